"""Shared fixtures: tokenizers and corpora built in-process (no network, ever)."""

from __future__ import annotations

import copy
import inspect
import json.decoder
import shlex
import string
import textwrap
from pathlib import Path

import pytest

# StarCoder's special tokens, in StarCoder's id order: <|endoftext|>=0, <fim_prefix>=1, ...
STARCODER_SPECIALS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
TINY_VOCAB = 600


def code_samples() -> list[str]:
    """A few dozen KB of real Python: the source of some standard-library modules."""
    return [inspect.getsource(m) for m in (textwrap, json.decoder, shlex, string)]


def train_tiny_tokenizer(special_tokens: list[str], vocab_size: int = TINY_VOCAB):
    """A byte-level BPE trained on :func:`code_samples`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(code_samples(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=special_tokens[0] if special_tokens else None)


def train_sentencepiece_style_tokenizer(prepend: str = "normalizer", vocab_size: int = TINY_VOCAB):
    """A BPE with byte fallback that writes spaces as "▁" and puts one before each text it encodes
    (SentencePiece's dummy prefix), as Llama's, CodeLlama's and Mistral's: through a `Prepend`
    normalizer (``prepend="normalizer"``, transformers' legacy Llama tokenizers) or a `Metaspace`
    pre-tokenizer (``"metaspace"``); CodeLlama's FIM tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    if prepend == "normalizer":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    specials = ["<unk>", "<s>", "</s>", "\u2581<PRE>", "\u2581<SUF>", "\u2581<MID>", "\u2581<EOT>"]
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + bytes_, show_progress=False)
    tok.train_from_iterator(code_samples(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", bos_token="<s>")


@pytest.fixture(scope="session")
def _tiny_tokenizer_session():
    return train_tiny_tokenizer(STARCODER_SPECIALS)


@pytest.fixture
def tiny_tokenizer(_tiny_tokenizer_session):
    """A small fast tokenizer with `<|endoftext|>` and the StarCoder FIM tokens (ids 0-4); a private copy."""
    return copy.deepcopy(_tiny_tokenizer_session)


@pytest.fixture
def tiny_tokenizer_without_fim():
    """A small fast tokenizer with only `<|endoftext|>`, like SmolLM2's vocabulary."""
    return train_tiny_tokenizer(["<|endoftext|>"])


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """The embedded SmolLM2 tokenizer, loaded once per session (~4 s). Shared: deepcopy before changing it."""
    from fimtune.errors import FimtuneError
    from fimtune.hub import load_tokenizer

    try:
        return load_tokenizer("embedded")
    except FimtuneError as e:  # `make install` installs it; a bare checkout may lack it
        pytest.skip(f"embedded model not installed: {e}")


def corpus_texts(n_docs: int, lines_per_doc: int = 30) -> list[str]:
    """Documents cut from :func:`code_samples`, plus the awkward ones: empty, and control-token text."""
    lines = [line for src in code_samples() for line in src.splitlines(keepends=True)]
    docs = ["".join(lines[i : i + lines_per_doc]) for i in range(0, len(lines), lines_per_doc)]
    docs = (docs * (1 + n_docs // max(1, len(docs))))[: n_docs - 2]
    return [*docs, "", "s = '<|endoftext|>' + '<fim_prefix>'\n"]


def write_dataset_dir(path: Path, train: list[str], validation: list[str]) -> Path:
    """A folder like `fimtune data build` writes: DatasetDict(train, validation) via save_to_disk."""
    import datasets

    def split(texts: list[str], name: str) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {
                "repo_id": ["tests/stdlib"] * len(texts),
                "file_path": [f"{name}/doc{i}.py" for i in range(len(texts))],
                "language": ["python"] * len(texts),
                "content": texts,
                "size": [len(t.encode()) for t in texts],
                "id": [f"{name}-{i}" for i in range(len(texts))],
            }
        )

    datasets.DatasetDict(train=split(train, "train"), validation=split(validation, "validation")).save_to_disk(
        str(path)
    )
    return path


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory) -> Path:
    """A small corpus folder (train: 60 documents, about 16k SmolLM2 tokens; validation: 12)."""
    texts = corpus_texts(72)
    return write_dataset_dir(tmp_path_factory.mktemp("corpus") / "data", texts[:58] + texts[-2:], texts[58:70])


@pytest.fixture
def token_cache(tmp_path, monkeypatch) -> Path:
    """A private token cache for one test ($FIMTUNE_CACHE)."""
    monkeypatch.setenv("FIMTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokens"


@pytest.fixture
def repetitive_data(tmp_path) -> Path:
    """A small corpus that repeats itself, so a tiny model's loss must fall quickly."""
    texts = corpus_texts(12, lines_per_doc=12)[:10]
    return write_dataset_dir(tmp_path / "data", texts * 4, texts[:3])


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine those threads spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing `gpu` test prints its report at once: a CUDA fault can abort the process
    (an asynchronous kernel error surfaces at a later free) before pytest's summary."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "gpu" in item.keywords:
        print(f"\n--- {item.nodeid} ({report.when}) failed:\n{report.longreprtext}\n", flush=True)
