"""Concurrency: batching gives each request its own answer, a full queue says 503, gone clients cancel,
timeouts, the event loop stays free, and the KV cache is reused across keystrokes."""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import (
    abandon,
    answer,
    error_field,
    make_app,
    psm,
    requests_of_many_shapes,
    running,
    sse_events,
    wait_until,
)

SLOW_STEP_S = 0.05


@pytest.fixture
def slow(server):
    """Each forward of the server's engine takes SLOW_STEP_S more (restored afterwards)."""
    decoder = server[1].decoder
    decoder.step_hook = lambda: time.sleep(SLOW_STEP_S)
    yield server[1]
    decoder.step_hook = None


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server):
    url, engine = server
    calls = requests_of_many_shapes()
    with httpx.Client(base_url=url, timeout=30) as c:
        alone = [c.post(route, json=body).json() for route, body in calls]
        batches_before = engine.decoder.stats.batches
        engine.pause()  # let every request queue up, then batch them
        try:
            with ThreadPoolExecutor(len(calls)) as pool:
                futures = [pool.submit(c.post, route, json=body) for route, body in calls]
                wait_until(lambda: engine.queue_depth() == len(calls))
                engine.resume()
                together = [f.result().json() for f in futures]
        finally:
            engine.resume()
    assert [answer(r) for r in together] == [answer(r) for r in alone]
    assert engine.decoder.stats.largest_batch >= 5
    # greedy + run adapter, greedy + other adapter: two batches for ten requests
    assert engine.decoder.stats.batches - batches_before == 2


def test_prompts_tokenized_in_threads_give_the_same_answers(tiny_run, other_adapter):
    """On a GPU the handlers tokenize in a thread pool (here switched on by hand): the same answers,
    for requests sent together too, as when the event loop tokenizes them."""
    app = make_app(tiny_run, [f"other={other_adapter}"])
    svc = app.state.service
    calls = requests_of_many_shapes()
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        on_loop = [answer(c.post(route, json=body).json()) for route, body in calls]
        svc.tokenize_in_threads = True
        with ThreadPoolExecutor(len(calls)) as pool:
            futures = [pool.submit(c.post, route, json=body) for route, body in calls]
            in_threads = [answer(f.result().json()) for f in futures]
    assert in_threads == on_loop and sum(bool(a) for a in on_loop) >= len(calls) // 2


def test_a_batch_waits_for_a_request_still_being_tokenized(tiny_run):
    """With `batch_max_wait_ms`, an open arrival (a handler tokenizing a request) holds the next batch,
    so a request queued meanwhile and the one still arriving go together; `batch_max_wait_ms` bounds
    the hold, and by default (0) nothing holds."""
    app = make_app(tiny_run, batch_max_wait_ms=60_000)
    engine = app.state.service.engine
    stats = engine.decoder.stats
    body = {"inputs": psm("x = "), "parameters": {"max_new_tokens": 3}}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c, ThreadPoolExecutor(2) as pool:
        c.post("/generate", json=body)  # warm: the next batches are the ones counted
        batches = stats.batches
        arriving = engine.arrival()  # as a handler does from its read body until its job is queued
        first = pool.submit(c.post, "/generate", json=body)
        wait_until(lambda: engine.queue_depth() == 1)
        time.sleep(0.3)
        assert not first.done() and stats.batches == batches  # held: one is still arriving
        second = pool.submit(c.post, "/generate", json={**body, "inputs": psm("y = ")})
        wait_until(lambda: engine.queue_depth() == 2)
        arriving.done()
        assert first.result().status_code == second.result().status_code == 200
        assert stats.batches == batches + 1 and stats.largest_batch >= 2  # together, in one batch
    for limits in ({"batch_max_wait_ms": 100}, {}):  # the hold ends after 100 ms; off by default
        app = make_app(tiny_run, **limits)
        engine = app.state.service.engine
        with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
            arriving = engine.arrival()  # never queued
            assert c.post("/generate", json=body).status_code == 200
            arriving.done()


def test_the_engine_keeps_its_switch_interval_while_it_runs_and_gives_pythons_back(tiny_run):
    """The worker waits for the model with the interpreter lock let go; the switch interval bounds
    how long a busy thread keeps it from the worker afterwards."""
    python_default = sys.getswitchinterval()
    app = make_app(tiny_run, switch_interval_ms=0.25)
    engine = app.state.service.engine
    body = {"inputs": psm("x = "), "parameters": {"max_new_tokens": 3}}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/generate", json=body).status_code == 200
        assert sys.getswitchinterval() == pytest.approx(0.00025)
        engine.set_batching(switch_interval_ms=1.0)  # a change holds from the next batch
        assert c.post("/generate", json=body).status_code == 200
        assert sys.getswitchinterval() == pytest.approx(0.001)
    assert sys.getswitchinterval() == python_default


