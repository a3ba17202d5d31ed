"""Tokenize a split once per (dataset content, tokenizer) pair; cache the token arrays on disk.

    split (datasets.Dataset, text column) --fast tokenizer, batched--> $FIMTUNE_CACHE/tokens/<data>-<tok>/
        tokens.bin    int32 [n_tokens]     every document's ids, concatenated (no separators)
        offsets.npy   int64 [n_docs + 1]   document d is tokens[offsets[d]:offsets[d + 1]]
        meta.json     counts, characters, chars per token, both fingerprints

Training, evaluation and `fimtune data inspect` share the cache; the arrays are
memory-mapped on load. The folder is written to a temporary name and renamed, so a
reader never sees half a cache; an entry damaged later (a file cut short or deleted) is
written again.

Documents are tokenized as plain text: no BOS/EOS added (the packer adds the separator),
and a literal ``<|endoftext|>`` or ``<fim_prefix>`` inside a source file stays text rather
than becoming a control token (the recipe's tokenizer call would turn it into one). That holds
for added tokens shaped as control tokens that a tokenizer does not mark special (Qwen2.5-Coder's,
CodeGemma's and DeepSeek-Coder's FIM tokens): they are encoded as text too (:func:`text_backend`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import secrets
import shutil
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fimtune.errors import FimtuneError

log = logging.getLogger(__name__)

CACHE_ENV = "FIMTUNE_CACHE"
CACHE_FORMAT = "fimtune-tokens-v2"  # bump when the files or the encoding options change
HASH_ROWS = 65536  # rows gathered at a time when hashing a shuffled or selected split
BATCH_DOCS = 512  # documents per encode_batch call (the Rust side spreads them over cores)
TOKEN_DTYPE = np.int32
OFFSET_DTYPE = np.int64


def cache_home() -> Path:
    """fimtune's cache folder: ``$FIMTUNE_CACHE`` (``~`` expanded), by default ``~/.cache/fimtune``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "fimtune")).expanduser()


def cache_root() -> Path:
    """``$FIMTUNE_CACHE/tokens``, by default ``~/.cache/fimtune/tokens``."""
    return cache_home() / "tokens"


# --------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------


