"""FIM tokens by model family: find them in a tokenizer's vocabulary, or add the StarCoder ones.

=====================================  ===================  ===================  ===================  ===============
family                                 prefix               suffix               middle               pad / end
=====================================  ===================  ===================  ===================  ===============
StarCoder / StarCoder2                 ``<fim_prefix>``     ``<fim_suffix>``     ``<fim_middle>``     ``<fim_pad>``
SantaCoder                             ``<fim-prefix>``     ``<fim-suffix>``     ``<fim-middle>``     ``<fim-pad>``
Qwen2.5-Coder / CodeGemma              ``<|fim_prefix|>``   ``<|fim_suffix|>``   ``<|fim_middle|>``   ``<|fim_pad|>`` (Qwen)
DeepSeek-Coder                         ``<｜fim▁begin｜>``  ``<｜fim▁hole｜>``   ``<｜fim▁end｜>``    (none)
CodeLlama                              ``▁<PRE>``           ``▁<SUF>``           ``▁<MID>``           ``▁<EOT>``
=====================================  ===================  ===================  ===================  ===============

Names are matched in the vocabulary (``get_vocab()``), never by ``convert_tokens_to_ids``:
that maps an unknown name to the unknown token (SmolLM2's ``<|endoftext|>``, id 0) and
would find FIM tokens that are not there. Ids always come from the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fimtune.errors import FimtuneError
from fimtune.fim import NEWLINE, FimTokens

END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class FimTokenNames:
    """The FIM token names of one model family (``pad`` is None where the family has none)."""

    family: str
    prefix: str
    suffix: str
    middle: str
    pad: str | None

    def names(self) -> list[str]:
        """The names in the order they are added: prefix, middle, suffix, pad (StarCoder's id order)."""
        return [n for n in (self.prefix, self.middle, self.suffix, self.pad) if n is not None]


STARCODER = FimTokenNames("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>")
FAMILIES: tuple[FimTokenNames, ...] = (
    STARCODER,
    FimTokenNames("santacoder", "<fim-prefix>", "<fim-suffix>", "<fim-middle>", "<fim-pad>"),  # hyphens, not _
    FimTokenNames("qwen2.5-coder/codegemma", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>"),
    FimTokenNames("deepseek-coder", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", None),
    FimTokenNames("codellama", "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"),
)


def find_fim_tokens(tokenizer: Any) -> FimTokenNames | None:
    """The first family whose prefix, suffix and middle tokens are all in the vocabulary.

    The returned ``pad`` is the family's pad name when the vocabulary has it, else None
    (CodeGemma has no ``<|fim_pad|>``).
    """
    vocab = tokenizer.get_vocab()
    for fam in FAMILIES:
        if all(name in vocab for name in (fam.prefix, fam.suffix, fam.middle)):
            pad = fam.pad if fam.pad in vocab else None
            return FimTokenNames(fam.family, fam.prefix, fam.suffix, fam.middle, pad)
    return None


def missing_fim_tokens(tokenizer: Any) -> list[str]:
    """The StarCoder FIM names to add when the tokenizer has no family's FIM tokens ([] when it has).

    The embedded SmolLM2 tokenizer has none: ``['<fim_prefix>', '<fim_middle>', '<fim_suffix>', '<fim_pad>']``.
    """
    if find_fim_tokens(tokenizer) is not None:
        return []
    vocab = tokenizer.get_vocab()
    return [name for name in STARCODER.names() if name not in vocab]


def ensure_fim_tokens(tokenizer: Any) -> tuple[FimTokens, list[str]]:
    """The FIM token ids, adding the missing StarCoder names as special tokens (in place).

    Returns the ids and the names added; when names were added, the model's embeddings
    must be resized (``len(tokenizer)`` rows) and the new rows trained. The pad id falls
    back to the tokenizer's pad token, then to the document separator, when the family
    has no pad token.
    """
    added = missing_fim_tokens(tokenizer)
    if added:
        tokenizer.add_special_tokens({"extra_special_tokens": added}, replace_extra_special_tokens=False)
    names = find_fim_tokens(tokenizer)
    if names is None:  # unreachable unless the tokenizer refuses new tokens
        raise FimtuneError(f"could not add the FIM tokens {', '.join(added)} to the tokenizer")
    vocab = tokenizer.get_vocab()
    pad = vocab[names.pad] if names.pad is not None else _fallback_pad(tokenizer)
    return FimTokens(prefix=vocab[names.prefix], middle=vocab[names.middle], suffix=vocab[names.suffix], pad=pad), added


def _fallback_pad(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else document_separator_id(tokenizer)


def document_separator_id(tokenizer: Any) -> int:
    """The token after every document: ``<|endoftext|>`` when the vocabulary has it, else EOS.

    StarCoder: ``<|endoftext|>`` = 0 (also its EOS). SmolLM2 has ``<|endoftext|>`` (0) too,
    while the EOS of its GGUF is the chat token ``<|im_end|>``: the separator is 0.
    """
    vocab = tokenizer.get_vocab()
    if END_OF_TEXT in vocab:
        return int(vocab[END_OF_TEXT])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise FimtuneError(
            f"the tokenizer has neither {END_OF_TEXT} nor an EOS token to separate documents; "
            "use a model whose tokenizer defines eos_token"
        )
    return int(eos)


def newline_mask(tokenizer: Any) -> np.ndarray:
    """``mask[t]``: whether token id ``t`` decodes to text holding a newline (for line spans).

    In a byte-level BPE, ``Ċ`` (a newline) and ``ĊĠĠĠ`` (a newline and an indent) hold one,
    ``def`` does not; in SentencePiece, ``<0x0A>`` does. One batched decode of the vocabulary.
    """
    backend = tokenizer.backend_tokenizer
    size = backend.get_vocab_size(with_added_tokens=True)
    texts = backend.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
    return np.fromiter((NEWLINE in t for t in texts), dtype=bool, count=size)
