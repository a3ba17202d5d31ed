"""Helpers for the server tests: a tiny never-ending model, adapters, a real uvicorn server on loopback."""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from fimtune.serve.engine import Limits

STARTUP_POLLS = 1000  # x 10 ms
TEST_LIMITS = dict(max_input_tokens=200, max_new_tokens=64, max_body_bytes=20_000, timeout_s=20.0, trim_step=16)


def never_ending(model, tokenizer):
    """Zero the output rows of the end tokens: their logit is 0 while some other token's is higher."""
    from fimtune.generate import FimPrompter

    with torch.no_grad():
        model.get_output_embeddings().weight[FimPrompter(tokenizer).end_ids] = 0.0
    return model


def save_adapter(base: Path, folder: Path, seed: int) -> Path:
    """A random (non-zero) LoRA adapter on ``base``, saved as safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), cfg).save_pretrained(folder)
    return folder


def make_app(run: Path, adapters: list[str] | None = None, api_key: str | None = None, **limits):
    from fimtune.serve.app import create_app
    from fimtune.serve.engine import load_engine

    engine, prompter, mode = load_engine(str(run), adapters or [], Limits(**{**TEST_LIMITS, **limits}), "auto")
    return create_app(engine, prompter, mode, api_key)


def psm(prefix: str, suffix: str = "\n") -> str:
    return f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"


def requests_of_many_shapes() -> list[tuple[str, dict]]:
    """Different prompts, lengths, stops and adapters, all greedy."""
    out = []
    for i in range(8):
        prefix = f"def f{i}(x):\n" + "    y = x\n" * i
        params = {"max_new_tokens": 4 + 3 * i, "do_sample": False, "stop": ["\n\n"] if i % 3 == 0 else []}
        if i % 4 == 3:
            params["adapter_id"] = "other"
        out.append(("/generate", {"inputs": psm(prefix), "parameters": params}))
    out.append(("/v1/completions", {"prompt": "import os\n", "suffix": "\n", "max_tokens": 9, "temperature": 0}))
    out.append(("/infill", {"input_prefix": "class A:\n", "input_suffix": "", "n_predict": 7, "temperature": 0}))
    return out


def answer(body: dict) -> str:
    """The completion text of any of the three shapes."""
    if "choices" in body:
        return body["choices"][0]["text"]
    return body.get("generated_text", body.get("content"))


def engine_for_process(run: Path, adapters: list[str] | None, step_s: float, limits: dict, warmup_s: float = 0.0):
    """Run in the engine's process (`fimtune.serve.process`): the engine of ``make_app``, each
    forward ``step_s`` slower (a step hook cannot be pickled; this sets it there), its warm-up
    ``warmup_s`` long (as compiling for a GPU is)."""
    from fimtune.serve.engine import load_engine

    engine, prompter, mode = load_engine(str(run), adapters or [], Limits(**{**TEST_LIMITS, **limits}), "auto")
    if step_s:
        engine.decoder.step_hook = functools.partial(time.sleep, step_s)
    if warmup_s:
        warm_up = engine._warm_up

        def slow_warm_up() -> None:
            time.sleep(warmup_s)
            warm_up()

        engine._warm_up = slow_warm_up
    return engine, prompter, mode


def make_process_app(
    run: Path, adapters: list[str] | None = None, step_s: float = 0.0, warmup_s: float = 0.0, **limits
):
    """``make_app``, with the model in a process of its own (`fimtune serve --engine-process`)."""
    from fimtune.serve.app import create_app
    from fimtune.serve.process import EngineProcess

    factory = functools.partial(engine_for_process, run, adapters, step_s, limits, warmup_s)
    engine = EngineProcess(factory, Limits(**{**TEST_LIMITS, **limits}), threads=1)
    prompter, mode = engine.launch()
    return create_app(engine, prompter, mode)


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on an ephemeral loopback port; yield its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(STARTUP_POLLS):
        if server.started or not thread.is_alive():
            break
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def sse_events(response: httpx.Response) -> list[dict | str]:
    """The `data:` payloads of a server-sent-event stream (JSON decoded, `[DONE]` kept as text)."""
    out: list[dict | str] = []
    for line in response.iter_lines():
        if line.startswith("data:"):
            payload = line[len("data:") :].strip()
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def error_field(body: dict) -> str | None:
    """The field an error names, in either error shape (TGI or OpenAI)."""
    err = body["error"]
    return err["param"] if isinstance(err, dict) else body["field"]


def wait_until(condition, timeout_s: float = 30.0, delay: float = 0.01) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout_s`` (a bound for a slow, busy machine:
    a condition met returns at once)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached in {timeout_s:g} s")
        time.sleep(delay)


def abandon(url: str, pool, body: dict, n: int = 2, path: str = "/generate") -> None:
    """``n`` requests whose clients give up after 0.3 s (an editor cancelling at each keystroke)."""
    with httpx.Client(base_url=url, timeout=0.3) as hasty:
        for gone in [pool.submit(hasty.post, path, json=body) for _ in range(n)]:
            with pytest.raises(httpx.ReadTimeout):
                gone.result()
