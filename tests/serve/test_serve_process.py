"""The engine in a process of its own (`fimtune serve --engine-process`): the same answers as in one
process, streaming, the queue bound, cancels, timeouts, `/info` and `/metrics` through the pipe, a
load failure's message, and a server that outlives its engine's process."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serve_helpers import (
    TEST_LIMITS,
    abandon,
    answer,
    error_field,
    make_process_app,
    psm,
    requests_of_many_shapes,
    running,
    sse_events,
    wait_until,
)
from tests.test_readme import served_url

from fimtune.errors import FimtuneError
from fimtune.serve.engine import Limits, load_engine
from fimtune.serve.process import EngineProcess

STEP_S = 0.02  # each forward of the engine's process is this much slower (time for cancels)


@pytest.fixture(scope="module")
def apart(tiny_run, other_adapter):
    """(base URL, EngineProcess) of the tiny run's server, its model in a process of its own."""
    # batching that waits for arrivals: the handlers' arrivals travel through the pipe too
    app = make_process_app(tiny_run, [f"other={other_adapter}"], step_s=STEP_S, queue_size=2, batch_max_wait_ms=20)
    with running(app) as url:
        engine = app.state.service.engine
        assert engine.ready.wait(60)
        yield url, engine


def test_the_answers_are_those_of_the_engine_in_one_process(apart, server):
    calls = requests_of_many_shapes()
    with httpx.Client(base_url=server[0], timeout=30) as here, httpx.Client(base_url=apart[0], timeout=30) as there:
        expected = [answer(here.post(route, json=body).json()) for route, body in calls]
        alone = [answer(there.post(route, json=body).json()) for route, body in calls]
        with ThreadPoolExecutor(2) as pool:  # two at a time: the queue holds 2 here
            together = list(pool.map(lambda call: answer(there.post(call[0], json=call[1]).json()), calls))
    assert sum(map(bool, expected)) >= len(calls) - 1  # text in all but (at most) one cut by its stop string
    assert alone == expected and together == expected
    assert apart[1]._query()["arriving"] == 0  # each arrival ended, with its job or its error


def test_streamed_tokens_are_those_of_the_engine_in_one_process(apart, server):
    body = {"inputs": psm("def mean(v):\n"), "parameters": {"max_new_tokens": 10}}
    streams = []
    for url in (server[0], apart[0]):
        with httpx.Client(base_url=url, timeout=30) as c, c.stream("POST", "/generate_stream", json=body) as r:
            streams.append(sse_events(r))
    here, there = streams
    assert len(there) == 10 and [e["token"] for e in there] == [e["token"] for e in here]
    assert there[-1]["generated_text"] == here[-1]["generated_text"] == "".join(e["token"]["text"] for e in there)


def test_info_and_metrics_come_from_the_engines_process(apart):
    url, engine = apart
    with httpx.Client(base_url=url, timeout=30) as c:
        info = c.get("/info").json()
        assert info["engine_process"] is True and info["model_device_type"] == "cpu"
        assert info["models"] == list(engine.models) and "other" in info["models"]
        assert info["cuda_graphs_active"] is False and info["decode_attention_active"] == {}
        before = engine.snapshot()[0].generated_tokens
        c.post("/generate", json={"inputs": psm("x = "), "parameters": {"max_new_tokens": 7}}).raise_for_status()
        metrics = c.get("/metrics").text
    assert f"fimtune_generated_tokens_total {before + 7}" in metrics  # the tiny model never ends: exactly 7
    assert "fimtune_queue_depth 0" in metrics
    assert engine.alive()


def test_a_full_queue_is_503_counted_by_the_server(apart):
    url, engine = apart
    body = {"inputs": psm("def q():\n"), "parameters": {"max_new_tokens": 3}}
    rejected = engine.snapshot()[1].rejected
    with httpx.Client(base_url=url, timeout=30) as c, ThreadPoolExecutor(2) as pool:
        engine.pause()
        try:
            queued = [pool.submit(c.post, "/generate", json=body) for _ in range(2)]
            wait_until(lambda: engine.queue_depth() == 2)
            third = c.post("/generate", json=body)
        finally:
            engine.resume()
        assert third.status_code == 503 and third.json()["error_type"] == "overloaded"
        assert [f.result().status_code for f in queued] == [200, 200]
    assert engine.queue_depth() == 0 and engine.snapshot()[1].rejected == rejected + 1
    assert engine._query()["arriving"] == 0  # the refused request's arrival ended too


