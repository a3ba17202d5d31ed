"""The split: deterministic per seed, no leakage of duplicate clusters or repos, head and repo modes."""

import random

import pytest
from corpus_helpers import build, code, write

from fimtune.corpus.split import split_files, union_groups, validation_target
from fimtune.errors import ConfigError


def singletons(n: int) -> list[int]:
    return list(range(n))


def test_same_seed_same_split_other_seed_other_split():
    repos = ["r"] * 100
    a, _ = split_files(repos, singletons(100), seed=1)
    b, _ = split_files(repos, singletons(100), seed=1)
    c, _ = split_files(repos, singletons(100), seed=2)
    assert a == b and a != c
    assert sum(a) == sum(c) == 10


def test_validation_size_instead_of_fraction():
    is_val, info = split_files(["r"] * 50, singletons(50), validation_size=7)
    assert sum(is_val) == 7 and info["validation_target"] == 7


def test_head_mode_takes_the_first_rows():
    is_val, _ = split_files(["r"] * 20, singletons(20), validation_size=4, mode="head")
    assert is_val == [True] * 4 + [False] * 16


def test_clusters_never_straddle_the_split():
    rng = random.Random(0)
    n = 300
    duplicate_of = [i if rng.random() < 0.7 else rng.randrange(0, i + 1) for i in range(n)]
    group = union_groups(n, [(i, j) for i, j in enumerate(duplicate_of)])
    for seed in range(5):
        is_val, _ = split_files(["r"] * n, duplicate_of, validation_fraction=0.2, seed=seed)
        sides: dict[int, set[bool]] = {}
        for g, v in zip(group, is_val, strict=True):
            sides.setdefault(g, set()).add(v)
        assert all(len(s) == 1 for s in sides.values())
        assert 0 < sum(is_val) < n


def test_split_by_repo_keeps_repos_whole():
    repos = [f"repo{i % 7}" for i in range(70)]
    is_val, info = split_files(repos, singletons(70), validation_size=2, split_by="repo", seed=3)
    val_repos = {r for r, v in zip(repos, is_val, strict=True) if v}
    train_repos = {r for r, v in zip(repos, is_val, strict=True) if not v}
    assert len(val_repos) == 2 and not val_repos & train_repos
    assert info["validation_units"] == 2 and info["units"] == 7


def test_split_by_repo_joins_repos_linked_by_a_duplicate():
    repos = ["a", "a", "b", "c", "d"]
    duplicate_of = [0, 1, 0, 3, 4]  # b's file duplicates a's first file
    for seed in range(10):
        is_val, _ = split_files(repos, duplicate_of, validation_size=1, split_by="repo", seed=seed)
        assert is_val[0] == is_val[1] == is_val[2]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_tiny_corpora(n):
    is_val, info = split_files(["r"] * n, singletons(n))
    assert sum(is_val) == (0 if n == 1 else 1)
    assert info["train_files"] >= 1
    assert ("note" in info) == (n == 1)


def test_validation_never_takes_everything():
    is_val, _ = split_files(["r"] * 5, singletons(5), validation_size=50)
    assert sum(is_val) == 4
    is_val, info = split_files(["r"] * 4, [0, 0, 0, 0], validation_size=2)  # one cluster: cannot split
    assert sum(is_val) == 0 and "note" in info


def test_target():
    assert validation_target(1000, 0.1, None) == 100
    assert validation_target(1000, 0.0, None) == 0
    assert validation_target(3, 0.5, 0) == 0


@pytest.mark.parametrize(
    "kwargs", [{"validation_fraction": 1.0}, {"validation_fraction": -0.1}, {"validation_size": -1}]
)
def test_bad_split_arguments(kwargs):
    with pytest.raises(ConfigError):
        split_files(["r"] * 3, singletons(3), **kwargs)


