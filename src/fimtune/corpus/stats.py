"""The numbers of a corpus build (`stats.json`) and the table `fimtune data build` prints."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from fimtune.corpus.filters import REASONS

CHARS_PER_TOKEN_ESTIMATE = 3.5
TOKENS_NOTE = (
    f"characters / {CHARS_PER_TOKEN_ESTIMATE}: an estimate only; the model's tokenizer decides "
    "(code often runs 2.5-4 characters per token)"
)
TOP_REPOS = 15


def size_table(keys: Sequence[str], sizes: Sequence[int]) -> dict[str, dict[str, int]]:
    """{key: {files, bytes}}, most files first.

    >>> size_table(["py", "md", "py"], [10, 5, 20])
    {'py': {'files': 2, 'bytes': 30}, 'md': {'files': 1, 'bytes': 5}}
    """
    files: Counter = Counter()
    nbytes: Counter = Counter()
    for key, size in zip(keys, sizes, strict=True):
        files[key] += 1
        nbytes[key] += size
    return {k: {"files": n, "bytes": nbytes[k]} for k, n in sorted(files.items(), key=lambda kv: (-kv[1], kv[0]))}


def merged(counters: Sequence[Counter]) -> dict[str, int]:
    """Sum of counters, largest first.

    >>> merged([Counter(a=1, b=3), Counter(a=5)])
    {'a': 6, 'b': 3}
    """
    total: Counter = Counter()
    for c in counters:
        total.update(c)
    return dict(sorted(total.items(), key=lambda kv: (-kv[1], kv[0])))


def human_bytes(n: float) -> str:
    """A size for people.

    >>> human_bytes(512), human_bytes(1_500_000), human_bytes(3.2e9)
    ('512 B', '1.5 MB', '3.2 GB')
    """
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def format_stats(stats: dict[str, Any]) -> str:
    """A readable table of a build's stats: sources, filters, languages, repos, sizes, split."""
    lines = [
        f"files seen {stats['files_seen']:,}  usable {stats['usable']:,}  kept {stats['kept']:,}  "
        f"({human_bytes(stats['bytes'])}, ~{stats['estimated_tokens']:,} tokens estimated as chars/"
        f"{CHARS_PER_TOKEN_ESTIMATE})",
        "",
        "sources",
        *(_source_line(s) for s in stats["sources"]),
    ]
    lines += _counts_section("skipped files", stats["skipped_files"])
    lines += _counts_section("skipped folders (their files were never listed)", stats["skipped_dirs"])
    lines += _sizes_section("languages", stats["languages"])
    lines += _sizes_section("repos", stats["repos"], limit=TOP_REPOS)
    lines += ["", "split", *_split_lines(stats)]
    lines += ["", "time " + "  ".join(f"{k} {v:.2f}s" for k, v in stats["timings_s"].items())]
    return "\n".join(lines)


def _source_line(s: dict[str, Any]) -> str:
    return (
        f"  {s['kind']:8s} {s['source']}  (repo_id {s['repo_id']}): seen {s['files_seen']:,}, "
        f"usable {s['usable']:,}, kept {s['kept']:,}"
    )


def _counts_section(title: str, counts: dict[str, int]) -> list[str]:
    if not counts:
        return ["", f"{title}: none"]
    width = max(map(len, counts))
    rows = [f"  {k:{width}s} {n:>8,}  {REASONS.get(k, '')}" for k, n in counts.items()]
    return ["", title, *rows]


def _sizes_section(title: str, table: dict[str, dict[str, int]], limit: int | None = None) -> list[str]:
    items = list(table.items())
    shown = items[:limit] if limit else items
    width = max([len(k) for k, _ in shown] + [8])
    rows = [f"  {k:{width}s} {v['files']:>8,} files {human_bytes(v['bytes']):>10s}" for k, v in shown]
    if len(items) > len(shown):
        rows.append(f"  ... and {len(items) - len(shown)} more (see stats.json)")
    return ["", title, *rows]


def _split_lines(stats: dict[str, Any]) -> list[str]:
    split = stats["split"]
    rows = [
        f"  {name:10s} {v['files']:>8,} files {human_bytes(v['bytes']):>10s}" for name, v in stats["splits"].items()
    ]
    rows.append(
        f"  by {split['split_by']}, mode {split['mode']}, seed {split['seed']}; duplicate clusters kept on one side"
    )
    if "note" in split:
        rows.append(f"  note: {split['note']}")
    return rows
