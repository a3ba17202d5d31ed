"""The scale-out check (benchmarks/scaleout_gpu.py): its plan, its reading of failed launches, and its
CPU mode end to end (on a GPU it also launches FSDP and DeepSpeed; see its docstring)."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

from tests.runs import run_script

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "scaleout_gpu.py"


@pytest.fixture(scope="module")
def scaleout():
    spec = importlib.util.spec_from_file_location("scaleout_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_plan_runs_every_engine_against_plain_and_chains_resume_after_stop(scaleout):
    jobs = scaleout.plan_jobs(["plain", "fsdp", "zero2"], ["llama", "gpt_bigcode"], ["fp32", "bf16"])
    names = {j.name for j in jobs}
    assert {
        f"llama-fp32-{e}-{k}" for e in ("plain", "fsdp", "zero2") for k in ("full", "stop", "resume", "ga2")
    } <= names
    # bf16 and GPTBigCode: `full` only; GPTBigCode in fp32 only.
    assert {j.kind for j in jobs if j.precision == "bf16" or j.family == "gpt_bigcode"} == {"full"}
    assert not [j for j in jobs if j.family == "gpt_bigcode" and j.precision == "bf16"]
    by_name = {j.name: j for j in jobs}
    assert by_name["llama-fp32-zero2-resume"].after == "llama-fp32-zero2-stop"
    assert by_name["llama-fp32-zero2-ga2"].after == "llama-fp32-zero2-full"
    assert by_name["llama-fp32-zero2-resume"].run_name == by_name["llama-fp32-zero2-stop"].run_name
    ordered = sorted(jobs, key=lambda j: j.priority)
    assert ordered[0].name == "llama-fp32-plain-stop" and ordered[-1].family == "gpt_bigcode"


def test_several_processes_split_the_global_batch_that_plain_runs_alone(scaleout, tmp_path):
    jobs = {j.name: j for j in scaleout.plan_jobs(["plain", "fsdp", "ddp"], ["llama"], ["fp32"], processes=2)}
    inputs = {"llama": tmp_path / "base", "data": tmp_path / "data"}

    def batch(job):
        args = scaleout.overrides(job, inputs, tmp_path)
        return [a for a in args if a.startswith(("train.batch_size=", "train.gradient_accumulation_steps="))]

    assert batch(jobs["llama-fp32-plain-full"]) == ["train.batch_size=8", "train.gradient_accumulation_steps=1"]
    assert batch(jobs["llama-fp32-fsdp-full"]) == ["train.batch_size=4", "train.gradient_accumulation_steps=1"]
    assert batch(jobs["llama-fp32-fsdp-ga2"]) == ["train.batch_size=2", "train.gradient_accumulation_steps=2"]
    job = jobs["llama-fp32-fsdp-full"]
    args = scaleout.overrides(job, inputs, tmp_path)
    on_cpu = scaleout.command(job, inputs, tmp_path, cuda=False)  # FSDP set up on CPU processes
    assert on_cpu[on_cpu.index("--num_processes") + 1] == "2"
    assert on_cpu[-len(args) - 1 :] == [str(scaleout.ENGINES_ON_CPU), *args]
    assert scaleout.command(job, inputs, tmp_path, cuda=True)[-len(args) - 2 :] == ["-m", "fimtune", *args]
    ddp = scaleout.command(jobs["llama-fp32-ddp-full"], inputs, tmp_path, cuda=False)  # accelerate's gloo DDP
    assert ddp[-len(args) - 2 : -len(args)] == ["-m", "fimtune"]


def test_jobs_that_do_not_fit_the_budget_are_skipped_not_launched(scaleout, tmp_path):
    jobs = scaleout.plan_jobs(["plain", "zero3"], ["llama"], ["fp32"])
    scaleout.schedule(jobs, {}, tmp_path, deadline=time.monotonic() + 5, workers=2)
    assert {j.status for j in jobs} == {"skipped"}
    assert all("budget" in j.note or "did not succeed" in j.note for j in jobs)
    rows = scaleout.compare(jobs, tmp_path)
    assert [r.status for r in rows] == ["skipped", "skipped"]


LAUNCH_LOG = """\
model            /tmp/base-llama (llama, 65,184 parameters)
[rank0]: Traceback (most recent call last):
[rank0]:   File "/work/src/fimtune/train.py", line 100, in setup
[rank0]:     model, optimizer = accelerator.prepare(model, optimizer)
[rank0]: ValueError: When using DeepSpeed, `accelerate.prepare()` requires you to pass at least one of ...
E1126 02:06:44.370000 21587 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1)
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
"""


def test_a_failed_launch_is_summed_up_by_the_worker_error_not_the_launcher_report(scaleout):
    assert scaleout.last_error(LAUNCH_LOG).startswith("ValueError: When using DeepSpeed")
    tail = scaleout.error_tail(LAUNCH_LOG)
    assert "accelerator.prepare" in tail and "ChildFailedError" not in tail
    plain = "Traceback (most recent call last):\n  File 'x'\nKeyError: 0\n"
    assert scaleout.last_error(plain) == "KeyError: 0"


def test_a_rank_that_only_saw_its_peer_go_does_not_hide_the_peers_error(scaleout):
    log = (
        "[rank1]: Traceback (most recent call last):\n"
        "[rank1]: FileNotFoundError: [Errno 2] No such file or directory: 'state'\n"
        "[rank0]: Traceback (most recent call last):\n"
        "[rank0]:   File 'dtensor.py', line 1, in full_tensor\n"
        "[rank0]: RuntimeError: [pair.cc:537] Read error [127.0.0.1]:51410: Connection reset by peer.\n"
    )
    assert scaleout.last_error(log).startswith("FileNotFoundError")
    alone = "RuntimeError: [pair.cc:537] Read error [127.0.0.1]:51410: Connection reset by peer.\n"
    assert scaleout.last_error(alone).startswith("RuntimeError")  # nothing better: the report itself


def test_a_failed_launch_keeps_its_whole_output_in_the_report_folder(scaleout, tmp_path):
    (job,) = [j for j in scaleout.plan_jobs(["plain"], ["llama"], ["fp32"]) if j.kind == "full"]
    inputs = {"llama": tmp_path / "no-such-model", "data": tmp_path / "no-such-data"}
    scaleout.run_job(job, inputs, tmp_path / "work", timeout=120)  # a real launch, which fails at once
    assert job.status == "failed" and "no-such" in job.note
    report = {"settings": {"processes": 1}, "device": "cpu", "tolerances": {"adapter": {}}, "versions": {},
              "elapsed_s": 1, "budget_s": 1}  # fmt: skip
    scaleout.write_report(tmp_path / "out", report, scaleout.compare([job], tmp_path / "work"), [job])
    kept = (tmp_path / "out" / "logs" / f"{job.name}.log").read_text()
    assert kept == job.log.read_text() and "no-such" in kept
    assert job.name in (tmp_path / "out" / "failures.txt").read_text()


@pytest.mark.slow
def test_cpu_mode_runs_plain_and_fsdp_on_two_processes_and_writes_the_table(tmp_path):
    out = tmp_path / "out"
    proc = run_script(
        str(SCRIPT), "--out", str(out), "--families", "llama", "--workers", "2", "--budget-s", "400",
        "--engines", "fsdp", "--processes", "2", env={"OMP_NUM_THREADS": "1", "PATH": "", "HOME": str(tmp_path)},
    )  # fmt: skip
    report = json.loads((out / "scaleout.json").read_text())
    assert report["notes"] == ["no CUDA device: engines on CPU processes (gloo) (fp32)"]
    plain, fsdp = report["rows"]
    for row in (plain, fsdp):
        assert row["status"] == "ok" and row["steps"] == 6
        # Two micro-batches of 2 rows give the losses of one of 4; stop + resume gives the same adapter.
        assert row["ga2_loss_diff"] < 1e-4
        assert row["resume_ok"] and row["resume_adapter_diff"] < 1e-6
    # FSDP2 over 2 processes (4 rows each) against one process (8 rows): the same training.
    assert fsdp["engine"] == "fsdp" and fsdp["loss_diff"] < 1e-5 and fsdp["adapter_vs_plain"] < 1e-5
    assert {(j["engine"], j["kind"]): j["status"] for j in report["launches"]} == {
        (e, k): "ok" for e in ("plain", "fsdp") for k in ("full", "stop", "resume", "ga2")
    }
    table = (out / "scaleout.md").read_text()
    assert (
        "2 process(es)" in table
        and "| fsdp | llama | fp32 | 6 |" in table
        and "| plain | llama | fp32 | 6 |" in proc.stdout
    )
