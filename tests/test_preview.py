"""`fimtune data inspect`: end to end through the CLI, on the embedded tokenizer and a small corpus."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fimtune.cli import main
from fimtune.config import load_run_config
from fimtune.errors import DataError
from fimtune.preview import inspect_dataset

EMBEDDED_ADDED = "<fim_prefix>=49152, <fim_middle>=49153, <fim_suffix>=49154, <fim_pad>=49155"


@pytest.fixture
def embedded(embedded_tokenizer):
    """Requires the embedded model; `inspect_dataset` loads the same (cached) tokenizer."""
    return embedded_tokenizer


def test_cli_inspect_end_to_end(embedded, tiny_dataset_dir, token_cache, capsys):
    assert main(["data", "inspect", str(tiny_dataset_dir), "--model", "embedded", "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert f"training WILL ADD 4 special tokens: {EMBEDDED_ADDED}" in out
    assert "separator  <|endoftext|> (id 0)" in out
    assert re.search(r"\d\.\d\d chars per token", out)
    assert re.search(r"(\d+) of 60 documents FIM'd .*SPM \d+, PSM \d+; plain \d+", out)
    assert re.search(r"seq_length 2048: [1-9]\d* rows, \d+ tail tokens dropped", out)
    assert out.count("─── sample") == 1 and "⟦<|endoftext|>⟧" in out  # brackets: stdout is not a terminal
    assert any(p.is_dir() for p in token_cache.iterdir())  # tokens cached for training to reuse


def test_cli_inspect_uses_the_run_configs_model(tiny_dataset_dir, token_cache, tmp_path, tiny_tokenizer, capsys):
    """Without --model, the tokenizer is the run's (model.name_or_path), as training will use:
    a StarCoder-family model's own FIM tokens, none added (it showed SmolLM2's, adding four)."""
    from tests import tiny

    folder = tiny.save_model_folder(tiny.gpt_bigcode(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "sc")
    (tmp_path / "run.yaml").write_text(f"model:\n  name_or_path: {folder}\n")
    for args in (["--config", str(tmp_path / "run.yaml")], [f"model.name_or_path={folder}"]):
        assert main(["data", "inspect", str(tiny_dataset_dir), "--n", "0", *args]) == 0
        out = capsys.readouterr().out
        assert f"model      {folder}: FIM tokens of the" in out and "WILL ADD" not in out


def test_inspect_uses_the_run_config(embedded, tiny_dataset_dir, token_cache):
    cfg = load_run_config(None, ["fim.fim_rate=1.0", "fim.spm_rate=1.0"])
    out = inspect_dataset(tiny_dataset_dir, "embedded", 2, cfg)
    assert "60 of 60 documents FIM'd (100.0%): SPM 60, PSM 0; plain 0" in out
    assert out.count("─── sample") == 2
    assert "⟦<fim_prefix>⟧⟦<fim_suffix>⟧" in out  # SPM opens with both


def test_inspect_counts_the_documents_and_the_pieces_fim_cuts_them_into(embedded, tiny_dataset_dir, token_cache):
    """With fim.piece_tokens, FIM works on pieces: the report counts the split's 60 documents as
    documents, and what FIM and packing count as pieces (it said 60 files were hundreds of documents)."""
    cfg = load_run_config(None, ["fim.piece_tokens=50", "fim.fim_rate=1.0"])
    out = inspect_dataset(tiny_dataset_dir, "embedded", 0, cfg)
    n = int(re.search(r": 60 documents \(([\d,]+) pieces, fim.piece_tokens 50\)", out).group(1).replace(",", ""))
    assert n > 60 and f"{n:,} of {n:,} pieces FIM'd (100.0%)" in out and "after every piece" in out


def test_inspect_validation_split_and_colour(embedded, tiny_dataset_dir, token_cache):
    cfg = load_run_config(None, ["packing.seq_length=1024"])  # documents are about 300 tokens long
    out = inspect_dataset(tiny_dataset_dir, "embedded", 3, cfg, split="validation", color=True)
    assert "[validation]: 12 documents" in out and "rows shuffled" not in out
    assert "\x1b[" in out and "⟦" not in out


def test_too_small_for_one_row_says_what_to_do(embedded, tiny_dataset_dir, token_cache):
    cfg = load_run_config(None, ["packing.seq_length=100000"])
    out = inspect_dataset(tiny_dataset_dir, "embedded", 3, cfg, split="validation")
    assert "no full row" in out and "packing.seq_length=" in out and "─── sample" not in out


def test_not_a_dataset_folder(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path), "--model", "embedded"]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    with pytest.raises(DataError, match="does not exist"):
        inspect_dataset(tmp_path / "nope", "embedded", 1, load_run_config())


def test_a_file_is_not_said_not_to_exist(tmp_path, capsys):
    """A table file given for the dataset folder: said to be a file, with the build that reads it
    (it was said not to exist)."""
    (tmp_path / "rows.jsonl").write_text('{"content": "x = 1"}\n')
    (tmp_path / "notes.txt").write_text("notes\n")
    assert main(["data", "inspect", str(tmp_path / "rows.jsonl"), "--model", "embedded"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" not in err and f"'{tmp_path / 'rows.jsonl'}' is a file, not a dataset folder" in err
    assert f"`fimtune data build {tmp_path / 'rows.jsonl'} --out data/rows`" in err
    with pytest.raises(DataError, match="notes.txt' is a file, not a dataset folder: build one with `fimtune data"):
        inspect_dataset(tmp_path / "notes.txt", "embedded", 1, load_run_config())


def test_unknown_split(tiny_dataset_dir):
    with pytest.raises(DataError, match="no split 'test'"):
        inspect_dataset(tiny_dataset_dir, "embedded", 1, load_run_config(), split="test")


@pytest.mark.parametrize("spm", [False, True])
def test_a_sentencepiece_style_row_shows_each_part_with_its_spaces(spm):
    """The suffix and middle go on from text before them (encoded without the "▁" a text starts
    with): shown whole, where a SentencePiece-style decoder would drop their first space; the
    prefix starts the text and shows as the file's start. Byte-level tokenizers show the same."""
    from fimtune.fim import assemble
    from fimtune.preview import _marks, render_ids
    from fimtune.tokenization import encode_flat
    from fimtune.tokens import document_separator_id, ensure_fim_tokens, find_fim_tokens
    from tests.conftest import STARCODER_SPECIALS, train_sentencepiece_style_tokenizer, train_tiny_tokenizer

    prefix, middle, suffix = "def f(x):\n", "    return x\n", "    # end\n"
    for tokenizer in (train_sentencepiece_style_tokenizer(), train_tiny_tokenizer(STARCODER_SPECIALS)):
        fim, _ = ensure_fim_tokens(tokenizer)
        names = find_fim_tokens(tokenizer)
        parts = [
            encode_flat(tokenizer, [text], going_on)[0]
            for text, going_on in ((prefix, False), (middle, True), (suffix, True))
        ]
        marks = _marks(tokenizer, names, fim, document_separator_id(tokenizer))
        row = assemble(*parts, spm, fim)
        p, m, s = (f"⟦{name}⟧" for name in (names.prefix, names.middle, names.suffix))
        one = f"{p}{s}{suffix}{m}{prefix}{middle}" if spm else f"{p}{prefix}{s}{suffix}{m}{middle}"
        assert render_ids(row, tokenizer, marks, False) == one
        # two examples in a row, the second right after the first
        assert render_ids(np.concatenate([row, row]), tokenizer, marks, False) == one * 2


