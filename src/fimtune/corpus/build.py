"""`fimtune data build`: sources -> filtered, deduplicated train/validation dataset + stats.json.

    sources (folders, git repos, packages, Hub datasets, parquet/jsonl)
      -> documents {repo_id, file_path, language, content}   path, size and content filters
      -> exact dedup (sha256)  -> near dedup (MinHash LSH, verified Jaccard)
      -> split (by file or repo; duplicate clusters on one side)
      -> DatasetDict(train, validation).save_to_disk(out) + out/stats.json, written atomically

Python API::

    from fimtune.config import CorpusConfig
    stats = build_corpus(["~/code/myrepo"], packages=["peft"], hf=[], cfg=CorpusConfig(), out=Path("data/mine"))
    print(format_stats(stats))
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fimtune import __version__
from fimtune.config import CorpusConfig
from fimtune.corpus.files import Document
from fimtune.corpus.languages import KNOWN_LANGUAGES, canonical_language
from fimtune.corpus.sources import Source, iter_documents, resolve_sources
from fimtune.corpus.split import check_split_args, split_files, union_groups
from fimtune.corpus.stats import CHARS_PER_TOKEN_ESTIMATE, TOKENS_NOTE, format_stats, merged, size_table
from fimtune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = ["build_corpus", "format_stats"]

COLUMNS = ("repo_id", "file_path", "language", "content", "size", "id")
STATS_FILE = "stats.json"
DATASET_MARKER = "dataset_dict.json"
TOP_REASONS_IN_ERRORS = 4
FOLDER_TABLE_SUFFIXES = (".parquet", ".jsonl")
"""Table files that, inside a folder with nothing usable, mean the user meant the tables (.json is config)."""
BUILD_STATS_KEYS = frozenset({"fimtune_version", "sources", "kept", "skipped_files", "splits", "config"})
"""Keys every build's stats.json holds: how `--overwrite` tells an earlier build from other folders."""


@dataclass
class Corpus:
    """Usable documents in path order, with their ids and sources, and what dedup decided."""

    docs: list[Document] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    source_of: list[int] = field(default_factory=list)
    links: list[tuple[int, int]] = field(default_factory=list)
    """(duplicate, earlier file) pairs: exact and near duplicates."""
    dropped: dict[int, str] = field(default_factory=dict)
    """Index -> `exact_duplicate` | `near_duplicate` for the files dedup removes."""


