"""A corpus of hostile files builds: every bad file is counted, nothing crashes, good files survive."""

import json
import os

from corpus_helpers import code, write

from fimtune.cli import main


def test_hostile_tree_builds_with_every_bad_file_counted(tmp_path, capsys):
    root = tmp_path / "hostile"
    write(root, "good/a.py", code("alpha"))
    write(root, "good/b.py", code("beta"))
    write(root, "binary_named.py", b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 64)  # NUL bytes
    write(root, "latin1.py", "caf\xe9 = 1\n".encode("latin-1") * 50)  # invalid UTF-8
    with open(root / "huge.py", "wb") as f:  # 50 MB, sparse: never read whole
        f.truncate(50 * 1024 * 1024)
    (root / "loop").mkdir()
    os.symlink(root / "loop", root / "loop" / "again")  # a symlink loop
    os.symlink(root / "missing.py", root / "dangling.py")  # a broken link
    write(root, "broken.ipynb", '{"cells": [ {"cell_type": "code", "source": ')  # truncated JSON
    write(root, "wrong.ipynb", json.dumps({"cells": "not a list"}))
    lone = '{"cells": [{"cell_type": "code", "source": "s = \'\\ud83d\'"}]}'  # half of a surrogate pair
    write(root, "surrogate.ipynb", lone)
    write(root, "deep.ipynb", "[" * 200_000 + "]" * 200_000)  # deeper than Python's JSON reader goes
    os.symlink("/proc/self/mem", root / "unreadable.py")  # a file whose read fails, also for root
    os.mkfifo(root / "pipe.py")  # would block a naive reader

    out = tmp_path / "out"
    assert main(["data", "build", str(root), "--out", str(out), "--quiet", "--validation-size", "1"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["kept"] == 2 and stats["files_seen"] == 12
    assert stats["skipped_files"] == {
        "binary": 1,  # NUL bytes behind a .py name
        "undecodable": 1,  # latin-1
        "too_large": 1,  # 50 MB, skipped by its size before any read
        "broken_symlink": 1,
        "malformed_notebook": 4,
        "unreadable": 2,  # a read that fails, a FIFO
    }
    assert stats["skipped_dirs"] == {"symlink_dir": 1}  # the loop is never followed
    assert stats["kept"] + sum(stats["skipped_files"].values()) == stats["files_seen"]
    assert "kept 2" in capsys.readouterr().out