def dataset_fingerprint(ds: Any, column: str) -> str:
    """A hash of the text column's content, in the order the dataset shows its rows (exact, fast).

    Hashes Arrow buffers, not Python strings; a selection or shuffle is followed through
    the dataset's indices. A rebuilt corpus with the same files hits the cache, a changed
    file misses it.
    """
    lengths, data = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
    strings = ds.data.table.column(column)
    if ds._indices is None:
        chunks = strings.chunks
    else:  # datasets' row mapping after select/shuffle: hash the rows it shows, in its order
        rows = ds._indices.table.column(0)
        chunks = (strings.take(rows.slice(i, HASH_ROWS)) for i in range(0, len(rows), HASH_ROWS))
    for chunk in chunks:
        for piece in getattr(chunk, "chunks", [chunk]):
            _hash_strings(lengths, data, piece)
    key = f"{CACHE_FORMAT}\0{column}\0{ds.num_rows}\0{lengths.hexdigest()}\0{data.hexdigest()}"
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def _hash_strings(lengths: Any, data: Any, chunk: Any) -> None:
    """Feed the visible rows of an Arrow string array to two hashes: their lengths, their bytes.

    Two streams, so that how Arrow cuts the rows into chunks does not change the result.
    """
    import pyarrow as pa

    if pa.types.is_null(chunk.type):  # a column with no strings at all (e.g. an empty split)
        return
    if not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):
        raise FimtuneError(f"the text column holds {chunk.type}, not strings")
    dtype = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
    _, offsets_buf, data_buf = chunk.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=dtype)[chunk.offset : chunk.offset + len(chunk) + 1]
    lengths.update(np.diff(offsets).astype(np.int64).tobytes())
    if data_buf is not None and len(offsets):
        data.update(memoryview(data_buf)[int(offsets[0]) : int(offsets[-1])])


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the serialized fast tokenizer (model, normalizer, pre-tokenizer and added tokens)
    and of the `tokenizers` release that runs it (a release may split the same text otherwise)."""
    import tokenizers

    h = hashlib.blake2b(digest_size=16)
    h.update(CACHE_FORMAT.encode())
    h.update(tokenizers.__version__.encode())
    h.update(fast_backend(tokenizer).to_str().encode())
    return h.hexdigest()


def fast_backend(tokenizer: Any) -> Any:
    """The `tokenizers` backend of a transformers tokenizer (a clear error for a slow one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise FimtuneError(f"{type(tokenizer).__name__} is not a fast tokenizer: fimtune needs a `tokenizers` one")
    return backend


# --------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------


def control_like(content: str) -> bool:
    """Whether an added token reads as a control token: ``<fim_prefix>``, ``<|fim_middle|>``,
    ``<｜fim▁hole｜>``, ``▁<PRE>`` (not a run of spaces or a word a tokenizer added)."""
    body = content.lstrip("\u2581")
    return len(body) > 2 and body.startswith("<") and body.endswith(">")


def _unmarked(backend: Any) -> bool:
    """Whether ``backend`` has added tokens shaped as control tokens that are not marked special:
    `encode_special_tokens` reads special ones only as text, and would match these as the tokens."""
    return any(not t.special and control_like(t.content) for t in backend.get_added_tokens_decoder().values())


def _marked(backend: Any) -> Any:
    """A copy of ``backend`` with its control-like added tokens marked special (ids unchanged)."""
    from tokenizers import Tokenizer

    data = json.loads(backend.to_str())
    for token in data.get("added_tokens", []):
        if control_like(token["content"]):
            token["special"] = True
    return Tokenizer.from_str(json.dumps(data))


def _added_tokens(backend: Any) -> tuple:
    """``backend``'s added tokens (id, text, special): a copy made of it is made again when they change."""
    return tuple((i, t.content, t.special) for i, t in sorted(backend.get_added_tokens_decoder().items()))


# tokenizer -> (its added tokens, the copy that encodes them as text), for tokenizers that need one
_TEXT_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def text_backend(tokenizer: Any) -> Any:
    """The `tokenizers` backend that encodes ``tokenizer``'s documents as plain text under
    :func:`_plain_text`: its own, or where it has control-like added tokens not marked special, a
    copy with them marked (made once, again when its added tokens change)."""
    backend = fast_backend(tokenizer)
    if not _unmarked(backend):
        return backend
    added = _added_tokens(backend)
    cached = _TEXT_BACKENDS.get(tokenizer)
    if cached is None or cached[0] != added:
        _TEXT_BACKENDS[tokenizer] = cached = (added, _marked(backend))
    return cached[1]


def _never_prepends(node: Any, decoder: bool = False) -> Any:
    """``node`` (a normalizer, pre-tokenizer or decoder of tokenizer.json, changed in place) without
    what puts a dummy prefix before a text, or takes its space off a decoded one: a `Prepend`
    normalizer, a `Strip` of leading spaces (both dropped: None), a `Metaspace` that prepends,
    byte-level BPE's `add_prefix_space` (its decoder's setting of that name changes nothing); inside
    a `Sequence` too."""
    if not isinstance(node, dict):
        return node
    kind = node.get("type")
    if kind == "Prepend" or (kind == "Strip" and node.get("start")):
        return None
    if kind == "Sequence":
        key = next((k for k in ("normalizers", "pretokenizers", "decoders") if k in node), None)
        if key is not None:
            node[key] = [n for n in (_never_prepends(n, decoder) for n in node[key] or []) if n is not None]
    elif kind == "Metaspace":
        node["prepend_scheme"] = "never"
        node.pop("add_prefix_space", None)
    elif kind == "ByteLevel" and node.get("add_prefix_space") and not decoder:
        node["add_prefix_space"] = False
    return node


def continuation(backend: Any) -> Any:
    """``backend`` for text that goes on from text before it (a FIM middle or suffix): a copy
    without the dummy prefix that SentencePiece-style tokenizers (Llama, CodeLlama, Mistral) put
    before each text they encode, so ``"    return"`` after a cut gets its four spaces, not five,
    as in the whole document's tokens, and that decodes a completion's leading spaces (their
    decoders drop the first, taking it for the dummy prefix); ``backend`` itself where it has
    none (StarCoder's, GPT-2's)."""
    from tokenizers import Tokenizer

    data = json.loads(backend.to_str())
    parts = ("normalizer", "pre_tokenizer", "decoder")
    before = json.dumps([data.get(part) for part in parts])
    for part in parts:
        data[part] = _never_prepends(data.get(part), decoder=part == "decoder")
    if json.dumps([data.get(part) for part in parts]) == before:
        return backend
    copy = Tokenizer.from_str(json.dumps(data))
    copy.encode_special_tokens = backend.encode_special_tokens
    return copy


# tokenizer -> (its added tokens, the continuation copy of its text backend)
_CONTINUATIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def continuation_text_backend(tokenizer: Any) -> Any:
    """:func:`text_backend`, for text that goes on from text before it (:func:`continuation`)."""
    backend = text_backend(tokenizer)
    added = _added_tokens(backend)
    cached = _CONTINUATIONS.get(tokenizer)
    if cached is None or cached[0] != added:
        _CONTINUATIONS[tokenizer] = cached = (added, continuation(backend))
    return cached[1]


@contextlib.contextmanager
def _plain_text(backend: Any) -> Iterator[Any]:
    """Encode special-token strings found in the text as ordinary text, with no padding or
    truncation (a tokenizer.json may carry them, and a `tokenizer(..., padding=True)` call leaves
    them set), for the duration; the settings come back after."""
    before = backend.encode_special_tokens, backend.padding, backend.truncation
    backend.encode_special_tokens = True
    backend.no_padding()
    backend.no_truncation()
    try:
        yield backend
    finally:
        special, padding, truncation = before
        backend.encode_special_tokens = special
        if padding is not None:
            backend.enable_padding(**padding)
        if truncation is not None:
            backend.enable_truncation(**truncation)


def backend_copy(tokenizer: Any, special_tokens_as_text: bool) -> Any:
    """A `tokenizers` backend of its own, for threads that encode at once (flipping settings of a
    shared backend around each call, as :func:`encode_flat` does, is not thread-safe): it never pads
    or truncates, and encodes special-token strings as ordinary text (as encode_flat does) or as
    the tokens (as text: control-like added tokens too, :func:`text_backend`). A snapshot: tokens
    added later are not in it."""
    from tokenizers import Tokenizer

    shared = fast_backend(tokenizer)
    backend = _marked(shared) if special_tokens_as_text and _unmarked(shared) else Tokenizer.from_str(shared.to_str())
    backend.encode_special_tokens = special_tokens_as_text
    backend.no_padding()
    backend.no_truncation()
    return backend


def encode_flat(tokenizer: Any, texts: list[str], continued: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """All ``texts`` encoded as plain text, no special tokens: (ids int32 concatenated, lengths int64).
    ``continued``: each goes on from text before it (no dummy prefix: :func:`continuation`)."""
    with _plain_text(continuation_text_backend(tokenizer) if continued else text_backend(tokenizer)) as backend:
        encodings = backend.encode_batch_fast(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e) for e in encodings), dtype=OFFSET_DTYPE, count=len(encodings))
    ids = np.fromiter(
        itertools.chain.from_iterable(e.ids for e in encodings), dtype=TOKEN_DTYPE, count=int(lengths.sum())
    )
    return ids, lengths


