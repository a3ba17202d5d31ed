"""What the user named -> sources of documents: folders, git repos, packages, Hub datasets, tables.

Every input is checked before any file is read (a missing path, an uninstalled
package or an unreachable Hub fails in seconds), then :func:`iter_documents` reads
one source at a time. Git URLs are cloned with `git clone --depth 1` into a temporary
folder that lives as long as the caller's :class:`~contextlib.ExitStack`.

    >>> is_git_url("https://github.com/huggingface/peft"), is_git_url("git@github.com:a/b.git")
    (True, True)
    >>> repo_name("https://github.com/huggingface/peft.git"), repo_name("git@host:team/tool")
    ('peft', 'tool')
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlparse

from fimtune.config import CorpusConfig
from fimtune.corpus.files import NOTEBOOK_RAW_SIZE_FACTOR, Document, Tally, accept, read_file, walk_folder
from fimtune.corpus.filters import path_dirs_reason, secret_name_reason, size_reason, suffix_reason
from fimtune.corpus.languages import (
    NOTEBOOK_SUFFIX,
    SHEBANG_MAX_BYTES,
    UNKNOWN,
    canonical_language,
    content_language,
    has_suffix,
    language_of,
    script_language,
)
from fimtune.corpus.notebooks import MalformedNotebook, notebook_to_code
from fimtune.errors import DataError

GIT_URL_PREFIXES = ("http://", "https://", "git://", "ssh://", "file://", "git@")
TABLE_SUFFIXES = (".parquet", ".jsonl", ".json")
CLONE_TIMEOUT_S = 900
TABLE_BATCH_ROWS = 1024
PATH_COLUMNS = ("file_path", "path", "max_stars_repo_path")
REPO_COLUMNS = ("repo_id", "repo_name", "max_stars_repo_name")
LANGUAGE_COLUMNS = ("language", "lang")
PACKAGE_METADATA_DIRS = (".dist-info/", ".egg-info/")
COLUMN_CHECK_ROWS = 1000
"""A JSON file none of whose first this many objects holds --text-column fails then, not at its end."""


@dataclass
class Source:
    """One input: `folder`, `git` (a local repo or a clone), `package`, `hub` or `table`."""

    kind: str
    label: str
    """What the user wrote: a path, URL, package name or dataset id."""
    repo_id: str
    root: str = ""
    """Folder to walk (folder, git, editable package) or file to read (table)."""
    tally: Tally = field(default_factory=Tally)
    cloned: bool = False
    """A repository cloned from a URL or a bare repo: its symlinks are followed only inside it."""

    def summary(self) -> dict[str, Any]:
        t = self.tally
        return {
            "kind": self.kind,
            "source": self.label,
            "repo_id": self.repo_id,
            "files_seen": t.files_seen,
            "usable": t.usable,
            "bytes_read": t.bytes_read,
            "skipped_files": dict(sorted(t.skipped_files.items())),
            "skipped_dirs": dict(sorted(t.skipped_dirs.items())),
        }


# --------------------------------------------------------------------------------------
# Resolving inputs
# --------------------------------------------------------------------------------------


def resolve_sources(paths: list[str], packages: list[str], hf: list[str], stack: ExitStack) -> list[Source]:
    """Check every input and turn it into a :class:`Source`, in the order given; clones live as long as ``stack``.

    The cheap checks run first, so a typo fails before a long clone.
    """
    local = {i: resolve_path(p, stack) for i, p in enumerate(paths) if not is_git_url(p)}
    tail = [resolve_package(name) for name in packages] + [resolve_hub(dataset_id) for dataset_id in hf]
    cloned = {i: resolve_path(p, stack) for i, p in enumerate(paths) if is_git_url(p)}
    return distinct_repo_ids([local[i] if i in local else cloned[i] for i in range(len(paths))]) + tail


def distinct_repo_ids(sources: list[Source]) -> list[Source]:
    """Give repositories that share a name but not a place longer ids (``client/app``, ``server/app``,
    or the whole path where those agree too): one id is one repository in the stats and in
    `--split-by repo`. The same repository given twice keeps its one id."""
    groups: dict[str, dict[str, list[Source]]] = {}
    for s in sources:
        where = unquote(s.label) if s.cloned and is_git_url(s.label) else os.path.realpath(s.root)
        groups.setdefault(s.repo_id, {}).setdefault(where, []).append(s)
    for places in groups.values():
        if len(places) < 2:
            continue
        longer = {where: _parent_and_name(where) for where in places}
        if len(set(longer.values())) < len(longer):
            longer = {where: where for where in places}
        for where, same in places.items():
            for s in same:
                s.repo_id = longer[where]
    return sources


def _parent_and_name(where: str) -> str:
    """The last two components of a path or URL, without `.git`.

    >>> _parent_and_name("/home/me/client/app"), _parent_and_name("https://github.com/org/app.git")
    ('client/app', 'org/app')
    """
    parts = where.rstrip("/").replace(":", "/").split("/")
    return "/".join([*parts[-2:-1], repo_name(parts[-1])])


def is_git_url(text: str) -> bool:
    """Whether ``text`` names a repository to clone: a URL, `git@host:...`, or a `.git` name that is no local path."""
    return text.startswith(GIT_URL_PREFIXES) or (text.endswith(".git") and not os.path.lexists(text))


def repo_name(url_or_path: str) -> str:
    """The repository's name: the last path component, without `.git`."""
    tail = url_or_path.rstrip("/").replace(":", "/").rsplit("/", 1)[-1]
    return tail[: -len(".git")] if tail.endswith(".git") and len(tail) > len(".git") else tail


