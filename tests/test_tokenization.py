"""Tokenization: plain text, no special tokens, cached once per (content, tokenizer), atomic."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest

from fimtune import tokenization
from fimtune.errors import FimtuneError
from fimtune.tokenization import (
    TextColumn,
    cache_root,
    dataset_fingerprint,
    encode_batch,
    tokenize_split,
    tokenizer_fingerprint,
)
from tests.conftest import corpus_texts


@pytest.fixture
def texts():
    return corpus_texts(40)


def split(texts):
    return datasets.Dataset.from_dict({"content": texts, "id": [str(i) for i in range(len(texts))]})


def test_documents_round_trip(tiny_tokenizer, texts, tmp_path):
    out = tokenize_split(split(texts), tiny_tokenizer, cache_dir=tmp_path, progress=False)
    assert out.n_docs == len(texts) and out.n_tokens == len(out.tokens)
    assert out.tokens.dtype == np.int32 and out.offsets.dtype == np.int64
    for d, text in enumerate(texts):
        assert tiny_tokenizer.decode(out.doc(d)) == text
    assert out.chars == sum(map(len, texts))
    assert out.chars_per_token == pytest.approx(out.chars / out.n_tokens)


def test_plain_text_no_special_tokens(embedded_tokenizer, tmp_path):
    text = "s = '<|endoftext|>' + '<|im_start|>'\n"
    out = tokenize_split(split([text]), embedded_tokenizer, cache_dir=tmp_path, progress=False)
    ids = out.doc(0).tolist()
    assert ids == encode_batch(embedded_tokenizer, [text])[0].tolist()
    assert not set(ids) & set(embedded_tokenizer.all_special_ids)  # no BOS, no control token from the text
    assert embedded_tokenizer.decode(ids) == text
    assert embedded_tokenizer.backend_tokenizer.encode_special_tokens is False  # restored


def test_second_call_hits_the_cache(tiny_tokenizer, texts, tmp_path, monkeypatch):
    ds = split(texts)
    first = tokenize_split(ds, tiny_tokenizer, cache_dir=tmp_path, progress=False)
    mtime = (first.path / "tokens.bin").stat().st_mtime_ns

    def no_encoding(*args, **kwargs):
        raise AssertionError("re-tokenized")

    monkeypatch.setattr(tokenization, "encode_flat", no_encoding)
    again = tokenize_split(split(texts), tiny_tokenizer, cache_dir=tmp_path, progress=False)
    assert (first.from_cache, again.from_cache) == (False, True)
    assert again.path == first.path and (again.path / "tokens.bin").stat().st_mtime_ns == mtime
    assert isinstance(again.tokens, np.memmap)
    assert np.array_equal(again.tokens, first.tokens) and np.array_equal(again.offsets, first.offsets)


def test_cache_is_written_atomically(tiny_tokenizer, texts, tmp_path):
    out = tokenize_split(split(texts), tiny_tokenizer, cache_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.path.name]  # no temporary folder left
    assert sorted(p.name for p in out.path.iterdir()) == ["meta.json", "offsets.npy", "tokens.bin"]


def test_a_killed_writers_temporary_folder_is_removed_once_a_day_old(tiny_tokenizer, texts, tmp_path):
    """A writer killed mid-write (`kill -9`) leaves a hidden temporary folder nothing reads: the next
    write removes those over a day old, and leaves a younger one (another process's, still writing)."""
    import os
    import time

    old, young = tmp_path / ".entry.0123456789abcdef", tmp_path / ".entry.fedcba9876543210"
    for folder in (old, young):
        folder.mkdir()
        (folder / "tokens.bin").write_bytes(b"\0" * 8)
    day_ago = time.time() - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    out = tokenize_split(split(texts), tiny_tokenizer, cache_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.path.name, young.name])