def encode_batch(tokenizer: Any, texts: list[str]) -> list[np.ndarray]:
    """Each of ``texts`` encoded as in the cache (plain text, no special tokens)."""
    ids, lengths = encode_flat(tokenizer, texts)
    return np.split(ids, np.cumsum(lengths)[:-1]) if len(texts) else []


# --------------------------------------------------------------------------------------
# The cached split
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedSplit:
    """A split's token ids: ``tokens[offsets[d]:offsets[d + 1]]`` is document ``d``."""

    tokens: np.ndarray  # int32 [n_tokens], memory-mapped from the cache
    offsets: np.ndarray  # int64 [n_docs + 1]
    chars: int
    path: Path
    from_cache: bool

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def chars_per_token(self) -> float:
        return self.chars / max(1, self.n_tokens)

    def doc(self, d: int) -> np.ndarray:
        return self.tokens[self.offsets[d] : self.offsets[d + 1]]


def tokenize_split(
    ds: Any, tokenizer: Any, column: str = "content", *, progress: bool = True, cache_dir: Path | None = None
) -> TokenizedSplit:
    """The token arrays of split ``ds``: from the cache, else tokenized once and cached."""
    if column not in ds.column_names:
        raise FimtuneError(f"the dataset has no column '{column}' (columns: {', '.join(ds.column_names)})")
    root = cache_dir or cache_root()
    folder = root / f"{dataset_fingerprint(ds, column)}-{tokenizer_fingerprint(tokenizer)}"
    if (folder / "meta.json").is_file():
        try:
            return _load_cache(folder, from_cache=True)
        except DamagedCache as e:  # a file cut short or deleted (a full disk, a user's cleanup): write it again
            log.warning("the token cache %s is damaged (%s): tokenizing again", folder, e)
            discard_entry(folder)
    _write_cache(ds, tokenizer, column, folder, progress)
    return _load_cache(folder, from_cache=False)


