"""`fimtune eval RUN`: the tuned model against its base on held-out data; writes RUN/eval/.

    fimtune eval runs/mine                                  # loss, infill (200 holes), HumanEval (164)
    fimtune eval runs/mine --tasks infill --holes 60
    fimtune eval runs/mine --limit 20                       # 20 HumanEval problems, 20 loss rows per format

Writes report.json, report.md, PNG plots, infill_samples.jsonl and humaneval_samples.jsonl
(every completion of both models, for reading), and prints the table. The report replaces
an earlier one in the same folder, files of tasks it did not run included.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any

from fimtune.errors import FimtuneError, Terminated

TASKS = ("loss", "infill", "humaneval")
EVAL_DIR = "eval"
SAMPLE_FILES = {  # task -> (its file of completions, the key of its records in the results)
    "infill": ("infill_samples.jsonl", "samples"),
    "humaneval": ("humaneval_samples.jsonl", "samples_detail"),
}


def parse_tasks(text: str) -> list[str]:
    """``"loss,infill"`` -> ``['loss', 'infill']``, in the order given; unknown names are errors.

    >>> parse_tasks("humaneval, loss")
    ['humaneval', 'loss']
    """
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise FimtuneError(f"--tasks {text!r}: choose among {', '.join(TASKS)} (comma-separated)")
    return list(dict.fromkeys(tasks))


def check_args(ns: argparse.Namespace) -> None:
    from fimtune.model import require_run_dir

    require_run_dir(ns.run)
    if {"loss", "infill"} & set(parse_tasks(ns.tasks)):  # their data, before the model loads
        check_run_data(Path(ns.run))
    if "humaneval" in parse_tasks(ns.tasks):  # before the tasks (which may take hours), not after them
        from fimtune.evaluate.humaneval import data_file

        data_file()
    for flag, value in (("--limit", ns.limit), ("--holes", ns.holes), ("--batch-size", ns.batch_size),
                        ("--samples", ns.samples)):  # fmt: skip
        if value is not None and value < 1:
            raise FimtuneError(f"{flag} must be at least 1, got {value}")


def check_run_data(run: Path) -> None:
    """The run's `data.path` is a dataset folder; the error says the path comes from the run's config."""
    from fimtune.config import load_run_config
    from fimtune.dataset import check_folder
    from fimtune.errors import DataError

    cfg = load_run_config(run / "config.yaml")
    if not cfg.data.path:
        return
    try:
        check_folder(Path(cfg.data.path))
    except DataError as e:
        raise DataError(
            f"{e}\n(the run's data, `data.path` in {run / 'config.yaml'}: if the data moved, set its new place there)"
        ) from None


def report_folder(out: Path) -> Path:
    """``out``, created and writable: checked before the tasks (which may take hours), not after them."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FimtuneError(f"cannot create the report folder '{out}' ({e.strerror or e}): pass --out DIR") from None
    if not os.access(out, os.W_OK):
        raise FimtuneError(f"the report folder '{out}' is not writable: pass --out DIR")
    return out


class Progress:
    """A progress bar per task on stderr (tqdm; silent when stderr is not a terminal)."""

    def __init__(self, desc: str, total: int | None) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="item", disable=None, dynamic_ncols=True, leave=False)

    def __call__(self, *args: Any) -> None:
        self.bar.update(args[1] if len(args) >= 2 else 1)

    def close(self) -> None:
        self.bar.close()


def run_loss(ctx: dict[str, Any], ns: argparse.Namespace) -> dict[str, Any]:
    from fimtune.evaluate import loss

    bar = Progress("loss (batches)", None)
    try:
        return loss.evaluate(ctx["model"], ctx["tokenizer"], ctx["cfg"], ns.limit, bar)
    finally:
        bar.close()