def test_a_server_stopped_while_its_engine_warms_up_does_not_wait_for_the_warm_up(tiny_run):
    """A Ctrl-C while the engine compiles its GPU graphs (minutes) ends the server at once, as with the
    engine in a process of its own: its process is about to end, and the worker is a daemon thread."""
    app = make_app(tiny_run, timeout_s=600.0)
    engine = app.state.service.engine
    compiled, stopped = threading.Event(), threading.Event()
    warm_up, stop = engine._warm_up, engine.stop

    def slow_warm_up() -> None:
        compiled.wait(600)
        warm_up()

    def stop_and_tell(**kwargs) -> None:
        stop(**kwargs)
        stopped.set()

    engine._warm_up, engine.stop = slow_warm_up, stop_and_tell
    try:
        with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/health").json() == {"status": "warming_up"}
        assert stopped.wait(60)  # bounds a hang: the server's shutdown waited for the warm-up (timeout_s)
    finally:
        compiled.set()
        engine._thread.join(60)


def test_full_queue_answers_503_with_retry_after(tiny_run):
    app = make_app(tiny_run, queue_size=1)
    engine = app.state.service.engine
    body = {"inputs": psm("x = "), "parameters": {"max_new_tokens": 3}}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c, ThreadPoolExecutor(1) as pool:
        engine.pause()
        first = pool.submit(c.post, "/generate", json=body)
        wait_until(lambda: engine.queue_depth() == 1)
        second = c.post("/generate", json=body)
        oa = c.post("/v1/completions", json={"prompt": "x", "suffix": ""})
        engine.resume()
        assert second.status_code == 503 and second.headers["retry-after"] == "1"
        assert second.json()["error_type"] == "overloaded"
        assert oa.status_code == 503 and "busy" in oa.json()["error"]["message"]
        assert first.result().status_code == 200
        assert "fimtune_rejected_total 2" in c.get("/metrics").text


def test_requests_whose_clients_went_away_leave_room_in_a_full_queue(tiny_run):
    """An editor cancels its request at each keystroke: while the worker is busy those wait in the
    queue, and must not have the next (live) request refused with 503."""
    app = make_app(tiny_run, queue_size=2)
    engine = app.state.service.engine
    body = {"inputs": psm("x = "), "parameters": {"max_new_tokens": 3}}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c, ThreadPoolExecutor(2) as pool:
        engine.pause()
        try:
            abandon(url, pool, body)
            wait_until(lambda: len(engine._queue) == 2 and all(job.cancelled() for job in engine._queue))
            assert "fimtune_queue_depth 0" in c.get("/metrics").text  # it counts requests still waited for
            live = pool.submit(c.post, "/generate", json=body)
            wait_until(lambda: live.done() or engine.counters.cancelled == 2)
        finally:
            engine.resume()
        assert live.result().status_code == 200
        assert engine.counters.rejected == 0 and engine.counters.cancelled == 2 and engine.queue_depth() == 0


def test_timeout_is_408_naming_timeout_s(tiny_run):
    app = make_app(tiny_run, timeout_s=0.5)
    app.state.service.engine.decoder.step_hook = lambda: time.sleep(SLOW_STEP_S)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/generate", json={"inputs": psm("x = "), "parameters": {"max_new_tokens": 60}})
        assert r.status_code == 408 and error_field(r.json()) == "timeout_s"
        assert r.headers["x-should-retry"] == "false"  # the OpenAI clients retry a 408 twice unless told not to
        assert app.state.service.engine.counters.timeouts == 1


def test_a_request_that_timed_out_waiting_in_the_queue_counts_as_a_timeout(tiny_run):
    """Behind a busy worker (here: paused) the handler gives up on its own: the client's 408 is a
    timeout in `/metrics` too, not a cancel (a client gone)."""
    app = make_app(tiny_run, timeout_s=0.3)
    engine = app.state.service.engine
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        engine.pause()
        try:
            r = c.post("/generate", json={"inputs": psm("x = "), "parameters": {"max_new_tokens": 3}})
        finally:
            engine.resume()
        assert r.status_code == 408
        wait_until(lambda: engine.counters.timeouts + engine.counters.cancelled == 1)
        assert engine.counters.timeouts == 1 and engine.counters.cancelled == 0


def test_a_client_that_goes_away_cancels_its_generation(server, slow):
    url, engine = server
    body = {"inputs": psm("def g():\n"), "parameters": {"max_new_tokens": 60}}
    cancelled, generated = engine.counters.cancelled, engine.decoder.stats.generated_tokens
    with httpx.Client(base_url=url, timeout=0.4) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/generate", json=body)
    wait_until(lambda: engine.counters.cancelled == cancelled + 1)
    with httpx.Client(base_url=url, timeout=30) as c:
        with c.stream("POST", "/generate_stream", json=body) as r:
            next(r.iter_lines())  # the first token arrived; now hang up
        wait_until(lambda: engine.counters.cancelled == cancelled + 2)
    assert engine.decoder.stats.generated_tokens - generated < 60  # two 60-token jobs were cut short