STALE_TEMPORARY_S = 24 * 3600  # a writer's temporary folder this old is a killed writer's (a live one's: minutes)


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the hidden temporary folders in cache ``folder`` older than a day: what a writer killed
    mid-write (`kill -9`, a power cut) left, never read (a dequantized GGUF copy's holds a whole model)."""
    now = time.time()
    for path in folder.glob(".*"):
        with contextlib.suppress(OSError):  # another process's, just removed or renamed
            if path.is_dir() and not path.is_symlink() and now - path.stat().st_mtime > STALE_TEMPORARY_S:
                shutil.rmtree(path, ignore_errors=True)


def _write_cache(ds: Any, tokenizer: Any, column: str, folder: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder.parent)
        # not tempfile.mkdtemp: its folders are 0700, and a cache shared by a team is read by the others
        tmp = folder.parent / f".{folder.name}.{secrets.token_hex(8)}"
        tmp.mkdir()  # the mode the umask gives, like the files written in it
    except OSError as e:  # a read-only cache folder, or a file where it should be
        raise FimtuneError(
            f"could not write the token cache to {folder.parent} ({e}); set {CACHE_ENV} to a writable folder"
        ) from None
    lengths, chars = [np.zeros(1, OFFSET_DTYPE)], 0
    bar = tqdm(total=ds.num_rows, desc="tokenizing", unit="file", disable=not progress, dynamic_ncols=True)
    try:
        with (tmp / "tokens.bin").open("wb") as f:
            for batch in ds.select_columns([column]).iter(batch_size=BATCH_DOCS):
                texts = [t or "" for t in batch[column]]
                ids, lens = encode_flat(tokenizer, texts)
                f.write(ids.tobytes())
                lengths.append(lens)
                chars += sum(map(len, texts))
                bar.update(len(texts))
            f.flush()
            os.fsync(f.fileno())
        offsets = np.cumsum(np.concatenate(lengths), dtype=OFFSET_DTYPE)
        np.save(tmp / "offsets.npy", offsets)
        meta = {
            "format": CACHE_FORMAT,
            "n_docs": len(offsets) - 1,
            "n_tokens": int(offsets[-1]),
            "chars": chars,
            "chars_per_token": chars / max(1, int(offsets[-1])),
            "column": column,
            "tokenizer": getattr(tokenizer, "name_or_path", ""),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        _publish(tmp, folder)
    except OSError as e:  # a full disk or quota: say which folder, and how to write elsewhere
        raise FimtuneError(
            f"could not write the token cache to {folder.parent} ({e}); free space there or set {CACHE_ENV} "
            "to a writable folder with room for it"
        ) from None
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the finished temporary folder into place (another process may have won the race)."""
    try:
        tmp.rename(folder)
    except OSError:
        if not (folder / "meta.json").is_file():
            raise


class DamagedCache(Exception):
    """A cache entry whose files do not agree with its meta.json (cut short, deleted, unparsable)."""


def discard_entry(folder: Path) -> None:
    """Take a damaged cache entry (token cache, dequantized GGUF copy) out of the way: renamed first,
    so no reader finds it half deleted."""
    aside = folder.parent / f".{folder.name}.damaged.{secrets.token_hex(8)}"
    try:
        folder.rename(aside)
    except FileNotFoundError:  # another process took it away first
        return
    except OSError as e:
        raise FimtuneError(f"the cache entry {folder} is damaged and could not be removed ({e}); delete it") from None
    shutil.rmtree(aside, ignore_errors=True)


def _load_cache(folder: Path, from_cache: bool) -> TokenizedSplit:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        offsets = np.load(folder / "offsets.npy")
        n_docs, n, chars = int(meta["n_docs"]), int(meta["n_tokens"]), int(meta["chars"])
        size, expected = (folder / "tokens.bin").stat().st_size, n * np.dtype(TOKEN_DTYPE).itemsize
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:  # JSON and .npy errors are ValueErrors
        raise DamagedCache(f"{type(e).__name__}: {e}") from None
    if offsets.shape != (n_docs + 1,) or offsets[-1] != n:
        raise DamagedCache(f"offsets.npy does not hold the {n_docs + 1} offsets of {n} tokens")
    if size != expected:
        raise DamagedCache(f"tokens.bin holds {size} bytes, not the {expected} of {n} tokens")
    tokens = (
        np.memmap(folder / "tokens.bin", dtype=TOKEN_DTYPE, mode="r", shape=(n,)) if n else np.zeros(0, TOKEN_DTYPE)
    )
    return TokenizedSplit(tokens, offsets, chars, folder, from_cache)


class TextColumn:
    """A split's texts by slice (``texts[lo:hi] -> list[str]``), for `fim.unit: char`."""

    def __init__(self, ds: Any, column: str = "content") -> None:
        self._ds, self._column = ds.select_columns([column]), column

    def __len__(self) -> int:
        return self._ds.num_rows

    def __getitem__(self, key: slice) -> list[str]:
        return [t or "" for t in self._ds[key][self._column]]
