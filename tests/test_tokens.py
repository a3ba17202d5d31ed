"""FIM tokens by family: found in the vocabulary, added when absent, ids from the tokenizer."""

from __future__ import annotations

import copy

import pytest

from fimtune.fim import FimTokens
from fimtune.tokens import (
    FAMILIES,
    STARCODER,
    document_separator_id,
    ensure_fim_tokens,
    find_fim_tokens,
    missing_fim_tokens,
    newline_mask,
)

STARCODER_NAMES = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]


def with_tokens(tokenizer, names):
    tokenizer.add_special_tokens({"extra_special_tokens": names}, replace_extra_special_tokens=False)
    return tokenizer


def test_starcoder_tokens_are_found_with_their_ids(tiny_tokenizer):
    assert find_fim_tokens(tiny_tokenizer) == STARCODER
    assert missing_fim_tokens(tiny_tokenizer) == []
    size = len(tiny_tokenizer)
    assert ensure_fim_tokens(tiny_tokenizer) == (FimTokens(prefix=1, middle=2, suffix=3, pad=4), [])
    assert len(tiny_tokenizer) == size


def test_missing_tokens_are_added_as_special_tokens(tiny_tokenizer_without_fim):
    tok = tiny_tokenizer_without_fim
    size = len(tok)
    assert find_fim_tokens(tok) is None
    assert missing_fim_tokens(tok) == STARCODER_NAMES
    ids, added = ensure_fim_tokens(tok)
    assert added == STARCODER_NAMES
    assert ids == FimTokens(prefix=size, middle=size + 1, suffix=size + 2, pad=size + 3)
    assert all(name in tok.all_special_tokens for name in added)
    assert tok("a<fim_prefix>b", add_special_tokens=False)["input_ids"][1] == ids.prefix  # never split
    assert ensure_fim_tokens(tok) == (ids, [])  # idempotent


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.family)
def test_every_family_is_recognised(tiny_tokenizer_without_fim, family):
    tok = with_tokens(tiny_tokenizer_without_fim, family.names())
    found = find_fim_tokens(tok)
    assert found == family
    ids, added = ensure_fim_tokens(tok)
    vocab = tok.get_vocab()
    assert added == []
    assert (ids.prefix, ids.suffix, ids.middle) == (vocab[family.prefix], vocab[family.suffix], vocab[family.middle])


def test_a_family_without_pad_falls_back(tiny_tokenizer_without_fim):
    tok = with_tokens(tiny_tokenizer_without_fim, ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"])  # CodeGemma
    assert find_fim_tokens(tok).pad is None
    ids, _ = ensure_fim_tokens(tok)
    assert ids.pad == tok.convert_tokens_to_ids("<|endoftext|>")  # eos (= pad fallback) here


def test_separator_prefers_endoftext_over_eos(tiny_tokenizer_without_fim):
    tok = with_tokens(tiny_tokenizer_without_fim, ["<|im_end|>"])
    tok.eos_token = "<|im_end|>"
    assert document_separator_id(tok) == tok.get_vocab()["<|endoftext|>"] != tok.eos_token_id


def test_separator_falls_back_to_eos():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"</s>": 0, "x": 1}, unk_token="x"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    assert document_separator_id(tok) == 0


def test_embedded_model_has_no_fim_tokens(embedded_tokenizer):
    tok = copy.deepcopy(embedded_tokenizer)
    # the trap: an unknown name maps to the unk token, id 0, which is not a FIM token
    assert tok.convert_tokens_to_ids("<fim_prefix>") == 0
    assert find_fim_tokens(tok) is None
    assert missing_fim_tokens(tok) == STARCODER_NAMES
    assert document_separator_id(tok) == 0 != tok.eos_token_id  # <|endoftext|>, while EOS is <|im_end|>
    ids, added = ensure_fim_tokens(tok)
    assert added == STARCODER_NAMES and ids == FimTokens(49152, 49153, 49154, 49155)
    assert find_fim_tokens(embedded_tokenizer) is None  # the shared one is untouched


def test_newline_mask(tiny_tokenizer):
    mask = newline_mask(tiny_tokenizer)
    vocab = tiny_tokenizer.get_vocab()
    assert len(mask) == len(tiny_tokenizer)
    assert mask[vocab["Ċ"]] and not mask[vocab["def"]]
    assert mask[tiny_tokenizer("\n    ", add_special_tokens=False)["input_ids"][0]]