def build_corpus(
    paths: list[str],
    packages: list[str],
    hf: list[str],
    cfg: CorpusConfig,
    out: Path,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Build the dataset at ``out`` and return its stats (also written as `out/stats.json`)."""
    check_config(cfg)
    out = Path(os.path.abspath(Path(out).expanduser()))  # `--out .` has a name to rename
    check_out(out, overwrite)
    timings: dict[str, float] = {}
    with ExitStack() as stack:  # clones are removed when the build ends, failed or not
        clock = time.perf_counter()
        sources = resolve_sources(paths, packages, hf, stack)
        if not sources:
            raise DataError("no sources given: name folders, git repos, parquet/jsonl files, --package or --hf")
        corpus = scan(sources, cfg, progress)
        exact_dedup(corpus, cfg.exact_dedup)
        timings["scan"] = time.perf_counter() - clock
        clock = time.perf_counter()
        near_dedup(corpus, cfg, progress)
        timings["near_dedup"] = time.perf_counter() - clock
    clock = time.perf_counter()
    kept = [i for i in range(len(corpus.docs)) if i not in corpus.dropped]
    is_val, split_info = split_kept(corpus, kept, cfg)
    timings["split"] = time.perf_counter() - clock
    stats = collect_stats(sources, corpus, kept, is_val, split_info, cfg, timings)
    clock = time.perf_counter()
    write_atomically(out, lambda tmp: save_dataset(tmp, corpus, kept, is_val, stats))
    stats["timings_s"]["write"] = round(time.perf_counter() - clock, 3)
    write_json(out / STATS_FILE, stats)  # again, with the write time
    return stats


# --------------------------------------------------------------------------------------
# Checks before any work
# --------------------------------------------------------------------------------------


def check_config(cfg: CorpusConfig) -> None:
    """Reject values that make no sense, naming the flag."""
    if not 0 < cfg.near_dedup_threshold <= 1:
        raise ConfigError(f"--near-dedup-threshold must be in (0, 1]; got {cfg.near_dedup_threshold}")
    if cfg.near_dedup_ngram < 1:
        raise ConfigError(f"--near-dedup-ngram must be >= 1; got {cfg.near_dedup_ngram}")
    if cfg.near_dedup_num_perm < 2:
        raise ConfigError(f"--near-dedup-num-perm must be >= 2; got {cfg.near_dedup_num_perm}")
    for name in ("max_file_size", "max_line_length", "max_mean_line_length", "min_alnum_fraction"):
        if not getattr(cfg, name) >= 0:  # NaN too, which no file fails: it turned the filter off
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (0 disables it); got {getattr(cfg, name)}")
    check_split_args(cfg.validation_fraction, cfg.validation_size)
    for name in cfg.languages or []:
        if (language := canonical_language(name)) not in KNOWN_LANGUAGES:  # a Hub dataset's own names may be others
            close = difflib.get_close_matches(language, sorted(KNOWN_LANGUAGES), n=1)
            log.warning(
                "--languages %s: no file name or suffix gives this language%s; files are kept by theirs",
                name,
                f" (did you mean {close[0]}?)" if close else "",
            )


def check_out(out: Path, overwrite: bool) -> None:
    """An existing ``out`` needs --overwrite, and is only replaced when it is an earlier build (or empty)."""
    if file := next((p for p in out.parents if p.exists() and not p.is_dir()), None):
        raise DataError(f"--out '{out}': '{file}' is a file, not a folder")
    base = next(p for p in out.parents if p.exists())  # where the output's folders will be made
    if not os.access(base, os.W_OK | os.X_OK):
        raise DataError(f"cannot write --out '{out}': '{base}' is not writable; pass another --out")
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise DataError(f"output folder '{out}' already exists: pass --overwrite to replace it")
    if not is_earlier_build(out) and not (out.is_dir() and not any(out.iterdir())):
        raise DataError(
            f"'{out}' exists and is not a dataset folder written by fimtune: refusing to overwrite it "
            f"(a build holds {DATASET_MARKER} and the {STATS_FILE} this command writes); "
            "pass another --out, or empty that folder yourself"
        )


def is_earlier_build(out: Path) -> bool:
    """Whether ``out`` is a folder this builder wrote: the saved dataset's marker beside a stats.json
    that holds the keys every build writes. A file of that name alone (a project's own stats.json)
    does not make a folder one to delete."""
    if not out.is_dir() or not (out / DATASET_MARKER).is_file():
        return False
    try:
        stats = json.loads((out / STATS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(stats, dict) and stats.keys() >= BUILD_STATS_KEYS


# --------------------------------------------------------------------------------------
# Scan and dedup
# --------------------------------------------------------------------------------------


def scan(sources: list[Source], cfg: CorpusConfig, progress: bool = True) -> Corpus:
    """Read every source (path order within each); a source with nothing usable is an error."""
    from tqdm.auto import tqdm

    corpus = Corpus()
    with tqdm(desc="scanning", unit=" files", disable=not progress) as bar:
        for k, source in enumerate(sources):
            source.tally.on_file = bar.update
            for doc in iter_documents(source, cfg):
                corpus.docs.append(doc)
                corpus.ids.append(hashlib.sha256(doc.content.encode("utf-8")).hexdigest())
                corpus.source_of.append(k)
            source.tally.on_file = None
            if source.tally.usable == 0:
                raise DataError(no_usable_files_message(source))
    return corpus


def no_usable_files_message(source: Source) -> str:
    t = source.tally
    if t.files_seen == 0 and source.kind in ("table", "hub"):
        return f"source '{source.label}' holds no rows; check that it is the file you meant"
    if t.files_seen == 0:
        return f"source '{source.label}' holds no files (skipped folders: {dict(t.skipped_dirs) or 'none'})"
    ranked = sorted(t.skipped_files.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_REASONS_IN_ERRORS]
    top = ", ".join(f"{n} {reason}" for reason, n in ranked)
    what = "rows" if source.kind in ("table", "hub") else "files"
    tables = _table_files(source.root) if source.kind in ("folder", "git") else []
    if tables:  # Hub downloads and dataset dumps: a folder of shards is read as code, file by file
        folder, suffix = os.path.dirname(tables[0]), os.path.splitext(tables[0])[1]
        return (
            f"source '{source.label}' has no usable files ({t.files_seen} seen; skipped: {top}); its "
            f"{len(tables)} .parquet/.jsonl file(s) are read as tables only when named themselves: "
            f"pass them as sources (e.g. {folder}/*{suffix}) instead of their folder"
        )
    return (
        f"source '{source.label}' has no usable {what} ({t.files_seen} seen; skipped: {top}); check the path, "
        "or loosen the filters (--max-file-size, --languages, --min-alnum-fraction, ...)"
    )


def _table_files(root: str) -> list[str]:
    """The .parquet/.jsonl files under ``root`` (symlinked folders not followed), in sorted order."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        found += sorted(os.path.join(folder, n) for n in names if n.lower().endswith(FOLDER_TABLE_SUFFIXES))
    return found


def exact_dedup(corpus: Corpus, drop: bool) -> None:
    """Link each file to the first with the same content; drop the later ones when ``drop``."""
    first: dict[str, int] = {}
    for i, doc_id in enumerate(corpus.ids):
        j = first.setdefault(doc_id, i)
        if j != i:
            corpus.links.append((i, j))
            if drop:
                corpus.dropped[i] = "exact_duplicate"


def near_dedup(corpus: Corpus, cfg: CorpusConfig, progress: bool = True) -> None:
    """Link near-duplicates among the files exact dedup kept; drop them unless keep_near_duplicates."""
    if not cfg.near_dedup:
        return
    from fimtune.corpus.dedup import find_near_duplicates, near_duplicate_pairs

    candidates = [i for i in range(len(corpus.docs)) if i not in corpus.dropped]
    texts = [corpus.docs[i].content for i in candidates]
    options = {
        "threshold": cfg.near_dedup_threshold,
        "ngram": cfg.near_dedup_ngram,
        "num_perm": cfg.near_dedup_num_perm,
        "progress": progress,
    }
    if cfg.keep_near_duplicates:  # every pair: a chain of them must land on one side of the split
        corpus.links.extend((candidates[i], candidates[j]) for i, j in near_duplicate_pairs(texts, **options))
        return
    for i, j in zip(candidates, find_near_duplicates(texts, **options), strict=True):
        if j is not None:
            corpus.links.append((i, candidates[j]))
            corpus.dropped[i] = "near_duplicate"


def split_kept(corpus: Corpus, kept: list[int], cfg: CorpusConfig) -> tuple[list[bool], dict[str, Any]]:
    """The split of the kept files; files linked as duplicates (kept ones) share a side."""
    group = union_groups(len(corpus.docs), corpus.links)
    first_kept: dict[int, int] = {}
    duplicate_of = [first_kept.setdefault(group[i], k) for k, i in enumerate(kept)]
    return split_files(
        [corpus.docs[i].repo_id for i in kept],
        duplicate_of,
        validation_fraction=cfg.validation_fraction,
        validation_size=cfg.validation_size,
        split_by=cfg.split_by,
        mode=cfg.split_mode,
        seed=cfg.seed,
        keys=[f"{corpus.docs[i].repo_id}/{corpus.docs[i].file_path}" for i in kept],
    )


# --------------------------------------------------------------------------------------
# Stats and output
# --------------------------------------------------------------------------------------


def collect_stats(
    sources: list[Source],
    corpus: Corpus,
    kept: list[int],
    is_val: list[bool],
    split_info: dict[str, Any],
    cfg: CorpusConfig,
    timings: dict[str, float],
) -> dict[str, Any]:
    docs = [corpus.docs[i] for i in kept]
    sizes = [len(d.content.encode("utf-8")) for d in docs]
    chars = sum(len(d.content) for d in docs)
    kept_per_source = Counter(corpus.source_of[i] for i in kept)
    skipped = [Counter(s.tally.skipped_files) for s in sources]  # plus what dedup dropped
    for i, reason in corpus.dropped.items():
        skipped[corpus.source_of[i]][reason] += 1
    summaries = [
        {**s.summary(), "skipped_files": dict(sorted(skipped[k].items())), "kept": kept_per_source[k]}
        for k, s in enumerate(sources)
    ]
    dropped = Counter(corpus.dropped.values())
    return {
        "fimtune_version": __version__,
        "sources": summaries,
        "files_seen": sum(s.tally.files_seen for s in sources),
        "bytes_read": sum(s.tally.bytes_read for s in sources),
        "usable": len(corpus.docs),
        "kept": len(docs),
        "skipped_files": merged(skipped),
        "skipped_dirs": merged([s.tally.skipped_dirs for s in sources]),
        "languages": size_table([d.language for d in docs], sizes),
        "repos": size_table([d.repo_id for d in docs], sizes),
        "bytes": sum(sizes),
        "chars": chars,
        "estimated_tokens": round(chars / CHARS_PER_TOKEN_ESTIMATE),
        "estimated_tokens_note": TOKENS_NOTE,
        "dedup": {
            "exact_duplicates": dropped["exact_duplicate"],
            "near_duplicates": dropped["near_duplicate"],
            "duplicate_links": len(corpus.links),
            "near_dedup": cfg.near_dedup,
            "near_dedup_threshold": cfg.near_dedup_threshold,
        },
        "splits": {
            name: {
                "files": sum(1 for v in is_val if v == want),
                "bytes": sum(s for s, v in zip(sizes, is_val, strict=True) if v == want),
            }
            for name, want in (("train", False), ("validation", True))
        },
        "split": split_info,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "config": dataclasses.asdict(cfg),
    }


def write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Run ``write`` on a temporary folder beside ``out``, then rename it to ``out``.

    A failure (or Ctrl-C) removes the temporary folder and leaves an earlier ``out`` as it was.
    """
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:  # a folder that refuses writes (read-only, no permission): after the whole build
        raise DataError(f"cannot write --out '{out}': {e.strerror}; pass another --out") from None
    try:
        write(tmp)
        if out.exists() or out.is_symlink():
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    if old.is_symlink():  # `out` linked to an earlier build: the link goes, the folder it named stays
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def save_dataset(tmp: Path, corpus: Corpus, kept: list[int], is_val: list[bool], stats: dict) -> None:
    """`DatasetDict(train, validation).save_to_disk(tmp)` with the record columns, plus stats.json."""
    import datasets
    import pyarrow as pa

    features = datasets.Features({name: datasets.Value("int64" if name == "size" else "string") for name in COLUMNS})
    rows = {
        "train": [i for i, v in zip(kept, is_val, strict=True) if not v],
        "validation": [i for i, v in zip(kept, is_val, strict=True) if v],
    }
    splits = {
        name: datasets.Dataset(pa.Table.from_pydict(_columns(corpus, idx), schema=features.arrow_schema))
        for name, idx in rows.items()
    }
    # An empty split must still be written as one (empty) shard, or `load_from_disk` fails on it.
    num_shards = {name: 1 for name, idx in rows.items() if not idx}
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # our own bars say enough
    try:
        datasets.DatasetDict(splits).save_to_disk(str(tmp), num_shards=num_shards)
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
    write_json(tmp / STATS_FILE, stats)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never half a file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _columns(corpus: Corpus, idx: list[int]) -> dict[str, list[Any]]:
    docs = [corpus.docs[i] for i in idx]
    return {
        "repo_id": [d.repo_id for d in docs],
        "file_path": [d.file_path for d in docs],
        "language": [d.language for d in docs],
        "content": [d.content for d in docs],
        "size": [len(d.content.encode("utf-8")) for d in docs],
        "id": [corpus.ids[i] for i in idx],
    }
