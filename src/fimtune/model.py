"""Load a base model, add FIM tokens, attach LoRA: the only place that knows model families.

base (Hub id | folder | .gguf | embedded) -> dtype / attention / 4-bit or 8-bit
  -> FIM tokens: reuse the tokenizer's, else add them, resize, train only the new rows
  -> PEFT LoRA on the family's target modules (warn about names that match nothing)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import secrets
import shutil
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from fimtune.checkpoint import umask_modes
from fimtune.config import LoraConfig, ModelConfig
from fimtune.errors import FimtuneError
from fimtune.fim import FimTokens
from fimtune.hub import ModelSource, gguf_error, hub_error, load_tokenizer, offline_path, resolve_model
from fimtune.tokenization import CACHE_ENV, cache_home, discard_entry, remove_stale_temporaries

log = logging.getLogger(__name__)

# LoRA targets by `config.model_type` (the recipe's for GPTBigCode); anything else: all-linear.
DEFAULT_TARGETS: dict[str, list[str]] = {"gpt_bigcode": ["c_proj", "c_attn", "q_attn", "c_fc"]}

# Config values of models a person may want to plan for offline (`fimtune train --dry-run`).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "bigcode/starcoderbase-1b": {
        "model_type": "gpt_bigcode",
        "n_embd": 2048,
        "n_layer": 24,
        "n_head": 16,
        "n_inner": 8192,
        "n_positions": 8192,
        "vocab_size": 49152,
        "multi_query": True,
        "activation_function": "gelu_pytorch_tanh",
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """`auto` -> bf16 on GPUs that have it, fp16 on other GPUs, fp32 on CPUs."""
    if choice != "auto":
        return DTYPES[choice]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_attn_implementation(device: torch.device, training: bool = False) -> str:
    """FlashAttention-2 (the `flash-attn` package) when installed on a CUDA device; for training
    there, else PyTorch's variable-length FlashAttention (`varlen`); else PyTorch SDPA.

    FlashAttention-4 (`flash-attn-4`) is installed under the same module name, `flash_attn`, and is
    no FlashAttention-2: transformers' own check tells the two apart."""
    from transformers.utils import is_flash_attn_2_available

    from fimtune.fast import varlen_supported

    if device.type == "cuda" and is_flash_attn_2_available():
        return "flash_attention_2"
    if training and varlen_supported(device):
        return "varlen"
    return "sdpa"


def attn_implementation(choice: str | None, device: torch.device, training: bool = False) -> str | None:
    """The name transformers is given: ``varlen`` is registered under fimtune's own name. SDPA by
    default is transformers' own default (None), which gives way to eager attention in models that
    have no SDPA (GPT-Neo, BLOOM, MPT); named, it is an error there."""
    if choice is None and (choice := default_attn_implementation(device, training)) == "sdpa":
        return None
    if choice == "varlen":
        from fimtune.fast import register_varlen

        return register_varlen()
    return choice


def materialize_gguf(src: ModelSource) -> Path:
    """Dequantize a GGUF model once into a plain transformers folder (safetensors), cached.

    transformers dequantizes GGUF weights at every load (about 15 s for SmolLM2-135M on a
    CPU); the cached folder loads in about a second and is what later loads use. Its key holds
    the transformers version that wrote it: the config is written in that version's format (5.x's
    `rope_parameters`, which 4.x reads as the default rope_theta), and the cache is shared by
    every environment of the user.
    """
    import transformers

    gguf = Path(src.name_or_path) / str(src.gguf_file)
    st = gguf.stat()
    stamp = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}:transformers-{transformers.__version__}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    out = cache_home() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    if out.exists():  # a file of it deleted since (a user's cleanup)
        discard_entry(out)
    from transformers import AutoModelForCausalLM

    log.info("dequantizing %s once into %s", gguf, out)
    try:
        model = AutoModelForCausalLM.from_pretrained(src.name_or_path, gguf_file=src.gguf_file, dtype=torch.float32)
    except (OSError, ValueError, struct.error) as e:  # struct.error, a reshape's ValueError: a file cut short
        raise gguf_error(gguf, e) from None
    # The weights are plain tensors once dequantized: drop the GGUF marker so they save normally.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out.parent)  # a copy a killed process left half-written: a whole model's size
        # a folder of its own: another process's (another container's pid 1 too) is never touched;
        # not tempfile.mkdtemp: its folders are 0700, and a cache shared by a team is read by the others
        tmp = out.parent / f".{out.name}.{secrets.token_hex(8)}"
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        umask_modes(tmp, tmp / "config.json")
        load_tokenizer(_label(src)).save_pretrained(tmp)
    except BaseException as e:  # an interrupt or a full disk: no half-written copy left in the cache
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a read-only or full cache folder
            raise FimtuneError(
                f"could not write the dequantized copy of GGUF file '{gguf}' to {out.parent} ({e}); "
                f"set {CACHE_ENV} to a writable folder with room for it"
            ) from None
        raise
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _label(src: ModelSource) -> str:
    return str(Path(src.name_or_path) / src.gguf_file) if src.gguf_file else src.name_or_path