def resolve_path(text: str, stack: ExitStack) -> Source:
    """A folder, a git repo (local, bare, or URL) or a parquet/jsonl/json file."""
    if is_git_url(text):  # a URL's `%20` is a space in the repository's name
        return Source("git", text, repo_name(unquote(text)), clone(text, stack), cloned=True)
    path = Path(text).expanduser()
    try:
        path.stat()
    except FileNotFoundError:
        hint = "is a broken symlink" if path.is_symlink() else "does not exist"
        raise DataError(f"source '{text}' {hint}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(f"source '{text}' is a symlink loop") from None
        raise DataError(f"cannot read source '{text}': {e.strerror}") from None
    name = path.resolve().name
    if os.path.isdir(path):
        if (path / "HEAD").is_file() and (path / "objects").is_dir():  # a bare repository: check it out
            return Source("git", text, repo_name(name), clone(path.resolve().as_uri(), stack), cloned=True)
        kind = "git" if (path / ".git").exists() else "folder"
        return Source(kind, text, name, str(path))
    if path.suffix.lower() in TABLE_SUFFIXES and os.path.isfile(path):
        return Source("table", text, path.stem, str(path))
    raise DataError(
        f"source '{text}' is neither a folder, a git repo nor a .parquet/.jsonl/.json file; pass the folder that holds it"
    )


def clone(url: str, stack: ExitStack) -> str:
    """`git clone --depth 1` into a temporary folder removed when ``stack`` closes."""
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="fimtune-clone-"))
    dest = os.path.join(tmp, repo_name(url) or "repo")
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}  # fail instead of asking for a password
    cmd = ["git", "clone", "--depth", "1", "--quiet", url, dest]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=CLONE_TIMEOUT_S)
    except FileNotFoundError:
        raise DataError(f"cannot clone '{url}': git is not installed") from None
    except subprocess.TimeoutExpired:
        raise DataError(
            f"cloning '{url}' took more than {CLONE_TIMEOUT_S} s; clone it yourself and pass the folder"
        ) from None
    if res.returncode != 0:
        # git's first words say why (`fatal: '...' does not appear to be a git repository`, `ssh: Could not
        # resolve hostname`); its last are advice (`... and the repository exists.`)
        lines = [line.strip() for line in res.stderr.splitlines() if line.strip()]
        said = [line for line in lines if not line.startswith("warning:")] or lines
        detail = said[0] if said else f"exit code {res.returncode}"
        raise DataError(f"cannot clone '{url}': {detail}")
    return dest


