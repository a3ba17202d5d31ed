"""The engine in a process of its own (`fimtune serve --engine-process`).

::

    server process                                    engine process (spawned)
    handlers tokenize, build Jobs                     factory(): the model, its adapters, an Engine
    EngineProcess.submit(job) ------ pipe ------->    main thread: submit / cancel / arrived / start /
      queue bound checked here (503)                  pause / resume / batching / query / stop -> the Engine
    receiver thread: events -> the job's loop <---    worker thread: taken / token / done / error,
                                                      ready (after the warm-up), replies to queries

In one process the engine's worker shares the interpreter lock with the event loop, the HTTP
parsing, the JSON and the streaming of every request: each time the worker lets the lock go to
wait for the GPU, it may wait for another thread to give it back (RESULTS.md: 32 waits of 1.5 ms took
up to 4x their time beside a busy thread). In a process of its own the worker shares its interpreter
with nothing but this module's small messages. It also keeps the server up when the engine dies (a
CUDA fault, the out-of-memory killer): requests then get 503 and `/health` says "stopped".

The server's side keeps the engine's interface (`submit`, `arrival`, `describe`, `snapshot`,
`ready`, ...), so the routes do not know where the model runs. `describe` and `snapshot` ask the
engine's process (a round trip of the pipe); `queue_depth` is counted here, from the `taken` events.
A job's deadline travels as the time it has left. The process is spawned (CUDA cannot be forked) and
can run only once: `stop` ends it.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from fimtune.errors import FimtuneError
from fimtune.generate import FimPrompter
from fimtune.serve.decoding import DecodeStats
from fimtune.serve.engine import (
    Arrival,
    Engine,
    EngineCounters,
    EngineGone,
    Job,
    JobCancelled,
    JobTimeout,
    Limits,
    QueueFull,
    batching_changes,
)

log = logging.getLogger(__name__)

QUERY_TIMEOUT_S = 5.0  # a query the engine's process does not answer in this long gets the last answer
WARMING_UP_STOP_S = 1.0  # how long the engine's process waits for a worker still warming up, once told to stop
STOP_GRACE_S = 10.0  # after the batch in flight stopped (up to the job timeout), the process gets this long

# factory() -> (engine, prompter, prompt mode), as `load_engine` returns them; run in the engine's process
EngineFactory = Callable[[], tuple[Engine, FimPrompter, str]]


class RemoteError(Exception):
    """An error raised in the engine's process: ``name`` is its type's name, the message its text."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}" if message else name)
        self.name = name


_KNOWN_ERRORS: dict[str, type[Exception]] = {"JobCancelled": JobCancelled, "JobTimeout": JobTimeout}


def _error(name: str, message: str) -> Exception:
    kind = _KNOWN_ERRORS.get(name)
    return kind() if kind is not None else RemoteError(name, message)


# --------------------------------------------------------------------------------------
# The server's side
# --------------------------------------------------------------------------------------


