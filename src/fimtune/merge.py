"""`fimtune merge RUN --out DIR`: a standalone transformers model, LoRA merged in.

The merged folder holds the weights (safetensors, added FIM token rows included), the
config and the tokenizer; it loads with plain ``AutoModelForCausalLM.from_pretrained(DIR)``
and gives the logits of base + adapter. The adapter is merged in fp32, and the weights saved in
the run's `model.dtype` (`auto`: the base model's) unless ``--dtype`` names another. Its
generation config stops where fimtune's completions stop (the document separator and the FIM
tokens, or `complete`'s default of 128 new tokens), so `generate` and other servers end a
completion there too; its `fimtune.json` names the run's prompt layout, so `fimtune complete` and
`fimtune serve` of the folder lay out prompts as the run's (`--mode auto`). A quantized (QLoRA)
base is loaded unquantized for the merge, with transformers' default attention (the merge runs on
the CPU). A run with LoRA on tied embeddings (trained before `fimtune train` refused it) is
refused: merged, its change would land in both embeddings at once. The folder is written under a temporary name and renamed when complete;
with ``--overwrite`` the old folder is set aside first and comes back if the rename fails, so an
interrupt never loses both.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fimtune.errors import FimtuneError


def merge_run(run_dir: Path, out: Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Merge the adapter of ``run_dir`` into its base and save the result to ``out``, its weights in
    ``dtype`` (a `model.dtype` name; default: the run's, see :func:`saved_dtype`)."""
    from fimtune.checkpoint import umask_modes
    from fimtune.config import load_run_config
    from fimtune.generate import MERGED_INFO, FimPrompter, GenerationParams, prompt_mode
    from fimtune.model import require_run_dir, write_json

    require_run_dir(run_dir)
    cfg = load_run_config(run_dir / "config.yaml")
    out = checked_out(out, run_dir, cfg.model.name_or_path, overwrite)
    save_dtype = saved_dtype(dtype or cfg.model.dtype, cfg.model.name_or_path)
    merged, tokenizer = merged_model(run_dir)
    merged = merged.to(save_dtype)
    merged.generation_config.eos_token_id = FimPrompter(tokenizer).end_ids
    # as long as fimtune's completions may be, not transformers' default of 20 new tokens
    merged.generation_config.max_new_tokens = GenerationParams.max_new_tokens
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        umask_modes(tmp, tmp / "config.json")
        tokenizer.save_pretrained(tmp)
        # `complete` and `serve` lay out the merged model's prompts as the run's (`--mode auto`);
        # `export` finds the base's GGUF tokenizer metadata through `base_model`
        info = {"prompt_mode": prompt_mode("auto", run_dir), "base_model": cfg.model.name_or_path}
        write_json(tmp / MERGED_INFO, info)
        replace_folder(tmp, out, old)
    except Exception as e:  # disk full, quota, permissions (safetensors raises its own type for these)
        shutil.rmtree(tmp, ignore_errors=True)
        raise FimtuneError(f"could not write the merged model to '{out}' ({e}); '{out}' is as it was") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def merged_model(run_dir: Path) -> tuple[Any, Any]:
    """The model of run ``run_dir`` with its adapter merged in, in fp32 on the CPU, and the run's
    tokenizer: what `fimtune merge` saves and `fimtune export` writes as GGUF. A quantized (QLoRA)
    base is loaded unquantized, with transformers' default attention; LoRA on tied embeddings is
    refused (merged, its change would land in both embeddings at once)."""
    from fimtune.config import load_run_config
    from fimtune.model import load_run, lora_on_tied_embeddings, tied_embedding_names, tied_lora_problem

    cfg = load_run_config(run_dir / "config.yaml")
    model_cfg = replace(cfg.model, quantization="none", attn_implementation=None)
    # Merged in fp32 whatever the weights are saved in: W + BA is rounded once, at the end.
    loaded = load_run(run_dir, torch.device("cpu"), torch.float32, model_cfg=model_cfg)
    if on_tied := lora_on_tied_embeddings(loaded.model):
        tied = tied_embedding_names(loaded.model.get_base_model())
        raise FimtuneError(
            f"run '{run_dir}' has LoRA on {', '.join(on_tied)} (its lora.target_modules): "
            f"{tied_lora_problem(on_tied, tied)}; nothing was written: train the run again without "
            f"{', '.join(on_tied)} in lora.target_modules (fimtune now refuses it), then merge"
        )
    return loaded.model.merge_and_unload(), loaded.tokenizer


def saved_dtype(choice: str, base: str) -> torch.dtype:
    """The dtype a merged model is saved in: ``choice`` (`fp32`, `bf16`, `fp16`), or for `auto` the
    one the base model's config states (a bf16 base gives a bf16 model of its size), fp32 where it
    states none."""
    from fimtune.model import DTYPES, model_config

    if choice != "auto":
        return DTYPES[choice]
    stated = getattr(model_config(base), "dtype", None)
    if isinstance(stated, str):
        stated = getattr(torch, stated, None)
    return stated if stated in DTYPES.values() else torch.float32


def checked_out(out: Path, run_dir: Path, base: str, overwrite: bool) -> Path:
    """``out`` as an absolute path, once it is a place a merge may write: a clear error for a file,
    a link, a folder that holds the run or its base model (``--overwrite`` would delete them), or
    a non-empty folder without ``--overwrite``."""
    if out.is_symlink():
        raise FimtuneError(f"--out '{out}' is a symbolic link: give the folder it points to, or a new one")
    if out.exists() and not out.is_dir():
        raise FimtuneError(f"--out '{out}' is a file: give a folder")
    resolved = out.resolve()
    if resolved.parent == resolved:
        raise FimtuneError(f"--out '{out}' is the file system's root: give a folder for the merged model")
    keep = {"the run folder": run_dir.resolve()}
    if Path(base).exists():
        keep["the run's base model"] = Path(base).resolve()
    for what, path in keep.items():
        if path == resolved or resolved in path.parents:
            raise FimtuneError(f"--out '{out}' holds {what} ('{path}'), which the merge needs: choose another folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FimtuneError(f"'{out}' exists and is not empty: choose another --out or pass --overwrite")
        if keep["the run folder"] in resolved.parents:
            raise FimtuneError(f"--out '{out}' is a folder of the run: --overwrite would replace part of it")
    return resolved


def replace_folder(new: Path, out: Path, old: Path) -> None:
    """Rename folder ``new`` to ``out``; an ``out`` already there is renamed to ``old`` first, and back
    if the rename fails, then deleted."""
    moved = out.exists()
    if moved:
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        if moved and not out.exists():
            old.rename(out)
        raise
    if moved:
        shutil.rmtree(old, ignore_errors=True)
