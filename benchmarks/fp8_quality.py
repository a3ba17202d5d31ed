"""What `train.fp8_base` costs in quality: the same run trained twice, its frozen products in the
config's precision and in FP8, each adapter then evaluated as it is served (plain products).

    python benchmarks/fp8_quality.py --data .demo/data                     # SmolLM2-135M on a CPU
    python benchmarks/fp8_quality.py --data .demo/data --steps 40 --limit 24 --holes 40
    python benchmarks/fp8_quality.py --data data/mine --config configs/starcoderbase-1b.yaml train.cuda_graphs=true

Each arm runs `fimtune train --config CONFIG data.path=DATA output_dir=OUT/ARM [train.fp8_base=true]`
(on a CPU the FP8 products go through `torch._scaled_mm` there: slow, but the same rounding), then
`fimtune eval OUT/ARM --tasks loss,infill`. The table puts the arms side by side: the training
loss's last logged window and the last validation loss (both computed with the arm's own products),
then the held-out loss per layout and infill exact match of each adapter served on the plain base
(what `fimtune serve` runs), with 95% intervals; the JSON also has each arm's training seconds (on a
CPU the FP8 products are slower than bf16's: only a GPU's FP8 units make them pay). The FP8 arm's
validation loss at step 0 is the base model's under FP8 products. A trained model is the point:
random weights give near-uniform logits, whose loss FP8 hardly moves (`train_throughput.py`'s `fp8_check`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ARMS = {"plain": [], "fp8": ["train.fp8_base=true"]}


def fimtune(*args: str) -> float:
    """Run a fimtune command (its output passed through); its seconds."""
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fimtune", *args], check=True)
    return time.perf_counter() - began


def logged(records: list[dict], key: str) -> list[tuple[int, float]]:
    """Each logged (step, value) of ``key`` in metrics.jsonl's records."""
    return [(r["step"], r[key]) for r in records if key in r]


def arm_figures(run: Path) -> dict:
    """One arm's figures: from its metrics.jsonl and its evaluation's report.json."""
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    tasks = json.loads((run / "eval" / "report.json").read_text(encoding="utf-8"))["tasks"]
    return {
        "train_loss": logged(records, "loss")[-1],
        "val_start": logged(records, "val_loss")[0],  # before the first step: the base's
        "val_loss": logged(records, "val_loss")[-1],
        "loss": {fmt: r["tuned"]["loss"] for fmt, r in tasks["loss"]["formats"].items()},
        "base_loss": {fmt: r["base"]["loss"] for fmt, r in tasks["loss"]["formats"].items()},
        "exact_match": {kind: r["tuned"]["exact_match"] for kind, r in tasks["infill"]["kinds"].items()},
    }


def estimate(e: dict) -> str:
    lo, hi = e.get("lo"), e.get("hi")
    return f"{e['value']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def table(figures: dict[str, dict]) -> str:
    plain, fp8 = figures["plain"], figures["fp8"]
    rows = [
        "| figure | plain products | FP8 products |",
        "|---|---|---|",
    ]
    for key, name in (
        ("val_start", "validation loss, base"),
        ("train_loss", "training loss, last window"),
        ("val_loss", "validation loss, last"),
    ):
        rows.append(f"| {name} (step {plain[key][0]}) | {plain[key][1]:.4f} | {fp8[key][1]:.4f} |")
    for fmt, e in plain["loss"].items():
        rows.append(f"| held-out {fmt} loss, served plain (base {plain['base_loss'][fmt]['value']:.3f}) | ")
        rows[-1] += f"{estimate(e)} | {estimate(fp8['loss'][fmt])} |"
    for kind, e in plain["exact_match"].items():
        rows.append(
            f"| infill exact match, {kind} (n = {e['n']}) | {estimate(e)} | {estimate(fp8['exact_match'][kind])} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a dataset folder (`fimtune data build`)")
    parser.add_argument("--config", default="configs/smollm2-demo.yaml")
    parser.add_argument("--out", default="runs/fp8-quality", help="the two runs go to OUT/plain and OUT/fp8")
    parser.add_argument("--steps", type=int, help="train.max_steps (default: the config's)")
    parser.add_argument("--limit", type=int, default=24, help="held-out loss rows per layout")
    parser.add_argument("--holes", type=int, default=40, help="infill holes")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for both runs")
    args = parser.parse_args()
    out = Path(args.out)
    figures, seconds = {}, {}
    for arm, extra in ARMS.items():
        run = out / arm
        overrides = [f"data.path={args.data}", f"output_dir={run}", *extra]
        overrides += [f"train.max_steps={args.steps}"] if args.steps else []
        overrides += args.overrides
        seconds[arm] = fimtune("train", "--config", args.config, *overrides)
        fimtune("eval", str(run), "--tasks", "loss,infill", "--limit", str(args.limit), "--holes", str(args.holes))
        figures[arm] = arm_figures(run)
    print(table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "train_s": seconds}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
