"""The loss-chunk benchmark runs on a small chunk, and its two ways give one loss and gradient."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_eager_and_compiled_chunks_agree_and_are_timed():
    proc = subprocess.run(
        [sys.executable, "benchmarks/loss_chunk.py", "--tokens", "64", "--vocab", "500", "--repeats", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    times = [float(t) for t in re.findall(r"\s([\d.]+) ms", proc.stdout)]
    assert len(times) == 2 and all(t > 0 for t in times)
    first, second, largest = re.search(
        r"losses ([\d.]+) / ([\d.]+); gradients' largest difference (\S+)", proc.stdout
    ).groups()
    assert abs(float(first) - float(second)) <= 1e-3 * float(first) and float(largest) < 1e-4
