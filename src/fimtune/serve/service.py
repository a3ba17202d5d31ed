"""What the routes share: building jobs from requests (limits checked, fields named) and waiting for them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import replace
from typing import NamedTuple, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from fimtune.generate import Completion, FimPrompter, GenerationParams, after_indent
from fimtune.serve.engine import Arrival, Engine, EngineGone, Event, Job, JobCancelled, JobTimeout, Limits, QueueFull
from fimtune.serve.http import STATUS_CLIENT_GONE, ApiError, Metrics
from fimtune.serve.process import EngineProcess

DISCONNECT_POLL_S = 0.05  # how often a waiting handler checks that its client is still there
TIMEOUT_GRACE_S = 1.0  # a handler gives up this long after the job's deadline (the worker should first)
RETRY_AFTER_S = 1

T = TypeVar("T")

_arrival: ContextVar[Arrival | None] = ContextVar("fimtune_arrival", default=None)  # the request being handled
_received: ContextVar[float | None] = ContextVar("fimtune_received", default=None)  # when its handler began


class Prompt(NamedTuple):
    """A request's prompt ids, whether its cursor follows only indentation on its line (then the
    answer's first line starts at code: :func:`fimtune.generate.after_indent`), and whether fitting
    it to ``max_input_tokens`` cut any of its text (llama.cpp's `truncated`)."""

    ids: list[int]
    after_indent: bool = False
    truncated: bool = False

    def params(self, params: GenerationParams) -> GenerationParams:
        return replace(params, after_indent=True) if self.after_indent else params


class Service:
    """What the routes share: the engine, the prompt builder, the limits, the metrics."""

    def __init__(self, engine: Engine | EngineProcess, prompter: FimPrompter, mode: str, routes: set[str]) -> None:
        self.engine = engine
        self.prompter = prompter
        self.mode = mode
        self.limits: Limits = engine.limits
        # Tokenize in a thread pool when the model runs on a GPU (the CPU cores are free); on a CPU
        # the model's threads use every core, and more threads would only slow its steps.
        self.tokenize_in_threads = engine.device_type != "cpu"
        self.metrics = Metrics(routes)
        self.started = int(time.time())

    # ---- building jobs ------------------------------------------------------------------

    def params(
        self,
        max_new_tokens: int,
        field: str,
        temperature: float,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
        stop_field: str = "stop",
    ) -> GenerationParams:
        """Generation parameters, checked against the limits (each error names its field)."""
        lim = self.limits
        if max_new_tokens > lim.max_new_tokens:
            raise ApiError(
                422,
                f"{field}={max_new_tokens} is more than the server allows ({lim.max_new_tokens}, max_new_tokens)",
                field,
            )
        stop = [x for x in stop or [] if x]
        if len(stop) > lim.max_stop_sequences:
            raise ApiError(422, f"{stop_field}: at most {lim.max_stop_sequences} stop strings", stop_field)
        return GenerationParams(
            max_new_tokens=max_new_tokens,
            temperature=max(temperature, 0.0),
            top_p=top_p or 1.0,
            top_k=max(top_k or 0, 0),
            stop=stop,
            mode=self.mode,  # type: ignore[arg-type]
            max_input_tokens=lim.max_input_tokens,
            trim_step=lim.trim_step,
            seed=seed,
        )

    def model(self, name: str | None, field: str) -> tuple[str, str | None]:
        """(public name, PEFT adapter) of a requested model; 404 naming ``field`` when unknown."""
        name = name or self.engine.default_model
        if name not in self.engine.models:
            served = ", ".join(self.engine.models)
            raise ApiError(404, f"{field}={name!r} is not served here (models: {served})", field, "not_found")
        return name, self.engine.models[name]

    async def prepare(self, build: Callable[[], T]) -> T:
        """Run ``build`` (tokenizing a request's prompts); with `tokenize_in_threads`, in a thread, not on
        the event loop: the prompter tokenizes with the interpreter lock let go (`encode_batch`), so
        requests that come together are tokenized in parallel, and the loop meanwhile streams other
        requests' tokens and the engine's worker queues its steps."""
        return await run_in_threadpool(build) if self.tokenize_in_threads else build()

    def fim_prompt(self, prefix: str, suffix: str, context: str = "") -> Prompt:
        lim = self.limits
        ids, truncated = self.prompter.build_fitted(
            prefix, suffix, self.mode, lim.max_input_tokens, context, lim.trim_step
        )
        return Prompt(ids, after_indent(prefix), truncated)

    def formatted_prompt(self, text: str, field: str, truncate: int | None = None) -> Prompt:
        """A prompt the client formatted: a FIM prompt is rebuilt and fitted, other text must fit (as sent)."""
        parts = self.prompter.split(text)
        if parts is not None:
            return self.fim_prompt(*parts)
        ids = self.prompter.encode_formatted(text)
        if truncate:
            ids = ids[-truncate:]
        limit = self.limits.max_input_tokens
        if len(ids) > limit:
            raise ApiError(
                422,
                f"{field} is {len(ids)} tokens, more than the server allows ({limit}, max_input_tokens); "
                "send less, or a FIM prompt (those are fitted)",
                field,
            )
        if not ids:
            raise ApiError(422, f"{field} is empty", field)
        return Prompt(ids)

    # ---- running jobs -------------------------------------------------------------------

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Around a generation request's handler, from its read body until its job is queued (or it
        fails): the engine's worker may wait for it before it starts a batch (`batch_max_wait_ms`)."""
        received = _received.set(time.monotonic())
        arrival = self.engine.arrival()
        token = _arrival.set(arrival)
        try:
            yield
        finally:
            _arrival.reset(token)
            _received.reset(received)
            arrival.done()

    def submit(self, prompt: Prompt, params: GenerationParams, adapter: str | None, stream: bool = False) -> Job:
        job = Job(prompt.ids, prompt.params(params), adapter, self.limits.timeout_s, stream)
        job.received_at = _received.get() or job.received_at  # outside a handler: its queuing
        try:
            self.engine.submit(job, _arrival.get())
        except QueueFull:
            raise ApiError(
                503,
                f"the server is busy (its queue of {self.limits.queue_size} is full); retry shortly",
                None,
                "overloaded",
                {"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        except EngineGone as e:  # before a stream's answer begins: its status, not an error event
            raise job_error(e, self.limits) from None
        return job

    async def result(self, request: Request, job: Job, tokens: list[Event] | None = None) -> Completion:
        """Wait for ``job``; cancel it when the client goes away or the deadline passes. ``tokens``
        gets a streaming job's token events."""
        task = asyncio.ensure_future(_final(job, tokens))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    job.cancel()
                    raise ApiError(STATUS_CLIENT_GONE, "the client closed the request", None, "cancelled")
                if time.monotonic() > job.deadline + TIMEOUT_GRACE_S:
                    job.cancel()
                    raise JobTimeout()
        except ApiError:
            raise
        except Exception as e:  # timed out, cancelled, or the worker's generation failed (logged there)
            raise job_error(e, self.limits) from None
        finally:
            if not task.done():
                task.cancel()

    def finished(self, jobs: list[Job], done: list[Completion]) -> dict[str, str]:
        """A request's jobs are done: its phases go to the metrics; its timing headers come back."""
        phases, headers = timing_headers(jobs, done)
        self.metrics.observe_phases(phases)
        return headers

    async def results(self, request: Request, jobs: list[Job]) -> list[Completion]:
        try:
            return [await self.result(request, job) for job in jobs]
        finally:
            for job in jobs:
                job.cancel()  # no-op for finished jobs; drops the rest when one failed


async def _final(job: Job, tokens: list[Event] | None = None) -> Completion:
    async for event in job.events_until_done():
        if event.kind == "token" and tokens is not None:
            tokens.append(event)
        if event.kind == "error":
            raise event.error or JobCancelled()
        if event.kind == "done" and event.completion is not None:
            return event.completion
    raise JobCancelled()


# The OpenAI clients (llama.vscode's and Continue's among them) retry a 408 or a 5xx twice on their own
# unless told not to: the same request would run past the timeout again, or fail again, each time.
NO_RETRY = {"x-should-retry": "false"}


def job_error(e: Exception, limits: Limits) -> ApiError:
    """The HTTP error for a job that ended without a completion."""
    if isinstance(e, JobTimeout):
        return ApiError(
            408,
            f"generation ran past the server's timeout of {limits.timeout_s:g} s (timeout_s); ask for fewer tokens",
            "timeout_s",
            "timeout",
            NO_RETRY,
        )
    if isinstance(e, JobCancelled):
        return ApiError(503, "the request was cancelled (server stopping)", None, "cancelled")
    if isinstance(e, EngineGone):
        return ApiError(503, f"{e}; the server cannot generate until it is restarted", None, "engine_gone")
    # an error raised in the engine's process arrives as a RemoteError carrying its type's name; "generation"
    # is TGI's error_type for it (huggingface_hub raises its GenerationError for that name only)
    return ApiError(500, f"generation failed: {getattr(e, 'name', type(e).__name__)}", None, "generation", NO_RETRY)


def timing_headers(jobs: list[Job], done: list[Completion]) -> tuple[dict[str, float], dict[str, str]]:
    """A finished request's phases in seconds, and TGI's timing headers, in whole milliseconds as TGI
    writes them: `x-validation-time` from the handler's start (its body read) to its jobs' queuing
    (the prompt's tokenizing), `x-queue-time` until the worker took the last of them,
    `x-inference-time` from there to now (prefill, decoding, and the way back to the handler),
    `x-total-time` all three; `x-time-per-token` is the inference time over the new tokens."""
    now = time.monotonic()
    received = min(job.received_at for job in jobs)
    queued = max(job.queued_at for job in jobs)
    taken = max(queued, *(job.taken_at or queued for job in jobs))
    phases = {"validation": queued - received, "queue": taken - queued, "inference": now - taken}
    new = sum(c.completion_tokens for c in done)

    def ms(seconds: float) -> str:
        return str(int(1000 * max(seconds, 0.0)))

    headers = {
        "x-total-time": ms(now - received),
        "x-validation-time": ms(phases["validation"]),
        "x-queue-time": ms(phases["queue"]),
        "x-inference-time": ms(phases["inference"]),
        "x-time-per-token": ms(phases["inference"] / max(new, 1)),
        "x-prompt-tokens": str(sum(c.prompt_tokens for c in done)),
        "x-generated-tokens": str(new),
    }
    return phases, headers


def submit_all(svc: Service, prompts: list[Prompt], params: GenerationParams, adapter: str | None) -> list[Job]:
    jobs: list[Job] = []
    try:
        for prompt in prompts:
            jobs.append(svc.submit(prompt, params, adapter))
    except ApiError:
        for job in jobs:
            job.cancel()
        raise
    return jobs
