"""Helpers to train tiny runs in tests: a model folder, a config, a quiet fit, the metrics."""

import json
import warnings
from pathlib import Path

from fimtune.config import load_run_config
from fimtune.train import fit
from tests import tiny


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def model_dir(tmp_path: Path, tokenizer, family: str) -> Path:
    make = {"gpt_bigcode": tiny.gpt_bigcode, "llama": tiny.llama}[family]
    return tiny.save_model_folder(make(len(tokenizer)), tokenizer, tmp_path / f"base-{family}")


def run_config(tmp_path, base: Path, data: Path, name: str = "run", *extra: str):
    return load_run_config(
        None,
        [
            f"output_dir={tmp_path / name}",
            f"model.name_or_path={base}",
            f"data.path={data}",
            "packing.seq_length=64",
            "train.batch_size=4",
            "train.max_steps=40",
            "train.learning_rate=2e-2",
            "train.warmup_steps=2",
            "train.eval_every=10",
            "train.log_every=1",
            "train.save_every=10",
            "lora.r=8",
            "lora.alpha=16",
            *extra,
        ],
    )


def quiet_fit(cfg, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit(cfg, **kw)
