"""What a thread busy in Python costs the serving engine's worker, by interpreter switch interval.

The engine's worker lets the interpreter lock go while it waits for the model (a CUDA sync, a
kernel on the CPU) and must get it back before it can queue the next step. A thread that runs
Python the while (the event loop parsing requests, a handler building a prompt) keeps it until it
lets go or the switch interval runs out. Here the worker's 32 steps are 1.5 ms waits with the lock
let go (`time.sleep`, as a decoding step of the 1B model on an H200) and a little Python each; the
other thread parses a request body and formats strings in a loop. Printed for each interval: the
worker's 32 steps alone and beside that thread (median of 7), and that thread's iterations a second.

    .venv/bin/python benchmarks/switch_interval.py [--intervals-ms 5,1,0.5,0.2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

BODY = json.dumps({"prompt": "x = 1\n" * 1800, "suffix": "y\n" * 500, "max_tokens": 32})
STEPS, STEP_S = 32, 0.0015


def worker_steps() -> float:
    began = time.perf_counter()
    for _ in range(STEPS):
        time.sleep(STEP_S)  # waiting for the model, the lock let go
        sum(range(300))  # the host's share of a step
    return time.perf_counter() - began


def measure(interval_s: float) -> tuple[float, float, float]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    try:
        alone = statistics.median(worker_steps() for _ in range(5))
        stop, done = threading.Event(), [0]

        def busy() -> None:
            while not stop.is_set():
                json.loads(BODY)
                [str(i) for i in range(2000)]
                done[0] += 1

        thread = threading.Thread(target=busy)
        thread.start()
        time.sleep(0.1)
        start_done, began = done[0], time.perf_counter()
        beside = statistics.median(worker_steps() for _ in range(7))
        rate = (done[0] - start_done) / (time.perf_counter() - began)
        stop.set()
        thread.join()
        return alone, beside, rate
    finally:
        sys.setswitchinterval(before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--intervals-ms", type=lambda t: [float(x) for x in t.split(",") if x], default=[5.0, 1.0, 0.5, 0.2]
    )
    args = parser.parse_args()
    print(f"{STEPS} worker steps of {STEP_S * 1000:g} ms (Python {sys.version.split()[0]})")
    print(f"{'switch interval':>16} {'alone ms':>9} {'beside a busy thread ms':>24} {'its work /s':>12}")
    for ms in args.intervals_ms:
        alone, beside, rate = measure(ms / 1000)
        print(f"{ms:>13g} ms {alone * 1000:>9.0f} {beside * 1000:>24.0f} {rate:>12.0f}")


if __name__ == "__main__":
    main()
