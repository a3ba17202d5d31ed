"""`fimtune merge RUN --out DIR`: a standalone transformers model, LoRA merged in.

The merged folder holds the weights (safetensors, added FIM token rows included), the
config and the tokenizer; it loads with plain ``AutoModelForCausalLM.from_pretrained(DIR)``
and gives the logits of base + adapter. A quantized (QLoRA) base is loaded unquantized for
the merge. The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch

from fimtune.errors import FimtuneError


def merge_run(run_dir: Path, out: Path, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Merge the adapter of ``run_dir`` into its base and save the result to ``out``."""
    from fimtune.config import load_run_config
    from fimtune.model import is_run_dir, load_run

    if not is_run_dir(run_dir):
        raise FimtuneError(
            f"'{run_dir}' is not a run folder (no config.yaml + adapter/): train one with `fimtune train`"
        )
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FimtuneError(f"'{out}' exists and is not empty: choose another --out or pass --overwrite")
    cfg = load_run_config(run_dir / "config.yaml")
    model_cfg = replace(cfg.model, quantization="none")
    loaded = load_run(run_dir, torch.device("cpu"), dtype or torch.float32, model_cfg=model_cfg)
    merged = loaded.model.merge_and_unload()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
