"""Sources: packages, parquet/jsonl/json tables, git repos (local, bare, file:// URL), the Hub offline."""

import json
import os
import subprocess
import time
from contextlib import ExitStack

import pytest
from corpus_helpers import GIT_ENV, code, git_repo, notebook, write

from fimtune.config import CorpusConfig
from fimtune.corpus import sources
from fimtune.corpus.sources import (
    is_git_url,
    iter_documents,
    repo_name,
    resolve_hub,
    resolve_package,
    resolve_path,
    resolve_sources,
)
from fimtune.errors import DataError


def docs_of(source, **fields):
    return list(iter_documents(source, CorpusConfig(**fields)))


def test_package_source_reads_its_file_list():
    source = resolve_package("pathspec")
    docs = docs_of(source)
    paths = [d.file_path for d in docs]
    assert "pathspec/__init__.py" in paths and all(p.startswith("pathspec/") for p in paths)
    assert paths == sorted(paths)
    assert {d.repo_id for d in docs} == {"pathspec"} and {d.language for d in docs} == {"python"}
    assert source.tally.skipped_files["package_metadata"] >= 3  # METADATA, RECORD, WHEEL, ...
    assert "pycache" in source.tally.skipped_files  # the .pyc files


def test_missing_package():
    with pytest.raises(DataError, match="package 'no-such-package-xyz' is not installed"):
        resolve_package("no-such-package-xyz")
    # an import name is no distribution's: the error names the one that installs it, not `pip install yaml`
    with pytest.raises(DataError, match="'yaml' is the import name of PyYAML: pass --package PyYAML"):
        resolve_package("yaml")


def test_jsonl_table(tmp_path):
    rows = [
        {"repo_id": "org/a", "file_path": "src/x.py", "content": code("x")},
        {"file_path": "y.rs", "content": 'fn main() {\n    println!("hello from the rust side");\n}\n'},
        {"content": code("z")},
        {"file_path": "img.png", "content": "png"},
        {"content": None},
        {"content": "\x00binary"},
    ]
    path = tmp_path / "files.jsonl"
    deep = "[" * 200_000 + "]" * 200_000  # deeper than Python's JSON reader goes: a malformed row
    # a byte order mark first (some editors write one): not part of the first row
    lines = "\n".join(json.dumps(r) for r in rows) + f"\n{{broken\n{deep}\n\n"
    path.write_text(lines, encoding="utf-8-sig")
    source = resolve_path(str(path), ExitStack())
    docs = docs_of(source)
    assert [(d.repo_id, d.file_path, d.language) for d in docs] == [
        ("org/a", "src/x.py", "python"),
        ("files", "y.rs", "rust"),
        ("files", "row-0000002", "unknown"),
    ]
    assert source.tally.skipped_files == {"blocked_suffix": 1, "malformed_row": 3, "binary": 1}


def test_a_jsonl_row_without_the_text_column_is_malformed_even_the_first(tmp_path, monkeypatch):
    """A row that omits the text column (JSON writers drop null fields) is a `malformed_row`, the
    first as any other: it failed the whole file, saying it had no such column. A file none of whose
    rows holds the column is still an error, naming the file and the columns it has."""
    path = tmp_path / "rows.jsonl"
    rows = [{"path": "a.py"}, {"path": "b.py", "content": code("b")}, {"path": "c.py"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    source = resolve_path(str(path), ExitStack())
    assert [d.file_path for d in docs_of(source)] == ["b.py"]
    assert source.tally.skipped_files == {"malformed_row": 2}
    path.write_text("".join(json.dumps({"path": f"{k}.py", "contnet": code("x")}) + "\n" for k in range(3)))
    with pytest.raises(
        DataError, match=r"rows.jsonl' has no column 'content' \(columns: path, contnet\); set --text-column"
    ):
        docs_of(resolve_path(str(path), ExitStack()))
    monkeypatch.setattr(sources, "COLUMN_CHECK_ROWS", 2)  # a big file fails at its first rows, not its end
    source = resolve_path(str(path), ExitStack())
    rows = iter_documents(source, CorpusConfig())
    with pytest.raises(DataError, match="has no column 'content'"):
        next(rows)
    assert source.tally.files_seen == 1


def test_json_array_with_notebook_rows(tmp_path):
    rows = [{"path": "nb.ipynb", "text": notebook([("code", "!ls"), ("code", code("nb"))])}]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    docs = docs_of(resolve_path(str(path), ExitStack()), text_column="text")
    assert [(d.file_path, d.content) for d in docs] == [("nb.ipynb", code("nb"))]


def test_a_pretty_printed_json_object_is_one_row(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"path": "a.py", "content": code("a")}, indent=2), encoding="utf-8")
    source = resolve_path(str(path), ExitStack())
    assert [(d.file_path, d.content) for d in docs_of(source)] == [("a.py", code("a"))]
    assert source.tally.skipped_files == {}
    # a .json that is JSON Lines with a broken first line keeps its other rows, the bad one counted
    path = tmp_path / "lines.json"
    path.write_text('{"content": "cut\n' + json.dumps({"content": code("b")}) + "\n", encoding="utf-8")
    source = resolve_path(str(path), ExitStack())
    assert [d.content for d in docs_of(source)] == [code("b")]
    assert source.tally.skipped_files == {"malformed_row": 1}


