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
    gpu_only = ("qlora", "c-graphs", "c-graphs-mem", "c-graphs-fp8")
    assert all("needs a CUDA GPU" in res[name]["skipped"] for name in gpu_only)
    for name, r in res.items():
        if name not in gpu_only:
            assert r["tokens_per_s"] > 0 and r["last_loss"] > 0, name
    # fimtune's loss path (attention, loss) agrees with plain transformers on the same batch.
    assert res["c"]["check"]["rel_diff"] < 1e-4
    assert "(c)/(a)" in proc.stdout and "(c)/(b)" in proc.stdout
