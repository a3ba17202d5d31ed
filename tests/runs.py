"""Helpers to train tiny runs in tests: a model folder, a config, a quiet fit, the metrics."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

from fimtune.config import load_run_config
from fimtune.train import fit
from tests import tiny

ROOT = Path(__file__).parents[1]


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


def run_script(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` (a path from the repository root) with this Python, one intra-op thread by
    default; fail the test with the end of its output unless it exits 0."""
    proc = subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env if env is not None else {**os.environ, "OMP_NUM_THREADS": "1"},  # inductor needs PATH's compiler
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc
