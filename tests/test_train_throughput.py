"""The training benchmark runs end to end on a tiny shape (on a GPU it measures the real one)."""

import json
import subprocess
import sys
from pathlib import Path

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
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/train_throughput.py",
            "--shape",
            "tiny",
            "--length",
            "64",
            "--warmup",
            "1",
            "--steps",
            "1",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    res = report["results"]
    assert list(res) == benchmark_variants()  # every variant, in order
    assert "needs a CUDA GPU" in res["qlora"]["skipped"]
    for name, r in res.items():
        if name != "qlora":
            assert r["tokens_per_s"] > 0 and r["last_loss"] > 0, name
    # fimtune's loss path (attention, loss) agrees with plain transformers on the same batch.
    assert res["c"]["check"]["rel_diff"] < 1e-4
    assert "(c)/(a)" in proc.stdout and "(c)/(b)" in proc.stdout
