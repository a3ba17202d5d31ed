"""Train/validation split: deterministic, by file or by repo, never splitting a duplicate cluster.

Files are first joined into *groups* that must stay on one side: a file and its exact
or near duplicates (when they are kept), and, with `split_by=repo`, all files of a
repo. Groups are then taken into validation, in a seeded shuffled order (`random`) or
in path order (`head`, the recipe's "first N rows are validation"), while they fit the
target size. At least one unit always stays in train; a corpus of one unit has an
empty validation split (said in the stats).

    >>> is_val, info = split_files(["r"] * 6, [0, 1, 2, 3, 1, 5], validation_size=3, mode="head")
    >>> is_val  # files 1 and 4 are duplicates: they go together
    [True, True, False, False, True, False]
    >>> info["validation_files"], info["train_files"]
    (3, 3)
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

from fimtune.errors import ConfigError


def union_groups(n: int, links: Sequence[tuple[int, int]]) -> list[int]:
    """Connected components of ``n`` items joined by ``links``; each labelled by its smallest index.

    >>> union_groups(5, [(0, 3), (3, 4)])
    [0, 1, 2, 0, 0]
    """
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in links:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [find(i) for i in range(n)]


def validation_target(n_units: int, fraction: float, size: int | None) -> int:
    """How many units to hold out: ``size``, else ``round(fraction * n)`` and at least one when
    ``fraction > 0``; always leaving one unit for training.

    >>> validation_target(100, 0.1, None), validation_target(5, 0.1, None), validation_target(1, 0.1, None)
    (10, 1, 0)
    >>> validation_target(10, 0.1, 50)
    9
    """
    target = size if size is not None else round(fraction * n_units)
    if size is None and fraction > 0:
        target = max(target, 1)
    return max(0, min(target, n_units - 1))


def check_split_args(fraction: float, size: int | None) -> None:
    if not 0 <= fraction < 1:
        raise ConfigError(f"--validation-fraction must be in [0, 1); got {fraction}")
    if size is not None and size < 0:
        raise ConfigError(f"--validation-size must be >= 0; got {size}")


def split_files(
    repo_ids: Sequence[str],
    duplicate_of: Sequence[int],
    *,
    validation_fraction: float = 0.1,
    validation_size: int | None = None,
    split_by: str = "file",
    mode: str = "random",
    seed: int = 0,
    keys: Sequence[str] | None = None,
) -> tuple[list[bool], dict[str, Any]]:
    """(is_validation per file, info) for files in path order.

    ``duplicate_of[i]`` is the index of the file whose cluster file i belongs to (i itself
    when none). Units are files, or repos with ``split_by="repo"``. ``keys`` (a name for each
    file, e.g. `repo/path`): the random order of the groups is that of a seeded hash of their
    smallest key, so the split does not depend on the order the files came in (the sources'
    order on the command line), and a file added or changed moves no other file's group.
    """
    check_split_args(validation_fraction, validation_size)
    n = len(repo_ids)
    links = [(i, j) for i, j in enumerate(duplicate_of) if i != j]
    if split_by == "repo":
        first_of_repo: dict[str, int] = {}
        links += [(i, first_of_repo.setdefault(r, i)) for i, r in enumerate(repo_ids)]
    group = union_groups(n, links)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group):
        members.setdefault(g, []).append(i)

    def units(idx: list[int]) -> int:
        return len({repo_ids[i] for i in idx}) if split_by == "repo" else len(idx)

    n_units = units(list(range(n)))
    target = validation_target(n_units, validation_fraction, validation_size)
    order = list(members)  # groups in path order of their first file
    if mode == "random" and keys is not None:
        order.sort(key=lambda g: _rank(seed, min(keys[i] for i in members[g])))
    elif mode == "random":
        random.Random(seed).shuffle(order)
    chosen = _take_groups(order, members, units, target, n)
    is_val = [False] * n
    for g in chosen:
        for i in members[g]:
            is_val[i] = True
    n_val = sum(is_val)
    info = {
        "split_by": split_by,
        "mode": mode,
        "seed": seed,
        "units": n_units,
        "validation_target": target,
        "validation_units": units([i for i in range(n) if is_val[i]]),
        "validation_files": n_val,
        "train_files": n - n_val,
        "groups": len(members),
    }
    if n_val == 0:
        info["note"] = "validation is empty: " + _why_empty(n_units, target, split_by)
    return is_val, info


def _rank(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{key}".encode()).digest()


def _why_empty(n_units: int, target: int, split_by: str) -> str:
    if n_units <= 1:
        return f"{n_units} {split_by} in the corpus, nothing to hold out"
    if target == 0:
        return "the validation target is 0"
    return f"no group of {split_by}s linked as duplicates fits {target} {split_by}(s) and leaves some for training"


def _take_groups(order: list[int], members: dict[int, list[int]], units, target: int, n: int) -> list[int]:
    """Groups taken in ``order`` while they fit ``target`` units and leave a file for training."""
    chosen: list[int] = []
    taken_units, taken_files = 0, 0
    for g in order:
        if taken_units >= target:
            break
        g_units, g_files = units(members[g]), len(members[g])
        if taken_units + g_units > target or taken_files + g_files >= n:
            continue  # too big for what is left: try the next group (head mode stays near the top)
        chosen.append(g)
        taken_units += g_units
        taken_files += g_files
    return chosen