class EngineProcess:
    """An :class:`~fimtune.serve.engine.Engine` in a spawned process, seen through a pipe.

    ``factory`` (picklable: a module-level function or a partial of one) builds the engine there.
    :meth:`launch` starts the process and waits for the model to load; :meth:`start` (the server's
    start-up) starts the engine's worker there, which warms up, then sets :attr:`ready`.
    """

    def __init__(self, factory: EngineFactory, limits: Limits, threads: int | None = None) -> None:
        self.factory = factory
        self.limits = limits
        self.threads = threads
        self.counters = EngineCounters()  # the requests refused here (queue full); the rest are the process's
        self.ready = threading.Event()
        self.warmup_s = 0.0
        self.models: dict[str, str | None] = {}
        self.default_model = ""
        self.base_name = ""
        self.device_type = "cpu"
        self.exitcode: int | None = None  # once the process ended
        self._described: dict[str, Any] = {}
        self._stats, self._counters = DecodeStats(), EngineCounters()  # the last answers to a query
        self._jobs: dict[int, Job] = {}
        self._queued: set[int] = set()  # submitted, not yet taken by the worker
        self._lock = threading.Lock()  # the two above
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._replies: dict[int, list[Any]] = {}  # query id -> [threading.Event, answer]
        self._process: Any = None
        self._conn: Any = None
        self._receiver: threading.Thread | None = None
        self._stopping = False
        self._stopped = False
        self._stop_lock = threading.Lock()
        self._reap_lock = threading.Lock()
        self._gone: str | None = None  # why the engine's process is no longer there
        # only then does the worker wait for arrivals: each request's is counted (through the pipe) or not
        self._arrivals = limits.batch_max_wait_ms > 0

    # ---- life cycle --------------------------------------------------------------------

    def launch(self) -> tuple[FimPrompter, str]:
        """Spawn the engine's process, wait for its model: (prompter for the handlers, prompt mode).

        A load that fails raises its :class:`FimtuneError` (or names the error) here.
        """
        if self._process is not None:
            raise RuntimeError("the engine process was launched already")
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        level = logging.getLogger().getEffectiveLevel()
        self._process = ctx.Process(
            target=_engine_main, args=(theirs, self.factory, self.threads, level), name="fimtune-engine"
        )
        self._process.start()
        atexit.register(self.stop)  # a server that exits without stopping it must not wait on it forever
        theirs.close()
        self._conn = ours
        try:
            first = ours.recv()
        except (EOFError, OSError):
            code = self._join(STOP_GRACE_S)
            self._conn.close()
            raise FimtuneError(
                f"the engine process ended while loading the model (exit code {code}); see the messages above"
            ) from None
        if first[0] == "failed":
            _, name, message, ours_error = first
            self._join(STOP_GRACE_S)
            self._conn.close()
            raise FimtuneError(message if ours_error else f"loading the model failed: {name}: {message}")
        info = first[1]
        self.models, self.default_model, self.base_name = info["models"], info["default_model"], info["base_name"]
        self.device_type, self._described = info["device_type"], info["describe"]
        self.limits.max_input_tokens = info["max_input_tokens"]  # the handlers trim prompts to it
        self._receiver = threading.Thread(target=self._receive, name="fimtune-engine-receiver", daemon=True)
        self._receiver.start()
        return FimPrompter(info["tokenizer"]), info["mode"]

    def start(self) -> None:
        """Start the engine's worker (it warms up, then :attr:`ready` is set); after :meth:`launch`."""
        if self._process is None:
            raise RuntimeError("launch() the engine process first: its prompter serves the routes")
        self._send_quietly(("start",))

    def stop(self) -> None:
        """End the engine's process: queued jobs fail as cancelled, the batch in flight stops at its next token.

        Idempotent, and safe from two threads at once (the server's shutdown and an at-exit hook): the
        second waits for the first.
        """
        with self._stop_lock:
            if self._process is None or self._stopped:
                return
            self._stopping = True
            self._send_quietly(("stop",))
            # a batch in flight stops at its next token (within the job timeout); a warm-up (minutes
            # of compiling on a GPU) does not stop, and nothing of it is worth waiting for
            grace = self.limits.timeout_s + STOP_GRACE_S if self.ready.is_set() else STOP_GRACE_S
            if self._join(grace) is None:
                log.warning("the engine process did not stop in time: killing it")
                self._process.kill()
                self._join(STOP_GRACE_S)
            if self._receiver is not None:
                self._receiver.join(STOP_GRACE_S)
            self._conn.close()
            self._stopped = True

    def alive(self) -> bool:
        """Whether the engine's process runs (its sentinel is read, not the process reaped)."""
        if self._process is None or self._gone is not None:
            return False
        return not multiprocessing.connection.wait([self._process.sentinel], 0)

    def _join(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` s for the process to end: its exit code, None while it runs. One thread
        at a time: two threads joining at once race to reap it, and the loser sees it as still running."""
        with self._reap_lock:
            self._process.join(timeout)
            return self._process.exitcode

    # ---- what the routes use ---------------------------------------------------------

    def submit(self, job: Job, arrival: Arrival | None = None) -> None:
        """Send ``job`` to the engine; :class:`QueueFull` when `queue_size` jobs wait already,
        :class:`EngineGone` once the engine's process has ended (before a stream's answer begins)."""
        with self._lock:
            full = len(self._queued) >= self.limits.queue_size
            if full:
                self.counters.rejected += 1
            elif self._gone is None:
                jid = next(self._ids)
                self._jobs[jid] = job
                self._queued.add(jid)
        if full:
            if arrival is not None:
                arrival.done()
            raise QueueFull()
        if self._gone is not None:
            if arrival is not None:
                arrival.done()
            raise EngineGone(self._gone)
        arrived = arrival is not None and arrival.take()  # a counted one: it ends in the engine's process
        job.on_cancel = functools.partial(self._cancel, jid)
        left = job.deadline - time.monotonic()
        message = ("submit", jid, job.prompt, job.params, job.adapter, left, job.stream, arrived)
        if not self._send_quietly(message):
            with self._lock:
                self._jobs.pop(jid, None)
                self._queued.discard(jid)
            raise EngineGone(self._gone or "the engine process cannot be reached")

    def _cancel(self, jid: int) -> None:
        """A job's client went away: it no longer counts against the queue here (the engine's process
        drops it from its queue when that is full, as `Engine.submit` does)."""
        with self._lock:
            self._queued.discard(jid)
        self._send_quietly(("cancel", jid))

    def arrival(self) -> Arrival:
        # it calls `_arrived`, as on an Engine; decided once, so a later `set_batching` never unbalances it
        return Arrival(self, counted=self._arrivals)  # type: ignore[arg-type]

    def _arrived(self, change: int) -> None:
        self._send_quietly(("arrived", change))

    def queue_depth(self) -> int:
        return len(self._queued)

    def adapter_of(self, model: str | None) -> str | None:
        return self.models[model or self.default_model]

    def pause(self) -> None:
        """Hold the worker before its next batch (jobs still queue up); for tests and maintenance."""
        self._send_quietly(("pause",))

    def resume(self) -> None:
        self._send_quietly(("resume",))

    def set_batching(self, **changes: Any) -> None:
        """As :meth:`Engine.set_batching`: the engine's process applies it (from its next batch), and
        :attr:`limits` here says it."""
        changes = batching_changes(changes)
        for name, value in changes.items():
            setattr(self.limits, name, value)
        self._arrivals = self.limits.batch_max_wait_ms > 0
        self._send_quietly(("batching", changes))

    def describe(self) -> dict[str, Any]:
        """As :meth:`Engine.describe`, asked of the engine's process (its last answer once it is gone)."""
        answer = self._query()
        if answer is not None:
            self._described = answer["describe"]
        return dict(self._described)

    def snapshot(self) -> tuple[DecodeStats, EngineCounters]:
        """As :meth:`Engine.snapshot`, asked of the engine's process; the refusals counted here."""
        answer = self._query()
        if answer is not None:
            self._stats, self._counters = answer["stats"], answer["counters"]
        return dataclasses.replace(self._stats), dataclasses.replace(self._counters, rejected=self.counters.rejected)

    # ---- the pipe ----------------------------------------------------------------------

    def _send_quietly(self, message: tuple) -> bool:
        """Send ``message``: False when the process is gone (the receiver fails its jobs)."""
        if self._conn is None or self._gone is not None:
            return False
        try:
            with self._send_lock:
                self._conn.send(message)
            return True
        except (OSError, ValueError):  # a broken pipe, or the connection closed by `stop`
            return False

    def _query(self) -> dict[str, Any] | None:
        if self._process is None or self._gone is not None:
            return None
        qid = next(self._ids)
        slot: list[Any] = [threading.Event(), None]
        self._replies[qid] = slot
        try:
            if self._send_quietly(("query", qid)):
                slot[0].wait(QUERY_TIMEOUT_S)
        finally:
            self._replies.pop(qid, None)
        return slot[1]

    def _receive(self) -> None:
        """The receiver thread: the engine's events to their jobs, until the process ends."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind, *rest = message
            if kind == "token":
                jid, token, text, end = rest
                job = self._jobs.get(jid)
                if job is not None:
                    job._on_token(token, text, end)
            elif kind in ("done", "error"):
                with self._lock:
                    job = self._jobs.pop(rest[0], None)
                    self._queued.discard(rest[0])
                if job is None:
                    continue
                if kind == "done":
                    job.finish(rest[1])
                else:
                    job.fail(_error(rest[1], rest[2]))
            elif kind == "taken":
                with self._lock:
                    self._queued.discard(rest[0])
                    job = self._jobs.get(rest[0])
                if job is not None:
                    job.taken_at = time.monotonic()  # as the server saw it: the pipe's delay included
            elif kind == "ready":
                self.warmup_s, self._described = rest
                self.ready.set()
            elif kind == "reply":
                slot = self._replies.get(rest[0])
                if slot is not None:
                    slot[1] = rest[1]
                    slot[0].set()
        self._ended()

    def _ended(self) -> None:
        """The engine's process is gone: fail what it had, wake whoever waits for it."""
        self.exitcode = self._join(STOP_GRACE_S)
        self._gone = f"the engine process ended (exit code {self.exitcode})"
        if not self._stopping:
            log.error("%s; the server answers 503 to generation requests from now on", self._gone)
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
            self._queued.clear()
        for job in jobs:
            job.fail(JobCancelled() if self._stopping else EngineGone(self._gone))
        for slot in list(self._replies.values()):
            slot[0].set()
        self.ready.set()  # nobody waits for a warm-up that will not come; `alive()` says why


# --------------------------------------------------------------------------------------
# The engine's side
# --------------------------------------------------------------------------------------


def _engine_main(conn: Any, factory: EngineFactory, threads: int | None, log_level: int) -> None:
    """The engine process: build the engine, then serve the pipe until told to stop (or the server is gone)."""
    # A terminal's Ctrl-C, or a service manager's SIGTERM, may reach the whole process group: the
    # server stops this process itself once it has shut down (or this one sees its pipe close).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _end_with_the_server()
    logging.basicConfig(level=log_level, format="%(levelname)s [engine process] %(name)s: %(message)s")
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        engine, prompter, mode = factory()
    except BaseException as e:  # noqa: BLE001 - every failure is told to the server, which raises it there
        with contextlib.suppress(OSError, ValueError):  # the server's process went away
            conn.send(("failed", type(e).__name__, str(e), isinstance(e, FimtuneError)))
        conn.close()
        return
    _Host(conn, engine).serve(
        {
            "tokenizer": prompter.tokenizer,
            "mode": mode,
            "models": engine.models,
            "default_model": engine.default_model,
            "base_name": engine.base_name,
            "device_type": engine.device_type,
            "describe": engine.describe(),
            "max_input_tokens": engine.limits.max_input_tokens,  # lowered there to the model's positions
        }
    )


def _end_with_the_server() -> None:
    """End this process as soon as the server's ends, even while the model loads (minutes for a large
    one, the pipe unread meanwhile): a server killed then (SIGKILL, or SIGTERM, which it leaves to its
    default before it serves) must leave no process behind holding the model's memory."""
    server = multiprocessing.parent_process()
    if server is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([server.sentinel])
        os._exit(1)  # nobody is left to answer; the model's memory goes with the process

    threading.Thread(target=watch, name="fimtune-engine-watch", daemon=True).start()


class _Host:
    """The engine's process: its main thread reads the pipe; the worker's events are sent back."""

    def __init__(self, conn: Any, engine: Engine) -> None:
        self.conn = conn
        self.engine = engine
        self.jobs: dict[int, _PipedJob] = {}
        self._send_lock = threading.Lock()

    def send(self, message: tuple) -> None:
        # a pipe the server's process has closed is ignored: it went away, nobody reads any more
        with contextlib.suppress(OSError, ValueError), self._send_lock:
            self.conn.send(message)

    def ended(self, jid: int, message: tuple) -> None:
        self.jobs.pop(jid, None)
        self.send(message)

    def serve(self, loaded: dict[str, Any]) -> None:
        engine = self.engine
        self.send(("loaded", loaded))
        try:
            while True:
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):  # the server's process went away
                    break
                kind, *rest = message
                if kind == "submit":
                    jid, prompt, params, adapter, left, stream, arrived = rest
                    job = _PipedJob(self, jid, prompt, params, adapter, left, stream)
                    self.jobs[jid] = job
                    try:
                        engine.submit(job, _Arrived(engine) if arrived else None)  # type: ignore[arg-type]
                    except QueueFull as e:  # the server bounds the queue first: not expected
                        job.fail(e)
                elif kind == "cancel":
                    job = self.jobs.get(rest[0])
                    if job is not None:
                        job.cancel()
                elif kind == "arrived":
                    engine._arrived(rest[0])
                elif kind == "start":
                    engine.start()
                    threading.Thread(target=self._tell_ready, name="fimtune-engine-ready", daemon=True).start()
                elif kind == "pause":
                    engine.pause()
                elif kind == "resume":
                    engine.resume()
                elif kind == "batching":
                    engine.set_batching(**rest[0])
                elif kind == "query":
                    stats, counters = engine.snapshot()
                    answer = {
                        "describe": engine.describe(),
                        "stats": stats,
                        "counters": counters,
                        "arriving": engine._arriving,  # requests the worker may wait for (batch_max_wait_ms)
                    }
                    self.send(("reply", rest[0], answer))
                elif kind == "stop":
                    break
        finally:
            # queued jobs fail as cancelled (sent back), the batch in flight stops; a warm-up (minutes
            # of compiling on a GPU) does not stop, and ends with this process
            engine.stop(warming_up_s=WARMING_UP_STOP_S)
            self.conn.close()

    def _tell_ready(self) -> None:
        self.engine.ready.wait()
        self.send(("ready", self.engine.warmup_s, self.engine.describe()))


class _Arrived:
    """The arrival of a job the server submitted with it: ends with the job's queuing, as in one process."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def done(self) -> None:
        self._engine._arrived(-1)


class _PipedJob(Job):
    """A job in the engine's process: its events go back through the pipe."""

    def __init__(
        self, host: _Host, jid: int, prompt: list[int], params: Any, adapter: str | None, left_s: float, stream: bool
    ) -> None:
        self._host, self.jid = host, jid
        super().__init__(prompt, params, adapter, left_s, stream)

    def _bind(self) -> None:  # no event loop here
        pass

    def taken(self) -> None:
        self._host.send(("taken", self.jid))

    def _on_token(self, token: int, text: str, end: bool) -> None:
        self._host.send(("token", self.jid, token, text, end))

    def finish(self, completion: Any) -> None:
        self.ended = True
        self._host.ended(self.jid, ("done", self.jid, completion))

    def fail(self, error: Exception) -> None:
        self.ended = True
        self._host.ended(self.jid, ("error", self.jid, type(error).__name__, str(error)))