def test_requests_whose_clients_went_away_leave_room_in_a_full_queue_there(apart):
    url, engine = apart
    body = {"inputs": psm("def q():\n"), "parameters": {"max_new_tokens": 3}}
    rejected, cancelled = engine.snapshot()[1].rejected, engine.snapshot()[1].cancelled
    with httpx.Client(base_url=url, timeout=30) as c, ThreadPoolExecutor(2) as pool:
        engine.pause()
        try:
            abandon(url, pool, body)
            wait_until(lambda: engine.queue_depth() == 0)  # cancelled: they no longer count
            live = pool.submit(c.post, "/generate", json=body)
            wait_until(lambda: live.done() or engine.snapshot()[1].cancelled == cancelled + 2)
        finally:
            engine.resume()
        assert live.result().status_code == 200
    assert engine.snapshot()[1].rejected == rejected and engine.queue_depth() == 0


@pytest.mark.parametrize("where", ["server", "apart"])
def test_batching_changed_while_serving_reaches_the_worker(where, request):
    """`set_batching` on the engine in one process, and through the pipe to the engine's process: a
    batch that waits a second for company takes a request sent 0.3 s after the first; with the
    fixtures' waits (2 ms; apart, at most 20 ms while arrivals come) the two are batches of their own."""
    url, engine = request.getfixturevalue(where)
    body = {"inputs": psm("def b():\n"), "parameters": {"max_new_tokens": 3}}
    before = {name: getattr(engine.limits, name) for name in ("batch_wait_ms", "batch_max_wait_ms")}

    def batches_of_two_requests() -> int:
        first = engine.snapshot()[0].batches
        with httpx.Client(base_url=url, timeout=30) as c, ThreadPoolExecutor(2) as pool:
            one = pool.submit(c.post, "/generate", json=body)
            time.sleep(0.3)
            two = pool.submit(c.post, "/generate", json=body)
            assert [one.result().status_code, two.result().status_code] == [200, 200]
        return engine.snapshot()[0].batches - first

    try:
        assert batches_of_two_requests() == 2
        engine.set_batching(batch_wait_ms=1000.0, batch_max_wait_ms=0.0)
        assert engine.limits.batch_wait_ms == 1000.0
        assert batches_of_two_requests() == 1
    finally:
        engine.set_batching(**before)
    assert batches_of_two_requests() == 2
    if where == "apart":  # arrivals counted (batch_max_wait_ms > 0), not counted, counted again: balanced
        assert engine._query()["arriving"] == 0


TIMINGS = ("x-validation-time", "x-queue-time", "x-inference-time")


