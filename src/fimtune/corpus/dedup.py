"""Exact and near-duplicate detection; the first file in path order is the one kept.

Exact: files with the same sha256 of their content. Near: files whose sets of word
n-gram shingles have Jaccard similarity at or above a threshold, found with MinHash
LSH (datasketch's index) and then *verified* on the shingle sets themselves, so a
pair is called a near-duplicate only when its true Jaccard reaches the threshold.

Shingles are hashed with numpy, not per shingle in Python: words are hashed once
(crc32, deterministic across runs), n consecutive word hashes are mixed into one
64-bit shingle hash, and the MinHash signature is datasketch's `affine32` scheme
(`min over shingles of a * fmix32(h) + b mod 2**32`) computed for all permutations
at once. It equals `datasketch.MinHash(hashfunc=lambda x: x).update_batch(h32)`.

    >>> a = "def add(a, b):\\n    return a + b  # the sum of a and b, as a number\\n"
    >>> shingles(a, 5).size  # 16 words -> 12 shingles of 5 words
    12
    >>> jaccard(shingles(a, 5), shingles(a.replace("number", "value"), 5))
    0.8461538461538461
    >>> find_near_duplicates([a, a.replace("number", "value"), "x = 1\\n"], threshold=0.8, progress=False)
    [None, 0, None]
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

DEFAULT_NGRAM = 5
DEFAULT_NUM_PERM = 128
MINHASH_SEED = 1
SIGNATURE_CHUNK = 16384  # shingles per (num_perm x chunk) block: 8 MB at 128 permutations
SHINGLE_CACHE = 4096  # shingle sets kept for verifying candidates
# LSH banding tuned for recall: candidates are verified on their exact Jaccard, so a false
# positive costs one set intersection while a false negative leaves a duplicate in. With
# 128 permutations and threshold 0.85 this picks 12 bands of 10 rows: a pair at Jaccard
# 0.85 is found with probability 0.93 (0.46 with datasketch's default equal weights),
# at 0.9 with 0.994; a pair at 0.6 becomes a candidate with probability 0.07.
LSH_WEIGHTS = (0.05, 0.95)  # (false positive, false negative)
MIN_BANDS = 2
ESTIMATE_MARGIN = 0.2  # candidates whose MinHash estimate is this far below the threshold skip the exact check

# Words of code: identifiers and numbers; UTF-8 letters count as word bytes.
WORD = re.compile(rb"[A-Za-z0-9_\x80-\xff]+")
SHINGLE_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # the golden-ratio constant, odd
_FMIX64 = (np.uint64(33), np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))
_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35))


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, element-wise (a bijection that spreads bits)."""
    shift, m1, m2 = _FMIX64
    h = (h ^ (h >> shift)) * m1
    h = (h ^ (h >> shift)) * m2
    return h ^ (h >> shift)


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, as datasketch's `affine32` scheme applies it."""
    s1, m1, s2, m2 = _FMIX32
    h = (h ^ (h >> s1)) * m1
    h = (h ^ (h >> s2)) * m2
    return h ^ (h >> s1)


def shingle_hashes(text: str, ngram: int = DEFAULT_NGRAM) -> np.ndarray:
    """64-bit hashes of the word ``ngram``-grams of ``text``, in text order (repeats kept).

    A text of fewer than ``ngram`` words is one shingle; a text without words has none.

    >>> shingle_hashes("a b c", 5).size, shingle_hashes("", 5).size, shingle_hashes("a b c d e f", 5).size
    (1, 0, 2)
    """
    words = np.fromiter(map(zlib.crc32, WORD.findall(text.encode("utf-8", "surrogatepass"))), dtype=np.uint64)
    if words.size == 0:
        return words
    n = min(ngram, words.size)
    m = words.size - n + 1
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):  # h = mix(... mix(mix(w0) + w1) ...): order-sensitive
            h = fmix64(h * SHINGLE_MULTIPLIER + words[k : k + m])
    return h


def shingles(text: str, ngram: int = DEFAULT_NGRAM) -> np.ndarray:
    """The shingle set of ``text``: sorted unique :func:`shingle_hashes`.

    >>> shingles("a b c d e a b c d e", 5).size  # 6 shingles, 5 distinct
    5
    """
    return np.unique(shingle_hashes(text, ngram))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique hash arrays.

    >>> jaccard(np.array([1, 2, 3]), np.array([2, 3, 4]))
    0.5
    """
    if a.size == 0 or b.size == 0:
        return float(a.size == b.size)
    if a.size > b.size:
        a, b = b, a
    pos = np.searchsorted(b, a)  # b is sorted: no concatenation, no re-sort
    inter = int(np.count_nonzero(b[np.minimum(pos, b.size - 1)] == a))
    return inter / (a.size + b.size - inter)


def permutations(num_perm: int, seed: int = MINHASH_SEED) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's `affine32` permutation parameters (a odd, b) for ``num_perm`` and ``seed``."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    return a.astype(np.uint32), b.astype(np.uint32)


def signature(shingle_hashes: np.ndarray, perms: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The MinHash signature (uint32, one value per permutation) of a shingle set."""
    a, b = perms[0][:, None], perms[1][:, None]
    out = np.full(a.size, np.iinfo(np.uint32).max, dtype=np.uint32)
    h32 = fmix32(shingle_hashes.astype(np.uint32))[None, :]  # the low 32 bits are the set element
    with np.errstate(over="ignore"):
        for start in range(0, h32.size, SIGNATURE_CHUNK):
            block = a * h32[:, start : start + SIGNATURE_CHUNK]  # (num_perm, chunk), wraps mod 2**32
            block += b
            np.minimum(out, block.min(axis=1), out=out)  # rows are contiguous: a fast reduction
    return out


