"""The three API shapes editors speak: TGI, OpenAI completions, llama.cpp infill (handlers and streams).

Streams are server-sent events. Each stream's generator cancels its job when it ends, so a
client that goes away mid-stream (Starlette cancels the generator) stops its generation.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from fimtune.generate import Completion
from fimtune.serve import schemas as s
from fimtune.serve.engine import Event, Job, JobCancelled
from fimtune.serve.http import ApiError, sse
from fimtune.serve.service import Service, job_error, submit_all

EXTRA_FILE_HEADER = "# {filename}\n"  # how an `input_extra` file starts in the context
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --------------------------------------------------------------------------------------
# TGI
# --------------------------------------------------------------------------------------


async def tgi(svc: Service, request: Request, req: s.TgiRequest, stream: bool, listed: bool = False) -> Any:
    """``listed``: TGI's `POST /`, whose answer (not streamed) is a list of one, as the Inference API's."""
    p = req.parameters
    temperature = (1.0 if p.temperature is None else p.temperature) if p.sampling() else 0.0
    new_tokens = p.max_new_tokens or min(s.TGI_DEFAULT_NEW_TOKENS, svc.limits.max_new_tokens)
    params = svc.params(
        new_tokens, "parameters.max_new_tokens", temperature, p.top_p, p.top_k, p.stop, p.seed, "parameters.stop"
    )
    _, adapter = svc.model(p.adapter_id, "parameters.adapter_id")
    prompt = await svc.prepare(lambda: svc.formatted_prompt(req.inputs, "inputs", p.truncate))
    head = req.inputs if p.return_full_text else ""
    job = svc.submit(prompt, params, adapter, stream or p.details)  # details list the tokens: a stream's
    if stream:
        return StreamingResponse(tgi_events(svc, job, head, p), media_type="text/event-stream", headers=SSE_HEADERS)
    events: list[Event] = []
    done = await svc.result(request, job, events)
    details = (
        s.TgiGenerateDetails(**tgi_details(done, p).model_dump(), tokens=tgi_tokens(events, done))
        if p.details
        else None
    )
    out = s.TgiResponse(generated_text=head + done.text, details=details)
    body = out.model_dump(exclude_none=not p.details)
    return JSONResponse([body] if listed else body, headers=svc.finished([job], [done]))


def tgi_details(done: Completion, p: s.TgiParameters) -> s.TgiDetails:
    reason = "length" if done.finish_reason == "length" else "stop_sequence" if done.stop_string else "eos_token"
    return s.TgiDetails(finish_reason=reason, generated_tokens=done.completion_tokens, seed=p.seed)


def tgi_tokens(events: list[Event], done: Completion) -> list[s.TgiToken]:
    """TGI's `details.tokens`: one per token event; the text a stop string's check held back goes to the last."""
    tokens = [s.TgiToken(id=e.token, text=e.text, special=e.end) for e in events]
    sent = "".join(t.text for t in tokens)
    if tokens and done.text.startswith(sent):
        tokens[-1].text += done.text[len(sent) :]
    return tokens


async def tgi_events(svc: Service, job: Job, head: str, p: s.TgiParameters) -> AsyncIterator[str]:
    """TGI's stream: one event per token; the last carries `generated_text` (held back one event for that)."""
    held: s.TgiToken | None = None
    sent, index = "", 0
    try:
        async for event in job.events_until_done():
            if event.kind == "token":
                if held is not None:
                    yield sse(s.TgiStreamEvent(index=index, token=held).model_dump())
                    index += 1
                held = s.TgiToken(id=event.token, text=event.text, special=event.end)
                sent += event.text
            elif event.kind == "done" and event.completion is not None:
                done = event.completion
                svc.finished([job], [done])
                last = held or s.TgiToken(id=job.prompt[-1], text="", special=True)
                last.text += done.text[len(sent) :] if done.text.startswith(sent) else ""
                details = tgi_details(done, p) if p.details else None
                final = s.TgiStreamEvent(index=index, token=last, generated_text=head + done.text, details=details)
                yield sse(final.model_dump())
            else:
                err = job_error(event.error or JobCancelled(), svc.limits)
                yield sse({"error": err.message, "error_type": err.kind})
    finally:
        job.cancel()  # the client went away mid-stream (or we are done: then a no-op)


# --------------------------------------------------------------------------------------
# OpenAI
# --------------------------------------------------------------------------------------


