"""Fixtures of the corpus tests: tiny real trees on disk (helpers live in corpus_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from corpus_helpers import code, git_repo, notebook, write


@pytest.fixture
def mixed_tree(tmp_path: Path) -> Path:
    """A folder holding a git repo, a notebook, a binary, a huge file and a .gitignore."""
    root = tmp_path / "tree"
    git_repo(
        root / "myrepo", {"pkg/core.py": code("core"), "pkg/io.py": code("io"), "README.md": "# My repo\n\nIt adds.\n"}
    )
    write(root, "app/main.py", code("main"))
    write(root, "app/util.py", code("util"))
    write(
        root,
        "app/analysis.ipynb",
        notebook([("markdown", "# Notes"), ("code", "!pip install x"), ("code", code("nb"))]),
    )
    write(root, "app/logo.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    write(root, "app/blob.dat.py", b"\x00\x01\x02binary")
    with open(root / "app/huge.py", "wb") as f:  # sparse: 3 MB of apparent size, no disk used
        f.truncate(3_000_000)
    write(root, ".gitignore", "build/\n*.log\n")
    write(root, "build/gen.py", code("gen"))
    write(root, "app/debug.log", "log line\n")
    return root