@pytest.mark.parametrize(
    "damage",
    ["tokens.bin cut", "tokens.bin deleted", "offsets.npy cut", "offsets.npy deleted", "meta.json cut"],
)
def test_a_damaged_cache_entry_is_tokenized_again(tiny_tokenizer, texts, tmp_path, damage, caplog):
    """A cache entry with a file cut short (a full disk, a copy of the cache interrupted) or deleted
    was a traceback (`mmap length is greater than file size`, a JSONDecodeError): it is written again."""
    ds = split(texts)
    first = tokenize_split(ds, tiny_tokenizer, cache_dir=tmp_path, progress=False)
    tokens, offsets = np.array(first.tokens), first.offsets.copy()
    name, what = damage.split()
    path = first.path / name
    if what == "cut":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()
    again = tokenize_split(ds, tiny_tokenizer, cache_dir=tmp_path, progress=False)
    assert not again.from_cache and "is damaged" in caplog.text and "tokenizing again" in caplog.text
    assert np.array_equal(again.tokens, tokens) and np.array_equal(again.offsets, offsets)
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # the damaged copy is gone
    assert tokenize_split(ds, tiny_tokenizer, cache_dir=tmp_path, progress=False).from_cache


def test_cache_key_follows_content_and_tokenizer(tiny_tokenizer, tiny_tokenizer_without_fim, texts):
    key = dataset_fingerprint(split(texts), "content")
    assert dataset_fingerprint(split(list(texts)), "content") == key  # rebuilt, same files: same key
    assert dataset_fingerprint(split([*texts[:-1], texts[-1] + "#"]), "content") != key
    shuffled = split(texts).shuffle(seed=0)  # an indices mapping over the same table
    assert dataset_fingerprint(shuffled, "content") != key
    assert dataset_fingerprint(shuffled.flatten_indices(), "content") == dataset_fingerprint(shuffled, "content")
    assert dataset_fingerprint(split(texts).select(range(5, 10)), "content") == dataset_fingerprint(
        split(texts[5:10]), "content"
    )
    assert tokenizer_fingerprint(tiny_tokenizer) != tokenizer_fingerprint(tiny_tokenizer_without_fim)
    before = tokenizer_fingerprint(tiny_tokenizer_without_fim)
    tiny_tokenizer_without_fim.add_special_tokens({"extra_special_tokens": ["<fim_prefix>"]})
    assert tokenizer_fingerprint(tiny_tokenizer_without_fim) != before  # added tokens are part of the key


def test_a_new_tokenizers_release_is_a_new_token_cache_key(tiny_tokenizer, monkeypatch):
    """A release can change how the same serialized tokenizer splits text (a pre-tokenizer's fix)."""
    import tokenizers

    key = tokenizer_fingerprint(tiny_tokenizer)
    monkeypatch.setattr(tokenizers, "__version__", tokenizers.__version__ + ".post1")
    assert tokenizer_fingerprint(tiny_tokenizer) != key


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FIMTUNE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path / "tokens"
    monkeypatch.delenv("FIMTUNE_CACHE")
    assert cache_root().parts[-3:] == (".cache", "fimtune", "tokens")


def test_default_cache_location(tiny_tokenizer, texts, token_cache):
    out = tokenize_split(split(texts), tiny_tokenizer, progress=False)
    assert out.path.parent == token_cache


