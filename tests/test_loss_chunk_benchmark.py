"""The loss-chunk benchmark runs on a small chunk, and its two ways give one loss and gradient."""

import re

from tests.runs import run_script


def test_eager_and_compiled_chunks_agree_and_are_timed():
    proc = run_script("benchmarks/loss_chunk.py", "--tokens", "64", "--vocab", "500", "--repeats", "1")
    times = [float(t) for t in re.findall(r"\s([\d.]+) ms", proc.stdout)]
    assert len(times) == 2 and all(t > 0 for t in times)
    first, second, largest = re.search(
        r"losses ([\d.]+) / ([\d.]+); gradients' largest difference (\S+)", proc.stdout
    ).groups()
    assert abs(float(first) - float(second)) <= 1e-3 * float(first) and float(largest) < 1e-4