def run_infill(ctx: dict[str, Any], ns: argparse.Namespace) -> dict[str, Any]:
    from fimtune.dataset import load_splits
    from fimtune.evaluate import infill

    cfg = ctx["cfg"]
    split = load_splits(cfg.data, cfg.seed)["validation"]
    files = infill.held_out_files(split, cfg.data.text_column)
    if not files:
        raise FimtuneError(f"the validation split of '{cfg.data.path or cfg.data.hf}' holds no usable file for infill")
    bar = Progress("infill (holes, base then tuned)", 2 * ns.holes)
    try:
        return infill.evaluate(ctx["model"], ctx["prompter"], files, ns.holes, cfg.seed, ns.batch_size,
                               infill_mode(cfg), bar)  # fmt: skip
    finally:
        bar.close()


def run_humaneval(ctx: dict[str, Any], ns: argparse.Namespace) -> dict[str, Any]:
    from fimtune.evaluate import humaneval

    cfg = ctx["cfg"]
    n = min(ns.limit or humaneval.N_PROBLEMS, humaneval.N_PROBLEMS)
    bar = Progress("humaneval (samples, base then tuned)", 2 * n * ns.samples)
    try:
        return humaneval.evaluate(ctx["model"], ctx["tokenizer"], ns.limit, ns.samples, ns.batch_size, cfg.seed,
                                  progress=bar)  # fmt: skip
    finally:
        bar.close()


RUNNERS = {"loss": run_loss, "infill": run_infill, "humaneval": run_humaneval}


def infill_mode(cfg: Any) -> str:
    """PSM (the recipe's inference layout) unless the run trained mostly SPM."""
    return "spm" if cfg.fim.fim_rate > 0 and cfg.fim.spm_rate > 0.5 else "psm"