def find_near_duplicates(
    texts: Sequence[str],
    threshold: float = 0.85,
    ngram: int = DEFAULT_NGRAM,
    num_perm: int = DEFAULT_NUM_PERM,
    progress: bool = True,
) -> list[int | None]:
    """For each text, the index of the earlier kept text it near-duplicates, or None.

    Texts are visited in order; a text that duplicates none of the kept ones is kept
    and indexed. Candidates from the LSH index whose MinHash estimate is plausible are
    verified on the exact Jaccard of the shingle sets; of several verified ones, the
    earliest wins.
    """
    return [verified[0] if verified else None for verified in _matches(texts, threshold, ngram, num_perm, progress)]


def near_duplicate_pairs(
    texts: Sequence[str],
    threshold: float = 0.85,
    ngram: int = DEFAULT_NGRAM,
    num_perm: int = DEFAULT_NUM_PERM,
    progress: bool = True,
) -> list[tuple[int, int]]:
    """Every (later, earlier) pair of near-duplicate texts, for texts that are all kept: in a chain
    A ~ B ~ C where A and C are not alike, both links (:func:`find_near_duplicates` indexes the
    kept texts only: B, a duplicate of A, is not there for C to find).

    >>> a = "def add(a, b):\\n    return a + b  # the sum of a and b, as a number\\n"
    >>> near_duplicate_pairs([a, a.replace("number", "value"), "x = 1\\n"], threshold=0.8, progress=False)
    [(1, 0)]
    """
    found = _matches(texts, threshold, ngram, num_perm, progress, index_all=True)
    return [(i, j) for i, verified in enumerate(found) for j in verified]


def _matches(
    texts: Sequence[str], threshold: float, ngram: int, num_perm: int, progress: bool, index_all: bool = False
) -> list[list[int]]:
    """For each text, the earlier indexed texts it near-duplicates (verified), in order; the texts
    that match none are indexed (``index_all``: every text)."""
    from datasketch import LeanMinHash
    from tqdm.auto import tqdm

    perms = permutations(num_perm)
    lsh = lsh_index(threshold, num_perm)
    signatures: dict[int, np.ndarray] = {}  # of the indexed texts

    @lru_cache(maxsize=SHINGLE_CACHE)
    def shingle_set(i: int) -> np.ndarray:
        return shingles(texts[i], ngram)

    result: list[list[int]] = []
    for i in tqdm(range(len(texts)), desc="near-dedup", unit="file", disable=not progress):
        hashes = shingle_hashes(texts[i], ngram)
        if hashes.size == 0:
            result.append([])
            continue
        sig = signature(hashes, perms)  # repeats do not change a minimum: no need for unique here
        mh = LeanMinHash(seed=MINHASH_SEED, hashvalues=sig, scheme="affine32")
        candidates = plausible(sorted(lsh.query(mh)), sig, signatures, threshold)
        verified = [j for j in candidates if jaccard(shingle_set(i), shingle_set(j)) >= threshold]
        result.append(verified)
        if index_all or not verified:
            lsh.insert(i, mh, check_duplication=False)
            signatures[i] = sig
    return result


def lsh_index(threshold: float, num_perm: int):
    """datasketch's MinHashLSH banded for recall; at least 2 bands (thresholds near 1 would want one)."""
    from datasketch import MinHashLSH

    try:
        return MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    except ValueError:  # "the number of bands are too small (b < 2)"
        return MinHashLSH(num_perm=num_perm, params=(MIN_BANDS, num_perm // MIN_BANDS))


def plausible(candidates: list[int], sig: np.ndarray, signatures: dict[int, np.ndarray], threshold: float) -> list[int]:
    """The candidates whose MinHash estimate of Jaccard is within :data:`ESTIMATE_MARGIN` of the threshold.

    Only a pre-filter before the exact check: with 128 permutations the estimate of a pair
    at the threshold falls below it by more than the margin with probability ~1e-10.
    """
    if not candidates:
        return candidates
    estimates = (np.stack([signatures[j] for j in candidates]) == sig).mean(axis=1)
    return [j for j, e in zip(candidates, estimates, strict=True) if e >= threshold - ESTIMATE_MARGIN]
