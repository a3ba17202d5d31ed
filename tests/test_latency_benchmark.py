"""The GPU latency benchmark's code runs end to end on a tiny shape on the CPU (on a GPU it measures the 1B one)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runs import run_script

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_gpu_latency_benchmark_runs_on_a_tiny_shape(tmp_path):
    out = tmp_path / "latency.json"
    run_script(
        "benchmarks/latency.py", "--device", "cpu", "--shape", "tiny", "--budget-s", "150",
        "--batch-wait-variants", "", "--graphs", "trees,trees+eager-prefill,trees+prefill", "--json", str(out),
        "--passes", "2", "--requests-per-client", "4",
        "--profile-step", str(tmp_path / "profile"), "--profile-prefill", str(tmp_path / "profile"),
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert not report["errors"], report["errors"]
    rows = {r["scenario"]: r for r in report["rows"]}
    plain = rows["generate (plain)"]
    # The fast path (compiled here with the eager backend), its single prompts prefilled padded to
    # a length bucket (uncaptured here), eagerly, or by a compiled prefill, generates what plain
    # `generate` does.
    for variant in ("trees", "trees+eager-prefill", "trees+prefill"):
        engine = rows[f"engine (CUDA graphs, {variant})"]
        assert engine["new_tokens_mean"] == plain["new_tokens_mean"] == 32
        assert engine["same_tokens_as_generate"] == 32
        assert rows[f"engine b1: prefill/step, {variant}"]["prefill_ms"] > 0
        assert engine["fast_path_batches"] == 23  # 3 warm-up runs and 20 timed, each through the fast path
        assert engine["bucketed_prefills"] == (23 if variant == "trees" else 0)
    warm = rows["engine warm-up, trees"]  # the server's default attention: each bucket's fastest, timed
    assert set(warm["decode_attention"]) == {"1", "4", "16"} and not warm["attention_errors"]
    assert all(set(warm["attention_ms"][size]) == {"sdpa", "matmul", "grouped"} for size in ("1", "4", "16"))
    for size in (1, 16):  # the first variant's steps under the profiler: operators on a CPU
        profiled = rows[f"profile b{size}: one step, trees"]
        assert profiled["per_step"] > 10 and 0 < profiled["busy_ms"] <= profiled["wall_ms"]
        assert "aten::mm" in Path(profiled["table"]).read_text()
    # the prompt's prefill alone (its length bucket's padded forward, uncaptured here), after the server rows
    (prefill,) = [r for name, r in rows.items() if name.startswith("profile prefill of ")]
    assert prefill["per_step"] > 10 and 0 < prefill["busy_ms"] <= prefill["wall_ms"]
    assert 0 <= prefill["small_ms"] <= prefill["busy_ms"] and prefill["small_per_step"] <= prefill["per_step"]
    assert list(rows).index(prefill["scenario"]) > list(rows).index(next(n for n in rows if n.startswith("server")))
    assert "aten::mm" in Path(prefill["table"]).read_text() or "aten::addmm" in Path(prefill["table"]).read_text()
    everything = [r for name, r in rows.items() if name.startswith("server 16")]  # the first variant's
    assert all(r["errors"] == 0 and r["requests"] == 64 for r in everything)
    assert all(0 < r["prefill_s"] < r["busy_s"] and 0 <= r["device_wait_s"] < r["busy_s"] for r in everything)
    # a first round of the defaults, reported apart; then the compared rows twice, the second pass in
    # reverse order and without the engine in a process of its own
    first, served, again = everything[0], everything[1:9], everything[9:]
    assert first["label"] == "first round" and first["continuous_batching"] and first["overlap_joins"]
    assert [r["label"] for r in served] == ["pass 1"] * 8 and [r["label"] for r in again] == ["pass 2"] * 6
    setting = ("continuous_batching", "overlap_joins", "join_min_rows", "batch_max_wait_ms")
    in_line = [tuple(r[k] for k in setting) for r in served if not r["engine_process"]]
    assert [tuple(r[k] for k in setting) for r in again] == in_line[::-1]
    # each in-process row counts its eager prefills (on a CPU every prompt's), by whether the shape
    # (rows, width) was new; the first round meets the first shapes
    counted = [r for r in everything if not r["engine_process"]]
    assert all("eager_prefills" not in r for r in everything if r["engine_process"])
    assert all(sum(k["calls"] for k in r["eager_prefills"].values()) > 0 for r in counted)
    assert first["eager_prefills"]["new_shape"]["calls"] > 0
    assert sum(r["eager_prefills"]["seen_shape"]["calls"] for r in counted) > 0
    # the defaults (rows join, one joining alone prefilled beside the steps, a fixed 2 ms wait); every
    # join stalling the batch; rows joining 4 at a time, then that stalling the batch; the defaults with
    # the engine in a process of its own (its counters read through the pipe), then its joins stalling
    # the batch (set there, through the pipe); each batch to its end; each batch to its end with
    # batching that waits while requests arrive; on a CPU the prompts are tokenized on the event loop
    # in all; the clients are a process of their own
    assert [r["engine_process"] for r in served] == [False] * 4 + [True, True] + [False] * 2
    assert all(served[i]["joined"] > 0 and served[i]["batches"] > 0 for i in (4, 5))
    assert all(0 < r["joins"] <= r["joined"] if r["joined"] else r["joins"] == 0 for r in served)
    assert served[4]["cuda_graphs_active"]
    assert [r["continuous_batching"] for r in served] == [True] * 6 + [False] * 2
    assert served[6]["joined"] == 0
    assert [r["overlap_joins"] for r in served] == [True, False] * 3 + [True, True]
    assert [r["join_min_rows"] for r in served[:4]] == [1, 1, 4, 4]
    waits = [(r["batch_max_wait_ms"], r["tokenize_in_threads"]) for r in (served[0], served[4], served[6], served[7])]
    assert waits == [(0.0, False), (0.0, False), (0.0, False), (50.0, False)]
    assert not any(r["clients_in_process"] for r in served)
    for r in served:  # the answers' timing headers, split: the parts are each the server's, within its total
        split = r["split_ms"]
        assert set(split) == {"validation", "queue", "inference", "total", "outside"}
        assert split["validation"]["p50"] >= 0 and 0 < split["inference"]["p50"] <= split["total"]["p50"]
        assert split["total"]["p50"] <= r["p50_ms"] and split["outside"]["p50"] >= 0


@pytest.mark.slow
def test_engine_process_ab_sends_the_load_to_both_servers_in_turns(tmp_path):
    out = tmp_path / "ab.json"
    run_script(
        "benchmarks/engine_process_ab.py", "--device", "cpu", "--shape", "tiny", "--rounds", "2",
        "--requests-per-client", "2", "--overlap-joins", "--json", str(out),
    )  # fmt: skip
    report = json.loads(out.read_text())
    order = [(r["round"], r["name"]) for r in report["rows"]]
    first = ["thread+overlap", "thread+in-line", "process+overlap", "process+in-line"]
    assert order == [(0, name) for name in first] + [(1, name) for name in first[::-1]]  # reversed every round
    assert all(r["errors"] == 0 and r["runs"] == 32 and r["p50_ms"] > 0 for r in report["rows"])
    assert all(0 < r["split_ms"]["inference"]["p50"] <= r["split_ms"]["total"]["p50"] for r in report["rows"])
    assert set(report["summary"]) == set(first) and report["ready_s"]["process"] > 0


@pytest.mark.slow
def test_tokenize_threads_benchmark_sends_the_load_both_ways_in_turns(tmp_path):
    out = tmp_path / "tokenize.json"
    run_script(
        "benchmarks/tokenize_threads.py", "--device", "cpu", "--shape", "tiny", "--rounds", "2",
        "--requests-per-client", "2", "--json", str(out),
    )  # fmt: skip
    report = json.loads(out.read_text())
    # the lock held: a thread beside the tokenizing runs Python about half the time; let go, about all of it
    held, released = (r["python_rate"] for r in report["lock"])
    assert held < 0.75 < released
    assert [(r["round"], r["name"]) for r in report["rows"]] == [
        (0, "held"),
        (0, "released"),
        (1, "released"),
        (1, "held"),
    ]
    assert all(r["errors"] == 0 and r["runs"] == 32 and r["split_ms"]["validation"]["p50"] >= 0 for r in report["rows"])


@pytest.mark.slow
def test_warmup_cache_benchmark_reads_the_first_starts_graphs_at_the_second(tmp_path):
    out = tmp_path / "starts.json"
    run_script("benchmarks/warmup_cache.py", "--device", "cpu", "--shape", "tiny", "--json", str(out))
    starts = json.loads(out.read_text())["starts"]
    assert [s["fx_graph_cache"] for s in starts] == [{"miss": 3}, {"hit": 3}]  # a graph per batch bucket
    assert all(s["warmup_s"] > 0 for s in starts)


def test_switch_interval_benchmark_prints_a_row_per_interval():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "switch_interval.py"), "--intervals-ms", "5,0.5"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.strip().endswith(tuple("0123456789")) and " ms " in line]
    assert [row[0] for row in rows] == ["5", "0.5"]
    assert all(float(row[2]) >= 32 * 1.5 for row in rows)  # 32 waits of 1.5 ms at least, alone


def test_engine_variants_parse():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from latency_gpu import parse_variant
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert parse_variant("trees+cublas") == ("trees", {"cublas"})  # the engine whose batch-of-one steps use cuBLAS
    assert parse_variant("captured+flex+eager-prefill") == ("captured", {"flex", "eager-prefill"})
    with pytest.raises(Exception, match="MODIFIER from eager-prefill, prefill, flex, sdpa, cublas"):
        parse_variant("trees+fast")


def test_server_rows_the_budget_leaves_out_are_reported_as_skipped(tiny_tokenizer):
    """A server row skipped for the budget is in the report's skipped list (JSON and summary), as a
    skipped engine row is: it was only printed, so the JSON lost it without a word."""
    import argparse
    import textwrap
    import time

    from fimtune.generate import FimPrompter
    from tests.tiny import gpt_bigcode

    model = gpt_bigcode(len(tiny_tokenizer), n_positions=2048)
    text = Path(textwrap.__file__).read_text()
    args = argparse.Namespace(
        device="cpu", shape="tiny", no_cuda_graphs=True, clients_in_process=True, requests_per_client=1, passes=1,
        no_engine_process_row=True, batch_wait_variants=[], switch_interval_variants=[],
    )  # fmt: skip
    skipped: list[str] = []
    sys.path.insert(0, str(ROOT / "benchmarks"))  # latency_gpu, and the clients' load_clients
    try:
        import latency_gpu

        s = latency_gpu.Setup(model, tiny_tokenizer, FimPrompter(tiny_tokenizer), [], text, 200, "tiny")
        engine = latency_gpu.make_engine(s, args)
        rows = latency_gpu.server_rows(s, engine, args, time.monotonic(), skipped=skipped)  # the budget spent
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert [r["label"] for r in rows] == ["first round"]  # the first round runs whatever the budget
    assert len(skipped) == 6 and all(name.startswith("server ") for name in skipped), skipped


def test_the_server_rows_time_the_load_from_its_first_request_not_the_client_process_start(tiny_tokenizer):
    """A server row's seconds (its tokens/s, the worker's busy share) are the clients' own, from their
    first request to the last answer: they counted the client process's start-up as the server's."""
    import argparse
    import textwrap
    import time

    from fimtune.generate import FimPrompter
    from fimtune.serve.app import create_app
    from tests.tiny import gpt_bigcode

    model = gpt_bigcode(len(tiny_tokenizer), n_positions=2048)
    text = Path(textwrap.__file__).read_text()
    args = argparse.Namespace(device="cpu", shape="tiny", no_cuda_graphs=True, clients_in_process=False)
    sys.path.insert(0, str(ROOT / "benchmarks"))  # latency_gpu, and the clients' load_clients
    try:
        import latency_gpu

        s = latency_gpu.Setup(model, tiny_tokenizer, FimPrompter(tiny_tokenizer), [], text, 200, "tiny")
        engine = latency_gpu.make_engine(s, args)
        url, server = latency_gpu.serve_in_thread(create_app(engine, s.prompter, "psm"))
        try:
            assert engine.ready.wait(30)
            began = time.perf_counter()
            got = latency_gpu.load(s, url, 2, 2)  # the clients in a process of their own
            around = time.perf_counter() - began
            per_client = argparse.Namespace(**vars(args), requests_per_client=1)
            row = latency_gpu.server_run(s, engine, url, 0.0, per_client, False, "eager")
        finally:
            server.should_exit = True
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert not got.errors and len(got.seconds) == 4
    assert max(got.seconds) <= got.wall_s <= around  # every answer inside the load's time, itself inside the call's
    assert row["errors"] == 0 and row["requests"] == 16 and row["seconds"] >= 1e-3 * row["max_ms"]