def test_a_short_request_is_answered_when_it_ends_not_when_its_batch_does(server, slow):
    """Batched with a long request (the eager path, as on a CPU), a short one's answer comes as soon as
    its own tokens are done: waiting for the long one would also run it past its timeout."""
    url, engine = server
    short = {"inputs": psm("def s():\n"), "parameters": {"max_new_tokens": 2}}
    long = {"inputs": psm("def l():\n"), "parameters": {"max_new_tokens": 60}}  # ~60 x SLOW_STEP_S
    with httpx.Client(base_url=url, timeout=30) as c, ThreadPoolExecutor(2) as pool:
        engine.pause()
        try:
            futures = [pool.submit(c.post, "/generate", json=body) for body in (long, short)]
            wait_until(lambda: engine.queue_depth() == 2)
        finally:
            engine.resume()
        wait_until(lambda: futures[1].done())
        assert not futures[0].done()  # the long one goes on, alone
        assert futures[1].result().status_code == 200 and futures[0].result().status_code == 200


def test_generation_does_not_block_the_event_loop(server):
    """The worker is held inside a forward (its step hook waits) until /health and /info have
    answered: were generation on the event loop, they could not (the client would time out)."""
    url, engine = server
    body = {"inputs": psm("def h():\n"), "parameters": {"max_new_tokens": 30}}
    in_forward, answered = threading.Event(), threading.Event()

    def hold() -> None:
        in_forward.set()
        answered.wait(30)

    engine.decoder.step_hook = hold
    try:
        with httpx.Client(base_url=url, timeout=30) as c, ThreadPoolExecutor(1) as pool:
            long = pool.submit(c.post, "/generate", json=body)
            assert in_forward.wait(30)  # generating, and held there
            with httpx.Client(base_url=url, timeout=10) as other:
                assert other.get("/health").status_code == 200 and other.get("/info").status_code == 200
            assert not long.done()  # still held: they were answered while it generated
            answered.set()
            assert long.result().status_code == 200
    finally:
        answered.set()
        engine.decoder.step_hook = None


def test_keystrokes_reuse_the_kv_cache_and_answer_as_without(client, server):
    """An editor's requests as a person types: each answer as from a fresh cache, few tokens fed."""
    engine = server[1]
    source = (
        "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n"
    )
    suffix = "\n\nprint(mean([1, 2, 3]))\n"
    cursor = 40
    texts, fed = [], []
    for step in range(6):
        prefix = source[: cursor + 3 * step]
        body = {"inputs": psm(prefix, suffix), "parameters": {"max_new_tokens": 5}}
        before = engine.decoder.stats.fed_tokens
        texts.append(client.post("/generate", json=body).json()["generated_text"])
        fed.append(engine.decoder.stats.fed_tokens - before)
    engine.decoder.caches.clear()
    for step in range(6):  # the same requests, each on an empty cache
        prefix = source[: cursor + 3 * step]
        body = {"inputs": psm(prefix, suffix), "parameters": {"max_new_tokens": 5}}
        assert client.post("/generate", json=body).json()["generated_text"] == texts[step]
        engine.decoder.caches.clear()
    assert max(fed[1:]) <= 6 < fed[0]  # after the first request, only the few typed tokens are fed


def test_infill_timings_split_at_the_first_token(server, slow):
    """llama.vim shows its info line (the prompt's and the prediction's tokens, ms and tokens/s) only
    when all six are answered: each is, streamed or not, and the prediction's time spans the forwards
    after the first token's (each takes SLOW_STEP_S more here; a greedy one may take several tokens)."""
    url, engine = server
    timings = [f"timings/{part}_{what}" for part in ("prompt", "predicted") for what in ("n", "ms", "per_second")]
    body = {"input_prefix": "def f(x):\n", "n_predict": 6, "temperature": 0, "response_fields": ["content", *timings]}
    answers = []
    with httpx.Client(base_url=url, timeout=30) as c:
        for stream in (False, True):
            before = engine.decoder.stats.forwards
            if stream:
                with c.stream("POST", "/infill", json={**body, "stream": True}) as r:
                    out = sse_events(r)[-1]
            else:
                out = c.post("/infill", json=body).json()
            answers.append((out, engine.decoder.stats.forwards - before))
    for out, forwards in answers:
        assert set(out) == {"content", *timings}, out
        n, ms = out["timings/predicted_n"], out["timings/predicted_ms"]
        assert n == 6 and forwards >= 2  # greedy never ends early here
        # the prompt's forward and the next (queued before the first token is read) aside; 0.9: rounding
        assert ms >= 0.9 * (forwards - 2) * SLOW_STEP_S * 1000
        assert out["timings/predicted_per_second"] == pytest.approx(n * 1000 / ms, rel=1e-3)
        assert out["timings/prompt_n"] > 0 and out["timings/prompt_ms"] >= 0.9 * SLOW_STEP_S * 1000