@pytest.mark.parametrize("where", ["server", "apart"])
def test_timing_headers_split_each_request_into_tokenizing_queue_and_inference(where, request):
    """TGI's timing headers (whole ms) on the engine in one process and in its own: a request sent
    while another key's batch runs waits in the queue for it, and says so (`x-queue-time`); the
    first's inference spans its forwards; the parts add up to `x-total-time`."""
    url, engine = request.getfixturevalue(where)
    if where == "server":  # as slow a forward as the engine's process has
        engine.decoder.step_hook = functools.partial(time.sleep, STEP_S)
        request.addfinalizer(lambda: setattr(engine.decoder, "step_hook", None))
    long = 40  # forwards of >= STEP_S: 0.8 s in which the sampled request is sent and queued
    greedy = {"inputs": psm("def t():\n"), "parameters": {"max_new_tokens": long, "details": True}}
    sampled = {"inputs": psm("def u():\n"), "parameters": {"max_new_tokens": 2, "do_sample": True, "seed": 1}}

    def phases(c: httpx.Client) -> dict[tuple[str, str], float]:  # /metrics' phase histogram: sums and counts
        found = re.findall(r'fimtune_request_phase_seconds_(sum|count)\{phase="(\w+)"\} (\S+)', c.get("/metrics").text)
        return {(kind, phase): float(value) for kind, phase, value in found}

    with httpx.Client(base_url=url, timeout=30) as c, ThreadPoolExecutor(2) as pool:
        before = phases(c)
        forwards = engine.snapshot()[0].forwards
        first = pool.submit(c.post, "/generate", json=greedy)
        wait_until(lambda: engine.snapshot()[0].forwards > forwards)  # the first's batch runs: the sampled one waits
        second = pool.submit(
            c.post, "/generate", json={**sampled, "parameters": {**sampled["parameters"], "details": True}}
        )
        answers = [first.result(), second.result()]
        completion = c.post(
            "/v1/completions", json={"prompt": "x = ", "suffix": "\n", "max_tokens": 3, "temperature": 0}
        )
        infill = c.post("/infill", json={"input_prefix": "y = ", "input_suffix": "", "n_predict": 3, "temperature": 0})
        with c.stream("POST", "/generate_stream", json=sampled) as streamed:
            assert len(sse_events(streamed)) == 2
        after = phases(c)
    for r in [*answers, completion, infill]:
        assert r.status_code == 200, r.text
        parts = [int(r.headers[name]) for name in TIMINGS]
        assert min(parts) >= 0 and sum(parts) <= int(r.headers["x-total-time"]) <= sum(parts) + 2
        new = int(r.headers["x-generated-tokens"])
        assert abs(int(r.headers["x-time-per-token"]) - parts[2] / new) <= 1
    (one, two) = answers
    assert int(one.headers["x-generated-tokens"]) == one.json()["details"]["generated_tokens"] == long
    assert int(one.headers["x-prompt-tokens"]) > 3 and int(completion.headers["x-generated-tokens"]) == 3
    assert int(one.headers["x-inference-time"]) >= long * STEP_S * 1000 * 0.9
    assert int(two.headers["x-queue-time"]) >= 50  # taken once the first's batch ended
    # /metrics: each finished request's phases, streamed ones too (5 here), as the headers say
    for phase, header in zip(("validation", "queue", "inference"), TIMINGS, strict=True):
        assert after["count", phase] == before.get(("count", phase), 0) + 5
        added = after["sum", phase] - before.get(("sum", phase), 0)
        assert added >= sum(int(r.headers[header]) for r in [*answers, completion, infill]) / 1000


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"max_batch_size": 4}, "'max_batch_size' cannot change while the engine serves"),
        ({"overlap_joins": 1}, "overlap_joins=1: expected bool"),
        ({"join_min_rows": 2.5}, "join_min_rows=2.5: expected int >= 1"),
        ({"join_min_rows": 0}, "join_min_rows=0: expected int >= 1"),
        ({"batch_wait_ms": -1.0}, "batch_wait_ms=-1.0: expected float >= 0"),
        ({"switch_interval_ms": 0.0}, "switch_interval_ms=0.0: expected float > 0"),
    ],
)
def test_batching_changes_that_cannot_be_made_are_refused_by_name(server, changes, says):
    engine = server[1]
    before = engine.limits.as_dict()
    with pytest.raises(ValueError, match=re.escape(says)):
        engine.set_batching(**changes)
    assert engine.limits.as_dict() == before


def test_a_client_that_goes_away_cancels_its_generation_there(apart):
    url, engine = apart
    body = {"inputs": psm("def g():\n"), "parameters": {"max_new_tokens": 60}}  # ~60 x STEP_S
    stats, counters = engine.snapshot()
    with httpx.Client(base_url=url, timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/generate", json=body)
    wait_until(lambda: engine.snapshot()[1].cancelled == counters.cancelled + 1)
    with httpx.Client(base_url=url, timeout=30) as c:
        with c.stream("POST", "/generate_stream", json=body) as r:
            next(r.iter_lines())  # the first token arrived; now hang up
        wait_until(lambda: engine.snapshot()[1].cancelled == counters.cancelled + 2)
    assert engine.snapshot()[0].generated_tokens - stats.generated_tokens < 60  # two 60-token jobs cut short


def test_a_failed_load_says_what_loading_in_one_process_says(tmp_path):
    missing = str(tmp_path / "no-such-run")
    with pytest.raises(FimtuneError) as here:
        load_engine(missing, [], Limits(**TEST_LIMITS))
    engine = EngineProcess(functools.partial(load_engine, missing, [], Limits(**TEST_LIMITS)), Limits(**TEST_LIMITS))
    with pytest.raises(FimtuneError) as there:
        engine.launch()
    assert str(there.value) == str(here.value)
    assert not engine.alive() and engine._process.exitcode == 0  # it ended on its own, having said why


def test_timeouts_there_and_a_server_that_outlives_its_engine(tiny_run):
    app = make_process_app(tiny_run, step_s=0.05, timeout_s=1.0)
    engine = app.state.service.engine
    body = {"inputs": psm("def h():\n"), "parameters": {"max_new_tokens": 60}}  # ~3 s > the 1 s timeout
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c, ThreadPoolExecutor(1) as pool:
        r = c.post("/generate", json=body)
        assert r.status_code == 408 and error_field(r.json()) == "timeout_s"
        assert engine.snapshot()[1].timeouts == 1
        forwards = engine.snapshot()[0].forwards
        # greedy: the end tokens' logits are below another's, so it runs all 60 steps (sampled, about 1 in
        # 100 ended at its first token, and its forwards never passed the mark below)
        long = {"prompt": "x", "suffix": "", "max_tokens": 60, "temperature": 0}
        pending = pool.submit(c.post, "/v1/completions", json=long)
        wait_until(lambda: engine.snapshot()[0].forwards > forwards + 1)  # it is generating
        os.kill(engine._process.pid, signal.SIGKILL)  # the out-of-memory killer, a CUDA fault
        lost = pending.result()
        assert lost.status_code == 503 and lost.json()["error"]["type"] == "engine_gone"
        assert "exit code -9" in lost.json()["error"]["message"]
        assert c.get("/health").status_code == 503 and not engine.alive()
        again = c.post("/generate", json={"inputs": psm("y = "), "parameters": {"max_new_tokens": 2}})
        assert again.status_code == 503 and again.json()["error_type"] == "engine_gone"
        # a stream asked for afterwards gets the same 503, not a 200 whose first event is the error
        for path, body in (
            ("/v1/completions", {"prompt": "x", "suffix": "", "max_tokens": 5, "stream": True}),
            ("/generate_stream", {"inputs": psm("y = "), "parameters": {"max_new_tokens": 2}}),
        ):
            streamed = c.post(path, json=body)
            assert streamed.status_code == 503 and "engine_gone" in streamed.text, (path, streamed.text)
        assert c.get("/info").json()["engine_process"] is True  # the last answer, not a hang
        with ThreadPoolExecutor(2) as stoppers:  # the server's shutdown and an at-exit hook, say
            assert list(stoppers.map(lambda _: engine.stop(), range(2))) == [None, None]


def test_a_server_stopped_while_its_engine_warms_up_does_not_wait_for_the_warm_up(tiny_run):
    app = make_process_app(tiny_run, warmup_s=120)  # compiling the 1B model's steps takes minutes on a GPU
    engine = app.state.service.engine
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        health = c.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "warming_up"}
        assert not engine.ready.is_set()
        began = time.monotonic()
    engine.stop()  # the server's shutdown stopped it already: this returns at once
    assert time.monotonic() - began < 10 and not engine.alive()
    assert engine.exitcode == 0  # it ended on its own, not killed


