"""`fimtune export RUN --out FILE.gguf`: the tuned model as one GGUF file, for llama.cpp, llama.vim,
llama.vscode and Ollama.

run folder (base + adapter) -> merged in fp32 (:func:`fimtune.merge.merged_model`, as `fimtune merge`)
  or a folder `fimtune merge` wrote -> loaded as it is
  -> weights under llama.cpp's tensor names, q/k rows permuted as llama.cpp's convert_hf_to_gguf.py
     permutes them, in f32, f16, bf16 or q8_0 (norms and other 1-D tensors stay f32)
  -> metadata: llama.* hyper-parameters, the byte-level BPE tokenizer (`tokenizer.ggml.model` gpt2)
     and the FIM token ids under `tokenizer.ggml.fim_{pre,suf,mid,pad,sep}_token_id` (and the older
     `prefix/suffix/middle_token_id`), which llama.cpp's `/infill` reads; EOT is the end of middle

Llama-architecture models only (`llama` in GGUF: SmolLM2, Llama, and what transformers loads as
`LlamaForCausalLM`); another one is refused before any weight is read. Byte-level BPE tokenizers
only: a SentencePiece one (Llama-2, CodeLlama) is refused. When the run's base was a GGUF file
(the embedded default), its tokenizer metadata is copied (its `pre`, token types, merges, special
ids, chat template) and the FIM tokens the run added are appended; otherwise `tokenizer.ggml.pre` is
`gpt-2` (GPT-2's split of text, what a plain `ByteLevel` pre-tokenizer does) or `smollm` (digits split
one by one first), and `gpt-2` with a warning for a pre-tokenizer fimtune does not recognise.

The file is written under a temporary name in the same folder and renamed when complete, so an
error, a full disk or Ctrl-C leaves no partial `.gguf`. What is verified: transformers loads the
file back (`gguf_file=`) with the merged model's logits and the tokenizer's ids; llama.cpp itself
is not run in the tests.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from fimtune.errors import FimtuneError

log = logging.getLogger(__name__)

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_GGUF_DTYPE = "f16"
ARCHITECTURE = "llama"  # the GGUF architecture written, and the transformers `model_type` accepted
UNSUPPORTED_HINT = "`fimtune merge RUN --out DIR`, then llama.cpp's convert_hf_to_gguf.py DIR"
# Looks special to llama.cpp's converter (`does_token_look_special`): an added token written so is CONTROL
SPECIAL_LOOKING = (("<|", "|>"), ("<｜", "｜>"))
# The tokens llama.cpp's repository-level infill puts between files (`fim_sep`), by FIM family
FILE_SEPARATORS = ("<file_sep>", "<|file_sep|>")
FIM_KEYS = frozenset(
    f"tokenizer.ggml.{k}_token_id"
    for k in ("fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_sep", "prefix", "suffix", "middle")
)


def export_gguf(
    source: Path, out: Path, dtype: str = DEFAULT_GGUF_DTYPE, overwrite: bool = False, progress: bool = True
) -> Path:
    """Write run folder (or merged model folder) ``source`` as one GGUF file ``out``."""
    if dtype not in GGUF_DTYPES:
        raise FimtuneError(f"--dtype {dtype}: choose one of {', '.join(GGUF_DTYPES)}")
    out = checked_gguf_out(out, overwrite)
    config, tokenizer, base_gguf, load = _source(source)
    if base_gguf is not None and base_gguf.resolve() == out:
        raise FimtuneError(f"--out '{out}' is the run's base model, which the run needs: choose another file")
    check_architecture(config, source)
    check_tokenizer(tokenizer, source)
    model = load()  # the heavy part: base + adapter merged in fp32
    from gguf import GGUFWriter

    # not tempfile.mkstemp: its files are 0600, and a model is read by others (a server's user, a team)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(8)}.tmp"
    writer = GGUFWriter(tmp, ARCHITECTURE)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # here, not before the checks: a refusal makes no folder
        add_model_metadata(writer, model, dtype, name=source.resolve().name)
        add_tokenizer_metadata(writer, tokenizer, model.get_input_embeddings().weight.shape[0], base_gguf)
        add_tensors(writer, model, dtype, progress)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.flush()
        for f in writer.fout or []:
            os.fsync(f.fileno())
        writer.close()
        os.replace(tmp, out)
    except OSError as e:  # a full disk, a quota, a file size limit
        writer.close()
        tmp.unlink(missing_ok=True)
        raise FimtuneError(f"could not write '{out}' ({e}); nothing was written") from e
    except BaseException:  # Ctrl-C, or an error: no partial .gguf left
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def checked_gguf_out(out: Path, overwrite: bool) -> Path:
    """``out`` as an absolute path once it is a `.gguf` file the export may write (its folder is made
    when the file is written)."""
    if out.suffix != ".gguf":
        raise FimtuneError(f"--out '{out}' must name a .gguf file (e.g. {out.with_suffix('.gguf').name})")
    if out.is_dir():
        raise FimtuneError(f"--out '{out}' is a folder: name a .gguf file")
    if out.exists() and not overwrite:
        raise FimtuneError(f"'{out}' exists: choose another --out or pass --overwrite")
    return out.resolve()


def _source(source: Path) -> tuple[Any, Any, Path | None, Any]:
    """(config, tokenizer, the base's GGUF file or None, a function loading the fp32 model) of a run
    folder or a model folder, read without its weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fimtune.hub import load_tokenizer
    from fimtune.model import check_has_adapter, is_run_dir, model_config

    if is_run_dir(source):
        from fimtune.config import load_run_config
        from fimtune.merge import merged_model
        from fimtune.model import run_tokenizer

        base = load_run_config(source / "config.yaml").model.name_or_path
        tokenizer = run_tokenizer(source)  # as load_run reads it
        return model_config(base), tokenizer, _gguf_file(base), lambda: merged_model(source)[0]
    check_has_adapter(source)
    if not (source / "config.json").is_file():
        raise FimtuneError(
            f"'{source}' is neither a run folder (config.yaml, adapter/) nor a model folder (config.json): "
            "pass a folder written by `fimtune train` or `fimtune merge`"
        )
    import torch

    from fimtune.generate import merged_info

    base = None
    with contextlib.suppress(FimtuneError):  # a damaged fimtune.json: the default tokenizer metadata
        base = merged_info(source).get("base_model")
    tokenizer = load_tokenizer(str(source))

    def load() -> Any:
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True).eval()

    return AutoConfig.from_pretrained(source), tokenizer, _gguf_file(base) if base else None, load


