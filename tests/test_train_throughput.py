"""The training benchmark runs end to end on a tiny shape (on a GPU it measures the real one)."""

import json
import sys
from pathlib import Path

from tests.runs import run_script

ROOT = Path(__file__).parents[1]


def benchmark_variants() -> list[str]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from train_throughput import ALL
    finally:
        sys.path.pop(0)
    return list(ALL)


def test_train_throughput_benchmark_runs_every_variant_on_a_tiny_shape(tmp_path):
    out = tmp_path / "train.json"
    proc = run_script(
        "benchmarks/train_throughput.py", "--shape", "tiny", "--length", "64", "--warmup", "1", "--steps", "1",
        "--json", str(out), env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )  # fmt: skip
    report = json.loads(out.read_text())
    res = report["results"]
    assert list(res) == benchmark_variants()  # every variant, in order
    gpu_only = ("qlora", "c-graphs", "c-graphs-mem", "c-graphs-fp8", "c-graphs-fp8-mem")
    assert all("needs a CUDA GPU" in res[name]["skipped"] for name in gpu_only)
    for name, r in res.items():
        if name not in gpu_only:
            assert r["tokens_per_s"] > 0 and r["last_loss"] > 0, name
    # fimtune's loss path (attention, loss) agrees with plain transformers on the same batch.
    assert res["c"]["check"]["rel_diff"] < 1e-4
    assert "(c)/(a)" in proc.stdout and "(c)/(b)" in proc.stdout


def test_each_step_is_timed_once_whether_it_waits_for_its_end_or_not():
    """A plain loop's step returns once it ended; fimtune's returns a reader of its loss, read once
    the next step is queued. Either way each of the timed steps counts once, end to end: a plain
    loop's last interval was ~0 (its end read again after the loop), biasing the median down; so
    was a queued step's where the host set the pace (its end read with no step queued after it)."""
    import argparse
    import doctest
    import time

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import train_throughput
    finally:
        sys.path.pop(0)
    args = argparse.Namespace(warmup=1, steps=4, batch=1, length=1, shape="tiny")

    def plain():
        time.sleep(0.02)
        return 1.0

    ends: list[float] = []

    def queued():  # a device that runs each step 20 ms after the one before; the host only queues it
        end = max(time.perf_counter(), ends[-1] if ends else 0.0) + 0.02
        ends.append(end)
        return lambda: (time.sleep(max(0.0, end - time.perf_counter())), 1.0)[1:]

    def host_bound():  # a step the host takes 20 ms to queue, whose device work ends as it is queued
        time.sleep(0.02)
        return lambda: (1.0,)

    for step in (plain, queued, host_bound):
        out = train_throughput.timed(step, args, torch.device("cpu"))
        assert out["step_ms_min"] > 15 and out["step_ms"] < 60, (step.__name__, out)
    assert doctest.testmod(train_throughput).failed == 0  # the 1B's FLOPs a token


def test_rows_of_several_documents_count_attention_inside_each():
    """c-docs's varlen kernels attend inside each document: its TFLOP/s counts that, not whole rows."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import train_throughput as tt
    finally:
        sys.path.pop(0)
    config = tt.model_config("starcoderbase-1b")
    one = next(tt.batches(512, 4, 2048, torch.device("cpu"), docs=False))
    assert tt.flop_per_token(config, 2048, tt.attention_context([one])) == tt.flop_per_token(config, 2048)
    rows = tt.batches(512, 4, 2048, torch.device("cpu"), docs=True)
    docs = tt.attention_context([next(rows) for _ in range(8)])
    assert 300 < docs < 600  # log-normal documents, median ~400 tokens: far less than half a row
    assert tt.flop_per_token(config, 2048, docs) < 0.95 * tt.flop_per_token(config, 2048)


def test_a_variant_the_process_ends_in_is_marked_unfinished_in_the_json(tmp_path, monkeypatch):
    """gpu_check.sh runs the benchmark under `timeout`: a variant it ends is in the JSON as unfinished,
    beside the figures of those before it (it was missing, as if it had never been asked for)."""
    import pytest

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import train_throughput as tt
    finally:
        sys.path.pop(0)
    measure = tt.run_variant

    def run_variant(name, args, device):
        if name == "a":
            raise KeyboardInterrupt  # as the process ends: SIGTERM, SIGKILL
        return measure(name, args, device)

    monkeypatch.setattr(tt, "run_variant", run_variant)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "train.json"
    argv = ["--shape", "tiny", "--length", "16", "--warmup", "1", "--steps", "1", "--variants", "b,a,c"]
    with pytest.raises(KeyboardInterrupt):
        tt.main([*argv, "--json", str(out)])
    res = json.loads(out.read_text())["results"]
    assert list(res) == ["b", "a"] and res["b"]["tokens_per_s"] > 0
    assert "tokens_per_s" not in res["a"] and "unfinished" in res["a"]["error"]


def test_two_micro_batches_of_an_odd_batch_are_refused_not_counted_as_the_whole_batch(tmp_path):
    """c-mb2 trains two micro-batches of half the rows: of 3 rows that is 2 a step, and tokens/s
    counted 3 (1.5x the tokens trained). An odd --batch is its error, no figure."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import train_throughput as tt
    finally:
        sys.path.pop(0)
    out = tmp_path / "train.json"
    argv = ["--shape", "tiny", "--length", "16", "--warmup", "1", "--steps", "1", "--batch", "3"]
    tt.main([*argv, "--variants", "c-mb2", "--json", str(out)])
    res = json.loads(out.read_text())["results"]["c-mb2"]
    assert "tokens_per_s" not in res and "--batch 3" in res["error"]
