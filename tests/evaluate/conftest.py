"""Fixtures of the evaluation tests: whole Python files, a held-out corpus and a tiny trained run."""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

import pytest
from eval_helpers import whole_files
from tests.conftest import corpus_texts, train_tiny_tokenizer, write_dataset_dir


@pytest.fixture(scope="session")
def python_source() -> str:
    return inspect.getsource(textwrap)


@pytest.fixture(scope="session")
def eval_dataset_dir(tmp_path_factory) -> Path:
    """Training: repetitive 12-line chunks; validation: two whole modules and a file spelling a FIM token."""
    train = corpus_texts(12, lines_per_doc=12)[:10] * 4
    validation = [*whole_files()[:2], "s = '<fim_prefix>'\nt = 1\n"]
    return write_dataset_dir(tmp_path_factory.mktemp("eval-data") / "data", train, validation)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, eval_dataset_dir) -> Path:
    """A run folder trained for a few steps: a tiny Llama whose tokenizer lacked FIM tokens (like SmolLM2)."""
    import os

    import torch
    from tests.test_train import model_dir, quiet_fit, run_config

    tmp = tmp_path_factory.mktemp("eval-run")
    old, threads = os.environ.get("FIMTUNE_CACHE"), torch.get_num_threads()
    os.environ["FIMTUNE_CACHE"] = str(tmp / "cache")
    torch.set_num_threads(1)  # session-scoped: set up before the one-thread fixture applies
    try:
        base = model_dir(tmp, train_tiny_tokenizer(["<|endoftext|>"]), "llama")
        cfg = run_config(tmp, base, eval_dataset_dir, "run", "train.max_steps=16", "train.eval_every=8",
                         "train.save_every=0", "lora.dropout=0.0")  # fmt: skip
        return quiet_fit(cfg)
    finally:
        torch.set_num_threads(threads)
        if old is None:
            os.environ.pop("FIMTUNE_CACHE", None)
        else:
            os.environ["FIMTUNE_CACHE"] = old


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every evaluation test runs tiny models on one torch thread (see tests/conftest.py)."""
