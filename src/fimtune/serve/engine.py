"""The engine: one worker thread owns the model; a bounded queue feeds it batches.

::

    request handler (event loop)              worker thread
    job = Job(prompt, params, adapter)
    engine.submit(job)   ---- queue ---->     wait for a job, then `batch_wait_ms` for more (or below);
      (full: QueueFull -> 503)                take the queued jobs with the first one's key
                                              (adapter, sampling), at most `max_batch_size`;
                                              merge that adapter's LoRA into the weights (on a switch);
                                              Decoder.run(rows, join): on the CUDA-graph path,
                                              queued jobs with the batch's key join it between
                                              steps (continuous batching)
    await job.result() / job.events  <----    token / done / error events (call_soon_threadsafe),
                                              each row's `done` as soon as it ends

With `batch_max_wait_ms` > 0, batching waits for requests on their way instead: with a job
queued, the worker starts the batch once nothing has arrived for `batch_wait_ms` (counted from the
last request that reached a handler, the last job queued, or the end of the previous batch) and no
handler is still tokenizing a request (an :class:`Arrival`); or once the batch is full, or the first
job has waited `batch_max_wait_ms`. A lone request at an idle server waits `batch_wait_ms` either
way. Clients that send their next request when an answer comes (a team's editors, a benchmark's
clients) come back together after a batch, but spread out by the tokenizing of each: a fixed wait
from the first of them split 16 such clients into batches of 1 and 15 that took turns (each request
waited for both) in a CPU trace; the wait for arrivals made them one batch of 16 there. End to end
it has not yet shown a gain (benchmarks/RESULTS.md), so it is off by default.

The whole engine can also run in a process of its own, behind a pipe (:mod:`fimtune.serve.process`).

Generation never runs on the event loop. A job whose client went away is cancelled: the
worker checks it before every forward and drops the row. Adapters are fixed at start-up:
requests name one of the loaded models, never a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fimtune.errors import FimtuneError
from fimtune.generate import (
    Completion,
    FimPrompter,
    GenerationParams,
    check_weights,
    mergeable,
    prompt_mode,
    require_safetensors,
)
from fimtune.serve.decoding import Decoder, DecodeStats, Joiner, Row

log = logging.getLogger(__name__)

BASE_MODEL = "base"  # the public name of the base model when a run's adapter is the default
RESERVED_NAMES = (BASE_MODEL, "default")


UNSETTLED = "<unsettled>"  # `_adapter` while a switch folds weights: no request's model name (those are identifiers)


@dataclass
class Limits:
    """What one request may ask for; shown in `/info`, each set by a `fimtune serve` flag."""

    max_body_bytes: int = 1_000_000
    max_input_tokens: int = 2048
    max_new_tokens: int = 256
    max_stop_sequences: int = 16
    timeout_s: float = 60.0
    queue_size: int = 32
    max_batch_size: int = 8
    batch_wait_ms: float = 2.0  # a batch starts this long after its first job, or (see below) ...
    # ... > 0: once requests stopped arriving for batch_wait_ms, at most this long after the first job
    batch_max_wait_ms: float = 0.0
    cache_slots: int = 4
    trim_step: int = 64  # FIM contexts are cut in steps of this many tokens, so the cache stays reusable
    cuda_graphs: bool = True  # on a CUDA device: static KV cache + decoding steps replayed as CUDA graphs
    prefill_graphs: bool = True  # with them: a single prompt's prefill replayed as a CUDA graph too
    # with them: the steps' attention (fimtune.serve.static.DECODE_ATTENTIONS); "auto" times SDPA, grouped
    # SDPA and matrix products on each batch size at start-up and takes the fastest
    decode_attention: str = "auto"
    gemv_steps: bool = True  # with them: a batch of one's step does its matrix products as reductions
    # With CUDA graphs: queued requests join the batch in flight (on an H200, with prefill graphs, it
    # lowered both the median and the 95th percentile latency of 16 clients; RESULTS.md, run 7) ...
    continuous_batching: bool = True
    join_min_rows: int = 1  # ... once this many wait (or as many as there are free rows): each join
    join_wait_ms: float = 0.0  # stalls the batch for a prefill; or once the first waited this long
    # ... unless it joins alone: its prompt is prefilled on a CUDA stream of its own beside the batch's
    # next steps, and joins once that prefill has ended (on an H200 it lowered the median and the 95th
    # percentile latency of 16 clients: RESULTS.md, run 9); False: every join stalls the batch
    overlap_joins: bool = True
    # While the engine runs: how long another thread may hold the interpreter lock once the worker
    # asks for it (Python's switch interval, 5 ms by default there). The worker lets the lock go at
    # each wait for the model and gets it back once the holder lets go or this runs out: beside a
    # thread busy in Python, 32 waits of 1.5 ms took ~220 ms at 5 ms, ~72 at 0.5 (RESULTS.md).
    switch_interval_ms: float = 0.5

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


MIN_INPUT_TOKENS = 8  # a prompt's room must be more: the FIM tokens and some code

# The limits the worker reads anew for each batch (and each join), which `Engine.set_batching` may
# change while it serves; the others are settled at start-up or checked by the handlers.
BATCHING_LIMITS = (
    "batch_wait_ms",
    "batch_max_wait_ms",
    "continuous_batching",
    "join_min_rows",
    "join_wait_ms",
    "overlap_joins",
    "switch_interval_ms",
)


def batching_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """``changes`` checked against :data:`BATCHING_LIMITS` and their kinds (ValueError naming the field).

    >>> batching_changes({"join_min_rows": 4, "overlap_joins": True})
    {'join_min_rows': 4, 'overlap_joins': True}
    """
    defaults = Limits()
    for name, value in changes.items():
        if name not in BATCHING_LIMITS:
            raise ValueError(f"{name!r} cannot change while the engine serves; these can: {', '.join(BATCHING_LIMITS)}")
        default = getattr(defaults, name)
        least = 1 if name == "join_min_rows" else 0  # as `fimtune serve` checks its flags
        strict = name == "switch_interval_ms"  # Python refuses a switch interval of 0
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        else:  # a count or a wait: a number, not a flag
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and (value > least if strict else value >= least)
            ok = ok and (isinstance(value, int) or not isinstance(default, int))
        if not ok:
            kind = type(default).__name__ + ("" if isinstance(default, bool) else f" {'>' if strict else '>='} {least}")
            raise ValueError(f"{name}={value!r}: expected {kind}")
    return dict(changes)


class QueueFull(Exception):
    """The queue holds `queue_size` jobs already."""


class EngineGone(Exception):
    """The engine's process ended before the job did (`fimtune serve --engine-process`)."""


