"""`fimtune data build` end to end: in-process through `main`, and as the installed command."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
from corpus_helpers import build, code, git_repo, write

from fimtune.cli import main
from fimtune.corpus import build as build_module
from fimtune.errors import DataError

FIMTUNE = Path(sys.executable).with_name("fimtune")
COLUMNS = ["repo_id", "file_path", "language", "content", "size", "id"]


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(["data", "build", "--quiet", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith((name, f".{name}"))]


def test_mixed_tree_end_to_end(mixed_tree, tmp_path, capsys):
    out = tmp_path / "data" / "mine"
    rc, stdout, _ = run_main([str(mixed_tree), "--out", str(out)], capsys)
    assert rc == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped_files"] == {
        "blocked_suffix": 1,  # logo.png
        "binary": 1,  # blob.dat.py
        "too_large": 1,  # huge.py (3 MB, never read)
        "gitignore": 1,  # debug.log
        "unknown_language": 1,  # .gitignore itself
    }
    assert stats["skipped_dirs"] == {"git": 1, "gitignore": 1}  # myrepo/.git, build/
    assert stats["bytes_read"] < 100_000
    assert stats["repos"].keys() == {"tree", "myrepo"}
    assert stats["kept"] == 6 and stats["languages"]["python"]["files"] == 5
    assert stats["splits"]["train"]["files"] + stats["splits"]["validation"]["files"] == 6
    assert stats["estimated_tokens"] == round(stats["chars"] / 3.5) and "estimate" in stats["estimated_tokens_note"]
    dd = datasets.load_from_disk(str(out))
    assert set(dd) == {"train", "validation"} and dd["train"].column_names == COLUMNS
    rows = {r["file_path"]: r for split in dd.values() for r in split}
    assert rows["app/analysis.ipynb"]["content"] == code("nb") and rows["app/analysis.ipynb"]["language"] == "python"
    assert rows["pkg/core.py"]["repo_id"] == "myrepo"
    assert all(r["size"] == len(r["content"].encode()) for r in rows.values())
    for line in ("skipped files", "too_large", "languages", "repos", "validation", "estimated"):
        assert line in stdout
    assert leftovers(out.parent, "mine") == ["mine"]  # no temporary folders left


def test_installed_command_mixing_sources_and_no_torch(mixed_tree, tmp_path):
    """The console script, run as users run it: a folder, a file:// clone, a jsonl file and a package."""
    upstream = git_repo(tmp_path / "upstream", {"lib/x.py": code("upx"), "lib/y.py": code("upy")})
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"file_path": "t.py", "content": code("table")}) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    args = [str(mixed_tree), upstream.as_uri(), str(rows), "--package", "pathspec", "--out", str(out), "--seed", "3"]
    res = subprocess.run([str(FIMTUNE), "data", "build", *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "skipped files" in res.stdout and f"wrote {out}" in res.stdout
    assert "scanning" in res.stderr  # the progress bar
    stats = json.loads((out / "stats.json").read_text())
    assert [s["kind"] for s in stats["sources"]] == ["folder", "git", "table", "package"]
    assert {"upstream", "rows", "pathspec", "tree", "myrepo"} <= stats["repos"].keys()
    assert stats["config"]["seed"] == 3
    probe = (
        "import sys; from fimtune.cli import main; "
        f"rc = main(['data', 'build', '--quiet', {str(mixed_tree)!r}, '--out', {str(tmp_path / 'probe')!r}]); "
        "print(rc, 'torch' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip().splitlines()[-1] == "0 False", res.stderr


def test_missing_path_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "nope"
    res = subprocess.run(
        [str(FIMTUNE), "data", "build", str(missing), "--out", str(tmp_path / "o")], capture_output=True, text=True
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: source '{missing}' does not exist"]
    assert not (tmp_path / "o").exists()


def test_zero_usable_files_names_the_source(tmp_path, capsys):
    good, bad = tmp_path / "good", tmp_path / "bad"
    write(good, "a.py", code("a"))
    write(bad, "img.png", b"\x89PNG")
    write(bad, "empty.py", "")
    rc, _, err = run_main([str(good), str(bad), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2
    assert f"source '{bad}' has no usable files (2 seen; skipped: 1 blocked_suffix, 1 empty)" in err
    rc, _, err = run_main([str(tmp_path / "nothing_here_yet"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "does not exist" in err
    (tmp_path / "hollow").mkdir()
    rc, _, err = run_main([str(tmp_path / "hollow"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "holds no files" in err
    assert not (tmp_path / "o").exists()


def test_zero_usable_rows_and_a_folder_of_table_shards_say_what_to_pass(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    rc, _, err = run_main([str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and f"source '{tmp_path / 'empty.jsonl'}' holds no rows" in err
    write(tmp_path, "rows.jsonl", json.dumps({"content": 3}) + "\n")
    rc, _, err = run_main([str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "has no usable rows (1 seen; skipped: 1 malformed_row)" in err
    shards = tmp_path / "download"
    write(shards, "data/train-00000.jsonl", json.dumps({"content": code("a")}) + "\n")
    write(shards, "README.md", "")
    rc, _, err = run_main([str(shards), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "its 1 .parquet/.jsonl file(s) are read as tables only when named themselves" in err
    assert f"pass them as sources (e.g. {shards / 'data'}/*.jsonl) instead of their folder" in err
    assert not (tmp_path / "o").exists()


def test_symlink_loop_source(tmp_path, capsys):
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    rc, _, err = run_main([str(tmp_path / "loop"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and err.strip() == f"error: source '{tmp_path / 'loop'}' is a symlink loop"


def test_existing_out_needs_overwrite_and_must_be_a_build(tmp_path, capsys):
    write(tmp_path, "src/a.py", code("a"))
    write(tmp_path, "src/b.py", code("b"))
    out = tmp_path / "out"
    assert run_main([str(tmp_path / "src"), "--out", str(out)], capsys)[0] == 0
    rc, _, err = run_main([str(tmp_path / "src"), "--out", str(out)], capsys)
    assert rc == 2 and f"'{out}' already exists: pass --overwrite" in err
    assert run_main([str(tmp_path / "src"), "--out", str(out), "--overwrite"], capsys)[0] == 0
    rc, _, err = run_main([str(tmp_path / "src"), "--out", str(tmp_path / "src"), "--overwrite"], capsys)
    assert rc == 2 and "not a dataset folder written by fimtune: refusing" in err


def test_overwriting_a_link_to_a_build_leaves_no_hidden_link_behind(tmp_path, capsys):
    """`--out` a symlink to an earlier build: the link is replaced and the build it named stays,
    with no `.out.old-*` link left beside it (rmtree refuses links, and its error was ignored)."""
    write(tmp_path, "src/a.py", code("a"))
    assert run_main([str(tmp_path / "src"), "--out", str(tmp_path / "real")], capsys)[0] == 0
    (tmp_path / "out").symlink_to("real")
    assert run_main([str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--overwrite"], capsys)[0] == 0
    assert leftovers(tmp_path, "out") == ["out"] and not (tmp_path / "out").is_symlink()
    assert (tmp_path / "real" / "stats.json").is_file()


@pytest.mark.parametrize(
    "held",
    [
        {"stats.json": '{"my": "analytics numbers"}\n'},
        {"dataset_dict.json": '{"splits": ["train"]}'},
        {"dataset_dict.json": '{"splits": ["train"]}', "stats.json": '{"kept": 3}'},
        {"dataset_dict.json": '{"splits": ["train"]}', "stats.json": "not json"},
    ],
    ids=["stats_only", "dataset_dict_only", "foreign_stats", "unparsable_stats"],
)
def test_overwrite_refuses_a_folder_that_only_looks_like_a_build(tmp_path, capsys, held):
    write(tmp_path, "src/a.py", code("a"))
    project = tmp_path / "myproject"
    for name, text in {**held, "notes.txt": "years of work\n", "code.py": "print('precious')\n"}.items():
        write(project, name, text)
    before = {p.name: p.read_text() for p in project.iterdir()}
    rc, _, err = run_main([str(tmp_path / "src"), "--out", str(project), "--overwrite"], capsys)
    assert rc == 2 and f"'{project}' exists and is not a dataset folder written by fimtune: refusing" in err
    assert "pass another --out" in err
    assert {p.name: p.read_text() for p in project.iterdir()} == before
    assert leftovers(tmp_path, "myproject") == ["myproject"]


def test_an_out_that_cannot_be_written_is_a_one_line_error(tmp_path, capsys):
    """A folder the user may not write in: said before any file is read (as another user than root),
    or when writing (root may write everywhere but /proc); it was a traceback after the whole build."""
    write(tmp_path, "src/a.py", code("a"))
    if os.geteuid() != 0:
        (tmp_path / "locked").mkdir(mode=0o555)
        out = tmp_path / "locked" / "data"
    elif os.path.isdir("/proc/self"):
        out = Path("/proc/self/fimtune-test-out")
    else:
        pytest.skip("running as root without /proc: no folder to refuse a write")
    rc, _, err = run_main([str(tmp_path / "src"), "--out", str(out)], capsys)
    assert rc == 2 and err.startswith(f"error: cannot write --out '{out}'") and "Traceback" not in err
    assert not out.exists()


def test_output_inside_the_source_is_not_read_back(tmp_path):
    write(tmp_path, "a.py", code("a"))
    write(tmp_path, "b.py", code("b"))
    first = build_module.build_corpus(
        [str(tmp_path)], [], [], build_module.CorpusConfig(), tmp_path / "data", progress=False
    )
    again = build_module.build_corpus(
        [str(tmp_path)], [], [], build_module.CorpusConfig(), tmp_path / "data", overwrite=True, progress=False
    )
    assert first["kept"] == again["kept"] == 2 and again["skipped_dirs"] == {"saved_dataset": 1}


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_leaves_nothing_and_keeps_the_old_build(tmp_path, monkeypatch, error):
    """Fault injection: the save step writes part of the dataset, then fails."""
    write(tmp_path, "src/a.py", code("a"))
    write(tmp_path, "src/b.py", code("b"))
    out = tmp_path / "out"
    real_save = build_module.save_dataset

    def save_then_fail(tmp, *args):
        real_save(tmp, *args)
        raise error

    monkeypatch.setattr(build_module, "save_dataset", save_then_fail)
    with pytest.raises(type(error)):
        build([str(tmp_path / "src")], out)
    assert leftovers(tmp_path, "out") == []
    monkeypatch.undo()
    build([str(tmp_path / "src")], out)
    before = (out / "stats.json").read_text()
    monkeypatch.setattr(build_module, "save_dataset", save_then_fail)
    with pytest.raises(type(error)):
        build_module.build_corpus(
            [str(tmp_path / "src")], [], [], build_module.CorpusConfig(), out, overwrite=True, progress=False
        )
    assert leftovers(tmp_path, "out") == ["out"] and (out / "stats.json").read_text() == before


def test_hf_offline_fails_fast_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    rc, _, err = run_main(["--hf", "smangrul/hf-stack-v1", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and time.monotonic() - start < 5
    assert "is not reachable" in err and "HF_HUB_OFFLINE=1" in err and len(err.strip().splitlines()) == 1


def test_package_source_through_main(tmp_path, capsys):
    rc, stdout, _ = run_main(
        ["--package", "datasketch", "--out", str(tmp_path / "o"), "--validation-size", "2"], capsys
    )
    assert rc == 0 and "datasketch" in stdout
    dd = datasets.load_from_disk(str(tmp_path / "o"))
    assert len(dd["validation"]) >= 2 and all(p.startswith("datasketch/") for p in dd["train"]["file_path"])


def test_one_file_corpus_has_an_empty_validation_split(tmp_path):
    write(tmp_path, "src/only.py", code("only"))
    stats = build([str(tmp_path / "src")], tmp_path / "out")
    assert stats["splits"]["validation"]["files"] == 0 and "validation is empty" in stats["split"]["note"]
    dd = datasets.load_from_disk(str(tmp_path / "out"))
    assert len(dd["train"]) == 1 and len(dd["validation"]) == 0


def test_bad_config_values_are_user_errors(tmp_path, capsys):
    write(tmp_path, "src/a.py", code("a"))
    rc, _, err = run_main(
        [str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--near-dedup-threshold", "1.5"], capsys
    )
    assert rc == 2 and "--near-dedup-threshold must be in (0, 1]" in err
    with pytest.raises(DataError, match="no sources given"):
        build([], tmp_path / "o")
    # NaN fails no comparison: it turned the filter off
    rc, _, err = run_main([str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--min-alnum-fraction", "nan"], capsys)
    assert rc == 2 and "--min-alnum-fraction must be >= 0" in err


def test_a_language_no_file_name_gives_is_warned(tmp_path, caplog):
    """`--languages pyton` matched nothing, silently (a Hub dataset's column may name others: a warning)."""
    import logging

    write(tmp_path, "src/a.py", code("a"))
    write(tmp_path, "src/b.py", code("b"))
    with caplog.at_level(logging.WARNING, logger="fimtune.corpus.build"):
        build([str(tmp_path / "src")], tmp_path / "o", languages=["python", "C++", "Markdown"])
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="fimtune.corpus.build"), pytest.raises(DataError):
        build([str(tmp_path / "src")], tmp_path / "o2", languages=["pyton"])
    assert "--languages pyton: no file name or suffix gives this language (did you mean python?)" in caplog.text


def test_hf_offline_mode_without_a_cached_copy(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    cmd = [str(FIMTUNE), "data", "build", "--hf", "smangrul/hf-stack-v1", "--out", str(tmp_path / "o"), "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "could not load its train split" in res.stderr and "only a cached copy" in res.stderr


def test_sigterm_during_a_build_removes_its_clone_as_ctrl_c_does(tmp_path):
    """`kill` (or `docker stop`) during a build ends it as Ctrl-C does: the clone's temporary folder
    is removed, not left in /tmp for each killed build."""
    upstream = git_repo(tmp_path / "upstream", {"lib/x.py": code("x")})
    temp = tmp_path / "temp"
    temp.mkdir()
    probe = (
        "import os, signal, sys; from fimtune.cli import main; from fimtune.corpus import build; "
        "build.scan = lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM); "
        f"sys.exit(main(['data', 'build', '--quiet', {upstream.as_uri()!r}, '--out', {str(tmp_path / 'out')!r}]))"
    )
    env = {**os.environ, "TMPDIR": str(temp)}
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 143 and "terminated" in res.stderr, (res.returncode, res.stderr)
    assert os.listdir(temp) == [] and not (tmp_path / "out").exists()