ORPHAN_PARENT = """
import functools, multiprocessing, threading, time
from fimtune.serve.engine import Limits
from fimtune.serve.process import EngineProcess

engine = EngineProcess(functools.partial(time.sleep, 600), Limits())  # a model that takes its time to load
threading.Thread(target=engine.launch, daemon=True).start()
while engine._process is None or engine._process.pid is None:
    time.sleep(0.01)
print(engine._process.pid, flush=True)
time.sleep(600)
"""


def test_an_engine_process_still_loading_ends_when_its_server_is_killed():
    """A server killed while its model loads (SIGKILL; SIGTERM, which it does not catch before it serves)
    leaves no engine process behind, loading on, holding the model's memory."""
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN_PARENT], stdout=subprocess.PIPE, text=True)
    engine_pid = 0
    try:
        engine_pid = int(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        wait_until(lambda: _gone(engine_pid), timeout_s=60, delay=0.1)  # bounds a hang: it loads for 600 s
    finally:
        proc.kill()
        proc.wait(timeout=60)
        if engine_pid and not _gone(engine_pid):
            os.kill(engine_pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie
    except OSError:
        return True


@pytest.mark.slow
def test_fimtune_serve_engine_process_answers_and_stops_with_the_server(tiny_run, server):
    cmd = [sys.executable, "-m", "fimtune", "serve", str(tiny_run), "--engine-process", "--port", "0"]
    cmd += ["--threads", "1", "--max-input-tokens", "200", "--max-new-tokens", "64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    body = {"input_prefix": "def add(a, b):\n", "input_suffix": "\n", "n_predict": 6, "temperature": 0}
    try:
        url, said = served_url(proc)  # `--port 0`: any free port, the one it took said
        wait_until(lambda: proc.poll() is not None or _up(url), timeout_s=120, delay=0.2)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        engines = _children(proc.pid)
        assert engines, "no engine process"
        got = httpx.post(f"{url}/infill", json=body, timeout=60).json()["content"]
        expected = httpx.post(f"{server[0]}/infill", json=body, timeout=60).json()["content"]
        assert got == expected
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # as a service manager stops a service: every process of it
        _, err = proc.communicate(timeout=60)
    # uvicorn shuts down cleanly, then raises the signal again (its exit status says SIGTERM); the
    # engine's process ignored the signal and stopped when the server told it to
    assert proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in err, err[-3000:]
    assert "did not stop in time" not in err and "leaked" not in err, err[-3000:]
    assert "the model in a process of its own" in said
    wait_until(lambda: all(_gone(pid) for pid in engines), delay=0.1)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
