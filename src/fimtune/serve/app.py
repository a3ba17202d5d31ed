"""`fimtune serve`: completions for editors over HTTP (FastAPI + uvicorn).

::

    POST /generate  /generate_stream  /     TGI: llm-vscode sends PSM `inputs` holding the FIM tokens
    POST /v1/completions   GET /v1/models   OpenAI: the FIM prompt is built here from `prompt` + `suffix`
    POST /infill                            llama.cpp: `input_extra` files become context before the prefix
    GET  /info  /health  /metrics           template, limits, models; readiness; Prometheus text

Prompts in the model's FIM form are rebuilt in the server's prompt layout (SPM for runs
trained on SPM) and fitted to `max_input_tokens`, so the KV cache of the last request can be
reused (:mod:`fimtune.serve.decoding`). Handlers tokenize and wait; the engine's worker
thread generates (:mod:`fimtune.serve.engine`), in this process or (`--engine-process`) in one of
its own (:mod:`fimtune.serve.process`). Bound to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from fimtune import __version__
from fimtune.errors import FimtuneError
from fimtune.serve import schemas as s
from fimtune.serve import shapes
from fimtune.serve.engine import MIN_INPUT_TOKENS, Engine, Limits
from fimtune.serve.http import CONTENT_TYPE, ApiError, Gate, error_response, read_json
from fimtune.serve.process import WARMING_UP_STOP_S, EngineProcess
from fimtune.serve.service import Service

log = logging.getLogger(__name__)

ROUTES = {
    "/",
    "/generate",
    "/generate_stream",
    "/v1/completions",
    "/v1/models",
    "/infill",
    "/info",
    "/health",
    "/metrics",
}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def create_app(engine: Engine | EngineProcess, prompter: Any, mode: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app around a loaded engine; the engine's worker runs while the app does."""
    api_key = checked_api_key(api_key)
    svc = Service(engine, prompter, mode, ROUTES)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            if isinstance(engine, EngineProcess):
                engine.stop()
            else:  # the server's process ends next: a warm-up (minutes of compiling on a GPU) is not waited for
                engine.stop(warming_up_s=WARMING_UP_STOP_S)

    app = FastAPI(title="fimtune", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = svc
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _routing_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(Gate, metrics=svc.metrics, api_key=api_key)
    _add_routes(app, svc)
    return app


async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return error_response(request.url.path, err)


async def _routing_error(request: Request, err: HTTPException) -> JSONResponse:
    """No such route (404) or method (405, with its `Allow` header): in the shape of the API the path is of."""
    kind = "not_found" if err.status_code == 404 else "invalid_request"
    message = f"{err.detail}: {request.method} {request.url.path}"
    headers = dict(err.headers) if err.headers else None
    return error_response(request.url.path, ApiError(err.status_code, message, "path", kind, headers))


async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    log.error("internal error on %s: %r", request.url.path, err)
    return error_response(request.url.path, ApiError(500, f"internal error: {type(err).__name__}", None, "internal"))


def _add_routes(app: FastAPI, svc: Service) -> None:
    limit = svc.limits.max_body_bytes

    # A generation handler is an arrival (svc.arriving) from its read body until its job is queued:
    # batching may wait for it. (Not while the body comes in: a slow client must not hold batches.)
    @app.post("/generate")
    async def generate(request: Request) -> Any:
        req = await read_json(request, s.TgiRequest, limit)
        with svc.arriving():
            return await shapes.tgi(svc, request, req, stream=False)

    @app.post("/generate_stream")
    async def generate_stream(request: Request) -> Any:
        req = await read_json(request, s.TgiRequest, limit)
        with svc.arriving():
            return await shapes.tgi(svc, request, req, stream=True)

    @app.post("/")
    async def tgi_root(request: Request) -> Any:
        req = await read_json(request, s.TgiRequest, limit)
        with svc.arriving():
            return await shapes.tgi(svc, request, req, stream=req.stream, listed=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = await read_json(request, s.CompletionRequest, limit)
        with svc.arriving():
            return await shapes.completions(svc, request, req)

    @app.get("/v1/models")
    async def models() -> s.ModelList:
        return model_list(svc)

    @app.post("/infill")
    async def infill(request: Request) -> Any:
        req = await read_json(request, s.InfillRequest, limit)
        with svc.arriving():
            return await shapes.infill(svc, request, req)

    # /info and /metrics ask an engine in its own process through its pipe: off the event loop
    @app.get("/info")
    async def info() -> dict[str, Any]:
        return await run_in_threadpool(server_info, svc)

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: `wget --spider`, as container checks use
    async def health() -> JSONResponse:
        """200 once the model serves at full speed; 503 while it warms up (requests wait in the
        queue meanwhile), as TGI answers only once warm, and 503 once its engine stopped."""
        if not svc.engine.alive():
            return JSONResponse({"status": "stopped"}, status_code=503)
        if not svc.engine.ready.is_set():
            return JSONResponse({"status": "warming_up"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        gauges = await run_in_threadpool(engine_gauges, svc.engine)
        return PlainTextResponse(svc.metrics.render(gauges), media_type=CONTENT_TYPE)


def model_list(svc: Service) -> s.ModelList:
    base = svc.engine.base_name
    cards = [
        s.ModelCard(id=name, created=svc.started, root=base, parent=None if adapter is None else base)
        for name, adapter in svc.engine.models.items()
    ]
    return s.ModelList(data=cards)


def server_info(svc: Service) -> dict[str, Any]:
    """TGI's `/info` fields, plus the FIM template, models and limits."""
    engine, lim, names = svc.engine, svc.limits, svc.prompter.names
    described = engine.describe()
    template = svc.prompter.template()
    return {
        "model_id": engine.default_model,
        "model_dtype": described.pop("model_dtype"),
        "model_device_type": described.pop("model_device_type"),
        "router": "fimtune",
        "version": __version__,
        "max_input_tokens": lim.max_input_tokens,
        "max_input_length": lim.max_input_tokens,  # TGI 1.x's name, which Continue's TGI provider reads
        "max_total_tokens": lim.max_input_tokens + lim.max_new_tokens,
        "max_concurrent_requests": lim.queue_size,
        "max_batch_size": lim.max_batch_size,
        "max_stop_sequences": lim.max_stop_sequences,
        "max_best_of": 1,
        "models": list(engine.models),
        "default_model": engine.default_model,
        "base_model": engine.base_name,
        "adapters": [name for name, adapter in engine.models.items() if adapter is not None],
        "fim": {
            "family": names.family,
            "prefix": names.prefix,
            "suffix": names.suffix,
            "middle": names.middle,
            "pad": names.pad,
            "mode": svc.mode,
            "template": template[svc.mode],
            "templates": template,
            "end_token_ids": svc.prompter.end_ids,
        },
        "limits": lim.as_dict(),
        "engine_process": isinstance(engine, EngineProcess),
        **described,  # cuda_graphs_active, prefill_graphs_active, gemv_steps_active, decode_attention_active
    }


def engine_gauges(engine: Engine | EngineProcess) -> dict[str, tuple[str, str, Any]]:
    st, c = engine.snapshot()
    return {
        "fimtune_generated_tokens_total": ("counter", "Tokens generated.", st.generated_tokens),
        "fimtune_prompt_tokens_total": ("counter", "Prompt tokens of completed requests.", st.prompt_tokens),
        "fimtune_prompt_tokens_cached_total": ("counter", "Prompt tokens reused from the KV cache.", st.cached_tokens),
        "fimtune_draft_tokens_total": ("counter", "Guessed tokens checked (greedy drafts).", st.draft_tokens),
        "fimtune_draft_tokens_accepted_total": ("counter", "Guessed tokens the model agreed with.", st.accepted_tokens),
        "fimtune_forwards_total": ("counter", "Model forwards.", st.forwards),
        "fimtune_batches_total": ("counter", "Batches generated.", st.batches),
        "fimtune_joined_total": ("counter", "Requests that joined a batch in flight.", st.joined),
        "fimtune_joins_total": (
            "counter",
            "Joins into a batch in flight (a join's requests are prefilled together).",
            st.joins,
        ),
        "fimtune_rejected_total": ("counter", "Requests refused with 503 (queue full).", c.rejected),
        "fimtune_cancelled_total": ("counter", "Requests cancelled (client gone).", c.cancelled),
        "fimtune_timeouts_total": ("counter", "Requests past their timeout.", c.timeouts),
        "fimtune_busy_seconds_total": ("counter", "Seconds the engine spent generating batches.", c.busy_seconds),
        "fimtune_prefill_seconds_total": (
            "counter",
            "Seconds of those in prefills and joins (GPU decoding path: queuing them; the GPU's own time falls in the waits).",
            st.prefill_s,
        ),
        "fimtune_device_wait_seconds_total": (
            "counter",
            "Seconds of those waiting for the device's next tokens (GPU decoding path).",
            st.device_wait_s,
        ),
        "fimtune_queue_depth": ("gauge", "Requests waiting for the engine.", engine.queue_depth()),
    }


# --------------------------------------------------------------------------------------
# `fimtune serve`
# --------------------------------------------------------------------------------------


def checked_api_key(key: str | None) -> str | None:
    """The key without the whitespace around it: one read from a file or a secret keeps its line end,
    which no client can send (HTTP strips a header's). Empty: no key; only whitespace: an error."""
    if not key:
        return None
    if not key.strip():
        raise FimtuneError("--api-key (or $FIMTUNE_API_KEY) is only whitespace: give a key, or leave it out")
    return key.strip()


def limits_from_args(ns: Any) -> Limits:
    """Limits from `fimtune serve` flags (a flag left out keeps the default), checked."""
    lim = Limits()
    for name in (
        "max_body_bytes",
        "max_input_tokens",
        "max_new_tokens",
        "queue_size",
        "max_batch_size",
        "join_min_rows",
    ):
        value = getattr(ns, name, None)
        if value is not None:
            if value < 1:
                raise FimtuneError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
            setattr(lim, name, value)
    timeout = getattr(ns, "timeout", None)
    if timeout is not None:
        if timeout <= 0:
            raise FimtuneError(f"--timeout must be more than 0 seconds (got {timeout})")
        lim.timeout_s = timeout
    switch = getattr(ns, "switch_interval_ms", None)
    if switch is not None:
        if switch <= 0:
            raise FimtuneError(f"--switch-interval-ms must be more than 0 (got {switch})")
        lim.switch_interval_ms = switch
    for name in ("join_wait_ms", "batch_wait_ms", "batch_max_wait_ms"):
        value = getattr(ns, name, None)
        if value is not None:
            if value < 0:
                raise FimtuneError(f"--{name.replace('_', '-')} must be 0 or more (got {value})")
            setattr(lim, name, value)
    if getattr(ns, "no_cuda_graphs", False):
        lim.cuda_graphs = False
    if getattr(ns, "continuous_batching", None) is not None:
        lim.continuous_batching = ns.continuous_batching
    if getattr(ns, "no_prefill_graphs", False):
        lim.prefill_graphs = False
    if getattr(ns, "decode_attention", None):
        lim.decode_attention = ns.decode_attention
    if getattr(ns, "no_gemv_steps", False):
        lim.gemv_steps = False
    if getattr(ns, "overlap_joins", None) is not None:
        lim.overlap_joins = ns.overlap_joins
    if lim.max_input_tokens <= MIN_INPUT_TOKENS:
        raise FimtuneError(f"--max-input-tokens must be more than {MIN_INPUT_TOKENS} (the FIM tokens and some code)")
    return lim


def bind_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads, so that a port in use fails at once.

    It listens only once uvicorn serves it: until then a client is refused rather than kept waiting.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        sock.bind((host, port))
    except OverflowError:  # a port past 0-65535
        sock.close()
        raise FimtuneError(f"--port {port}: a port is 0-65535 (0: any free one)") from None
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise FimtuneError(
                f"{host}:{port} is in use (another server?): stop it, or pick another port with --port"
            ) from None
        raise FimtuneError(f"cannot bind {host}:{port} ({e.strerror or e}): check --host and --port") from None
    return sock


def server_url(sock: socket.socket, host: str) -> str:
    """Where clients reach the server: the port its socket took (`--port 0`: any free one), an IPv6
    host in brackets."""
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def main(ns: Any) -> int:
    """`fimtune serve TARGET`: load the model and adapters, then serve until interrupted."""
    import uvicorn

    from fimtune.model import DTYPES
    from fimtune.serve.engine import load_engine

    limits = limits_from_args(ns)
    ns.api_key = checked_api_key(ns.api_key)
    threads = getattr(ns, "threads", None)
    if threads is not None and threads < 1:
        raise FimtuneError(f"--threads must be at least 1 (got {threads})")
    sock = bind_socket(ns.host, ns.port)
    if ns.host not in LOOPBACK_HOSTS:
        log.warning(
            "binding to %s: other machines can reach this server%s", ns.host, "" if ns.api_key else "; use --api-key"
        )
    dtype = DTYPES.get(getattr(ns, "dtype", None) or "")
    if threads:
        import torch

        torch.set_num_threads(threads)
    mode = getattr(ns, "mode", None) or "auto"
    quantize = getattr(ns, "quantize", None)
    engine: Engine | EngineProcess
    if getattr(ns, "engine_process", False):
        factory = functools.partial(load_engine, ns.target, ns.adapter, limits, mode, dtype, quantize=quantize)
        engine = EngineProcess(factory, limits, threads=threads)
        prompter, mode = engine.launch()
    else:
        engine, prompter, mode = load_engine(ns.target, ns.adapter, limits, mode, dtype, quantize=quantize)
    app = create_app(engine, prompter, mode, ns.api_key)
    graphs = ", CUDA-graph decoding (compiled at start-up)" if engine.describe()["cuda_graphs_active"] else ""
    where = ", the model in a process of its own" if isinstance(engine, EngineProcess) else ""
    print(
        f"serving {', '.join(engine.models)} ({mode.upper()} prompts{graphs}{where}) on {server_url(sock, ns.host)}",
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, host=ns.host, port=ns.port, log_level="info"))
    server.run(sockets=[sock])
    return 0 if server.started else 3  # uvicorn's own status for a server that never started