def resolve_package(name: str) -> Source:
    """An installed distribution: its file list, or its project folder when installed editable."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        # `yaml` is imported, `PyYAML` installed: --package takes the distribution's name
        owners = sorted(set(importlib.metadata.packages_distributions().get(name, [])))
        if owners:
            raise DataError(
                f"--package takes a distribution's name, and '{name}' is the import name of "
                f"{' and '.join(owners)}: pass --package {owners[0]}"
            ) from None
        raise DataError(
            f"package '{name}' is not installed here (pip install {name}), so --package cannot read it"
        ) from None
    folder = editable_folder(dist)
    if folder:
        return Source("package", name, name, folder)
    if not dist.files:
        raise DataError(f"package '{name}' has no file list (no RECORD in its metadata); pass its folder instead")
    return Source("package", name, name)


def editable_folder(dist: Any) -> str | None:
    """The project folder of an editable install (PEP 610 `direct_url.json`), else None."""
    try:
        info = json.loads(dist.read_text("direct_url.json") or "{}")
    except (OSError, ValueError):
        return None
    url = info.get("url", "") if isinstance(info, dict) else ""
    if not (info.get("dir_info") or {}).get("editable") or not url.startswith("file://"):
        return None
    folder = unquote(urlparse(url).path)
    return folder if os.path.isdir(folder) else None


def resolve_hub(dataset_id: str) -> Source:
    """A Hub dataset: fail in seconds when the Hub does not answer (unless HF_HUB_OFFLINE asks for the cache)."""
    from fimtune.hub import hub_reachable

    if not _hub_offline() and not hub_reachable():
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise DataError(
            f"--hf {dataset_id}: the Hugging Face Hub ({endpoint}) is not reachable. Download the dataset where "
            "you have network and pass its parquet/jsonl files, or set HF_HUB_OFFLINE=1 to use a cached copy"
        )
    return Source("hub", dataset_id, dataset_id)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


# --------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------


def iter_documents(source: Source, cfg: CorpusConfig) -> Iterator[Document]:
    """The usable documents of ``source`` in path order; ``source.tally`` counts the rest."""
    if source.kind in ("folder", "git") or (source.kind == "package" and source.root):
        # a fresh clone holds only tracked files: one a .gitignore matches was committed (force-added,
        # or before the rule), and git keeps it, so no .gitignore applies there
        gitignore = cfg.respect_gitignore and not source.cloned
        ancestors = source.kind != "package"  # a package's folder is no repository's
        walk = walk_folder(source.root, source.repo_id, source.tally, gitignore, source.cloned, ancestors)
        for repo_id, rel, path in walk:
            doc = read_file(path, rel, repo_id, cfg, source.tally)
            if doc:
                yield doc
    elif source.kind == "package":
        yield from _package_documents(source, cfg)
    elif source.kind == "hub":
        yield from table_documents(_hub_rows(source.label, cfg.text_column), source, cfg)
    else:
        yield from table_documents(_file_rows(source.root, cfg.text_column), source, cfg)


def _package_documents(source: Source, cfg: CorpusConfig) -> Iterator[Document]:
    import importlib.metadata

    dist = importlib.metadata.distribution(source.label)
    tally = source.tally
    for f in sorted(dist.files or [], key=lambda p: p.as_posix()):
        rel = f.as_posix()
        tally.seen()
        if rel.startswith(("../", "/")) or any(d in rel for d in PACKAGE_METADATA_DIRS):
            tally.skip("package_metadata")
            continue
        reason = path_dirs_reason(rel)
        if reason:
            tally.skip(reason)
            continue
        doc = read_file(str(dist.locate_file(f)), rel, source.repo_id, cfg, tally)
        if doc:
            yield doc


def table_documents(rows: Iterable[Any], source: Source, cfg: CorpusConfig) -> Iterator[Document]:
    """Documents from table rows: text in ``cfg.text_column``; path, repo and language columns when present."""
    tally = source.tally
    for i, row in enumerate(rows):
        tally.seen()
        doc = _row_document(i, row, source, cfg)
        if doc:
            yield doc


def _row_document(i: int, row: Any, source: Source, cfg: CorpusConfig) -> Document | None:
    tally = source.tally
    if row is UNDECODABLE_ROW:
        return tally.skip("undecodable")
    text = row.get(cfg.text_column) if isinstance(row, dict) else None
    if not isinstance(text, str):
        return tally.skip("malformed_row")
    text = text.removeprefix("\ufeff")  # a byte order mark is no text, as in a file (`decode`)
    path = _first_str(row, PATH_COLUMNS) or f"row-{i:07d}"
    name = path.rsplit("/", 1)[-1]
    reason = suffix_reason(name) or (None if cfg.keep_secrets else secret_name_reason(name))
    if reason:
        return tally.skip(reason)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates, from JSON escapes
        return tally.skip("undecodable")
    tally.bytes_read += size
    is_notebook = path.lower().endswith(NOTEBOOK_SUFFIX) and text.lstrip().startswith("{")
    # as in a folder: a notebook's JSON may be this many times the limit, which is for its code
    reason = size_reason(size, cfg.max_file_size * (NOTEBOOK_RAW_SIZE_FACTOR if is_notebook else 1))
    if reason or "\0" in text:
        return tally.skip(reason or "binary")
    column = _first_str(row, LANGUAGE_COLUMNS)
    script = None if has_suffix(name) else script_language(text[:SHEBANG_MAX_BYTES])  # as a file's
    language = content_language(canonical_language(column) if column else language_of(path) or script or UNKNOWN, text)
    if is_notebook:
        try:
            text, language = notebook_to_code(text, keep_markdown=cfg.notebook_markdown)
        except MalformedNotebook:
            return tally.skip("malformed_notebook")
        reason = size_reason(len(text.encode("utf-8")), cfg.max_file_size)
        if reason:
            return tally.skip(reason)
    repo_id = _first_str(row, REPO_COLUMNS) or source.repo_id
    return accept(Document(repo_id, path, language, text), cfg, tally)


def _first_str(row: dict[str, Any], columns: tuple[str, ...]) -> str | None:
    for col in columns:
        value = row.get(col)
        if isinstance(value, str) and value:
            return value
    return None


def _hub_rows(dataset_id: str, text_column: str) -> Iterator[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split="train")
    except Exception as e:  # datasets raises many types (unknown id, gated, missing cache, no train split)
        hint = "; HF_HUB_OFFLINE is set, so only a cached copy can load" if _hub_offline() else ""
        raise DataError(f"--hf {dataset_id}: could not load its train split ({type(e).__name__}: {e}){hint}") from None
    _check_column(text_column, ds.column_names, f"--hf {dataset_id}")
    feature = ds.features[text_column]
    dtype = getattr(feature, "dtype", type(feature).__name__)
    _check_text_type(text_column, dtype, dtype in ("string", "large_string"), f"--hf {dataset_id}")
    for batch in ds.iter(batch_size=TABLE_BATCH_ROWS):
        yield from _batch_rows(batch)


def _file_rows(path: str, text_column: str) -> Iterator[Any]:
    if path.lower().endswith(".parquet"):
        yield from _parquet_rows(path, text_column)
    else:
        yield from _json_rows(path, text_column)


def _parquet_rows(path: str, text_column: str) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"cannot read parquet file '{path}': {e}") from None
    names = pf.schema_arrow.names
    _check_column(text_column, names, f"'{path}'")
    kind = pf.schema_arrow.field(text_column).type
    kind = kind.value_type if pa.types.is_dictionary(kind) else kind
    _check_text_type(text_column, str(kind), pa.types.is_string(kind) or pa.types.is_large_string(kind), f"'{path}'")
    wanted = [c for c in (text_column, *PATH_COLUMNS, *REPO_COLUMNS, *LANGUAGE_COLUMNS) if c in names]
    batches = pf.iter_batches(batch_size=TABLE_BATCH_ROWS, columns=list(dict.fromkeys(wanted)))
    done = 0
    while True:
        # A damaged page (bad compression, a cut-off column chunk, strings that are not UTF-8) only
        # shows when its batch is read, long after the footer opened fine.
        try:
            batch = next(batches, None)
            rows = batch.to_pylist() if batch is not None else []
        except (OSError, ValueError, pa.ArrowException) as e:
            raise DataError(
                f"cannot read parquet file '{path}' after row {done}: {e}; the file is damaged, write or download it again"
            ) from None
        if batch is None:
            return
        done += len(rows)
        yield from rows


def _json_rows(path: str, text_column: str) -> Iterator[Any]:
    """Rows of a JSON Lines file, or of a .json file holding one array of objects or one object
    (pretty-printed or not). A line that is not UTF-8 is `UNDECODABLE_ROW` (counted as
    `undecodable`, as such a file in a folder is)."""
    with open(path, "rb") as f:
        head = f.read(1024).lstrip(b"\xef\xbb\xbf \t\r\n")
        f.seek(0)
        lines: Iterable[Any] | None = None
        if path.lower().endswith(".json") and head.startswith(b"["):
            lines = _whole_json(f, path)
        elif path.lower().endswith(".json") and _spans_lines(f):
            try:  # one pretty-printed object; if it is not one, the lines are rows (bad ones counted)
                lines = _whole_json(f, path)
            except DataError:
                f.seek(0)
        if lines is None:
            lines = (_json_bytes_line(line, i == 0) for i, line in enumerate(f) if line.strip())
        # A row without the column is a `malformed_row`, the first as any other; a file where none
        # of the first COLUMN_CHECK_ROWS holds it names another column (a typo): an error.
        found, lacking, columns = False, 0, {}
        for row in lines:
            if not found and isinstance(row, dict):
                found = text_column in row
                lacking += not found
                columns.update(dict.fromkeys(row))
                if lacking == COLUMN_CHECK_ROWS:
                    _check_column(text_column, list(columns), f"'{path}'")
            yield row  # a malformed line is None: counted as `malformed_row`
        if lacking and not found:
            _check_column(text_column, list(columns), f"'{path}'")


def _whole_json(f: BinaryIO, path: str) -> list[Any]:
    try:
        rows = json.loads(f.read().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"'{path}' is not UTF-8: {e}") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"'{path}' is not valid JSON: {e or 'nested too deep'}") from None
    return rows if isinstance(rows, list) else [rows]


def _spans_lines(f: BinaryIO) -> bool:
    """Whether a .json file's first line is not a whole JSON value, as in a pretty-printed object:
    such a file is one document, not JSON Lines (whose every line is a whole value)."""
    first = next((line for line in f if line.strip()), b"")
    f.seek(0)
    return bool(first) and _json_bytes_line(first, True) is None


def _json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nested too deep for Python's reader
        return None


UNDECODABLE_ROW = object()  # a JSON Lines line that is not UTF-8


def _json_bytes_line(line: bytes, first: bool) -> Any:
    try:
        text = line.decode("utf-8-sig" if first else "utf-8")  # -sig: a byte order mark is no row
    except UnicodeDecodeError:
        return UNDECODABLE_ROW
    return _json_line(text)


def _batch_rows(batch: dict[str, list[Any]]) -> Iterator[dict[str, Any]]:
    keys = list(batch)
    yield from (dict(zip(keys, values, strict=True)) for values in zip(*(batch[k] for k in keys), strict=True))


def _check_column(text_column: str, columns: list[str], where: str) -> None:
    if text_column not in columns:
        raise DataError(f"{where} has no column '{text_column}' (columns: {', '.join(columns)}); set --text-column")


def _check_text_type(text_column: str, kind: str, is_text: bool, where: str) -> None:
    """A text column of another type (binary, numbers) would make every row `malformed_row`."""
    if not is_text:
        raise DataError(f"{where}: column '{text_column}' holds {kind}, not text; set --text-column to a string column")
