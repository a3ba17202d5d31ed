"""The evaluation report: report.json, report.md, PNG plots and the table printed by `fimtune eval`.

Every figure carries its sample count ``n`` (rows for loss, holes for infill, problems for
HumanEval) and a 95% interval; each task records its wall time. Plots (matplotlib, Agg):

    loss_curves.png   training and validation loss by step, from RUN/metrics.jsonl
    loss.png          held-out loss per format, base vs tuned
    infill.png        exact match, edit similarity, parse rate per hole kind, base vs tuned
    humaneval.png     pass@k, base vs tuned
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

REPORT_JSON, REPORT_MD = "report.json", "report.md"
COLORS = {"base": "#9aa5b1", "tuned": "#2f6fde"}
FIGURE_DPI = 110
METRIC_NAMES = {"exact_match": "exact match", "edit_similarity": "edit similarity", "parse_rate": "parse rate"}
UNITS = {"loss": "rows", "infill": "holes", "humaneval": "problems"}
PLOTS = ("loss_curves.png", "loss.png", "infill.png", "humaneval.png")


def fmt_estimate(e: dict[str, Any] | None, signed: bool = False) -> str:
    """``0.512 [0.401, 0.622]``; a value without an interval is printed alone.

    >>> fmt_estimate({"value": 0.5, "lo": 0.2366, "hi": 0.7634, "n": 10})
    '0.500 [0.237, 0.763]'
    >>> fmt_estimate({"value": -0.1, "lo": None, "hi": None, "n": 1}, signed=True)
    '-0.100'
    >>> fmt_estimate({"value": 0.0, "lo": 0.0, "hi": 1.0, "n": 0})
    '-'
    """
    if e is None or e.get("n") == 0:  # nothing measured (e.g. a parse rate with no checkable file)
        return "-"
    num = "{:+.3f}" if signed else "{:.3f}"
    text = num.format(e["value"])
    if e.get("lo") is not None and e.get("hi") is not None:
        text += f" [{num.format(e['lo'])}, {num.format(e['hi'])}]"
    return text


def table_rows(tasks: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure: task, metric, n, base, tuned, delta (tuned - base; paired where it can be)."""
    rows: list[dict[str, Any]] = []
    if "loss" in tasks:
        for fmt, r in tasks["loss"]["formats"].items():
            rows.append(_row("loss", f"{fmt} loss", r, "loss", r.get("delta", {}).get("loss")))
            rows.append(_row("loss", f"{fmt} perplexity", r, "perplexity", None))
    if "infill" in tasks:
        for kind, r in tasks["infill"]["kinds"].items():
            for metric, name in METRIC_NAMES.items():
                rows.append(_row("infill", f"{kind} {name}", r, metric, r.get("delta", {}).get(metric)))
    if "humaneval" in tasks:
        h = tasks["humaneval"]
        for metric in h["tuned"]:
            rows.append(_row("humaneval", metric, h, metric, h.get("delta", {}).get(metric)))
    return rows


def _row(task: str, metric: str, r: dict[str, Any], key: str, delta: dict[str, Any] | None) -> dict[str, Any]:
    base, tuned = r["base"][key], r["tuned"][key]
    if delta is None:
        delta = {"value": tuned["value"] - base["value"], "lo": None, "hi": None, "n": tuned["n"]}
    return {"task": task, "metric": metric, "n": tuned["n"], "base": base, "tuned": tuned, "delta": delta}


def format_table(report: dict[str, Any]) -> str:
    """The table `fimtune eval` prints: one line per figure, then the wall time of each task."""
    head = ("task", "metric", "n", "base [95% CI]", "tuned [95% CI]", "tuned - base")
    lines = [
        (r["task"], r["metric"], f"{r['n']} {UNITS[r['task']]}", fmt_estimate(r["base"]), fmt_estimate(r["tuned"]),
         fmt_estimate(r["delta"], signed=True))
        for r in table_rows(report["tasks"])
    ]  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
    out = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip() for row in (head, *lines)]
    out.insert(1, "  ".join("-" * w for w in widths))
    times = ", ".join(f"{t} {r['wall_s']:.1f} s" for t, r in report["tasks"].items())
    out.append(f"wall time: model load {report['load_s']:.1f} s, {times}")
    return "\n".join(out)


def markdown(report: dict[str, Any], plots: list[str]) -> str:
    """report.md: the settings, the table, notes and the plots."""
    s = report["settings"]
    lines = [
        f"# Evaluation of `{report['run']}`",
        "",
        f"Base model `{report['base_model']}` with adapters disabled vs the same model tuned"
        + (f" (the adapter of checkpoint {report['checkpoint']})" if report.get("checkpoint") else "")
        + f"; device {report['device']}, {report['created']}.",
        f"Settings: tasks {', '.join(report['tasks'])}; limit {s['limit']}; holes {s['holes']}; "
        f"batch size {s['batch_size']}; samples {s['samples']}; seed {s['seed']}.",
        "",
        "| task | metric | n | base [95% CI] | tuned [95% CI] | tuned − base |",
        "|---|---|---|---|---|---|",
    ]
    for r in table_rows(report["tasks"]):
        lines.append(
            f"| {r['task']} | {r['metric']} | {r['n']} {UNITS[r['task']]} | {fmt_estimate(r['base'])} | "
            f"{fmt_estimate(r['tuned'])} | {fmt_estimate(r['delta'], signed=True)} |"
        )
    lines += ["", "Wall time: " + ", ".join(f"{t} {r['wall_s']:.1f} s" for t, r in report["tasks"].items())
              + f" (model load {report['load_s']:.1f} s).", ""]  # fmt: skip
    lines += [f"- {line}" for line in task_details(report["tasks"])]
    lines += [f"- {note}" for note in report.get("notes", [])]
    lines += ["", *[f"![{p}]({p})" for p in plots], ""]
    return "\n".join(lines)