async def completions(svc: Service, request: Request, req: s.CompletionRequest) -> Any:
    name, adapter = svc.model(req.model, "model")
    temperature = s.OPENAI_DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
    max_tokens = req.max_tokens or min(s.OPENAI_DEFAULT_MAX_TOKENS, svc.limits.max_new_tokens)
    params = svc.params(max_tokens, "max_tokens", temperature, req.top_p, req.top_k, req.stops(), req.seed)
    texts, suffix = req.prompts(), req.suffix
    if suffix is not None:  # Continue & co: the FIM prompt is ours to build
        prompts = await svc.prepare(lambda: [svc.fim_prompt(text, suffix) for text in texts])
    else:
        prompts = await svc.prepare(lambda: [svc.formatted_prompt(text, "prompt") for text in texts])
    meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": name}
    if req.stream:
        if len(prompts) > 1:
            raise ApiError(422, "prompt: streaming takes one prompt", "prompt")
        job = svc.submit(prompts[0], params, adapter, stream=True)
        echo = texts[0] if req.echo else ""  # the prompt first, as in the answer without streaming
        events = openai_events(svc, job, meta, echo)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    jobs = submit_all(svc, prompts, params, adapter)
    done = await svc.results(request, jobs)
    echo = req.prompts() if req.echo else [""] * len(done)
    choices = [
        s.CompletionChoice(index=i, text=head + c.text, finish_reason=c.finish_reason)
        for i, (head, c) in enumerate(zip(echo, done, strict=True))
    ]
    out = s.CompletionResponse(**meta, choices=choices, usage=usage(done))
    return JSONResponse(jsonable_encoder(out), headers=svc.finished(jobs, done))


def usage(done: list[Completion]) -> s.Usage:
    prompt, new = sum(c.prompt_tokens for c in done), sum(c.completion_tokens for c in done)
    cached = s.CachedTokens(cached_tokens=sum(c.cached_tokens for c in done))
    return s.Usage(prompt_tokens=prompt, completion_tokens=new, total_tokens=prompt + new, prompt_tokens_details=cached)


async def openai_events(svc: Service, job: Job, meta: dict[str, Any], echo: str = "") -> AsyncIterator[str]:
    """`data: {chunk}` per piece of text (``echo``, the prompt, first), a last chunk with `finish_reason`
    and usage, then `data: [DONE]`."""

    def chunk(text: str, reason: str | None = None, **extra: Any) -> str:
        choice = s.CompletionChoice(index=0, text=text, finish_reason=reason)
        out = s.CompletionResponse(**meta, choices=[choice], **extra)
        return sse(out.model_dump(exclude=None if out.usage else {"usage"}))  # `finish_reason` null till the last

    sent = ""
    try:
        if echo:
            yield chunk(echo)
        async for event in job.events_until_done():
            if event.kind == "token" and event.text:
                sent += event.text
                yield chunk(event.text)
            elif event.kind == "done" and event.completion is not None:
                done = event.completion
                svc.finished([job], [done])
                rest = done.text[len(sent) :] if done.text.startswith(sent) else ""
                yield chunk(rest, done.finish_reason, usage=usage([done]))
            elif event.kind == "error":
                err = job_error(event.error or JobCancelled(), svc.limits)
                yield sse({"error": {"message": err.message, "type": err.kind, "param": err.field, "code": err.status}})
        yield sse("[DONE]")
    finally:
        job.cancel()


# --------------------------------------------------------------------------------------
# llama.cpp
# --------------------------------------------------------------------------------------


def extra_context(req: s.InfillRequest) -> str:
    """`input_extra` files as `# filename` blocks (the prompt trims them first when too long)."""
    blocks = []
    for extra in req.input_extra:
        text = extra.text if extra.text.endswith("\n") or not extra.text else extra.text + "\n"
        blocks.append((EXTRA_FILE_HEADER.format(filename=extra.filename) if extra.filename else "") + text)
    return "".join(blocks)


