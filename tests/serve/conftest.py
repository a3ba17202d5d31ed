"""Fixtures for the server tests: a tiny run folder, a second adapter, a server on an ephemeral loopback port.

The tiny model never ends on its own (the end tokens' output rows are zero), so a
completion's length is its `max_new_tokens` unless a stop string cuts it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_helpers import make_app, never_ending, running, save_adapter
from tests import tiny


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models run on one thread here (see tests/conftest.py)."""


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, _tiny_tokenizer_session) -> Path:
    """A run folder (config.yaml, tokenizer, adapter) on a tiny Llama that trained on SPM too."""
    from fimtune.config import load_run_config, save_config

    tok = _tiny_tokenizer_session
    root = tmp_path_factory.mktemp("serve")
    base = tiny.save_model_folder(never_ending(tiny.llama(len(tok)), tok), tok, root / "base")
    run = root / "run"
    run.mkdir()
    cfg = load_run_config(None, [f"output_dir={run}", f"model.name_or_path={base}", "fim.spm_rate=0.5"])
    save_config(cfg, run / "config.yaml")
    tok.save_pretrained(run / "tokenizer")
    save_adapter(base, run / "adapter", seed=1)
    return run


@pytest.fixture(scope="session")
def other_adapter(tiny_run) -> Path:
    """A second adapter folder for the same base (`--adapter other=PATH`)."""
    return save_adapter(tiny_run.parent / "base", tiny_run.parent / "other", seed=2)


@pytest.fixture(scope="session")
def server(tiny_run, other_adapter) -> Iterator[tuple[str, object]]:
    """(base URL, engine) of a server on the tiny run with `other` as a second adapter."""
    app = make_app(tiny_run, [f"other={other_adapter}"])
    with running(app) as url:
        yield url, app.state.service.engine


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=30) as c:
        yield c