def test_a_rows_byte_order_mark_is_no_text(tmp_path):
    """As a file's (`decode`): the copy with the mark and the one without are one text (dedup), and the
    held-out Python text parses (tree-sitter reads the mark as an error)."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"path": "a.py", "content": "\ufeff" + code("a")}) + "\n", encoding="utf-8")
    assert [d.content for d in docs_of(resolve_path(str(path), ExitStack()))] == [code("a")]


def test_parquet_table_and_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "stack.parquet"
    pq.write_table(
        pa.table({"repo_id": ["r1", "r2"], "file_path": ["a.py", "b.py"], "content": [code("a"), code("b")]}), path
    )
    docs = docs_of(resolve_path(str(path), ExitStack()))
    assert [(d.repo_id, d.file_path) for d in docs] == [("r1", "a.py"), ("r2", "b.py")]
    with pytest.raises(DataError, match="has no column 'text'.*--text-column"):
        docs_of(resolve_path(str(path), ExitStack()), text_column="text")


def test_a_text_column_that_is_not_text_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"content": [code("a").encode()], "stars": [3]}), path)
    with pytest.raises(DataError, match="bytes.parquet': column 'content' holds binary, not text; set --text-column"):
        docs_of(resolve_path(str(path), ExitStack()))
    with pytest.raises(DataError, match="column 'stars' holds int64, not text"):
        docs_of(resolve_path(str(path), ExitStack()), text_column="stars")
    path = tmp_path / "categories.parquet"  # dictionary-encoded strings are text
    pq.write_table(pa.table({"content": pa.array([code("c")]).dictionary_encode()}), path)
    assert len(docs_of(resolve_path(str(path), ExitStack()))) == 1


def test_a_parquet_file_damaged_past_its_footer_names_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # strings that are not UTF-8: the footer reads fine, the rows do not
    path = tmp_path / "latin.parquet"
    pq.write_table(pa.table({"content": [code("a") + "# MARKER\n"]}), path, compression="none")
    path.write_bytes(path.read_bytes().replace(b"MARKER", b"\xff\xfe\xff\xfe\xff\xfe"))
    with pytest.raises(DataError, match="cannot read parquet file '.*latin.parquet' after row 0: .*write or download"):
        docs_of(resolve_path(str(path), ExitStack()))
    # a damaged compressed page
    path = tmp_path / "damaged.parquet"
    pq.write_table(pa.table({"content": [code(str(i)) for i in range(2000)]}), path, compression="snappy")
    data = bytearray(path.read_bytes())
    data[100:4000] = bytes(b ^ 0xFF for b in data[100:4000])
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="cannot read parquet file '.*damaged.parquet' after row 0"):
        docs_of(resolve_path(str(path), ExitStack()))


def test_missing_path_and_unsupported_file(tmp_path):
    with pytest.raises(DataError, match="does-not-exist' does not exist"):
        resolve_path(str(tmp_path / "does-not-exist"), ExitStack())
    write(tmp_path, "main.py", code("m"))
    with pytest.raises(DataError, match="pass the folder that holds it"):
        resolve_path(str(tmp_path / "main.py"), ExitStack())


def test_symlink_loop_and_broken_link_as_sources(tmp_path):
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(DataError, match="loop' is a symlink loop"):
        resolve_path(str(tmp_path / "loop"), ExitStack())
    os.symlink(tmp_path / "nothing", tmp_path / "dangling")
    with pytest.raises(DataError, match="dangling' is a broken symlink"):
        resolve_path(str(tmp_path / "dangling"), ExitStack())


def test_local_git_repo_is_a_folder_with_its_name(tmp_path):
    repo = git_repo(tmp_path / "myrepo", {"a.py": code("a")})
    source = resolve_path(str(repo), ExitStack())
    assert (source.kind, source.repo_id) == ("git", "myrepo")
    assert [d.file_path for d in docs_of(source)] == ["a.py"]
    assert source.tally.skipped_dirs == {"git": 1}


def test_repositories_that_share_a_name_get_ids_of_their_own(tmp_path):
    for owner in ("client", "server", "other/client"):
        write(tmp_path, f"{owner}/app/m.py", code(owner.replace("/", "_")))
    paths = [str(tmp_path / p / "app") for p in ("client", "server", "client", "other/client")]
    ids = [s.repo_id for s in resolve_sources([*paths, str(tmp_path / "server")], [], [], ExitStack())]
    # client/app twice is one repository; other/client/app shares "client/app" too: whole paths
    assert ids == [*(str(tmp_path / p / "app") for p in ("client", "server", "client", "other/client")), "server"]
    two = [s.repo_id for s in resolve_sources(paths[:2], [], [], ExitStack())]
    assert two == ["client/app", "server/app"]


def test_clone_by_file_url_and_bare_repo(tmp_path):
    repo = git_repo(tmp_path / "upstream", {"pkg/a.py": code("a"), "pkg/b.py": code("b")})
    with ExitStack() as stack:
        source = resolve_path(repo.as_uri(), stack)
        clone_root = source.root
        assert (source.kind, source.repo_id) == ("git", "upstream")
        assert [d.file_path for d in docs_of(source)] == ["pkg/a.py", "pkg/b.py"]
        log = subprocess.run(["git", "rev-list", "--count", "HEAD"], cwd=clone_root, capture_output=True, text=True)
        assert log.stdout.strip() == "1"  # --depth 1
    assert not os.path.exists(clone_root)  # removed with the stack
    spaced = git_repo(tmp_path / "my project", {"a.py": code("spaced")})
    with ExitStack() as stack:  # as_uri() writes the space as %20: the id is the folder's name
        assert resolve_path(spaced.as_uri(), stack).repo_id == "my project"
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True, env={**os.environ, **GIT_ENV})
    with ExitStack() as stack:
        source = resolve_path(str(bare), stack)
        assert source.repo_id == "bare" and len(docs_of(source)) == 2


def test_a_clones_symlinks_are_followed_inside_it_only(tmp_path):
    """A cloned repository's file symlinks come from whoever wrote it: one to a file outside the
    clone (a user's own secrets, say) is skipped and counted; one inside is followed. A local
    folder's links are the user's own, followed as before."""
    write(tmp_path, "home/notes.py", code("private"))
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    os.symlink(tmp_path / "home" / "notes.py", upstream / "outside.py")
    os.symlink("pkg/a.py", upstream / "inside.py")
    git_repo(upstream, {"pkg/a.py": code("a")})
    with ExitStack() as stack:
        source = resolve_path(upstream.as_uri(), stack)
        assert [d.file_path for d in docs_of(source)] == ["inside.py", "pkg/a.py"]
        assert source.tally.skipped_files == {"symlink_outside": 1}
    local = resolve_path(str(upstream), ExitStack())
    assert [d.file_path for d in docs_of(local)] == ["inside.py", "outside.py", "pkg/a.py"]


def test_clone_failure_names_the_url(tmp_path):
    url = (tmp_path / "nowhere").as_uri()
    with pytest.raises(DataError, match=f"cannot clone '{url}'") as info, ExitStack() as stack:
        resolve_path(url, stack)
    # git's reason, not the last line of its advice (`and the repository exists.`)
    assert str(info.value).endswith("does not appear to be a git repository"), info.value


def test_git_url_names():
    assert is_git_url("https://github.com/a/b") and is_git_url("file:///tmp/x") and not is_git_url("./code")
    assert is_git_url("example.com:team/tool.git") and not is_git_url(".")
    assert repo_name("https://github.com/huggingface/peft.git") == "peft"
    assert repo_name("git@github.com:huggingface/peft.git") == "peft"
    assert repo_name("https://host/x/tool/") == "tool"


def test_hub_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(DataError, match="smangrul/hf-stack-v1: the Hugging Face Hub .* is not reachable"):
        resolve_hub("smangrul/hf-stack-v1")
    assert time.monotonic() - start < 5


def test_a_clones_links_into_its_git_folder_and_its_tracked_ignored_files(tmp_path):
    """A cloned repository may link to files of its own .git folder (its config holds the clone's
    URL, its logs the user's git name and e-mail): skipped and counted. A file a .gitignore matches
    but git tracks (force-added, or committed before the rule) is in a fresh clone because git
    keeps it: it is read, as git would give it."""
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    os.symlink(".git/config", upstream / "cfg.ini")
    os.symlink(".git/logs/HEAD", upstream / "log.txt")
    git_repo(upstream, {"pkg/a.py": code("a"), ".gitignore": "*.gen.py\n"})
    write(upstream, "schema.gen.py", code("schema"))
    subprocess.run(["git", "add", "-f", "schema.gen.py"], cwd=upstream, check=True, capture_output=True)
    subprocess.run(
        ["git", "commit", "-q", "-m", "generated"],
        cwd=upstream,
        check=True,
        capture_output=True,
        env={**os.environ, **GIT_ENV},
    )
    with ExitStack() as stack:
        source = resolve_path(upstream.as_uri(), stack)
        assert [d.file_path for d in docs_of(source)] == ["pkg/a.py", "schema.gen.py"]
        assert source.tally.skipped_files["symlink_into_vcs"] == 2
    local = resolve_path(str(upstream), ExitStack())  # the user's own folder: the same tracked files
    assert [d.file_path for d in docs_of(local)] == ["pkg/a.py", "schema.gen.py"]
    assert local.tally.skipped_files["symlink_into_vcs"] == 2 and "gitignore" not in local.tally.skipped_files


def test_table_rows_and_files_name_languages_alike_and_read_bytes_strictly(tmp_path):
    """A `lang` column's names (The Stack's `C++`, `C#`) are the suffixes' (`cpp`, `csharp`); a Qt
    translation file (`.ts`, XML) is no TypeScript; in JSON Lines a first line that is an array is
    a malformed row, not the whole file, and a line that is not UTF-8 is counted `undecodable`
    (as such a file in a folder is), never read with replacement characters."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "stack.parquet"
    table = {"file_path": ["a.cpp", "b.cs", "c"], "lang": ["C++", "C#", "Shell"], "content": [code("a")] * 3}
    pq.write_table(pa.table(table), path)
    assert [d.language for d in docs_of(resolve_path(str(path), ExitStack()))] == ["cpp", "csharp", "shell"]
    rows = [
        {"content": "#!/bin/sh\necho 'hello from a row'\n"},
        {"path": "bin/run", "content": "#!/usr/bin/python3\nx = 1\n"},
    ]
    write(tmp_path, "scripts.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert [d.language for d in docs_of(resolve_path(str(tmp_path / "scripts.jsonl"), ExitStack()))] == [
        "shell",
        "python",
    ]
    qt = '<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE TS>\n<TS version="2.1">\n<context>x</context>\n</TS>\n'
    write(tmp_path, "app/app_de.ts", qt)
    write(tmp_path, "app/main.ts", "export const answer: number = 42;\nconsole.log(answer);\n")
    docs = docs_of(resolve_path(str(tmp_path / "app"), ExitStack()))
    assert [(d.file_path, d.language) for d in docs] == [("app_de.ts", "xml"), ("main.ts", "typescript")]
    lines = tmp_path / "rows.jsonl"
    good = json.dumps({"content": code("good")}).encode()
    lines.write_bytes(b'["not", "an object"]\n' + good + b"\n" + b'{"content": "caf\xe9 = 1"}\n' + good + b"\n")
    source = resolve_path(str(lines), ExitStack())
    assert len(docs_of(source)) == 2
    assert source.tally.skipped_files == {"malformed_row": 1, "undecodable": 1}


def test_a_notebook_rows_size_limit_is_for_its_code_as_in_a_folder(tmp_path):
    """A notebook's saved plot (base64 in its JSON) may dwarf its code: as a table row, as in a
    folder, the notebook is read up to 20 x --max-file-size and the limit applies to its code."""
    raw = json.loads(notebook([("code", code("nb"))]))
    raw["cells"][0]["outputs"] = [{"output_type": "display_data", "data": {"image/png": "iVBOR" * 2000}}]
    text = json.dumps(raw)
    write(tmp_path / "folder", "nb.ipynb", text)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"path": "nb.ipynb", "text": text}) + "\n", encoding="utf-8")
    limits = {"text_column": "text", "max_file_size": 4000}  # the JSON is ~10 kB, its code ~1 kB
    from_folder = docs_of(resolve_path(str(tmp_path / "folder"), ExitStack()), **limits)
    source = resolve_path(str(tmp_path / "rows.jsonl"), ExitStack())
    assert [d.content for d in docs_of(source, **limits)] == [d.content for d in from_folder] == [code("nb")]
    too_small = resolve_path(str(tmp_path / "rows.jsonl"), ExitStack())
    assert docs_of(too_small, text_column="text", max_file_size=400) == []  # its code is over the limit
    assert too_small.tally.skipped_files == {"too_large": 1}


def test_git_lfs_pointer_files_are_counted_not_read_as_code(tmp_path):
    """A repository cloned without git-lfs holds, for each LFS file, a small pointer text (a version
    line, an oid, a size): a .json, .py or .ipynb of those is no code to train on."""
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:" + "4d7a" * 16 + "\nsize 12345\n"
    files = {"a.py": code("a"), "data.json": pointer, "big.py": pointer, "nb.ipynb": pointer}
    upstream = git_repo(tmp_path / "upstream", {**files, ".gitattributes": "*.json filter=lfs diff=lfs -text\n"})
    with ExitStack() as stack:
        for source in (resolve_path(str(upstream), stack), resolve_path(upstream.as_uri(), stack)):
            assert [d.file_path for d in docs_of(source)] == ["a.py"]
            assert source.tally.skipped_files["lfs_pointer"] == 3