def _gguf_file(name_or_path: str) -> Path | None:
    """The GGUF file a base model name stands for (`embedded`, a `.gguf` path), if it still exists."""
    from fimtune.hub import resolve_model

    try:
        src = resolve_model(name_or_path)
    except FimtuneError:
        return None
    return Path(src.name_or_path) / src.gguf_file if src.gguf_file else None


def check_architecture(config: Any, source: Path) -> None:
    """Refuse, before any weight is read, a model this export does not write: another architecture,
    or a Llama with what the transformers GGUF loader would not carry (rope scaling, biases)."""
    kind = getattr(config, "model_type", "?")
    if kind != ARCHITECTURE:
        names = ", ".join(getattr(config, "architectures", None) or []) or kind
        raise FimtuneError(
            f"'{source}' is a {kind} model ({names}): `fimtune export` writes Llama-architecture models "
            f"(SmolLM2, Llama) only; for this one use {UNSUPPORTED_HINT}"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise FimtuneError(
            f"'{source}' uses rope scaling ({rope.get('rope_type')}), which `fimtune export` does not write; "
            f"use {UNSUPPORTED_HINT}"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise FimtuneError(
            f"'{source}' has attention or MLP biases, which `fimtune export` does not write; use {UNSUPPORTED_HINT}"
        )


def check_tokenizer(tokenizer: Any, source: Path) -> None:
    """Refuse a tokenizer that is not a byte-level BPE (GGUF `gpt2`): SentencePiece-style ones
    (Llama-2, CodeLlama: `▁` for spaces, byte fallback) are written differently."""
    model = _backend_json(tokenizer)["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback") or not _is_byte_level(tokenizer):
        raise FimtuneError(
            f"the tokenizer of '{source}' is not a byte-level BPE (it is a SentencePiece-style or "
            f"{model.get('type')} tokenizer), which `fimtune export` does not write; use {UNSUPPORTED_HINT}"
        )


@functools.lru_cache(maxsize=1)  # read by the checks, the pre-tokenizer's name and the merges: parsed once
def _backend_json(tokenizer: Any) -> dict[str, Any]:
    from fimtune.tokenization import fast_backend

    return json.loads(fast_backend(tokenizer).to_str())


def _pre_tokenizers(tokenizer: Any) -> list[dict[str, Any]]:
    pre = _backend_json(tokenizer).get("pre_tokenizer") or {}
    return pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]


def _is_byte_level(tokenizer: Any) -> bool:
    return any(p.get("type") == "ByteLevel" for p in _pre_tokenizers(tokenizer))


def default_pre(tokenizer: Any) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE that came with no GGUF: `gpt-2` for a plain
    `ByteLevel` pre-tokenizer (GPT-2's regex), `smollm` when digits are split one by one before it
    (SmolLM's tokenizer.json); `gpt-2`, with a warning, for any other."""
    kinds = [(p.get("type"), p.get("use_regex", True), p.get("individual_digits")) for p in _pre_tokenizers(tokenizer)]
    if kinds == [("ByteLevel", True, None)]:
        return "gpt-2"
    if kinds == [("Digits", True, True), ("ByteLevel", True, None)]:
        return "smollm"
    log.warning(
        "tokenizer.ggml.pre: the tokenizer's pre-tokenizer (%s) is not one fimtune recognises; writing 'gpt-2', "
        "so llama.cpp may split text other than the model was trained on",
        ", ".join(str(k[0]) for k in kinds),
    )
    return "gpt-2"


# --------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------


def add_model_metadata(writer: Any, model: Any, dtype: str, name: str) -> None:
    """general.* and llama.* keys, named as transformers' GGUF loader and llama.cpp read them."""
    from gguf import GGML_QUANT_VERSION, LlamaFileType

    c = model.config
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    writer.add_name(name)
    writer.add_vocab_size(model.get_input_embeddings().weight.shape[0])
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float((getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    if head_dim != c.hidden_size // heads:  # llama.cpp assumes hidden_size / heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    file_type = {
        "f32": LlamaFileType.ALL_F32,
        "f16": LlamaFileType.MOSTLY_F16,
        "bf16": LlamaFileType.MOSTLY_BF16,
        "q8_0": LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_file_type(file_type[dtype])
    writer.add_quantization_version(GGML_QUANT_VERSION)


def token_types(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """The tokens by id and their llama.cpp types, as convert_hf_to_gguf.py gives them: an added token
    CONTROL when special (or written like `<|...|>`), else USER_DEFINED; the others NORMAL; ids the
    tokenizer has no token for (embeddings padded past it) `[PAD{id}]`, UNUSED."""
    from gguf import TokenType

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        token = by_id[i]
        tokens.append(token)
        if i not in added:
            types.append(TokenType.NORMAL)
        elif added[i].special or any(token.startswith(a) and token.endswith(b) for a, b in SPECIAL_LOOKING):
            types.append(TokenType.CONTROL)
        else:
            types.append(TokenType.USER_DEFINED)
    return tokens, [int(t) for t in types]


def add_tokenizer_metadata(writer: Any, tokenizer: Any, vocab_size: int, base_gguf: Path | None) -> None:
    """The tokenizer as llama.cpp reads a byte-level BPE, then the FIM ids and the end of middle."""
    from gguf import GGUFValueType, Keys

    tokens, types = token_types(tokenizer, vocab_size)
    copied = base_tokenizer_fields(base_gguf) if base_gguf is not None else {}
    if copied:
        base_tokens = copied.pop(Keys.Tokenizer.LIST)[0]
        base_types = copied.pop(Keys.Tokenizer.TOKEN_TYPE)[0]
        if (
            wrong := next((i for i, t in enumerate(base_tokens) if i >= len(tokens) or tokens[i] != t), None)
        ) is not None:
            raise FimtuneError(
                f"the tokenizer does not match its base GGUF '{base_gguf}' (token {wrong}: "
                f"{base_tokens[wrong]!r} there): was the base replaced since training?"
            )
        tokens, types = base_tokens + tokens[len(base_tokens) :], base_types + types[len(base_tokens) :]
        for key, (value, vtype, sub_type) in copied.items():
            writer.add_key_value(key, value, vtype, sub_type)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(default_pre(tokenizer))
        writer.add_token_merges(_merges(tokenizer))
        for key, token_id in (
            (Keys.Tokenizer.BOS_ID, tokenizer.bos_token_id),
            (Keys.Tokenizer.EOS_ID, tokenizer.eos_token_id),
            (Keys.Tokenizer.UNK_ID, tokenizer.unk_token_id),
            (Keys.Tokenizer.PAD_ID, tokenizer.pad_token_id),
        ):
            if token_id is not None:
                writer.add_uint32(key, int(token_id))
        writer.add_add_bos_token(_adds_bos(tokenizer))
        if isinstance(getattr(tokenizer, "chat_template", None), str):
            writer.add_chat_template(tokenizer.chat_template)
    writer.add_token_list(tokens)
    writer.add_key_value(Keys.Tokenizer.TOKEN_TYPE, types, GGUFValueType.ARRAY, GGUFValueType.INT32)
    add_fim_metadata(writer, tokenizer, eot=Keys.Tokenizer.EOT_ID not in copied)


def add_fim_metadata(writer: Any, tokenizer: Any, eot: bool) -> None:
    """FIM ids under llama.cpp's keys (new and deprecated names); EOT (when ``eot``): the document
    separator, which ends a middle in fimtune's training, so llama.cpp stops there."""
    from gguf import Keys

    from fimtune.tokens import document_separator_id, find_fim_tokens

    names = find_fim_tokens(tokenizer)
    if names is None:
        log.warning("the tokenizer has no FIM tokens: llama.cpp's /infill will refuse this model")
        return
    vocab = tokenizer.get_vocab()
    T = Keys.Tokenizer
    ids = {
        (T.FIM_PRE_ID, T.PREFIX_ID): names.prefix,
        (T.FIM_SUF_ID, T.SUFFIX_ID): names.suffix,
        (T.FIM_MID_ID, T.MIDDLE_ID): names.middle,
        (T.FIM_PAD_ID,): names.pad,
        (T.FIM_SEP_ID,): next((s for s in FILE_SEPARATORS if s in vocab), None),
    }
    for keys, name in ids.items():
        for key in keys if name is not None else ():
            writer.add_uint32(key, int(vocab[name]))
    if eot:
        writer.add_eot_token_id(document_separator_id(tokenizer))


def base_tokenizer_fields(path: Path) -> dict[str, tuple[Any, Any, Any]]:
    """The tokenizer.* fields of GGUF file ``path``: key -> (value, type, array item type)."""
    from gguf import GGUFReader, GGUFValueType

    fields = {}
    for key, field in GGUFReader(path).fields.items():
        if key.startswith("tokenizer.") and key not in FIM_KEYS:  # the run's FIM ids are written after
            array = field.types[0] == GGUFValueType.ARRAY
            fields[key] = (field.contents(), field.types[0], field.types[-1] if array else None)
    if fields.get("tokenizer.ggml.model", (None,))[0] != "gpt2":
        raise FimtuneError(f"the base GGUF '{path}' has no byte-level BPE (gpt2) tokenizer to copy")
    return fields


def _merges(tokenizer: Any) -> list[str]:
    merges = _backend_json(tokenizer)["model"].get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer.encode("a")[:1] == [bos] != tokenizer.encode("a", add_special_tokens=False)[:1]


# --------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------


def add_tensors(writer: Any, model: Any, dtype: str, progress: bool) -> None:
    """Every weight under its llama.cpp name, converted to ``dtype`` (a progress bar over tensors).
    A tied output head is not written: llama.cpp and transformers read its absence as tied."""
    from gguf import MODEL_ARCH, get_tensor_name_map
    from tqdm.auto import tqdm

    from fimtune.model import tied_embeddings

    c = model.config
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, c.num_hidden_layers)
    skip = {"lm_head.weight"} if tied_embeddings(model) else set()
    state = {k: v for k, v in model.state_dict().items() if k not in skip}
    for hf_name, tensor in tqdm(state.items(), desc="export", unit="tensor", disable=not progress, dynamic_ncols=True):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise FimtuneError(f"tensor {hf_name} has no name in llama.cpp's Llama layout; use {UNSUPPORTED_HINT}")
        data = tensor.detach().float().numpy()
        if ".attn_q." in name:
            data = permute_rows(data, heads)
        elif ".attn_k." in name:
            data = permute_rows(data, kv_heads)
        data, qtype = encode(data, dtype, name)
        writer.add_tensor(name, data, raw_dtype=qtype)


def permute_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    """q (``heads``: the query heads) or k (the key/value heads) rows from transformers' rotary layout
    (each head's two halves) to llama.cpp's (interleaved pairs), as convert_hf_to_gguf.py's
    `LlamaModel.permute`; transformers' GGUF loader undoes it.
    (rows, cols) -> (heads, 2, rows/heads/2, cols) -> swap axes 1 and 2 -> (rows, cols)."""
    split = weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
    return split.swapaxes(1, 2).reshape(weights.shape)


def encode(data: np.ndarray, dtype: str, name: str) -> tuple[np.ndarray, Any]:
    """(array, GGML type or None for plain numpy dtypes) of fp32 tensor ``data`` in ``dtype``: 1-D
    tensors (norms) stay f32, as llama.cpp's converter keeps them; a row q8_0 cannot cut into blocks of
    32 falls back to f16, as there."""
    from gguf import GGMLQuantizationType, quants

    if dtype == "f32" or data.ndim == 1:
        return data.astype(np.float32), None
    if dtype == "f16":
        return data.astype(np.float16), None
    qtype = GGMLQuantizationType.BF16 if dtype == "bf16" else GGMLQuantizationType.Q8_0
    try:
        return quants.quantize(data, qtype), qtype
    except quants.QuantError as e:
        log.warning("%s: %s; written in f16", name, e)
        return data.astype(np.float16), None
