"""KV caches kept across requests, and drafts guessed from the tokens seen before.

An editor sends a request at almost every keystroke, and each prompt shares most of its
tokens with the one before. :class:`PromptCache` keeps the KV cache of the last few prompts
(with the tokens generated after them); a new request takes the one sharing the longest
token prefix, crops it to that prefix and feeds only the rest::

    kept      <P><S> suffix <M> def add(a, b):\\n    ret    urn a + b   (prompt + generated tokens)
    new       <P><S> suffix <M> def add(a, b):\\n    return
    reused    |<----------- common token prefix -------->|             crop to it, feed `urn`

SPM prompts put the suffix first, so a prefix that grows at the cursor keeps almost all
of the cache; PSM prompts keep only the prefix part (the suffix after it is recomputed).

:class:`Drafter` guesses the next tokens by finding the last few tokens earlier on (in this
prompt, or in the tokens the previous request generated): a person typing along the last
suggestion makes the guess right, and the decoder checks a whole guess in one forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

MIN_REUSE_TOKENS = 8  # a shorter common prefix starts a fresh cache (and keeps the old one for its file)
DEFAULT_CACHE_SLOTS = 4
MIN_CACHE_ROOM = 256  # positions a KV buffer starts with (it doubles when full)
DRAFT_NGRAM = 3  # tokens matched to find a draft
FIRST_DRAFT = 4  # tokens in a request's first draft
DRAFT_GROWTH = 2  # more tokens in the next draft after a fully right one


@dataclass
class CacheSlot:
    """A KV cache and the token ids it holds (for one adapter)."""

    adapter: str | None
    tokens: list[int] = field(default_factory=list)
    cache: Any = None


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two id lists.

    >>> common_prefix([1, 2, 3, 4], [1, 2, 5])
    2
    """
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def crop_cache(cache: Any, length: int) -> None:
    """Keep the first ``length`` positions of a DynamicCache (``crop(-k)`` removes k, in every transformers 5)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class PromptCache:
    """The KV caches of the last few prompts, most recent first; each belongs to one adapter."""

    def __init__(self, slots: int = DEFAULT_CACHE_SLOTS) -> None:
        self.size = slots
        self.slots: list[CacheSlot] = []

    def take(self, adapter: str | None, prompt: list[int]) -> tuple[CacheSlot | None, int, list[int]]:
        """The slot sharing the longest prefix with ``prompt``, cropped to it; that length; its tokens before.

        At least one prompt token is left to feed (its logits give the first new token).
        """
        best, reuse = None, 0
        for slot in self.slots:
            n = common_prefix(slot.tokens, prompt) if slot.adapter == adapter else 0
            if n > reuse:
                best, reuse = slot, n
        reuse = min(reuse, len(prompt) - 1)
        if best is None or reuse < MIN_REUSE_TOKENS:
            return None, 0, []
        self.slots.remove(best)
        before = list(best.tokens)
        crop_cache(best.cache, reuse)
        del best.tokens[reuse:]
        return best, reuse, before

    def put(self, slot: CacheSlot) -> None:
        self.slots.insert(0, slot)
        del self.slots[self.size :]

    def clear(self) -> None:
        self.slots.clear()


class Drafter:
    """Guesses what follows the last ``DRAFT_NGRAM`` tokens from where they occurred before.

    Looked up in the sequence being generated (prompt lookup) and in the previous request's
    tokens (its completion: right when a person types along it). The latest occurrence wins.

    >>> d = Drafter(previous=[7, 1, 2, 3, 4, 5, 6])
    >>> d.extend([9, 1, 2, 3])
    >>> d.propose(2)
    [4, 5]
    """

    def __init__(self, previous: list[int], n: int = DRAFT_NGRAM, length: int = FIRST_DRAFT) -> None:
        self.n = n
        self.length = length  # tokens to propose next: grows while guesses are right, shrinks when not
        self.seqs: list[list[int]] = [previous, []]
        self.where: dict[tuple[int, ...], tuple[int, int]] = {}
        self._index(0, 0)

    def extend(self, tokens: list[int]) -> None:
        """Tokens appended to the sequence being generated."""
        start = len(self.seqs[1])
        self.seqs[1].extend(tokens)
        self._index(1, start)

    def _index(self, which: int, start: int) -> None:
        seq, n = self.seqs[which], self.n
        for j in range(max(start, n), len(seq)):  # the n tokens before j, and what followed: seq[j]
            self.where[tuple(seq[j - n : j])] = (which, j)

    def adapt(self, proposed: int, agreed: int) -> None:
        """Longer drafts after a fully right one, shorter after a wrong one (a checked token costs a little)."""
        if proposed and agreed == proposed:
            self.length += DRAFT_GROWTH
        elif proposed:
            self.length = max(1, self.length - 1)

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the last n tokens last time ([] when never seen)."""
        current = self.seqs[1]
        if k <= 0 or len(current) < self.n:
            return []
        hit = self.where.get(tuple(current[-self.n :]))
        if hit is None:
            return []
        which, j = hit
        return self.seqs[which][j : j + k]


def new_cache() -> Any:
    """A DynamicCache whose layers keep their keys and values in buffers with room to grow."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layer_class_to_replicate = _growing_layer_class()
    return cache


_GROWING_LAYER: type | None = None


def _growing_layer_class() -> type:
    """`DynamicLayer` that writes new keys/values into spare room instead of concatenating.

    A plain DynamicLayer copies its whole cache at every token (`torch.cat`): 24 MB per
    token for SmolLM2-135M at 512 tokens, 15% of a decoding step on a CPU. Here the buffer
    doubles when full, a token is written in place, and attention reads a view of it.
    """
    global _GROWING_LAYER
    if _GROWING_LAYER is not None:
        return _GROWING_LAYER
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            self.length = 0
            self.key_buffer = self.value_buffer = None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if self.key_buffer is None or end > self.key_buffer.shape[-2]:
                self._grow(key_states, value_states, end)
            self.key_buffer[..., self.length : end, :] = key_states
            self.value_buffer[..., self.length : end, :] = value_states
            self._set_length(end)
            return self.keys, self.values

        def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, end: int) -> None:
            room = max(end, 2 * (self.key_buffer.shape[-2] if self.key_buffer is not None else 0), MIN_CACHE_ROOM)
            keys = key_states.new_empty((*key_states.shape[:-2], room, key_states.shape[-1]))
            values = value_states.new_empty((*value_states.shape[:-2], room, value_states.shape[-1]))
            if self.length:
                keys[..., : self.length, :] = self.keys
                values[..., : self.length, :] = self.values
            self.key_buffer, self.value_buffer = keys, values

        def _set_length(self, length: int) -> None:
            self.length = length
            self.keys = self.key_buffer[..., :length, :]
            self.values = self.value_buffer[..., :length, :]

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def crop(self, tokens_to_remove: int) -> None:
            if self.is_initialized and tokens_to_remove < 0:
                self._set_length(max(0, self.length + tokens_to_remove))

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized and self.key_buffer is not None:
                self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
                self._set_length(self.length)

    _GROWING_LAYER = GrowingLayer
    return GrowingLayer
