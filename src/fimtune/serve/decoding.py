"""Token-by-token decoding: one request with KV-cache reuse and drafts, or a left-padded batch.

One request (the editor's case) takes the KV cache of an earlier one (:mod:`.kvcache`) and
feeds only the tokens after their common prefix. Greedy requests also feed a draft, the
tokens the :class:`~.kvcache.Drafter` guesses come next, in the same forward, and keep the
longest part of it the model agrees with, plus the model's own next token::

    feed      [ new prompt tokens | pending token ]  d1  d2  d3  d4         (draft d1..d4)
    argmax                                            d1  d2  x   .  .
    keep      d1 d2, then x is the next pending token; the cache is cropped after d2

On a CPU a forward of a few tokens costs about one of a single token (reading the
weights dominates), so a right guess saves whole decoding steps, and a wrong one costs
little. The output is greedy decoding's (up to floating-point rounding of the wider forward).

Several requests at once are left-padded and decoded together, without reuse or drafts;
a row that finishes leaves the batch (its cache rows are dropped).

On a CUDA device the decoder uses :mod:`.static` instead (given as ``static``): a static
cache and a compiled one-token step replayed as a CUDA graph, for one request or a batch
(no reuse, no drafts: a step costs ~1 ms there, and launching kernels was the cost), on a
CUDA stream of the highest priority. Its rows stop, stream and cancel through the same
:class:`_RowState`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fimtune.fast import copy_to_device, copy_to_host, without_cudnn_attention
from fimtune.generate import Completion, FimPrompter, GenerationParams, TextTracker, pick_tokens
from fimtune.model import forward_keywords
from fimtune.serve.kvcache import DEFAULT_CACHE_SLOTS, CacheSlot, Drafter, PromptCache, crop_cache, new_cache
from fimtune.serve.static import OVERLAP_MAX_STEPS

if TYPE_CHECKING:
    from fimtune.serve.static import StaticDecoding, StaticSession

log = logging.getLogger(__name__)

MAX_DRAFT = 8  # draft tokens checked per forward

TokenCallback = Callable[[int, str, bool], None]  # (token id, text piece, is an end token)


@dataclass
class Row:
    """One request for the decoder: prompt ids, parameters, where new text goes, when to give up."""

    prompt: list[int]
    params: GenerationParams
    on_token: TokenCallback | None = None
    should_stop: Callable[[], bool] = lambda: False  # cancelled, or past its deadline
    on_done: Callable[[Completion], None] | None = None  # told the completion as soon as the row ends


# Rows that may join a batch in flight: join(room, fits) -> at most `room` rows, each passing
# fits(prompt tokens, max new tokens). Called between two decoding steps.
Joiner = Callable[[int, Callable[[int, int], bool]], list[Row]]


@dataclass
class DecodeStats:
    """Token counts since start-up (read by `/metrics` and the tests)."""

    prompt_tokens: int = 0
    fed_tokens: int = 0  # prompt tokens run through the model
    cached_tokens: int = 0  # prompt tokens whose KV came from an earlier request
    generated_tokens: int = 0
    draft_tokens: int = 0  # guessed tokens checked
    accepted_tokens: int = 0  # guessed tokens the model agreed with
    forwards: int = 0
    batches: int = 0
    largest_batch: int = 0
    joined: int = 0  # rows that joined a batch in flight (continuous batching)
    joins: int = 0  # ... in this many joins (the rows of a join are prefilled together; overlapped: one)
    # The static path's wall time: prefills (a batch's, joins'; on a GPU the host's part, queuing them:
    # the device's own time runs on into the next wait), and waits for the device's picks (the next
    # step runs meanwhile). The rest of a batch is the host's: queuing steps, stops, streaming.
    prefill_s: float = 0.0
    device_wait_s: float = 0.0


class _RowState:
    """One row's progress: new tokens, text, stop decisions, streaming."""

    def __init__(self, row: Row, prompter: FimPrompter, cached: int = 0) -> None:
        self.row = row
        self.ends = set(prompter.end_ids)
        self.tracker = TextTracker(prompter, row.params, prompter.starts_document(row.prompt))
        self.cached = cached
        self.n_new = 0
        self.reason = "length"
        self.first_at: float | None = None

    def accept(self, token: int) -> bool:
        """Take the next token; True when the row is finished (the token is then not fed back)."""
        self.n_new += 1
        if self.first_at is None:
            self.first_at = time.monotonic()
        if token in self.ends:
            self.reason = "stop"
            self._emit(token, "", True)
            return True
        piece = self.tracker.push(token)
        self._emit(token, piece, False)
        if self.tracker.stopped:
            self.reason = "stop"
            return True
        return self.n_new >= self.row.params.max_new_tokens or self.row.should_stop()

    @property
    def last_by_length(self) -> bool:
        """Whether the next token accepted is the row's last, whatever it is (its length limit)."""
        return self.n_new + 1 >= self.row.params.max_new_tokens

    def _emit(self, token: int, piece: str, end: bool) -> None:
        if self.row.on_token is not None:
            self.row.on_token(token, piece, end)

    def completion(self) -> Completion:
        n_prompt, stopped = len(self.row.prompt), self.tracker.stopped
        return Completion(self.tracker.text, n_prompt, self.n_new, self.reason, self.cached, stopped, self.first_at)


