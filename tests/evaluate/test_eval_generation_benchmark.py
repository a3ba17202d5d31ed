"""The benchmark of eval's generation against the server's decoder runs end to end on a tiny run."""

from __future__ import annotations

import json

from tests.runs import run_script


def test_eval_generation_benchmark_runs_on_a_tiny_run(tmp_path, tiny_run):
    out = tmp_path / "eval_generation.json"
    proc = run_script("benchmarks/eval_generation.py", str(tiny_run), "--holes", "6", "--repeats", "1",
                      "--json", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    assert set(report["times"]) == {"generate", "decoder batch", "decoder one"}
    holes = report["holes"]
    assert len(holes) == 6 and {h["kind"] for h in holes} >= {"line", "span"}
    # greedy: the decoder, batched or one row at a time with drafts, writes what `generate` writes
    assert all(h["decoder batch"] == h["generate"] == h["decoder one"] for h in holes), holes
    assert "| generate |" in proc.stdout