def cpu_threads(current: int) -> int:
    """Torch threads for a CPU run: the cores other work leaves idle (1-minute load average), at least 1.

    Oversubscribed cores make OpenMP threads wait for each other: on this project's 2-core
    machines, with one core busy elsewhere, a SmolLM2 decode step took 29x longer on 2 threads
    than on 1. ``OMP_NUM_THREADS``, when set, wins.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return current
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(current, cores - busy))


def load(run: Path) -> dict[str, Any]:
    import torch

    from fimtune.config import load_run_config
    from fimtune.generate import FimPrompter
    from fimtune.model import load_run

    cfg = load_run_config(run / "config.yaml")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(torch.get_num_threads()))
    # Rows of tokens the run added start random in the base: seed them, so reports repeat.
    torch.manual_seed(cfg.seed)
    loaded = load_run(run, device)
    checkpoint = adapter_checkpoint(run, loaded.adapter)  # the one loaded: a run still training moves `adapter` on
    return {"cfg": cfg, "model": loaded.model, "tokenizer": loaded.tokenizer, "checkpoint": checkpoint,
            "prompter": FimPrompter(loaded.tokenizer),
            "device": str(device) + (f" ({_threads(torch.get_num_threads())})" if device.type == "cpu" else "")}  # fmt: skip


def adapter_checkpoint(run: Path, adapter: Path | None) -> str | None:
    """The checkpoint (``step-000100``) of ``run`` whose adapter folder ``adapter`` is, None for a folder of
    its own: a run still training links a newer one at each save, so the report says which it measured."""
    from fimtune.checkpoint import CHECKPOINTS

    folder = adapter.parent if adapter is not None else None
    return folder.name if folder is not None and folder.parent == (run / CHECKPOINTS).resolve() else None


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def notes(ctx: dict[str, Any]) -> list[str]:
    peft_cfg = next(iter(getattr(ctx["model"], "peft_config", {}).values()), None)
    out = [
        "Intervals are 95%: Wilson for rates (and pass@k of several samples, a mean over the problems); "
        "Newcombe's paired interval for tuned − base of exact match, parse rate and pass@k; "
        "mean ± 1.96 SE for edit similarity; row-level ± 1.96 SE for loss (rows cut from one long file are "
        "not independent: the loss's may be too narrow). tuned − base is "
        "paired (same rows / holes / problems) for every figure but perplexity.",
    ]
    if peft_cfg is not None and (getattr(peft_cfg, "trainable_token_indices", None) or peft_cfg.modules_to_save):
        out.append("The base model has no FIM tokens of its own: the run added them, so the base reads them "
                   "through rows it never trained (drawn near the mean of its known rows, as training started them: FIM "
                   "figures of the base are those of a model that never saw FIM).")  # fmt: skip
    return out


def main(ns: argparse.Namespace) -> int:
    """Evaluate ``ns.run`` on ``ns.tasks``; write the report to ``ns.out`` (default RUN/eval); print the table.

    A task that fails or is interrupted (Ctrl-C, SIGTERM) does not take the finished tasks' figures
    with it: they are written as a report that says which tasks did not finish, and the error says so.
    """
    check_args(ns)
    tasks, run = parse_tasks(ns.tasks), Path(ns.run)
    out = report_folder(Path(ns.out) if ns.out else run / EVAL_DIR)
    t0 = time.perf_counter()
    ctx = load(run)
    load_s = time.perf_counter() - t0
    results: dict[str, Any] = {}
    try:
        for task in tasks:
            print(f"{task}: running", file=sys.stderr, flush=True)
            t = time.perf_counter()
            result = RUNNERS[task](ctx, ns)
            result["wall_s"] = round(time.perf_counter() - t, 2)
            print(f"{task}: done in {result['wall_s']:.1f} s", file=sys.stderr, flush=True)
            results[task] = result  # last: a task in `results` is a finished one (an interrupt may come anywhere)
    except BaseException as e:
        if not results:
            raise
        kept = keep_finished(ns, run, ctx, tasks, results, load_s, out, e)
        if isinstance(e, KeyboardInterrupt):
            raise type(e)(kept) from None
        print(kept, file=sys.stderr, flush=True)
        raise
    write(out, run, make_report(ns, run, ctx, tasks, results, load_s))
    return 0


def keep_finished(
    ns: argparse.Namespace, run: Path, ctx: dict[str, Any], tasks: list[str], results: dict[str, Any],
    load_s: float, out: Path, e: BaseException,
) -> str:  # fmt: skip
    """Write the report of the tasks that finished before ``e`` stopped the eval; say what was kept."""
    unfinished = [t for t in tasks if t not in results]
    report = make_report(ns, run, ctx, tasks, results, load_s)
    report["unfinished"] = unfinished
    report["notes"].append(f"{', '.join(unfinished)} did not finish ({stopped_by(e)}): this report has the "
                           f"figures of {', '.join(results)} alone.")  # fmt: skip
    write(out, run, report)
    return (
        f"the figures of {', '.join(results)} are kept in {out / 'report.json'}; {', '.join(unfinished)} did not finish"
    )


def stopped_by(e: BaseException) -> str:
    """What ended a task, in a few words."""
    if isinstance(e, KeyboardInterrupt):
        return "terminated" if isinstance(e, Terminated) else "interrupted"
    return (str(e).splitlines() or [type(e).__name__])[0]


def make_report(
    ns: argparse.Namespace, run: Path, ctx: dict[str, Any], tasks: list[str], results: dict[str, Any], load_s: float
) -> dict[str, Any]:
    return {
        "run": str(run),
        "base_model": ctx["cfg"].model.name_or_path,
        "checkpoint": ctx["checkpoint"],
        "device": ctx["device"],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "tasks": tasks,
            "limit": ns.limit,
            "holes": ns.holes,
            "batch_size": ns.batch_size,
            "samples": ns.samples,
            "seed": ctx["cfg"].seed,
        },  # fmt: skip
        "load_s": round(load_s, 2),
        "notes": notes(ctx),
        "tasks": results,
    }


def write(out: Path, run: Path, report: dict[str, Any]) -> None:
    """Write ``report`` (its tasks' completions into their sample files) to ``out``; print the table."""
    from fimtune.evaluate.report import format_table, write_report

    results = report["tasks"]
    samples = {name: results[task].pop(key) for task, (name, key) in SAMPLE_FILES.items() if task in results}
    stale = tuple(name for name, _ in SAMPLE_FILES.values() if name not in samples)  # an earlier eval's
    plots = write_report(out, report, run / "metrics.jsonl", samples, stale)
    print(format_table(report))
    print(f"wrote {out / 'report.json'}, {out / 'report.md'} and {len(plots)} plots")