def task_details(tasks: dict[str, Any]) -> list[str]:
    """One line per task saying what its figures are made of."""
    out = []
    if "loss" in tasks:
        t = tasks["loss"]
        out.append(f"loss: rows of {t['seq_length']} tokens from the validation split, packed as in training; "
                   f"{t['precision']} precision.")  # fmt: skip
    if "infill" in tasks:
        t = tasks["infill"]
        out.append(f"infill: {t['holes']} holes in validation files, {t['mode'].upper()} prompts of a window "
                   "around the hole, greedy.")  # fmt: skip
    if "humaneval" in tasks:
        t = tasks["humaneval"]
        out.append(f"humaneval: {t['problems']} problems x {t['samples']} sample(s), {t['prompt']} prompts, "
                   f"programs run in a sandbox ({t['timeout_s']:g} s timeout each).")  # fmt: skip
    return out


def write_report(
    out: Path,
    report: dict[str, Any],
    metrics_path: Path | None,
    samples: dict[str, list[dict[str, Any]]] | None = None,
    stale: tuple[str, ...] = (),
) -> list[str]:
    """Write report.json, the plots, report.md and ``samples`` (file name -> records) into ``out``;
    return the plot file names.

    Whole or not at all: every file is written into a folder of its own inside ``out`` first, then
    all are moved in (renames), so a failure or an interrupt while writing leaves the earlier report
    as it was. Plots, and the files named in ``stale``, of an earlier report that this one has not
    are removed: they would pass for this one's.
    """
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        for name, records in (samples or {}).items():
            write_jsonl(stage / name, records)
        (stage / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        plots = write_plots(stage, report, metrics_path)
        (stage / REPORT_MD).write_text(markdown(report, plots), encoding="utf-8")
        for path in sorted(stage.iterdir(), key=lambda p: p.name == REPORT_MD):  # report.md, which shows the rest, last
            os.replace(path, out / path.name)
        for name in (set(PLOTS) - set(plots)) | set(stale):
            (out / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return plots


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(out: Path, report: dict[str, Any], metrics_path: Path | None) -> list[str]:
    plots = []
    if metrics_path is not None and metrics_path.is_file() and loss_curves(metrics_path, out / "loss_curves.png"):
        plots.append("loss_curves.png")
    tasks = report["tasks"]
    if "loss" in tasks:
        f = tasks["loss"]["formats"]
        panels = {"held-out loss per token": {fmt: (r["base"]["loss"], r["tuned"]["loss"]) for fmt, r in f.items()}}
        bar_panels(out / "loss.png", "loss: base vs tuned (n = rows)", panels)
        plots.append("loss.png")
    if "infill" in tasks:
        kinds = tasks["infill"]["kinds"]
        panels = {
            name: {k: (r["base"][m], r["tuned"][m]) for k, r in kinds.items()} for m, name in METRIC_NAMES.items()
        }
        bar_panels(out / "infill.png", "infill: base vs tuned (n = holes)", panels, ylim=(0, 1))
        plots.append("infill.png")
    if "humaneval" in tasks:
        h = tasks["humaneval"]
        panels = {"HumanEval": {k: (h["base"][k], h["tuned"][k]) for k in h["tuned"]}}
        bar_panels(out / "humaneval.png", "HumanEval: base vs tuned (n = problems)", panels, ylim=(0, 1))
        plots.append("humaneval.png")
    return plots


def loss_curves(metrics_path: Path, path: Path) -> bool:
    """Training and validation loss by step (a cut last line skipped); False when the log holds neither."""
    from fimtune.train import metrics_records

    records = metrics_records(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"], r.get("val_tokens")) for r in records if "val_loss" in r]
    if not train and not val:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label=f"training (n = {len(train)} logged steps)", color=COLORS["base"])
    if val:
        tokens = val[-1][2]
        label = f"validation (n = {len(val)} evaluations" + (f", {tokens:,} tokens each)" if tokens else ")")
        ax.plot([v[0] for v in val], [v[1] for v in val], "o-", label=label, color=COLORS["tuned"])
    ax.set(xlabel="step", ylabel="loss per token", title="training and validation loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return True


def bar_panels(path: Path, title: str, panels: dict[str, dict[str, tuple]], ylim: tuple | None = None) -> None:
    """One panel per metric: groups of (base, tuned) bars with 95% error bars, labelled with n."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (name, groups) in zip(axes[0], panels.items(), strict=True):
        for j, variant in enumerate(("base", "tuned")):
            ests = [pair[j] for pair in groups.values()]
            xs = [i + (j - 0.5) * 0.38 for i in range(len(groups))]
            vals = [e["value"] if e.get("n") != 0 else float("nan") for e in ests]  # no bar for nothing measured
            errs = [[_below(e) for e in ests], [_above(e) for e in ests]]
            ax.bar(xs, vals, width=0.38, yerr=errs, capsize=3, color=COLORS[variant], label=variant)
        ax.set_xticks(range(len(groups)), [f"{g}\nn={pair[1]['n']}" for g, pair in groups.items()], fontsize=8)
        ax.set_title(name, fontsize=10)
        if ylim:
            ax.set_ylim(*ylim)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)


def _below(e: dict[str, Any]) -> float:
    return 0.0 if e.get("lo") is None else max(0.0, e["value"] - e["lo"])


def _above(e: dict[str, Any]) -> float:
    return 0.0 if e.get("hi") is None else max(0.0, e["hi"] - e["value"])