class JobCancelled(Exception):
    """The client went away (or the server is stopping)."""


class JobTimeout(Exception):
    """The job ran past the per-request timeout."""


@dataclass
class Event:
    """What the worker tells a job's handler: a token, the completion, or an error."""

    kind: str  # "token" | "done" | "error"
    token: int = 0
    text: str = ""
    end: bool = False  # an end token (EOS, FIM token)
    completion: Completion | None = None
    error: Exception | None = None


_SEEDED = itertools.count()  # a key of its own for each seeded sampling job


class Job:
    """One request on its way through the engine; created on the event loop."""

    def __init__(
        self, prompt: list[int], params: GenerationParams, adapter: str | None, timeout_s: float, stream: bool = False
    ) -> None:
        self.prompt = prompt
        self.params = params
        self.adapter = adapter
        self.stream = stream
        self.queued_at = time.monotonic()
        self.received_at = self.queued_at  # its request's handler began (the service sets it; before tokenizing)
        self.taken_at: float | None = None  # the worker took it (as this process saw it)
        self.deadline = self.queued_at + timeout_s
        self.stop_reason: str | None = None  # "cancelled" | "timeout", once the worker gave up on it
        self.ended = False  # the worker posted its `done` or `error` event
        self.on_cancel: Callable[[], None] | None = None  # told of a cancel (an engine in another process)
        self._cancelled = threading.Event()
        sampling = ("greedy",) if params.greedy else (params.temperature, params.top_p, params.top_k, params.seed)
        # Jobs of one key share a batch, and a batch's rows draw from one generator: a seeded job
        # goes alone, so that its seed gives its answer whatever else is asked at the time.
        self.key = (adapter, *sampling, None if params.greedy or params.seed is None else next(_SEEDED))
        self._bind()

    def _bind(self) -> None:
        """Tie the job's events to the running event loop (its handler's)."""
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()

    def cancel(self) -> None:
        if not self._cancelled.is_set():
            self._cancelled.set()
            if self.on_cancel is not None and not self.ended:
                self.on_cancel()

    def cancelled(self) -> bool:
        """Its handler gave up on it (the client went away, or it timed out waiting)."""
        return self._cancelled.is_set()

    def taken(self) -> None:
        """The worker took the job from the queue (into a batch, or joining one)."""
        self.taken_at = time.monotonic()

    def should_stop(self) -> bool:
        """Whether the worker should drop this job now (records why). Past its deadline it is a
        timeout, cancelled or not: its handler cancels it so, when the job waited behind a busy worker."""
        if self.stop_reason is None and time.monotonic() > self.deadline:
            self.stop_reason = "timeout"
        elif self.stop_reason is None and self._cancelled.is_set():
            self.stop_reason = "cancelled"
        return self.stop_reason is not None

    def row(self, on_done: Callable[[Completion], None] | None = None) -> Row:
        return Row(self.prompt, self.params, self._on_token if self.stream else None, self.should_stop, on_done)

    def _post(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def _on_token(self, token: int, text: str, end: bool) -> None:
        self._post(Event("token", token=token, text=text, end=end))

    def finish(self, completion: Completion) -> None:
        self.ended = True
        self._post(Event("done", completion=completion))

    def fail(self, error: Exception) -> None:
        self.ended = True
        self._post(Event("error", error=error))

    async def events_until_done(self) -> AsyncIterator[Event]:
        """Every event, the last being `done` or `error`."""
        while True:
            event = await self.events.get()
            yield event
            if event.kind != "token":
                return


class Arrival:
    """A generation request that a handler is tokenizing (:meth:`Engine.arrival`); with
    `batch_max_wait_ms` > 0 the worker does not start a batch while one is open. Ends with
    :meth:`done` (idempotent), which :meth:`Engine.submit` calls as it queues the request's job."""

    def __init__(self, engine: Engine, counted: bool = True) -> None:
        self._engine = engine
        self._open = counted  # one the engine does not count (an engine process without the wait) is no-op
        if counted:
            engine._arrived(+1)

    def done(self) -> None:
        if self._open:
            self._open = False
            self._engine._arrived(-1)

    def take(self) -> bool:
        """End it without telling the engine (the caller tells it, with the job): whether it was open."""
        was_open, self._open = self._open, False
        return was_open


@dataclass
class EngineCounters:
    """Jobs that did not end with a completion, and the worker's time (for `/metrics`)."""

    rejected: int = 0
    cancelled: int = 0
    timeouts: int = 0
    errors: int = 0
    busy_seconds: float = 0.0  # wall time the worker spent generating batches (prefills, joins, steps)


class Engine:
    """The model, its adapters, the queue and the worker thread."""

    def __init__(
        self,
        decoder: Decoder,
        models: dict[str, str | None],
        default_model: str,
        limits: Limits,
        base_name: str | None = None,
    ) -> None:
        self.decoder = decoder
        self.model = decoder.model
        self.models = models  # public name -> PEFT adapter name (None: the base model)
        self.default_model = default_model
        self.base_name = base_name or default_model  # the base model's name or path
        self.limits = limits
        self.counters = EngineCounters()
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._paused = False
        self._stopping = False
        self._adapter: str | None = None  # the adapter in use now (folded into the weights where mergeable)
        # bf16/fp16 weights: the base layers' own weights, put back at each switch (an unmerge rounds)
        self._base_weights: list[tuple[Any, dict[str, Any]]] | None = None
        self._running: list[Job] = []
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()  # set once the worker has warmed up (compiled the CUDA graphs)
        self._arriving = 0  # requests that handlers are tokenizing (see `Arrival`)
        self._last_arrival = 0.0  # time.monotonic() of the last request that reached a handler or the queue
        self._freed = 0.0  # ... of the end of the last batch
        self.warmup_s = 0.0
        self._switch_interval: float | None = None  # the interpreter's before `start`

    # ---- life cycle and queue (event loop side) -------------------------------------

    def start(self) -> None:
        self._stopping = False
        self._switch_interval = sys.getswitchinterval()  # Python's, restored by `stop`
        self._thread = threading.Thread(target=self._work, name="fimtune-engine", daemon=True)
        self._thread.start()

    def stop(self, warming_up_s: float | None = None) -> None:
        """Stop the worker: queued jobs fail as cancelled, the batch in flight stops at its next token
        (waited for up to the job timeout). ``warming_up_s``: how long to wait for a worker still warming
        up (None: the job timeout too); a warm-up does not stop, but a process that is about to end
        need not wait for it: the worker is a daemon thread."""
        with self._cond:
            self._stopping = True
            pending, self._queue = list(self._queue), deque()
            self._cond.notify_all()
        for job in pending:
            job.fail(JobCancelled())
        for job in list(self._running):  # the batch in flight stops at its next token
            job.cancel()
        if self._thread is not None:
            wait = self.limits.timeout_s if self.ready.is_set() or warming_up_s is None else warming_up_s
            self._thread.join(timeout=wait)
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)

    def submit(self, job: Job, arrival: Arrival | None = None) -> None:
        """Queue ``job``; :class:`QueueFull` when `queue_size` jobs wait already. ``arrival``, the
        request's :class:`Arrival`, ends here (in the same step as the job is queued)."""
        with self._cond:
            if arrival is not None:
                arrival.done()
            if len(self._queue) >= self.limits.queue_size:
                self._drop_stopped()
            if len(self._queue) >= self.limits.queue_size:
                self.counters.rejected += 1
                raise QueueFull()
            self._queue.append(job)
            self._last_arrival = time.monotonic()
            self._cond.notify_all()

    def _drop_stopped(self) -> None:
        """Give up the queued jobs whose clients went away (or whose time ran out), with the lock held:
        an editor cancels its request at each keystroke, and while a long batch runs those would fill
        the queue and have the next requests refused."""
        stopped = [job for job in self._queue if job.should_stop()]
        for job in stopped:
            self._queue.remove(job)
            self._give_up(job)

    def arrival(self) -> Arrival:
        """A request on its way to the queue (the worker may wait for it: `batch_max_wait_ms`)."""
        return Arrival(self)

    def _arrived(self, change: int) -> None:
        with self._cond:
            self._arriving += change
            if change > 0:
                self._last_arrival = time.monotonic()
            self._cond.notify_all()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queue_depth(self) -> int:
        """Queued jobs whose clients still wait (a cancelled one waits only for the worker to drop it)."""
        return sum(not job.cancelled() for job in list(self._queue))

    @property
    def device_type(self) -> str:
        """Where the model runs: "cuda", "cpu", ..."""
        return self.decoder.device.type

    def describe(self) -> dict[str, Any]:
        """The model's dtype and device, and which fast paths are on (`/info`; some are settled by the warm-up)."""
        param = next(self.model.parameters())
        static = self.decoder.static
        return {
            "model_dtype": str(param.dtype).removeprefix("torch."),
            "model_device_type": param.device.type,
            "cuda_graphs_active": static is not None,
            "prefill_graphs_active": static is not None and static.prefill_graphs_on,
            "gemv_steps_active": static is not None and static.gemv,
            # the attention of each batch size's steps ("auto": what the timing at start-up chose)
            "decode_attention_active": {} if static is None else dict(static.decode_attention),
        }

    def snapshot(self) -> tuple[DecodeStats, EngineCounters]:
        """Copies of the decoder's token counts and the engine's counters (`/metrics`)."""
        return dataclasses.replace(self.decoder.stats), dataclasses.replace(self.counters)

    def adapter_of(self, model: str | None) -> str | None:
        """The PEFT adapter behind a public model name (KeyError when unknown)."""
        return self.models[model or self.default_model]

    def pause(self) -> None:
        """Hold the worker before its next batch (jobs still queue up); for tests and maintenance."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def set_batching(self, **changes: Any) -> None:
        """Change how the worker forms batches and lets rows join them (:data:`BATCHING_LIMITS`), from
        its next batch (joins: its next step); for comparing batching policies on one warm engine."""
        changes = batching_changes(changes)
        with self._cond:
            for name, value in changes.items():
                setattr(self.limits, name, value)
            self._cond.notify_all()

    # ---- worker thread --------------------------------------------------------------

    def _work(self) -> None:
        self._warm_up()
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _warm_up(self) -> None:
        """Compile the GPU fast path here, before the first batch (requests queue up meanwhile).

        With the default model's adapter merged: its graphs are the ones used most.
        """
        try:
            if self.decoder.static is not None:
                with self._use_adapter(self.models[self.default_model]):
                    self.warmup_s = self.decoder.warmup()
        except Exception:  # the worker must start all the same (the decoder falls back to eager)
            log.exception("warming up the decoder failed")
        finally:
            self.ready.set()

    def _next_batch(self) -> list[Job] | None:
        """Wait for a job, then for others (see the module doc); take those with its key."""
        limits = self.limits
        with self._cond:
            while not self._stopping and (self._paused or not self._queue):
                self._cond.wait()
            latest = time.monotonic() + max(limits.batch_wait_ms, limits.batch_max_wait_ms) / 1000
            quiet = limits.batch_wait_ms / 1000
            while not self._stopping and len(self._queue) < limits.max_batch_size:
                now = time.monotonic()
                if now >= latest:
                    break
                if limits.batch_max_wait_ms <= 0:  # a fixed wait from the first job
                    self._cond.wait(latest - now)
                    continue
                if self._arriving:  # a handler is tokenizing one: it wakes this when it is queued
                    self._cond.wait(latest - now)
                    continue
                left = max(self._last_arrival, self._freed) + quiet - now
                if left <= 0:
                    break
                self._cond.wait(min(left, latest - now))
            if self._stopping:
                return None
            key = self._queue[0].key
            batch = [job for job in self._queue if job.key == key][: limits.max_batch_size]
            for job in batch:
                self._queue.remove(job)
                job.taken()
            return batch

    def _run(self, batch: list[Job]) -> None:
        live = [job for job in batch if not job.should_stop()]
        for job in batch:
            if job.stop_reason is not None:
                self._give_up(job)
        if not live:
            return
        self._running = list(live)
        if sys.getswitchinterval() != self.limits.switch_interval_ms / 1000:
            sys.setswitchinterval(self.limits.switch_interval_ms / 1000)
        join = self._joiner(live[0].key) if self.limits.continuous_batching else None
        began = time.perf_counter()
        try:
            with self._use_adapter(live[0].adapter):
                rows = [self._row(job) for job in live]
                self.decoder.run(rows, live[0].adapter, join=join, overlap_joins=self.limits.overlap_joins)
        except Exception as e:  # a failed batch must not stop the worker
            log.exception("generation failed")
            failed = [job for job in self._running if not job.ended]
            self.counters.errors += len(failed)
            for job in failed:
                job.fail(e)
        finally:
            self._running = []
            self._freed = time.monotonic()
            self.counters.busy_seconds += time.perf_counter() - began

    def _row(self, job: Job) -> Row:
        return job.row(on_done=lambda completion: self._end(job, completion))

    def _end(self, job: Job, completion: Completion) -> None:
        if job.stop_reason is not None:
            self._give_up(job)
        else:
            job.finish(completion)

    def _joiner(self, key: tuple) -> Joiner:
        """Queued jobs for the batch in flight: in queue order, those with its key that fit, up to the
        first that has another key or does not fit (that one waits for the next batch, so nothing starves).

        A join prefills its rows while the batch waits, so rows join in groups: once `join_min_rows`
        wait (or as many as there are free rows), or once the first has waited `join_wait_ms`.
        """
        limits = self.limits

        def join(room: int, fits: Callable[[int, int], bool]) -> list[Row]:
            if not self._queue or room <= 0:
                return []
            with self._cond:
                if self._stopping or self._paused:
                    return []
                taken = []
                for job in self._queue:
                    if len(taken) == room or job.key != key or not fits(len(job.prompt), job.params.max_new_tokens):
                        break
                    taken.append(job)
                waited = time.monotonic() - taken[0].queued_at if taken else 0.0
                if len(taken) < min(room, limits.join_min_rows) and waited < limits.join_wait_ms / 1000:
                    return []
                for job in taken:
                    self._queue.remove(job)
                    job.taken()
            rows = []
            for job in taken:
                if job.should_stop():
                    self._give_up(job)
                else:
                    self._running.append(job)
                    rows.append(self._row(job))
            return rows

        return join

    def _give_up(self, job: Job) -> None:
        if job.stop_reason == "timeout":
            self.counters.timeouts += 1
            job.fail(JobTimeout())
        else:
            self.counters.cancelled += 1
            job.fail(JobCancelled())

    def _keep_base_weights(self) -> None:
        """Before the first fold into weights that are not fp32: a copy of each adapted layer's own
        weights. There W + dW - dW is not W (each sum rounds), and the rounding adds up over the
        switches of a server that serves several adapters (its base and every adapter drift)."""
        if self._base_weights is not None or mergeable(self.model, exactly=True):
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._base_weights = [
            (layer, {name: p.detach().clone() for name, p in layer.get_base_layer().named_parameters(recurse=False)})
            for layer in self.model.modules()
            if isinstance(layer, BaseTunerLayer)
        ]

    def _unmerge(self) -> None:
        """Take the folded adapter out of the weights: by its own arithmetic in fp32 (W + dW - dW is W
        up to fp32 rounding, which a random walk over many switches grows only slowly: see
        :func:`fimtune.generate.mergeable`), else by putting the kept weights back (exact)."""
        import torch

        if self._base_weights is None:
            self.model.unmerge_adapter()
            return
        with torch.no_grad():
            for layer, weights in self._base_weights:
                base = layer.get_base_layer()
                for name, weight in weights.items():
                    getattr(base, name).copy_(weight)
                layer.merged_adapters.clear()

    @contextlib.contextmanager
    def _use_adapter(self, adapter: str | None) -> Iterator[None]:
        """Fold ``adapter`` into the weights (unfolding the previous one); None runs the base model.
        Into quantized weights nothing is folded (:func:`fimtune.generate.mergeable`): the adapter runs beside them."""
        if not hasattr(self.model, "merge_adapter"):  # a plain model: nothing to choose
            yield
            return
        if adapter != self._adapter:
            # a failure below (out of memory while folding) must leave no name on weights it may not hold
            previous, self._adapter = self._adapter, UNSETTLED
            if previous is not None and mergeable(self.model):
                self._unmerge()
            if adapter is not None:
                self.model.set_adapter(adapter)
                if mergeable(self.model):
                    self._keep_base_weights()
                    self.model.merge_adapter(adapter_names=[adapter])
            self._adapter = adapter
        if adapter is None:
            with self.model.disable_adapter():
                yield
        else:
            yield


# --------------------------------------------------------------------------------------
# Loading: the target (a run folder or a base model) and the extra adapters
# --------------------------------------------------------------------------------------


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """`NAME=PATH` flags -> {name: adapter folder}; PATH is a run folder or an adapter folder."""
    from fimtune.model import is_run_dir

    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise FimtuneError(f"--adapter {spec!r}: expected NAME=PATH (a run folder or its adapter folder)")
        if not name.replace("-", "_").isidentifier() or name in RESERVED_NAMES or name in adapters:
            raise FimtuneError(
                f"--adapter {spec!r}: NAME must be letters, digits, - or _, unique, and not {' or '.join(RESERVED_NAMES)}"
            )
        folder = Path(path) / "adapter" if is_run_dir(path) else Path(path)
        if not (folder / "adapter_config.json").is_file():
            raise FimtuneError(f"--adapter {spec!r}: {folder} has no adapter_config.json (give a run folder)")
        require_safetensors(folder, "adapter folder")
        if not (folder / "adapter_model.safetensors").is_file():
            raise FimtuneError(f"--adapter {spec!r}: {folder} has no adapter_model.safetensors")
        adapters[name] = folder
    return adapters


def check_adapter_run(name: str, folder: Path, base_name: str, tokenizer: Any) -> None:
    """Refuse the adapter of a run (``folder``: a run's `adapter/`) that trained on another base model
    than ``base_name`` (the served run's base, or the served base model), or with another vocabulary
    than ``tokenizer``'s (other token ids, FIM tokens added elsewhere): its weights load all the same
    where their shapes fit, and its requests are answered by a model it was never trained on."""
    from fimtune.model import is_run_dir, run_tokenizer

    run = folder.parent
    if folder.name != "adapter" or not is_run_dir(run):
        return  # a bare adapter folder: nothing tells its base or tokenizer
    trained_on = _base_name(run)
    if _model_path(trained_on) != _model_path(base_name):
        raise FimtuneError(f"--adapter {name}: run {run} trained on {trained_on}, but the served base is {base_name}")
    if (run / "tokenizer").is_dir() and run_tokenizer(run).get_vocab() != tokenizer.get_vocab():
        raise FimtuneError(
            f"--adapter {name}: run {run} has another vocabulary than the served model's (its tokenizer differs)"
        )


def served_with_biases(
    models: dict[str, str | None], target: str, run_dir: Path | None, adapters: dict[str, Path]
) -> dict[str, str | None]:
    """``models``, less what an adapter that trained biases (`lora.bias=all|lora_only`) leaves unservable.

    Such an adapter's biases are the base layers' own, not a part of it that a switch folds in or
    takes out: loading it replaces them for every model served (the run and `base` answered with
    another adapter's biases), and disabling it leaves them (`base` is not the base model). So it is
    served alone: a run without `base` (a warning says so), an extra adapter not at all (an error).
    """
    from fimtune.model import trained_biases

    biased = {name: trained_biases(folder) for name, folder in adapters.items()}
    if run_dir is not None:
        biased = {target: trained_biases(run_dir / "adapter"), **biased}
    biased = {name: bias for name, bias in biased.items() if bias != "none"}
    if not biased:
        return models
    name, bias = next(iter(biased.items()))
    if name == target and not adapters:
        log.warning("run %s trained biases (lora.bias=%s): its base model is not served", target, bias)
        return {target: models[target]}
    which = f"run folder '{target}'" if name == target else f"--adapter {name}"
    raise FimtuneError(
        f"{which}: its adapter trained biases (lora.bias={bias}), which replace the base model's own, "
        "shared by every model served: serve it alone (its run folder, no --adapter), or `fimtune merge` it"
    )


def _model_path(name_or_path: str) -> str:
    """A local model folder's absolute path (as a run's config holds it); a Hub id or `embedded` as it is."""
    found = Path(name_or_path).expanduser()
    return str(found.resolve()) if found.exists() else name_or_path


def attach_adapters(model: Any, adapters: dict[str, Path]) -> Any:
    """Load each adapter into one PEFT model (wrapping a plain model with the first); an adapter
    with weights for modules this model lacks, or without weights for some it adapts, is refused."""
    from safetensors import SafetensorError

    from fimtune.model import attach_adapter

    for name, folder in adapters.items():
        try:
            model, unfit = attach_adapter(model, folder, name)
        except (RuntimeError, ValueError, KeyError, SafetensorError) as e:
            raise FimtuneError(f"--adapter {name}: cannot load {folder} onto this model ({e})") from None
        if unfit:
            raise FimtuneError(
                f"--adapter {name}: {folder} does not fit this model (another base?): "
                f"{len(unfit)} weights without a place or a value, e.g. {unfit[0]}"
            )
    return model.eval()


def load_engine(
    target: str,
    adapter_specs: list[str],
    limits: Limits,
    mode: str = "auto",
    dtype: Any = None,
    device: Any = None,
    quantize: str | None = None,
) -> tuple[Engine, FimPrompter, str]:
    """Load the model and adapters (safetensors only): (engine, prompter for the handlers, prompt mode).

    ``quantize="int8"`` (CPU) merges the run's adapter and serves that model alone. On a CUDA
    device the decoder uses static caches and CUDA graphs unless ``limits.cuda_graphs`` is off.
    """
    import copy

    from fimtune.model import load_for_inference

    adapters = parse_adapters(adapter_specs)
    check_weights(target)
    loaded = load_for_inference(target, device=device, dtype=dtype)
    models: dict[str, str | None] = {loaded.name: "default" if loaded.run_dir else None}
    if loaded.run_dir:
        if loaded.name == BASE_MODEL:  # its adapter would be served as the base model, unadapted
            raise FimtuneError(
                f"run folder '{target}': its name, {BASE_MODEL!r}, is the served name of its base model; "
                "serve it from a folder of another name"
            )
        models[BASE_MODEL] = None
    for name in adapters:
        if name in models:
            raise FimtuneError(f"--adapter {name}: the name is taken by the served model; pick another")
        models[name] = name
    base_name = _base_name(loaded.run_dir) if loaded.run_dir else loaded.name
    for name, folder in adapters.items():
        check_adapter_run(name, folder, base_name, loaded.tokenizer)
    models = served_with_biases(models, loaded.name, loaded.run_dir, adapters)
    model = attach_adapters(loaded.model, adapters)
    fit_limits_to_positions(limits, model)
    if quantize == "int8":
        if adapters:
            raise FimtuneError("--quantize int8 serves one model: drop --adapter, or serve without --quantize")
        from fimtune.serve.quantize import quantize_int8

        model = quantize_int8(model)
        models = {loaded.name: None}
    static = None
    if limits.cuda_graphs:
        from fimtune.serve.static import static_decoding

        static = static_decoding(
            model,
            limits.max_input_tokens + limits.max_new_tokens,
            limits.max_batch_size,
            prefill_graphs=limits.prefill_graphs,
            attention=limits.decode_attention,
            gemv=None if limits.gemv_steps else False,
        )
    # The handlers encode on the event loop while the worker decodes: each gets its own tokenizer.
    decoder = Decoder(model, FimPrompter(copy.deepcopy(loaded.tokenizer)), limits.cache_slots, static=static)
    engine = Engine(decoder, models, loaded.name, limits, base_name)
    return engine, FimPrompter(loaded.tokenizer), prompt_mode(mode, loaded.run_dir, target)


def fit_limits_to_positions(limits: Limits, model: Any) -> None:
    """Lower ``limits.max_input_tokens`` (in place) so that a prompt and its new tokens fit ``model``'s
    learned positions (past them its forward fails: a 500, on a GPU a device-side assert that ends
    the process's use of the GPU); past a rotary model's stated context, a warning."""
    from fimtune.model import position_limit

    limit, learned = position_limit(model)
    if limit is None or limits.max_input_tokens + limits.max_new_tokens <= limit:
        return
    if not learned:
        log.warning(
            "--max-input-tokens %d + --max-new-tokens %d is past the model's stated context of %d tokens",
            limits.max_input_tokens,
            limits.max_new_tokens,
            limit,
        )
        return
    room = limit - limits.max_new_tokens
    if room <= MIN_INPUT_TOKENS:
        raise FimtuneError(
            f"--max-new-tokens {limits.max_new_tokens} leaves no room for a prompt in the model's {limit} "
            f"positions: lower it below {limit - MIN_INPUT_TOKENS}"
        )
    log.warning(
        "--max-input-tokens lowered from %d to %d: the model has %d positions, and --max-new-tokens is %d",
        limits.max_input_tokens,
        room,
        limit,
        limits.max_new_tokens,
    )
    limits.max_input_tokens = room


def _base_name(run_dir: Path) -> str:
    from fimtune.config import load_run_config

    return load_run_config(run_dir / "config.yaml").model.name_or_path
