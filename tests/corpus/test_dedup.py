"""Near-duplicate detection around the threshold, agreement with datasketch, first-kept order."""

import numpy as np
import pytest
from corpus_helpers import build, code, write
from datasketch import MinHash

from fimtune.corpus.dedup import (
    find_near_duplicates,
    jaccard,
    permutations,
    shingle_hashes,
    shingles,
    signature,
)


def words_text(n_words: int, tag: str = "w") -> str:
    """A text of ``n_words`` distinct words: its 5-gram shingles are all distinct."""
    return " ".join(f"{tag}{i}" for i in range(n_words)) + "\n"


def with_word_changed(text: str, position: int) -> str:
    words = text.split()
    words[position] = "changed"
    return " ".join(words) + "\n"


def test_one_changed_word_changes_five_shingles():
    a = words_text(66)  # 62 shingles
    b = with_word_changed(a, 30)
    assert jaccard(shingles(a), shingles(b)) == pytest.approx(57 / 67)  # 0.8507


@pytest.mark.parametrize(
    "n_words,expected",
    [
        (66, 0.8507),  # 57 shared of 67: just above 0.85
        (65, 0.8485),  # 56 shared of 66: just below 0.85
        (105, 0.9057),  # 96 of 106: comfortably above
        (40, 0.7561),  # 31 of 41: comfortably below
    ],
)
def test_near_duplicates_around_the_threshold(n_words, expected):
    a = words_text(n_words)
    b = with_word_changed(a, n_words // 2)
    similarity = jaccard(shingles(a), shingles(b))
    assert similarity == pytest.approx(expected, abs=1e-4)
    found = find_near_duplicates([a, b], threshold=0.85, progress=False)
    assert found == ([None, 0] if similarity >= 0.85 else [None, None])


def test_threshold_is_a_parameter():
    a = words_text(40)
    b = with_word_changed(a, 20)  # Jaccard 0.756
    assert find_near_duplicates([a, b], threshold=0.85, progress=False) == [None, None]
    assert find_near_duplicates([a, b], threshold=0.7, progress=False) == [None, 0]


def test_ngram_is_a_parameter():
    a = words_text(40)
    b = with_word_changed(a, 20)
    # 3-grams: 3 of 38 shingles change -> 35/41 = 0.854
    assert find_near_duplicates([a, b], threshold=0.85, ngram=3, progress=False) == [None, 0]


def test_first_in_order_is_kept_and_others_point_to_it():
    a = words_text(200)
    texts = [words_text(50, "other"), a, with_word_changed(a, 10), with_word_changed(a, 150), words_text(60, "x")]
    assert find_near_duplicates(texts, progress=False) == [None, None, 1, 1, None]


def test_texts_without_words_are_never_duplicates():
    assert find_near_duplicates(["", "+-*/\n", "+-*/\n"], progress=False) == [None, None, None]


def test_signature_equals_datasketch_minhash():
    hashes = shingle_hashes(code("sig", lines=30))
    reference = MinHash(num_perm=64, seed=1, hashfunc=lambda x: x)
    reference.update_batch([int(h) for h in hashes.astype(np.uint32)])
    assert np.array_equal(signature(hashes, permutations(64)), reference.hashvalues)


def test_signature_of_a_big_file_uses_chunks():
    hashes = np.arange(40_000, dtype=np.uint64) * np.uint64(2654435761)
    perms = permutations(16)
    whole = MinHash(num_perm=16, seed=1, hashfunc=lambda x: x)
    whole.update_batch([int(h) for h in hashes.astype(np.uint32)])
    assert np.array_equal(signature(hashes, perms), whole.hashvalues)


def test_jaccard_edge_cases():
    empty = np.array([], dtype=np.uint64)
    assert jaccard(empty, empty) == 1.0
    assert jaccard(empty, np.array([1], dtype=np.uint64)) == 0.0
    assert jaccard(np.array([1, 5, 9], dtype=np.uint64), np.array([5], dtype=np.uint64)) == pytest.approx(1 / 3)


def test_build_counts_exact_and_near_duplicates(tmp_path):
    base = code("base", lines=40)
    write(tmp_path, "src/a.py", base)
    write(tmp_path, "src/b_copy.py", base)  # exact duplicate
    write(tmp_path, "src/c_near.py", base.replace("offset_39", "shift_39"))  # near duplicate
    for name in ("d", "e", "f"):
        write(tmp_path, f"src/{name}.py", code(name))
    stats = build([str(tmp_path)], tmp_path / "out")
    assert stats["skipped_files"]["exact_duplicate"] == 1
    assert stats["skipped_files"]["near_duplicate"] == 1
    assert stats["kept"] == 4


def test_dedup_can_be_turned_off(tmp_path):
    base = code("base", lines=40)
    write(tmp_path, "a.py", base)
    write(tmp_path, "b.py", base)
    write(tmp_path, "c.py", base.replace("offset_39", "shift_39"))
    stats = build([str(tmp_path)], tmp_path / "out", exact_dedup=False, near_dedup=False)
    assert stats["kept"] == 3 and "exact_duplicate" not in stats["skipped_files"]
    stats = build([str(tmp_path)], tmp_path / "out2", near_dedup=False)
    assert stats["kept"] == 2


@pytest.mark.parametrize("threshold,num_perm", [(1.0, 128), (0.99, 128), (0.5, 2)])
def test_extreme_settings_still_index(threshold, num_perm):
    a = words_text(30)
    texts = [a, a, with_word_changed(a, 15)]
    found = find_near_duplicates(texts, threshold=threshold, num_perm=num_perm, progress=False)
    assert found[:2] == [None, 0]
