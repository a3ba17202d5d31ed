"""Files -> documents: walking folders, reading files, and counting every file left out.

A :class:`Tally` belongs to one source and counts what it saw and why each skipped
file or folder was skipped (the reasons of :mod:`fimtune.corpus.filters`). Folders
are walked in sorted order (the "path order" dedup keeps the first of), symlinked
folders are never followed (no loops), and file sizes are checked with `stat` before
a file is read, so a 50 MB file is never read whole.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fimtune.config import CorpusConfig
from fimtune.corpus.filters import (
    VCS_DIRS,
    decode,
    dir_reason,
    lfs_pointer_reason,
    quality_reason,
    secret_name_reason,
    size_reason,
    suffix_reason,
)
from fimtune.corpus.languages import (
    NOTEBOOK_SUFFIX,
    SHEBANG_MAX_BYTES,
    canonical_language,
    content_language,
    has_suffix,
    language_of,
    script_language,
)
from fimtune.corpus.notebooks import MalformedNotebook, notebook_to_code

log = logging.getLogger(__name__)

GITIGNORE = ".gitignore"
GIT_MARKER = ".git"  # a folder (or, in worktrees and submodules, a file)
INFO_EXCLUDE = os.path.join(GIT_MARKER, "info", "exclude")  # a clone's own ignore rules, below its .gitignore files
VIRTUALENV_MARKER = "pyvenv.cfg"
GIT_LS_TIMEOUT_S = 60
DIR_MARK = "ps_d"  # pathspec's regex group for the `/` after a folder a pattern matched
SAVED_DATASET_MARKER = "dataset_dict.json"  # what `DatasetDict.save_to_disk` writes
RUN_CONFIG = "config.yaml"  # a `fimtune train` run folder: this beside what only a run holds
RUN_MARKERS = ("checkpoints", "adapter", os.path.join("tokenizer", "tokenizer_config.json"))
MERGED_MARKERS = ("fimtune.json", "config.json")  # a `fimtune merge` folder holds both
NOTEBOOK_RAW_SIZE_FACTOR = 20
"""A notebook's saved outputs (a plot is base64 in its JSON) may dwarf its code: its .ipynb is read
up to this many times --max-file-size, and the limit itself applies to the code it converts to."""


@dataclass
class Document:
    """One usable file (or table row), before dedup."""

    repo_id: str
    file_path: str
    language: str
    content: str


@dataclass
class Tally:
    """What one source held: files seen, bytes read, and why files and folders were skipped."""

    files_seen: int = 0
    bytes_read: int = 0
    usable: int = 0
    skipped_files: Counter = field(default_factory=Counter)
    skipped_dirs: Counter = field(default_factory=Counter)
    on_file: Callable[[], None] | None = None
    """Called once per file seen (the progress bar)."""

    def seen(self) -> None:
        self.files_seen += 1
        if self.on_file:
            self.on_file()

    def skip(self, reason: str) -> None:
        """Count a skipped file; returns None so readers can `return tally.skip(...)`."""
        self.skipped_files[reason] += 1

    def skip_dir(self, reason: str) -> None:
        self.skipped_dirs[reason] += 1


# --------------------------------------------------------------------------------------
# Walking a folder
# --------------------------------------------------------------------------------------


def walk_folder(
    root: str,
    repo_id: str,
    tally: Tally,
    respect_gitignore: bool = True,
    links_inside: bool = False,
    ancestors: bool = True,
) -> Iterator[tuple[str, str, str]]:
    """(repo_id, path relative to its repo, absolute path) of each candidate file, in sorted order.

    A subfolder holding `.git` is a repository of its own: its files get its name as
    repo_id and paths relative to it, and the `.gitignore` files above it stop applying.
    Skipped folders go to ``tally.skipped_dirs`` (never listed); files matched by a
    `.gitignore`, broken symlinks and symlink loops go to ``tally.skipped_files``.
    ``links_inside``: a file symlink is followed only to a file inside ``root`` (a repository
    cloned from elsewhere could link to the user's own files: `symlink_outside`). ``ancestors``: the
    `.gitignore` files between ``root``'s repository root and ``root`` apply too (unless they
    ignore ``root`` itself); not for an installed package's folder.
    """
    inside = os.path.join(os.path.realpath(root), "") if links_inside else None
    specs = _gitignores_above(root) if respect_gitignore and ancestors else []
    tracked = _tracked_files(root) if respect_gitignore else set()
    yield from _walk(root, "", specs, tally, respect_gitignore, (repo_id, ""), inside, tracked)


def _tracked_files(folder: str) -> set[str]:
    """The paths (``folder`` joined with each) of the files git tracks under ``folder``, and of the
    folders above them: a .gitignore rule leaves out only untracked files, git keeps a committed one.
    Empty outside a repository, or without git."""
    try:
        res = subprocess.run(["git", "-C", folder, "ls-files", "-z"], capture_output=True, timeout=GIT_LS_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    tracked = set()
    for rel in os.fsdecode(res.stdout).split("\0") if res.returncode == 0 else []:
        while rel and (path := os.path.join(folder, *rel.split("/"))) not in tracked:
            tracked.add(path)
            rel = rel.rpartition("/")[0]
    return tracked


class _Above:
    """A `.gitignore` of a folder above the walked one (in the same repository): it sees paths from
    its own folder, ``prefix`` (the walked folder's path from there) first."""

    def __init__(self, spec: Any, prefix: str) -> None:
        self.spec, self.prefix = spec, prefix

    def last_match(self, path: str) -> bool | None:
        return last_match(self.spec, self.prefix + path)


def _gitignores_above(root: str) -> list:
    """The `.gitignore` files between ``root``'s repository root and ``root`` (git applies them to a
    subfolder too), as specs for paths relative to ``root``; none outside a repository."""
    here = os.path.realpath(root)
    folders, parent = [], here
    while True:
        if os.path.exists(os.path.join(parent, GIT_MARKER)):
            break
        up = os.path.dirname(parent)
        if up == parent:  # no repository above
            return []
        folders.append(up)
        parent = up
    exclude = _info_exclude(parent) if folders else None  # the root's own is read by the walk
    specs = [("", _Above(exclude, os.path.relpath(here, parent).replace(os.sep, "/") + "/"))] if exclude else []
    for folder in reversed(folders):
        path = os.path.join(folder, GITIGNORE)
        if os.path.isfile(path):
            prefix = os.path.relpath(here, folder).replace(os.sep, "/") + "/"
            specs.append(("", _Above(_load_gitignore(path), prefix)))
    # A folder the repository ignores (a virtual environment's site-packages inside a project, a
    # build output) was asked for by name: its own files are wanted, whatever the rules above say.
    return [] if specs and gitignored(specs, "", is_dir=True) else specs


def _info_exclude(repo_root: str) -> Any:
    """The spec of the repository's `.git/info/exclude`, or None; git ranks it below every .gitignore."""
    path = os.path.join(repo_root, INFO_EXCLUDE)
    return _load_gitignore(path) if os.path.isfile(path) else None


def _walk(
    path: str,
    rel: str,
    specs: list,
    tally: Tally,
    respect_gitignore: bool,
    repo: tuple[str, str],
    inside: str | None,
    tracked: set[str],
) -> Iterator[tuple[str, str, str]]:
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        tally.skip_dir("unreadable")
        return
    names = {e.name for e in entries}
    if rel and GIT_MARKER in names:  # a nested repository
        repo, specs = (os.path.basename(path), rel), []
        if respect_gitignore:
            tracked |= _tracked_files(path)
    exclude = _info_exclude(path) if respect_gitignore and GIT_MARKER in names else None
    if exclude:
        specs = [*specs, (rel, exclude)]
    if respect_gitignore and GITIGNORE in names:
        specs = [*specs, (rel, _load_gitignore(os.path.join(path, GITIGNORE)))]
    repo_id, repo_rel = repo
    for entry in entries:
        entry_rel = f"{rel}/{entry.name}" if rel else entry.name
        kind = _entry_kind(entry)
        if kind == "dir":
            reason = _dir_reason(entry, entry_rel, specs)
            if reason == "gitignore" and entry.path in tracked:  # only its tracked files: all else is ignored
                import pathspec

                sub = [*specs, (entry_rel, pathspec.GitIgnoreSpec.from_lines(["*"]))]
                yield from _walk(entry.path, entry_rel, sub, tally, respect_gitignore, repo, inside, tracked)
            elif reason:
                tally.skip_dir(reason)
            else:
                yield from _walk(entry.path, entry_rel, specs, tally, respect_gitignore, repo, inside, tracked)
            continue
        if kind == "symlink_dir":
            tally.skip_dir("symlink_dir")
            continue
        tally.seen()
        if entry.is_symlink() and kind == "file":
            target = os.path.realpath(entry.path)
            if inside is not None and not target.startswith(inside):
                kind = "symlink_outside"
            elif VCS_DIRS & set(target[len(inside or "") :].split(os.sep)):
                kind = "symlink_into_vcs"
        if kind in ("broken_symlink", "symlink_loop", "symlink_outside", "symlink_into_vcs"):
            tally.skip(kind)
        elif specs and entry.path not in tracked and gitignored(specs, entry_rel, is_dir=False):
            tally.skip("gitignore")
        else:
            yield repo_id, entry_rel[len(repo_rel) + 1 :] if repo_rel else entry_rel, entry.path


def _dir_reason(entry: os.DirEntry, rel: str, specs: list) -> str | None:
    reason = dir_reason(
        entry.name,
        has_pyvenv_cfg=os.path.isfile(os.path.join(entry.path, VIRTUALENV_MARKER)),
        is_saved_dataset=os.path.isfile(os.path.join(entry.path, SAVED_DATASET_MARKER)),
        is_fimtune_output=_is_fimtune_output(entry.path),
    )
    if not reason and specs and gitignored(specs, rel, is_dir=True):
        reason = "gitignore"
    return reason


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run folder of `fimtune train` (a project's own config.yaml is not one)."""
    return os.path.isfile(os.path.join(path, RUN_CONFIG)) and any(
        os.path.exists(os.path.join(path, m)) for m in RUN_MARKERS
    )


def _is_fimtune_output(path: str) -> bool:
    """Whether ``path`` is a run folder of `fimtune train` or a model folder of `fimtune merge`
    (written inside the project when the README is followed there): fimtune's output, not code."""
    return is_run_folder(path) or all(os.path.isfile(os.path.join(path, m)) for m in MERGED_MARKERS)


def _entry_kind(entry: os.DirEntry) -> str:
    """`dir`, `file` (anything else, even a FIFO: reading decides), `symlink_dir`, `broken_symlink`, `symlink_loop`."""
    if not entry.is_symlink():
        return "dir" if entry.is_dir(follow_symlinks=False) else "file"
    try:
        st = os.stat(entry.path)
    except OSError as e:  # a missing target, or a path to it through a file (ENOTDIR)
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return "broken_symlink"
        return "symlink_loop" if e.errno == errno.ELOOP else "file"
    return "symlink_dir" if stat.S_ISDIR(st.st_mode) else "file"


def _load_gitignore(path: str):
    import pathspec

    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    try:
        return pathspec.GitIgnoreSpec.from_lines(lines)
    except (ValueError, re.error):  # one bad line (`bin\`, a lone `!`, `[z-a]`): git skips it, so do we
        return pathspec.GitIgnoreSpec.from_lines(_valid_gitignore_lines(path, lines))


def _valid_gitignore_lines(path: str, lines: list[str]) -> list[str]:
    """The lines of the `.gitignore` at ``path`` that compile, in order; a warning names the others."""
    import pathspec

    valid, invalid = [], []
    for line in lines:
        try:
            pathspec.GitIgnoreSpec.from_lines([line])
        except (ValueError, re.error):
            invalid.append(line)
        else:
            valid.append(line)
    log.warning(
        "%s: ignoring %d line(s) that are not valid patterns (git ignores them too): %s",
        path,
        len(invalid),
        ", ".join(repr(line) for line in invalid),
    )
    return valid


def gitignored(specs: list, rel: str, is_dir: bool) -> bool:
    """Whether the `.gitignore` files above ``rel`` exclude it (the deepest deciding one wins).

    ``specs`` holds (folder relative path, compiled spec) from the root down.
    """
    ignored = False
    for base, spec in specs:
        sub = rel[len(base) + 1 :] if base else rel
        sub = sub + "/" if is_dir and sub else sub  # "": the prefix of an `_Above`, a folder already
        result = spec.last_match(sub) if isinstance(spec, _Above) else last_match(spec, sub)
        if result is not None:
            ignored = result
    return ignored


def last_match(spec: Any, path: str) -> bool | None:
    """Whether the last pattern of ``spec`` that matches ``path`` itself (a folder ends with `/`)
    ignores it, or None when none does.

    A pattern that matches only a folder above ``path`` (`*/`, `sub`) is passed over: the walk
    decided that folder already, and descends only into the folders it keeps. (`check_file` of
    pathspec's GitIgnoreSpec ranks such matches, and `!*/` after `*` kept no folder.)
    """
    result = None
    for pattern in spec.patterns:
        if pattern.include is not None and _matches_itself(pattern.regex, path):
            result = pattern.include
    return result


def _matches_itself(regex: re.Pattern, path: str) -> bool:
    """Whether ``regex`` (a pathspec pattern's) matches ``path``, not only a folder above it. An
    unanchored one (`*/` is `(?P<ps_d>/)`) matches the first folder first: later matches are tried."""
    m = regex.search(path)
    while m and m.groupdict().get(DIR_MARK) is not None and m.end(DIR_MARK) < len(path):
        m = regex.search(path, m.start() + 1)
    return m is not None


# --------------------------------------------------------------------------------------
# Reading one file
# --------------------------------------------------------------------------------------


def read_file(path: str, rel: str, repo_id: str, cfg: CorpusConfig, tally: Tally) -> Document | None:
    """The document of the file at ``path`` (shown as ``rel``), or None with the reason counted."""
    name = rel.rsplit("/", 1)[-1]
    reason = suffix_reason(name) or (None if cfg.keep_secrets else secret_name_reason(name))
    language = language_of(rel)
    if not reason and language is None and not has_suffix(name):  # a script says what it is: `#!/bin/bash`
        language = script_language(_head(path))
    if not reason and language is None:
        reason = "unknown_language"
    if reason:
        return tally.skip(reason)
    is_notebook = name.lower().endswith(NOTEBOOK_SUFFIX)
    data, reason = _read_bytes(path, cfg.max_file_size * (NOTEBOOK_RAW_SIZE_FACTOR if is_notebook else 1))
    if reason:
        return tally.skip(reason)
    tally.bytes_read += len(data)
    text, reason = decode(data)
    reason = reason or lfs_pointer_reason(text)
    if reason:
        return tally.skip(reason)
    if is_notebook:
        try:
            text, language = notebook_to_code(text, keep_markdown=cfg.notebook_markdown)
        except MalformedNotebook:
            return tally.skip("malformed_notebook")
        reason = size_reason(len(text.encode("utf-8")), cfg.max_file_size)  # the limit is for the code
        if reason:
            return tally.skip(reason)
    return accept(Document(repo_id, rel, content_language(language, text), text), cfg, tally)


def _head(path: str) -> str:
    """The first bytes of a regular file, as text ("" when it cannot be read: reading decides why)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block
            return ""
        with open(path, "rb") as f:
            return f.read(SHEBANG_MAX_BYTES).decode("utf-8", "replace")
    except OSError:
        return ""


def _read_bytes(path: str, max_file_size: int) -> tuple[bytes, str | None]:
    """The bytes of a regular file, or a reason: stat first, so big files are never read."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return b"", "broken_symlink" if os.path.islink(path) else "unreadable"
        return b"", "symlink_loop" if e.errno == errno.ELOOP else "unreadable"
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block, a device never ends
        return b"", "unreadable"
    reason = size_reason(st.st_size, max_file_size)
    if reason:
        return b"", reason
    try:
        with open(path, "rb") as f:
            # Read at most one byte past the limit: the file may have grown since stat.
            data = f.read(max_file_size + 1) if max_file_size else f.read()
    except OSError:
        return b"", "unreadable"
    return (b"", "too_large") if max_file_size and len(data) > max_file_size else (data, None)


def accept(doc: Document, cfg: CorpusConfig, tally: Tally) -> Document | None:
    """``doc`` when its language is selected and its content passes the quality filters."""
    if cfg.languages and doc.language not in {canonical_language(lang) for lang in cfg.languages}:
        return tally.skip("language_not_selected")
    reason = quality_reason(
        doc.content,
        max_line_length=cfg.max_line_length,
        max_mean_line_length=cfg.max_mean_line_length,
        min_alnum_fraction=cfg.min_alnum_fraction,
        skip_autogenerated=cfg.skip_autogenerated,
        keep_secrets=cfg.keep_secrets,
    )
    if reason:
        return tally.skip(reason)
    tally.usable += 1
    doc.file_path, doc.repo_id, doc.language = printable(doc.file_path), printable(doc.repo_id), printable(doc.language)
    return doc


def printable(name: str) -> str:
    """``name`` as valid UTF-8: bytes that were not (kept by `os` as surrogates) become U+FFFD.

    >>> printable("caf\\udce9.py")
    'caf\\ufffd.py'
    """
    if name.isascii():
        return name
    try:
        data = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape, not from `os`
        data = name.encode("utf-8", "surrogatepass")
    return data.decode("utf-8", "replace")