def test_a_cache_folder_that_cannot_be_written_is_a_clear_error(tiny_tokenizer, texts, tmp_path, monkeypatch):
    """A read-only $FIMTUNE_CACHE, or a file where it should be, was a traceback from mkdir."""
    (tmp_path / "cache").write_text("a file, not a folder")
    monkeypatch.setenv("FIMTUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FimtuneError, match=r"token cache.*set FIMTUNE_CACHE to a writable folder"):
        tokenize_split(split(texts), tiny_tokenizer, progress=False)


def test_empty_split(tiny_tokenizer, tmp_path):
    out = tokenize_split(split([]), tiny_tokenizer, cache_dir=tmp_path, progress=False)
    assert (out.n_docs, out.n_tokens, out.chars_per_token) == (0, 0, 0.0)
    assert tokenize_split(split([]), tiny_tokenizer, cache_dir=tmp_path, progress=False).from_cache


def test_missing_column_is_a_clear_error(tiny_tokenizer, tmp_path):
    with pytest.raises(FimtuneError, match="no column 'text'"):
        tokenize_split(split(["x"]), tiny_tokenizer, "text", cache_dir=tmp_path)


def test_text_column_slices(texts):
    col = TextColumn(split(texts))
    assert len(col) == len(texts) and col[3:6] == texts[3:6]


def test_fingerprint_ignores_how_arrow_chunks_the_rows(texts):
    import pyarrow as pa

    one = split(texts)
    table = pa.Table.from_batches(pa.Table.from_pydict({"content": texts}).to_batches(max_chunksize=7))
    assert table.column("content").num_chunks > 1
    assert dataset_fingerprint(datasets.Dataset(table), "content") == dataset_fingerprint(one, "content")


def test_fim_tokens_a_tokenizer_does_not_mark_special_stay_text_in_code(tmp_path):
    """Qwen2.5-Coder, CodeGemma and DeepSeek-Coder add their FIM tokens unmarked as special, which
    `encode_special_tokens` alone would still match in a file's text: training rows and a client's
    prefix would then hold real FIM tokens. They are encoded as text; the real ones still serve."""
    from tokenizers import AddedToken

    from fimtune.generate import FimPrompter
    from tests.conftest import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(["<|endoftext|>"])
    names = ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"]
    tokenizer.add_tokens([AddedToken(name, special=False) for name in names])
    fim_ids = set(tokenizer.convert_tokens_to_ids(names))
    text = "s = '<|fim_middle|>' + \"<|fim_prefix|>\"\n"
    in_text = set(tokenizer.convert_tokens_to_ids(names[:2]))
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True
    assert in_text <= set(backend.encode(text).ids)  # encode_special_tokens alone keeps them tokens
    backend.encode_special_tokens = False
    for ids in (
        encode_batch(tokenizer, [text])[0].tolist(),
        tokenize_split(split([text]), tokenizer, cache_dir=tmp_path, progress=False).doc(0).tolist(),
    ):
        assert not set(ids) & fim_ids and tokenizer.decode(ids) == text
    prompter = FimPrompter(tokenizer)
    ids = prompter.encode(text)
    assert not set(ids) & fim_ids and prompter.decode(ids) == text
    prompt = prompter.build(text, "\n")
    assert [t for t in prompt if t in fim_ids] == [prompter.fim.prefix, prompter.fim.suffix, prompter.fim.middle]
    assert prompter.encode_formatted("<|fim_prefix|>x") == [prompter.fim.prefix, *prompter.encode("x")]
    assert tokenizer.backend_tokenizer.get_added_tokens_decoder()[prompter.fim.middle].special is False  # unchanged


def test_a_full_cache_folder_is_a_clear_error_naming_it(tmp_path):
    """A write that fails for want of room (a file size limit here: EFBIG, as ENOSPC for a full
    disk) names the token cache and FIMTUNE_CACHE, and leaves no temporary folder behind."""
    script = textwrap.dedent("""
        import datasets
        from fimtune.errors import FimtuneError
        from fimtune.tokenization import tokenize_split
        from tests.conftest import corpus_texts, train_tiny_tokenizer
        ds = datasets.Dataset.from_dict({"content": corpus_texts(40)})
        try:
            tokenize_split(ds, train_tiny_tokenizer(["<|endoftext|>"]), progress=False)
        except FimtuneError as e:
            print(e)
    """)

    def size_limit():  # files may grow to 8 kB; writes past it fail instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8_000, 8_000))

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "FIMTUNE_CACHE": str(tmp_path)}
    res = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=size_limit,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith(f"could not write the token cache to {tmp_path / 'tokens'} ([Errno 27]"), res.stdout
    assert "FIMTUNE_CACHE" in res.stdout
    assert list((tmp_path / "tokens").iterdir()) == []  # no temporary folder left


def test_a_cache_entry_is_readable_as_the_umask_allows(tiny_tokenizer, texts, tmp_path):
    """A cache shared by a team (one FIMTUNE_CACHE, several users): an entry was a folder of mode
    0700 (`tempfile.mkdtemp`'s), so another user's run failed on it with a PermissionError."""
    old = os.umask(0o022)
    try:
        out = tokenize_split(split(texts), tiny_tokenizer, cache_dir=tmp_path, progress=False)
    finally:
        os.umask(old)
    assert out.path.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in out.path.iterdir()} == {0o644}