def test_rows_cut_inside_documents_show_their_text_with_its_spaces():
    """A row that begins inside a document goes on from the row before: shown with its leading
    space, where a SentencePiece-style decoder drops a text's first one (a row cut before
    "▁Gregor" showed "Gregor"). Rendered one after another, the rows give back the documents."""
    from fimtune.packing import Documents, PackSpec, pack_epoch
    from fimtune.preview import _marks, _row_starts_document, render_ids
    from fimtune.tokenization import encode_flat
    from fimtune.tokens import document_separator_id, ensure_fim_tokens, find_fim_tokens
    from tests.conftest import code_samples, train_sentencepiece_style_tokenizer

    tokenizer = train_sentencepiece_style_tokenizer()
    fim, _ = ensure_fim_tokens(tokenizer)
    separator = document_separator_id(tokenizer)
    texts = [code_samples()[0][:600], "    x = 1\n", code_samples()[1][:400]]
    ids, lengths = encode_flat(tokenizer, texts)
    docs = Documents(ids, np.concatenate([[0], np.cumsum(lengths)]))
    packed = pack_epoch(docs, PackSpec(fim, separator, seq_length=7, fim_rate=0.0, shuffle=False), 0)
    marks = _marks(tokenizer, find_fim_tokens(tokenizer), fim, separator)
    shown = "".join(
        render_ids(packed.row(k)["input_ids"], tokenizer, marks, False, starts=_row_starts_document(k, packed))
        for k in range(len(packed))
    )
    whole = "".join(f"{text}⟦{tokenizer.convert_ids_to_tokens(separator)}⟧" for text in texts)
    assert len(packed.tail) and whole.startswith(shown) and len(shown) > len(whole) - 40