class _Joining:
    """A slot whose row is being prefilled beside the decoding (overlapped joins): it decodes along
    unused until its prefill is put in (:meth:`Decoder._admit`)."""

    last_by_length = False  # the batch's steps go on for it

    def __init__(self, row: Row, admission: Any) -> None:
        self.row, self.admission, self.steps = row, admission, 0


class Decoder:
    """Runs rows through a causal LM (a PEFT model or a plain one); owns the prompt caches."""

    def __init__(
        self,
        model: Any,
        prompter: FimPrompter,
        cache_slots: int = DEFAULT_CACHE_SLOTS,
        max_draft: int = MAX_DRAFT,
        static: StaticDecoding | None = None,
    ) -> None:
        self.model = model
        self.static = static  # the CUDA fast path (None: eager decoding, as on a CPU)
        self.prompter = prompter
        self.caches = PromptCache(cache_slots)
        self.max_draft = max_draft
        self.stats = DecodeStats()
        self.step_hook: Callable[[], None] | None = None  # called before each forward (tests slow it down)
        self.cache_kw, self.keep_logits = forward_keywords(model)
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def run(
        self, rows: list[Row], adapter: str | None = None, join: Joiner | None = None, overlap_joins: bool = False
    ) -> list[Completion]:
        """Complete every row (greedy/sampling parameters are those of the first row).

        Each row's ``on_done`` hears its completion as soon as it ends. With ``join``, on the
        static path, more rows (the same parameters) join the batch while it decodes; only
        ``on_done`` tells their completions. ``overlap_joins``: a single joining prompt is
        prefilled beside the next decoding steps (a CUDA stream of its own), not while they wait.
        """
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(rows))
        # Made here, not on the fast path: what the rows ask for (a seed torch refuses) fails these
        # rows, and is no fault of the fast path.
        generator = _generator(rows[0].params, self.device)
        static = self.static
        if static is not None and static.fits(
            len(rows), max(len(r.prompt) for r in rows), max(r.params.max_new_tokens for r in rows)
        ):
            states = [_RowState(r, self.prompter) for r in rows]
            counted = (self.stats.prompt_tokens, self.stats.cached_tokens, self.stats.fed_tokens)
            try:
                with static.on_stream():
                    return self._run_static(static, states, generator, join, overlap_joins)
            except Exception:
                # Decode eagerly from now on; this batch too, unless some of its tokens went out already.
                log.exception("the CUDA-graph decoding failed; decoding eagerly from now on")
                self.static = None
                if any(s.n_new for s in states):
                    raise
                generator = _generator(rows[0].params, self.device)  # its draws as in a first try
                # no row joined before a first token: the eager path counts these prompts anew
                self.stats.prompt_tokens, self.stats.cached_tokens, self.stats.fed_tokens = counted
        if len(rows) > 1:
            return self._run_batch(rows, generator)  # tells each row's end as it leaves the batch
        done = self._run_one(rows[0], adapter, generator)
        if rows[0].on_done is not None:
            rows[0].on_done(done)
        return [done]

    def warmup(self) -> float:
        """Compile the fast path's steps before the first request (seconds; 0 without it).

        A failure turns the fast path off (logged): the server then decodes eagerly.
        """
        if self.static is None:
            return 0.0
        try:
            return self.static.warmup()
        except Exception:
            log.exception("compiling the CUDA-graph decoding failed; decoding eagerly")
            self.static = None
            return 0.0

    def _forward(
        self, ids: list[list[int]], positions: torch.Tensor, cache: Any, mask: torch.Tensor | None = None, keep: int = 1
    ) -> torch.Tensor:
        """Logits [B, keep, V] of the last ``keep`` positions of ``ids`` [B, T], fed after what ``cache`` holds."""
        self._hook()
        kwargs: dict[str, Any] = {self.cache_kw: cache, "use_cache": True, "position_ids": positions}
        if mask is not None:
            kwargs["attention_mask"] = mask
        if self.keep_logits:
            kwargs["logits_to_keep"] = keep
        with without_cudnn_attention():  # each step's keys a new shape
            out = self.model(input_ids=torch.tensor(ids, device=self.device), **kwargs)
        return out.logits[:, -keep:, :]

    def _run_one(self, row: Row, adapter: str | None, generator: torch.Generator | None) -> Completion:
        slot, reused, previous = self.caches.take(adapter, row.prompt)
        slot = slot or CacheSlot(adapter, [], new_cache())
        state = _RowState(row, self.prompter, reused)
        self._count_prompt(row.prompt, reused)
        drafter = Drafter(previous) if row.params.greedy and self.max_draft > 0 else None
        if drafter is not None:
            drafter.extend(row.prompt[:reused])
        feed = row.prompt[reused:]  # tokens known but not yet in the cache
        while not row.should_stop():
            draft = self._draft(drafter, feed, state)
            start = len(slot.tokens)
            positions = torch.arange(start, start + len(feed) + len(draft), device=self.device)[None]
            logits = self._forward([feed + draft], positions, slot.cache, keep=len(draft) + 1)[0]
            # greedy: the model's pick after each fed position; sampling: one pick, no draft
            picks = logits.argmax(-1).tolist() if drafter else [int(pick_tokens(logits[-1:], row.params, generator)[0])]
            agreed = next((i for i, t in enumerate(draft) if picks[i] != t), len(draft))
            self.stats.accepted_tokens += agreed
            slot.tokens += feed + draft[:agreed]
            crop_cache(slot.cache, len(slot.tokens))
            if drafter is not None:
                drafter.extend(draft[:agreed])
                drafter.adapt(len(draft), agreed)
            if any(state.accept(t) for t in [*draft[:agreed], picks[agreed]]):
                break
            feed = [picks[agreed]]
        # Only a slot whose cache matches its tokens goes back (an exception above drops it).
        self.caches.put(slot)
        self.stats.generated_tokens += state.n_new
        return state.completion()

    def _draft(self, drafter: Drafter | None, feed: list[int], state: _RowState) -> list[int]:
        if drafter is None:
            return []
        drafter.extend(feed)
        room = state.row.params.max_new_tokens - state.n_new - 1  # the model's own pick comes after
        draft = drafter.propose(min(drafter.length, self.max_draft, room))
        self.stats.draft_tokens += len(draft)
        return draft

    def _run_batch(self, rows: list[Row], generator: torch.Generator | None) -> list[Completion]:
        states = [_RowState(r, self.prompter) for r in rows]
        for r in rows:
            self._count_prompt(r.prompt, 0)
        width = max(len(r.prompt) for r in rows)
        pad = self.prompter.fim.pad
        ids = [[pad] * (width - len(r.prompt)) + r.prompt for r in rows]
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = new_cache()
        logits = self._forward(ids, positions, cache, mask)[:, -1]
        active = list(range(len(rows)))  # row index of each batch line
        next_pos = mask.sum(-1)  # [B] the next position of each line
        while active:
            tokens = pick_tokens(logits, rows[0].params, generator)
            picked = tokens.tolist()  # one read from the device, not one a row
            keep = []
            for i, k in enumerate(active):
                if states[k].accept(picked[i]):
                    self._finish(states[k])  # its answer goes now, not once the longest row ends
                else:
                    keep.append(i)
            if not keep:
                break
            if len(keep) < len(active):  # finished lines leave the batch
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, next_pos, tokens = mask[index], next_pos[index], tokens[index]
                active = [active[i] for i in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
            logits = self._forward(tokens[:, None].tolist(), next_pos[:, None], cache, mask)[:, -1]
            next_pos = next_pos + 1
        return [s.completion() for s in states]

    def _run_static(
        self,
        static: StaticDecoding,
        states: list[_RowState],
        generator: torch.Generator | None,
        join: Joiner | None = None,
        overlap: bool = False,
    ) -> list[Completion]:
        """The rows in a static-cache bucket: eager prefill, then one compiled step per token.

        ``states[i]`` is the row in slot i; slots past them, and those of finished rows, decode
        along unused until a joining row takes them (``overlap``: see :meth:`_admit`).
        """
        self._hook()
        params = states[0].row.params
        began = time.perf_counter()
        session, logits = static.start([s.row.prompt for s in states])
        self.stats.prefill_s += time.perf_counter() - began
        for state in states:
            self._count_prompt(state.row.prompt, 0)
        slots: list[_RowState | _Joining | None] = [*states, *[None] * (session.size - len(states))]
        while True:
            tokens = pick_tokens(logits, params, generator)
            picks = copy_to_host(tokens)
            # The next step goes to the GPU before the host has these tokens: it runs while the
            # rows below take them (stop strings, streaming); unless these are every row's last by
            # length (after a row's last token otherwise, e.g. an end token, the step is wasted).
            following = None
            if not all(state is None or state.last_by_length for state in slots):
                self._hook()
                following = session.step(tokens)
            began = time.perf_counter()
            tokens_now = picks()
            self.stats.device_wait_s += time.perf_counter() - began
            for i, state in enumerate(slots):
                if isinstance(state, _RowState) and state.accept(tokens_now[i]):
                    slots[i] = None
                    self._finish(state)
            if all(state is None for state in slots):
                break  # a new batch starts afresh, in the bucket its size needs
            assert following is not None  # some row goes on, so it was not every row's last token
            if join is not None:
                began = time.perf_counter()
                following = self._admit(session, slots, following, join, overlap)
                self.stats.prefill_s += time.perf_counter() - began
            logits = following
        return [s.completion() for s in states]

    def _admit(
        self,
        session: StaticSession,
        slots: list[_RowState | _Joining | None],
        logits: torch.Tensor,
        join: Joiner,
        overlap: bool = False,
    ) -> torch.Tensor:
        """Let waiting rows join ``session`` in free slots (growing its bucket when needed); the logits
        of the next pick, with each joined row's own.

        ``overlap``: a row that waits alone, whose prompt fits a prefill graph, starts its prefill
        on a stream of its own (:meth:`StaticSession.begin_admit`) and joins at the first step
        after it ended (or after `OVERLAP_MAX_STEPS` steps, waiting for it then); meanwhile the
        batch decodes on, and no other row joins. Rows that wait together (a burst: clients whose
        answers came at one step ask again at once) join together as without it, the batch
        waiting for their prefill: one at a time, each would wait for all the prefills before it.
        """
        for i, state in enumerate(slots):
            if isinstance(state, _Joining):
                state.steps += 1
                if state.admission.ready() or state.steps >= OVERLAP_MAX_STEPS:
                    logits[i : i + 1] = session.finish_admit(state.admission)
                    slots[i] = _RowState(state.row, self.prompter)
                    self._count_prompt(state.row.prompt, 0)
                    self.stats.joined += 1
                    self.stats.joins += 1
        if any(isinstance(state, _Joining) for state in slots):
            return logits  # one overlapped prefill at a time: the single-prompt buffers hold its results
        buckets = session.owner.buckets
        busy = sum(state is not None for state in slots)
        joining = join(buckets[-1] - busy, session.can_admit)
        if not joining:
            return logits
        if busy + len(joining) > session.size:
            size = next(size for size in buckets if size >= busy + len(joining))
            slots.extend([None] * (size - len(slots)))
            logits = logits[session.grow(size)]
        free = [i for i, state in enumerate(slots) if state is None][: len(joining)]
        self._hook()
        if (
            overlap
            and len(joining) == 1
            and session.can_overlap(len(joining[0].prompt), joining[0].params.max_new_tokens)
        ):
            slots[free[0]] = _Joining(joining[0], session.begin_admit(joining[0].prompt, free[0]))
            return logits
        first = session.admit([row.prompt for row in joining], free)
        for i, row in zip(free, joining, strict=True):
            slots[i] = _RowState(row, self.prompter)
            self._count_prompt(row.prompt, 0)
        self.stats.joined += len(joining)
        self.stats.joins += 1
        logits[copy_to_device(free, self.device)] = first
        return logits

    def _finish(self, state: _RowState) -> None:
        self.stats.generated_tokens += state.n_new
        if state.row.on_done is not None:
            state.row.on_done(state.completion())

    def _hook(self) -> None:
        if self.step_hook is not None:
            self.step_hook()
        self.stats.forwards += 1

    def _count_prompt(self, prompt: list[int], reused: int) -> None:
        self.stats.prompt_tokens += len(prompt)
        self.stats.cached_tokens += reused
        self.stats.fed_tokens += len(prompt) - reused


def _generator(params: GenerationParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else time.monotonic_ns())
    return generator
