"""Helpers that write tiny real corpora for the corpus tests (imported by conftest.py and tests)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from fimtune.config import CorpusConfig
from fimtune.corpus.build import build_corpus

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def write(root: Path, rel: str, content: str | bytes) -> Path:
    """Write ``content`` at ``root/rel``, creating folders."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def code(name: str, lines: int = 12) -> str:
    """A small, distinct, realistic Python file (passes every quality filter)."""
    body = "\n".join(f"    total_{name}_{i} = compute_{name}(value_{i}, factor={i}) + offset_{i}" for i in range(lines))
    return f'"""Module {name}."""\n\n\ndef run_{name}(value):\n{body}\n    return value\n'


def notebook(cells: list[tuple[str, str]], language: str = "python") -> str:
    """The JSON of a notebook with (cell_type, source) cells."""
    return json.dumps(
        {
            "metadata": {"kernelspec": {"language": language, "name": language}},
            "nbformat": 4,
            "nbformat_minor": 5,
            "cells": [{"cell_type": t, "metadata": {}, "source": s.splitlines(keepends=True)} for t, s in cells],
        }
    )


def git_repo(root: Path, files: dict[str, str]) -> Path:
    """A real git repository at ``root`` with ``files`` committed."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        write(root, rel, content)
    env = {**os.environ, **GIT_ENV}
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "init"]):
        subprocess.run(["git", *cmd], cwd=root, env=env, check=True, capture_output=True)
    return root


def build(sources: list[str], out: Path, packages: list[str] | None = None, **fields) -> dict:
    """`build_corpus` without progress bars, config from keyword fields."""
    return build_corpus(sources, packages or [], [], CorpusConfig(**fields), out, progress=False)