def load_base_model(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None = None, training: bool = False
) -> Any:
    """The base causal LM on ``device``: dtype, attention and quantization from ``cfg``.

    Weights load from safetensors only (pickled ones can run code): a folder with only `.bin`
    files is refused with what to do.
    """
    from transformers import AutoModelForCausalLM

    from fimtune.generate import require_safetensors

    dtype = dtype or resolve_dtype(cfg.dtype, device)
    src = resolve_model(cfg.name_or_path)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": attn_implementation(cfg.attn_implementation, device, training),
        "trust_remote_code": cfg.trust_remote_code,
        "use_safetensors": True,
    }
    if cfg.quantization != "none":
        kwargs["quantization_config"] = quantization_config(cfg.quantization, device)
        kwargs["device_map"] = {"": device.index or 0}
    path = str(materialize_gguf(src)) if src.gguf_file else src.name_or_path
    local = Path(path).exists()
    where = path if local else offline_path(path)
    require_safetensors(Path(where), "model folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except SafetensorError as e:  # a truncated or overwritten weights file: a traceback from deep in transformers
        raise FimtuneError(damaged_weights(where, e, cached=bool(src.gguf_file))) from None
    except OSError as e:
        if src.gguf_file:  # fimtune's own copy, a file of it cut short
            raise FimtuneError(damaged_weights(where, e, cached=True)) from None
        if local:
            raise FimtuneError(f"could not load model from '{path}': {e}") from None
        raise hub_error(cfg.name_or_path, e) from None
    return model if cfg.quantization != "none" else model.to(device)


def damaged_weights(folder: str | Path, err: Exception, cached: bool = False) -> str:
    """The message for a safetensors file in ``folder`` that cannot be read (cut short by a full disk
    or an interrupted copy); ``cached``: fimtune's dequantized copy of a GGUF file, written again once deleted."""
    if cached:
        return (
            f"fimtune's dequantized copy of a GGUF file in '{folder}' is damaged ({type(err).__name__}: {err}): "
            "delete that folder: the next load writes it again"
        )
    return f"the weights in '{folder}' are damaged ({type(err).__name__}: {err}): copy or download it again"


def quantization_config(kind: str, device: torch.device) -> Any:
    """bitsandbytes config for QLoRA: 4-bit NF4 with double quantization, or 8-bit."""
    if device.type != "cuda":
        raise FimtuneError(
            f"model.quantization={kind} needs a CUDA GPU (bitsandbytes); on this {device.type} pass model.quantization=none"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise FimtuneError("model.quantization needs bitsandbytes: pip install 'fimtune[gpu]'")
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


# --------------------------------------------------------------------------------------
# FIM tokens and LoRA
# --------------------------------------------------------------------------------------


def add_token_rows(model: Any, tokenizer: Any, added: list[str], fim: FimTokens | None = None) -> list[int]:
    """Give the embeddings a row for every token of ``tokenizer``; return the ids of the rows to
    train: the tokens ``added``, and ``fim``'s tokens that the model had no row for. A tokenizer may
    hold FIM tokens its model lacks: CodeLlama-34b's and the -Python models' tokenizers add
    ``▁<PRE>``, ``▁<MID>``, ``▁<SUF>``, ``▁<EOT>`` past their 32,000 rows (their ids were an
    IndexError, on a GPU a device-side assert). New rows, and added tokens that land on rows a model
    has past its tokenizer's (embeddings padded to a multiple), start at the mean of the known rows:
    the same rows at every load, so a run's base (its adapter disabled) is the same model each time."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        from transformers.utils import logging as hf_logging

        # transformers' mean-resizing draws the new rows around the mean (unseeded at a run's load:
        # `eval`'s base moved between loads); they are set to the mean below, but its draws are kept
        # so that a training run's random stream, and so its LoRA init, stays as it was. Its notice
        # ("to disable this, use `mean_resizing=False`") names a choice fimtune made, not the user.
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        finally:
            hf_logging.set_verbosity(level)
    ids = {tokenizer.convert_tokens_to_ids(t) for t in added}
    padded = sorted(i for i in ids if i < rows)  # rows past the tokenizer's (Pythia, Phi-2): never trained
    if fresh := padded + list(range(rows, len(tokenizer))):
        known = min(rows, len(tokenizer) - len(added))  # the rows of the tokens the model was trained with
        with torch.no_grad():
            for embedding in {model.get_input_embeddings(), model.get_output_embeddings()} - {None}:
                embedding.weight[fresh] = embedding.weight[:known].mean(0).to(embedding.weight.dtype)
    if fim is not None:
        ids |= {i for i in (fim.prefix, fim.middle, fim.suffix, fim.pad) if i >= rows}
    return sorted(ids)


def module_names(model: Any) -> list[str]:
    """Distinct last components of the names of modules that hold a weight."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if getattr(m, "weight", None) is not None}
    return sorted(names)


def resolve_target_modules(model: Any, targets: list[str] | None) -> list[str] | str:
    """The LoRA targets for ``model``: the family's default or the user's, checked.

    A name matches as PEFT matches it: a module's name or its end after a dot (`c_proj`: every
    `c_proj`; `attn.c_proj`: the attention's alone). Names that match no module are named in a
    warning beside the names that exist (the recipe's `q_attn` matches nothing in
    StarCoderBase-1B); if none match, an error.
    """
    if targets is None:
        targets = DEFAULT_TARGETS.get(getattr(model.config, "model_type", ""))
        if targets is None:
            return "all-linear"
    if targets in (["all-linear"], "all-linear"):
        return "all-linear"
    existing = module_names(model)
    full = [n for n, m in model.named_modules() if getattr(m, "weight", None) is not None]
    found = {t for t in targets if any(n == t or n.endswith("." + t) for n in full)}
    missing = [t for t in targets if t not in found]
    matched = [t for t in dict.fromkeys(targets) if t in found]
    if not matched:
        raise FimtuneError(
            f"lora.target_modules={','.join(targets)} matches no module of this model; "
            f"its modules are: {', '.join(existing)}"
        )
    if missing:
        warnings.warn(
            f"lora.target_modules: {', '.join(missing)} {'matches' if len(missing) == 1 else 'match'} no module "
            "and is ignored "
            f"(modules here: {', '.join(existing)})",
            stacklevel=2,
        )
    tied = tied_embedding_names(model)
    if on_tied := [t for t in matched if t.rsplit(".", 1)[-1] in tied]:
        raise FimtuneError(
            f"lora.target_modules={','.join(targets)}: {tied_lora_problem(on_tied, tied)}; drop "
            f"{', '.join(on_tied)} from lora.target_modules (the tied head trains through the input "
            "embeddings' rows: the added FIM tokens' rows train there)"
        )
    return matched


def tied_embeddings(model: Any) -> bool:
    """Whether ``model``'s input and output embeddings share their weight (PEFT-wrapped or not)."""
    out = model.get_output_embeddings()
    return out is not None and not {id(p) for p in out.parameters()}.isdisjoint(
        id(p) for p in model.get_input_embeddings().parameters()
    )


def tied_embedding_names(model: Any) -> list[str]:
    """The names of ``model``'s input and output embeddings (``["wte", "lm_head"]``) when they are
    tied, else []."""
    if not tied_embeddings(model):
        return []
    return [_child_name(model, model.get_input_embeddings()), _child_name(model, model.get_output_embeddings())]


def lora_on_tied_embeddings(peft_model: Any) -> list[str]:
    """The tied embeddings of a PEFT model that carry LoRA layers (runs trained before fimtune
    refused them): merging folds their change into the one shared matrix."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    if not tied_embeddings(base):
        return []
    embeddings = (base.get_input_embeddings(), base.get_output_embeddings())
    return [_child_name(base, e) for e in embeddings if any(isinstance(m, LoraLayer) for m in e.modules())]


def tied_lora_problem(on_tied: list[str], tied: list[str]) -> str:
    """Why LoRA on ``on_tied``, modules of the tied embeddings ``tied`` (input, output), gives a
    wrong merged model."""
    return (
        f"LoRA on {', '.join(on_tied)} changes this model's input and output embeddings at once "
        f"({' and '.join(tied)} are tied: one matrix), so a merged model's logits would not be base + adapter"
    )


def attach_lora(model: Any, cfg: LoraConfig, new_token_ids: list[int]) -> Any:
    """Wrap ``model`` with PEFT LoRA; added tokens' rows train too (only those rows when tied)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    extra: dict[str, Any] = {}
    if new_token_ids:
        if tied_embeddings(model):
            extra["trainable_token_indices"] = new_token_ids
        else:  # PEFT ties only tied heads to the trainable-token rows: train both matrices
            extra["modules_to_save"] = [
                _child_name(model, model.get_input_embeddings()),
                _child_name(model, model.get_output_embeddings()),
            ]
    targets = resolve_target_modules(model, cfg.target_modules)
    peft_cfg = PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias=cfg.bias,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        **extra,
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:  # a module LoRA cannot adapt (a norm: `ln_1`, `input_layernorm`)
        names = targets if isinstance(targets, str) else ",".join(targets)
        raise FimtuneError(f"lora.target_modules={names}: {e}") from None


def _child_name(model: Any, module: Any) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name.rsplit(".", 1)[-1]
    raise FimtuneError("could not find the embedding module by name")


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# --------------------------------------------------------------------------------------
# Planning without weights (`fimtune train --dry-run`)
# --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a run will train, computed on the meta device (no weights, no network)."""

    model_type: str
    trainable: int
    total: int
    vocab_size: int
    added_tokens: list[str]


def model_config(name_or_path: str) -> Any:
    """A model's config without its weights: shipped values, a local folder, or the Hub cache."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if name_or_path in KNOWN_CONFIGS:
        values = dict(KNOWN_CONFIGS[name_or_path])
        return CONFIG_MAPPING[values.pop("model_type")](**values)
    src = resolve_model(name_or_path)
    if src.gguf_file:  # GGUF metadata only: no weights are read
        gguf = Path(src.name_or_path) / src.gguf_file
        try:
            st = gguf.stat()
        except OSError as e:
            raise gguf_error(Path(src.label), e) from None
        return copy.deepcopy(_gguf_config(str(gguf.resolve()), st.st_size, st.st_mtime_ns, src.label))
    try:
        return AutoConfig.from_pretrained(src.name_or_path if src.is_local else offline_path(src.name_or_path))
    except OSError as e:
        raise hub_error(name_or_path, e) from None


@functools.cache
def _gguf_config(path: str, size: int, mtime_ns: int, label: str) -> Any:
    """The config in a GGUF file's metadata, read once a process for the file as it is (``size`` and
    ``mtime_ns`` part of the key): its reader parses the whole vocabulary to get there (4 s for the
    embedded SmolLM2), and `train --dry-run` asks twice (its checks, its plan)."""
    from transformers import AutoConfig

    folder, name = os.path.split(path)
    try:
        return AutoConfig.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, struct.error) as e:
        raise gguf_error(Path(label), e) from None


def stated_positions(name_or_path: str) -> tuple[int | None, bool]:
    """:func:`position_limit` of a model from its config alone (built on the meta device, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return position_limit(AutoModelForCausalLM.from_config(model_config(name_or_path)))


def plan(model_cfg: ModelConfig, lora_cfg: LoraConfig, fim_tokens_to_add: list[str] | None = None) -> Plan:
    """Build the model on the meta device, attach LoRA, count what trains."""
    from transformers import AutoModelForCausalLM

    config = model_config(model_cfg.name_or_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    added = list(fim_tokens_to_add or [])
    vocab = config.vocab_size
    ids = list(range(vocab, vocab + len(added)))
    if added:
        model.resize_token_embeddings(vocab + len(added), mean_resizing=False)
    peft_model = attach_lora(model, lora_cfg, ids)
    trainable, total = count_parameters(peft_model)
    return Plan(getattr(config, "model_type", "?"), trainable, total, vocab, added)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------
# Loading for inference: a run folder (base + adapter) or a base model alone
# --------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """A model ready for inference: the PEFT model of a run (or a plain base model) and its tokenizer."""

    model: Any
    tokenizer: Any
    name: str
    run_dir: Path | None = None
    adapter: Path | None = None  # the adapter folder loaded (a run's `adapter` link, resolved once)


def position_limit(model: Any) -> tuple[int | None, bool]:
    """The positions ``model``'s config states, and whether they are learned embeddings (GPT-BigCode's
    `wpe`: a position past them is an IndexError, on a GPU a device-side assert) rather than rotary
    (past them it runs, on what it was not trained on)."""
    from fimtune.evaluate.variants import context_length

    limit = context_length(model)
    if limit is None:
        return None, False
    tokens = model.get_input_embeddings()
    learned = any(
        isinstance(m, torch.nn.Embedding) and m is not tokens and m.num_embeddings == limit for m in model.modules()
    )
    return limit, learned


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.yaml").is_file() and (p / "adapter" / "adapter_config.json").is_file()


def check_has_adapter(path: str | Path) -> None:
    """Refuse a run folder whose training saved no checkpoint yet (its config.yaml, no adapter), which
    is neither a run to load nor a model."""
    if (Path(path) / "config.yaml").is_file() and not (Path(path) / "config.json").is_file():
        raise FimtuneError(
            f"run folder '{path}' has no adapter (adapter/adapter_config.json): its training stopped "
            "before the first checkpoint, or the folder was copied without checkpoints/; train it "
            "(`fimtune train --resume`) or give a run that saved one"
        )


def require_run_dir(path: str | Path) -> None:
    """Refuse what is not a run folder written by `fimtune train` (one without its first checkpoint
    yet is told so: :func:`check_has_adapter`)."""
    if is_run_dir(path):
        return
    check_has_adapter(path)
    raise FimtuneError(
        f"'{path}' is not a run folder (config.yaml and adapter/ are missing): pass a folder written by `fimtune train`"
    )


def load_for_inference(
    target: str | Path, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> Loaded:
    """A run folder (base + adapter, FIM tokens included) or a base model (`embedded`, a Hub id, ...).

    A base model that lacks FIM tokens gets them added (untrained rows), so prompts can be built.
    """
    from fimtune.tokens import ensure_fim_tokens

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if is_run_dir(target):
        return load_run(Path(target), device, dtype)
    check_has_adapter(target)
    from copy import deepcopy

    tokenizer = deepcopy(load_tokenizer(str(target)))
    fim, added = ensure_fim_tokens(tokenizer)
    model = load_base_model(ModelConfig(name_or_path=str(target)), device, dtype)
    add_token_rows(model, tokenizer, added, fim)
    return Loaded(model.eval(), tokenizer, str(target))


def inference_model_config(cfg: ModelConfig, device: torch.device) -> ModelConfig:
    """A run's model section for completions on ``device``: off a CUDA GPU, a quantized (QLoRA) base
    loads unquantized (bitsandbytes needs one; the adapter applies the same, as `fimtune merge`
    applies it) and FlashAttention kernels give way to transformers' default attention."""
    from dataclasses import replace

    if device.type == "cuda":
        return cfg
    if cfg.quantization != "none":
        log.info(
            "model.quantization=%s needs a CUDA GPU: loading the base unquantized on the %s",
            cfg.quantization,
            device.type,
        )
        cfg = replace(cfg, quantization="none")
    if (cfg.attn_implementation or "").startswith("flash_attention"):
        log.info(
            "model.attn_implementation=%s needs a CUDA GPU: transformers' default attention on the %s",
            cfg.attn_implementation,
            device.type,
        )
        cfg = replace(cfg, attn_implementation=None)
    return cfg


def _added_fim_tokens(name_or_path: str) -> list[str]:
    """The FIM token names training added to the tokenizer of base model ``name_or_path``."""
    from copy import deepcopy

    from fimtune.tokens import ensure_fim_tokens

    return ensure_fim_tokens(deepcopy(load_tokenizer(name_or_path)))[1]


BASE_BIASES = "_fimtune_base_biases"  # a run's model attribute: the base's biases its adapter trained over


def trained_biases(folder: Path) -> str:
    """Which biases the adapter in ``folder`` trained (`lora.bias`): "none", "all" or "lora_only"."""
    return json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("bias") or "none"


@contextlib.contextmanager
def as_base(model: Any) -> Iterator[Any]:
    """A run's model as its base model, while inside: the adapter disabled and, where it trained
    biases (`lora.bias=all|lora_only`), the base's own biases back. Those are the base layers' own
    parameters, which `disable_adapter()` leaves trained (PEFT warns so): the base of `fimtune eval`
    and `complete --compare-base` was not the base model."""
    saved: dict[torch.nn.Module, torch.Tensor] | None = getattr(model, BASE_BIASES, None)
    with contextlib.ExitStack() as stack:
        with warnings.catch_warnings():
            if saved:  # PEFT's warning that the biases stay: they are put back below
                warnings.filterwarnings("ignore", message="Careful, disabling adapter layers with bias")
            stack.enter_context(model.disable_adapter())
        if not saved:
            yield model
            return
        trained = {m: m.bias.detach().clone() for m in saved}
        with torch.no_grad():
            for m, bias in saved.items():
                m.bias.copy_(bias)
        try:
            yield model
        finally:
            with torch.no_grad():
                for m, bias in trained.items():
                    m.bias.copy_(bias)


def load_run(
    run_dir: Path, device: torch.device, dtype: torch.dtype | None = None, model_cfg: ModelConfig | None = None
) -> Loaded:
    """The base model of a run with its adapter attached (PEFT), and the run's tokenizer.

    ``model_cfg`` replaces the run's model section (e.g. to load a QLoRA base unquantized).
    """
    from fimtune.config import load_run_config
    from fimtune.tokens import STARCODER

    cfg = load_run_config(run_dir / "config.yaml")
    tokenizer = run_tokenizer(run_dir)
    model_cfg = model_cfg or inference_model_config(cfg.model, device)
    try:
        base = load_base_model(model_cfg, device, dtype)
    except FimtuneError as e:  # the user named the run, not this path: say where it comes from
        raise FimtuneError(
            f"{e}\n(the run's base model, `model.name_or_path` in {run_dir / 'config.yaml'}: "
            "if the base moved, set its new place there)"
        ) from None
    # The tuned model's added rows come from the adapter; the base (adapter disabled: `fimtune eval`,
    # `complete --compare-base`, the server's `base`) reads them as training started them, at the mean
    # of the known rows: resized rows, and padding rows the added tokens took (as `add_token_rows` did),
    # not at random or untrained values.
    # Added tokens take the tokenizer's last ids: only FIM names there, on rows the model had, may have
    # been added onto padding rows (the base's tokenizer tells; StarCoder's own FIM tokens are ids 1-4).
    names = STARCODER.names()
    rows = base.get_input_embeddings().weight.shape[0]
    last = tokenizer.convert_ids_to_tokens(list(range(max(len(tokenizer) - len(names), 0), len(tokenizer))))
    maybe = len(tokenizer) < rows + len(names) and set(last) & set(names)
    add_token_rows(base, tokenizer, _added_fim_tokens(model_cfg.name_or_path) if maybe else [])
    biases = None
    # the link resolved once: a run still training moves it on at each save, and PEFT reads the folder twice
    adapter = (run_dir / "adapter").resolve()
    if (adapter / "adapter_config.json").is_file() and trained_biases(adapter) != "none":
        biases = {
            m: m.bias.detach().clone()
            for m in base.modules()
            if isinstance(getattr(m, "bias", None), torch.nn.Parameter)
        }
    try:
        model, unfit = attach_adapter(base, adapter)
    except SafetensorError as e:
        raise FimtuneError(damaged_weights(adapter, e)) from None
    except torch.OutOfMemoryError:  # a RuntimeError, but no sign of another model
        raise
    except (ValueError, RuntimeError, KeyError) as e:  # no such modules, other shapes: another model there
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        reason = reason if len(reason) <= 300 else f"{reason[:200]} ... {reason[-100:]}"  # PEFT lists every module
        raise FimtuneError(
            f"the run's adapter does not fit its base model '{model_cfg.name_or_path}' (another model at that "
            f"place? `model.name_or_path` in {run_dir / 'config.yaml'}): {reason}"
        ) from None
    if unfit:  # PEFT loads what matches by name and leaves the rest: a model partly tuned, silently
        raise FimtuneError(
            f"the run's adapter does not fit its base model '{model_cfg.name_or_path}' (another model at that "
            f"place? `model.name_or_path` in {run_dir / 'config.yaml'}): {len(unfit)} weights without a place "
            f"or a value, e.g. {unfit[0]}"
        )
    if biases:
        setattr(model, BASE_BIASES, biases)  # the base's, for `as_base`
    return Loaded(model.eval(), tokenizer, run_dir.resolve().name, run_dir, adapter)  # `.`: the folder's own name


def run_tokenizer(run_dir: Path) -> Any:
    """A run's own tokenizer (its base's, the added FIM tokens included), from its `tokenizer/` folder.

    Missing, transformers took the path for a Hub id (a minute of retries offline); damaged, it was a
    JSON traceback. Each is one error: the run writes the folder again when it resumes."""
    from transformers import AutoTokenizer

    folder = run_dir / "tokenizer"
    again = f"`fimtune train --config {run_dir / 'config.yaml'} --resume` writes it again"
    if not folder.is_dir():
        raise FimtuneError(f"run '{run_dir}' has no tokenizer folder ({folder}): {again}")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:  # a JSON file cut short is a ValueError too
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FimtuneError(
            f"the run's tokenizer in '{folder}' is damaged ({type(e).__name__}: {reason}): {again}"
        ) from None


def attach_adapter(model: Any, folder: Path, name: str = "default") -> tuple[Any, list[str]]:
    """``model`` with the adapter in ``folder`` loaded as ``name`` (a plain model wrapped first, as
    `PeftModel.from_pretrained` does), and the adapter's weights that found no parameter or the
    adapter's parameters that got no weight: PEFT loads what matches by name and says nothing."""
    from peft import PeftConfig, PeftModel, get_peft_model

    if not isinstance(model, PeftModel):  # not `from_pretrained`, which keeps the load's result to itself
        config = PeftConfig.from_pretrained(str(folder))
        config.inference_mode = True
        model = get_peft_model(model, config, adapter_name=name)
    result = model.load_adapter(str(folder), adapter_name=name)
    # PEFT's missing keys are those naming the adapter anywhere: "y" is in "layers", for one
    return model, [*result.unexpected_keys, *(k for k in result.missing_keys if f".{name}." in k)]


def base_model(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (its LoRA layers, merged or not, included)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def forward_keywords(model: Any) -> tuple[str, bool]:
    """(the cache keyword of ``model``'s forward, whether it takes ``logits_to_keep``).

    transformers 5.24 renamed ``past_key_values`` to ``cache``; the PEFT wrapper's forward
    takes ``**kwargs``, so the inner model's signature is read.
    """
    forward = inspect.signature(base_model(model).forward).parameters
    return ("cache" if "cache" in forward else "past_key_values"), "logits_to_keep" in forward