def test_build_split_has_no_leakage(tmp_path):
    src = tmp_path / "src"
    base = code("base", lines=40)
    for i in range(30):
        write(src, f"m{i:02d}.py", code(f"m{i}"))
    for i in range(4):  # near-duplicates, kept together with keep_near_duplicates
        write(src, f"near{i}.py", base.replace("offset_39", f"offset_{100 + i}"))
    kwargs = dict(keep_near_duplicates=True, validation_fraction=0.3)
    stats = build([str(src)], tmp_path / "out", **kwargs)
    assert stats["dedup"]["near_duplicates"] == 0 and stats["kept"] == 34
    import datasets

    dd = datasets.load_from_disk(str(tmp_path / "out"))
    val_paths, train_paths = set(dd["validation"]["file_path"]), set(dd["train"]["file_path"])
    near = {f"near{i}.py" for i in range(4)}
    assert near <= val_paths or near <= train_paths
    assert not set(dd["validation"]["id"]) & set(dd["train"]["id"])
    again = build([str(src)], tmp_path / "out2", **kwargs)
    assert again["splits"] == stats["splits"]
    assert set(datasets.load_from_disk(str(tmp_path / "out2"))["validation"]["file_path"]) == val_paths


def test_build_head_mode(tmp_path):
    for i in range(10):
        write(tmp_path / "src", f"m{i:02d}.py", code(f"m{i}"))
    build([str(tmp_path / "src")], tmp_path / "out", split_mode="head", validation_size=3)
    import datasets

    dd = datasets.load_from_disk(str(tmp_path / "out"))
    assert dd["validation"]["file_path"] == ["m00.py", "m01.py", "m02.py"]
    assert dd["train"]["file_path"][0] == "m03.py"


def test_a_chain_of_near_duplicates_lands_on_one_side(tmp_path):
    """A ~ B and B ~ C, A and C not alike: with keep_near_duplicates all three share a side (C was
    compared with the kept texts only, and B, a duplicate of A, was not among them)."""
    import datasets

    from fimtune.corpus.dedup import jaccard, shingles

    words = [f"tok{i}" for i in range(400)]

    def doc(changed: dict[int, str]) -> str:
        ws = [changed.get(k, w) for k, w in enumerate(words)]
        return "\n".join(" ".join(ws[i : i + 8]) for i in range(0, len(ws), 8)) + "\n"

    b_changes = {k: f"chg{k}" for k in range(0, 400, 80)}
    chain = [doc({}), doc(b_changes), doc({**b_changes, **{k: f"chh{k}" for k in range(40, 400, 80)}})]
    a, b, c = (shingles(t) for t in chain)
    assert jaccard(a, b) >= 0.85 and jaccard(b, c) >= 0.85 and jaccard(a, c) < 0.85
    src = tmp_path / "src"
    for name, text in zip("abc", chain, strict=True):
        write(src, f"chain_{name}.py", text)
    for i in range(5):
        write(src, f"m{i}.py", code(f"m{i}"))
    for seed in range(6):
        out = tmp_path / f"out{seed}"
        build([str(src)], out, keep_near_duplicates=True, validation_size=2, min_alnum_fraction=0, seed=seed)
        sides = {p for p in datasets.load_from_disk(str(out))["validation"]["file_path"] if p.startswith("chain_")}
        assert sides in (set(), {"chain_a.py", "chain_b.py", "chain_c.py"}), (seed, sides)


def test_the_split_does_not_depend_on_the_order_of_the_sources(tmp_path):
    """The same files and seed give the same validation files whichever order the sources come in,
    and adding a file moves no other file to the other side."""
    import datasets

    for folder in ("sa", "sb"):
        for i in range(10):
            write(tmp_path / folder, f"{folder[-1]}{i}.py", code(f"{folder}_{i}"))

    def validation(*sources: str) -> set[str]:
        out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
        build([str(tmp_path / s) for s in sources], out, validation_size=4)
        return set(datasets.load_from_disk(str(out))["validation"]["file_path"])

    first = validation("sa", "sb")
    assert len(first) == 4 and validation("sb", "sa") == first
    write(tmp_path / "sa", "new.py", code("a_new_one"))
    grown = validation("sa", "sb")
    assert len(first & grown) >= 3  # the new file may take one place, nothing else moves