async def infill(svc: Service, request: Request, req: s.InfillRequest) -> Any:
    name, adapter = svc.model(req.model, "model")
    # -1: up to the limit; above it, lowered to it, as llama.cpp's server lowers a slot's n_predict
    # (llama.vim and llama.vscode ask 128 by default: refused, a server of a lower limit showed nothing)
    n_predict = min(req.n_predict, svc.limits.max_new_tokens) if req.n_predict > 0 else svc.limits.max_new_tokens
    seed = None if req.seed == s.LLAMACPP_RANDOM_SEED else req.seed
    params = svc.params(n_predict, "n_predict", req.temperature, req.top_p, req.top_k, req.stop, seed)
    context = extra_context(req)
    prompt = await svc.prepare(lambda: svc.fim_prompt(req.input_prefix + req.prompt, req.input_suffix, context))
    fields = req.response_fields
    if req.n_predict == 0:  # llama.vim warms its context up so: the prompt is read, nothing generated
        final = infill_response(Completion("", len(prompt.ids), 0, "length"), name, time.monotonic(), prompt.truncated)
        if req.stream:
            return StreamingResponse(
                iter([sse(nested_values(fields, final.model_dump()))]),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        return JSONResponse(nested_values(fields, jsonable_encoder(final)))
    started = time.monotonic()  # the clock of `Completion.first_token_at`, also in an engine process
    job = svc.submit(prompt, params, adapter, req.stream)
    if req.stream:
        return StreamingResponse(
            infill_events(svc, job, name, started, prompt.truncated, fields),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    done = await svc.result(request, job)
    body = nested_values(fields, jsonable_encoder(infill_response(done, name, started, prompt.truncated)))
    return JSONResponse(body, headers=svc.finished([job], [done]))


def nested_values(fields: list[str], answer: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's `response_fields`: the answer whole when none are named, else each named field
    found, `a/b` as the key "a/b" for b inside a.

    >>> nested_values(["content", "timings/predicted_n", "nope/x"], {"content": "x", "timings": {"predicted_n": 2}})
    {'content': 'x', 'timings/predicted_n': 2}
    """
    if not fields:
        return answer
    out: dict[str, Any] = {}
    for field in fields:
        value: Any = answer
        for key in field.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            out[field] = value
    return out


def infill_response(done: Completion, name: str, started: float, truncated: bool) -> s.InfillResponse:
    return s.InfillResponse(
        content=done.text,
        model=name,
        stop_type="limit" if done.finish_reason == "length" else "word" if done.stop_string else "eos",
        stopping_word=done.stop_string,
        truncated=truncated,
        tokens_predicted=done.completion_tokens,
        tokens_evaluated=done.prompt_tokens,
        tokens_cached=done.cached_tokens,
        timings=infill_timings(done, started, time.monotonic()),
    )


def infill_timings(done: Completion, started: float, ended: float) -> dict[str, int | float]:
    """llama.cpp's `timings` (llama.vim shows them once all six of the prompt's and the prediction's
    `_n`, `_ms` and `_per_second` are there): the prompt's from the request queued to its first token
    (a wait in the queue included), the prediction's from there to the end.

    >>> t = infill_timings(Completion("x", 10, 5, "length", 2, first_token_at=1.5), 1.0, 2.5)
    >>> t["prompt_n"], t["prompt_ms"], t["prompt_per_second"], t["predicted_ms"], t["predicted_per_token_ms"]
    (8, 500.0, 16.0, 1000.0, 200.0)
    """
    first = ended if done.first_token_at is None else min(max(done.first_token_at, started), ended)
    out: dict[str, int | float] = {}
    for name, n, seconds in (
        ("prompt", done.prompt_tokens - done.cached_tokens, first - started),
        ("predicted", done.completion_tokens, ended - first),
    ):
        ms = seconds * 1000
        out[f"{name}_n"] = n
        out[f"{name}_ms"] = round(ms, 3)
        out[f"{name}_per_token_ms"] = round(ms / n, 3) if n else 0.0
        out[f"{name}_per_second"] = round(n * 1000 / ms, 3) if ms > 0 else 0.0
    out["total_ms"] = round((ended - started) * 1000, 3)
    return out


async def infill_events(
    svc: Service, job: Job, name: str, started: float, truncated: bool, fields: list[str] | None = None
) -> AsyncIterator[str]:
    """llama.cpp's stream: `{"content": piece, "stop": false}` chunks, then the full response with
    `stop: true` (its ``fields`` alone, when named: :func:`nested_values`)."""
    sent = ""
    try:
        async for event in job.events_until_done():
            if event.kind == "token" and event.text:
                sent += event.text
                yield sse({"content": event.text, "stop": False})
            elif event.kind == "done" and event.completion is not None:
                svc.finished([job], [event.completion])
                final = infill_response(event.completion, name, started, truncated)
                final.content = final.content[len(sent) :] if final.content.startswith(sent) else ""
                yield sse(nested_values(fields or [], final.model_dump()))
            elif event.kind == "error":
                err = job_error(event.error or JobCancelled(), svc.limits)
                yield sse({"error": {"message": err.message, "type": err.kind, "code": err.status}})
    finally:
        job.cancel()
