"""Does fimtune train the same under the shipped accelerate configs as alone? Tiny models.

    python3 benchmarks/scaleout_gpu.py --out /tmp/scaleout --budget-s 170   # a CUDA GPU: every engine
    python3 benchmarks/scaleout_gpu.py --out /tmp/scaleout --processes 8    # 8 GPUs: every engine on 8
    python3 benchmarks/scaleout_gpu.py --out /tmp/scaleout --engines plain  # a CPU: the plain runs (tests)
    python3 benchmarks/scaleout_gpu.py --out /tmp/scaleout --engines fsdp,zero3 --processes 2  # CPU processes

Each engine is `accelerate launch --config_file configs/accelerate/<engine>.yaml --num_processes N
-m fimtune train ...` (ddp, fsdp, deepspeed-zero2, deepspeed-zero3; N = --processes, default 1);
`plain` is `python3 -m fimtune train ...` with the same settings and the same global batch on one
device of the same kind, the reference. Without CUDA the engines run on CPU processes over gloo through
tests/engines_on_cpu.py (FSDP2; DeepSpeed's CPU accelerator, when deepspeed is installed). Per engine,
on a 2-layer random Llama (and GPTBigCode, fp32 only) with LoRA, 6 steps of 4 rows x 64 tokens per
process (plain: 4 x N rows):

    full     runs to the end, with a checkpoint every 2 steps (saving must not disturb training); its
             per-step losses and its adapter are compared with plain's
    stop     `--stop-after 3` (a checkpoint mid-way) ...
    resume   ... then `--resume`: must reach the adapter of `full` (and its losses)
    ga2      2 micro-batches of 2 rows (train.gradient_accumulation_steps=2) against plain's 1 of 4 (x N):
             fimtune normalises by the label tokens of the whole step, so the losses must match

Precisions, the same for an engine and its plain reference:
    fp32     the mechanics: model.dtype=fp32, train.mixed_precision=no, `--mixed_precision no`, SDPA:
             differences are round-off, so tolerances are tight (an optimizer step too many or a
             wrong gradient shows at once)
    bf16     fimtune's GPU defaults (bf16 weights, bf16 autocast, `varlen` attention) with the
             shipped configs' `mixed_precision: bf16`: does it run, and how far the losses drift (a
             loose tolerance); `full` runs only. On a CPU: fp32 weights under bf16 autocast, SDPA
Both compute the loss in chunks of 64 tokens (train.loss_chunk_tokens; several chunks a micro-batch),
as the GPU default does in chunks of 4096; FSDP and ZeRO-3 take the whole logits (the head's weight
is split outside the model's forward), so those runs check the other path.
With several processes GPTBigCode's own dropout is off (processes draw other masks than one process)
and bf16 adapters are compared within 0.1 (DDP's own differs by ~0.05: the batch sums in another order).
torch.compile is off (it costs a minute per launch), except with --compile: bf16 runs then compile each
block as on a GPU by default (train.compile), engines and plain alike.

Launches run concurrently (the models are tiny; a launch is mostly imports), each with its own
timeout, inside --budget-s: what does not fit is skipped and listed. One engine failing stops
only the launches that need its runs. Results: a table on stdout, scaleout.json and scaleout.md
(and the stderr tails of failed launches, failures.txt, with their whole output under logs/) in --out.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CONFIGS = ROOT / "configs" / "accelerate"
ENGINES_ON_CPU = ROOT / "tests" / "engines_on_cpu.py"  # FSDP and DeepSpeed on CPU processes (gloo)
ENGINE_CONFIGS = {
    "ddp": "ddp.yaml",
    "fsdp": "fsdp.yaml",
    "zero2": "deepspeed-zero2.yaml",
    "zero3": "deepspeed-zero3.yaml",
}
ENGINES = ["plain", *ENGINE_CONFIGS]
FAMILIES = ["llama", "gpt_bigcode"]
PRECISIONS = ["fp32", "bf16"]

MAX_STEPS = 6
STOP_AFTER = 3
BATCH_SIZE = 4  # rows per step; ga2 runs 2 micro-batches of BATCH_SIZE // 2
SEQ_LENGTH = 64
LOSS_CHUNK = 64  # tokens per piece of the chunked loss in bf16 runs
# Largest |difference| accepted, per precision: per-step training loss (nats) and adapter weights.
LOSS_TOL = {"fp32": 1e-3, "bf16": 5e-2}
ADAPTER_TOL = {"fp32": 1e-4, "bf16": 2e-2}
# bf16 over several processes: the batch is summed in another order and LoRA's weights move by the
# large learning rate below, so even DDP's adapter ends ~0.05 from plain's (2 CPU processes).
MULTI_PROCESS_ADAPTER_TOL = {"fp32": 1e-4, "bf16": 1e-1}
LAUNCH_TIMEOUT_S = 120  # one launch (imports ~10-20 s, a few tiny steps)
COMPILE_LAUNCH_TIMEOUT_S = 300  # one launch that compiles its blocks
MIN_LAUNCH_S = 30  # a launch is not started with less budget than this left
TAIL_CHARS = 3000  # stderr kept per failed launch
ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b.*:|^error:")
LAUNCHER_ERROR = re.compile(r"ChildFailedError|CalledProcessError")  # the launcher's report of a worker's error
# a rank's error that only says another rank went away (gloo, NCCL)
PEER_GONE = re.compile(r"Connection reset by peer|Connection closed by peer|Broken pipe|communicator was aborted")


# --------------------------------------------------------------------------------------
# Inputs: the test suite's tokenizer, tiny models and corpus (built here: no network)
# --------------------------------------------------------------------------------------


def prepare_inputs(work: Path, families: list[str], dropout: bool = True) -> dict[str, Path]:
    """Model folders (one per family) and the dataset folder under ``work``. ``dropout`` False turns
    GPTBigCode's own dropout (0.1) off: processes draw different masks than one process does."""
    import datasets
    import transformers

    sys.path.insert(0, str(ROOT))
    from tests import tiny
    from tests.conftest import STARCODER_SPECIALS, corpus_texts, train_tiny_tokenizer, write_dataset_dir

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    tok = train_tiny_tokenizer(STARCODER_SPECIALS)
    paths = {}
    for family in families:
        model = {"llama": tiny.llama, "gpt_bigcode": tiny.gpt_bigcode}[family](len(tok))
        if not dropout:
            for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
                if hasattr(model.config, name):
                    setattr(model.config, name, 0.0)
        paths[family] = tiny.save_model_folder(model, tok, work / f"base-{family}")
    texts = corpus_texts(12, lines_per_doc=12)[:10]
    paths["data"] = write_dataset_dir(work / "data", texts * 4, texts[:4])
    return paths


# --------------------------------------------------------------------------------------
# Launches
# --------------------------------------------------------------------------------------


@dataclass
class Job:
    """One `fimtune train` process: an engine, a model family, a precision and a kind of run."""

    engine: str
    family: str
    precision: str
    kind: str  # full | stop | resume | ga2
    processes: int = 1  # the engine's processes; every run's global batch is BATCH_SIZE x this
    after: str | None = None  # a job that must have succeeded first
    priority: float = 0.0  # lower starts first
    status: str = "pending"  # pending | running | ok | failed | timeout | skipped
    seconds: float = 0.0
    note: str = ""
    stderr_tail: str = ""
    log: Path | None = None  # the launch's whole output
    compile: bool = False  # train.compile
    command: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.family}-{self.precision}-{self.engine}-{self.kind}"

    @property
    def run_name(self) -> str:
        """The run folder: `resume` continues the folder of `stop`."""
        kind = "stop" if self.kind == "resume" else self.kind
        return f"{self.family}-{self.precision}-{self.engine}-{kind}"


def overrides(job: Job, inputs: dict[str, Path], work: Path) -> list[str]:
    """`fimtune train` arguments of ``job``: the same settings and global batch for every engine (plain
    runs in one process what an engine splits over ``job.processes``)."""
    batch, accumulate = (BATCH_SIZE // 2, 2) if job.kind == "ga2" else (BATCH_SIZE, 1)
    if job.engine == "plain":
        batch *= job.processes
    args = [
        "train",
        f"model.name_or_path={inputs[job.family]}",
        f"data.path={inputs['data']}",
        f"output_dir={work / 'runs' / job.run_name}",
        f"packing.seq_length={SEQ_LENGTH}",
        f"train.batch_size={batch}",
        f"train.gradient_accumulation_steps={accumulate}",
        f"train.max_steps={MAX_STEPS}",
        "train.learning_rate=2e-2",  # large: a step too many or a wrong gradient moves the loss visibly
        "train.warmup_steps=0",  # the first step already moves the weights
        "train.eval_every=0",  # validation only at the end
        "train.eval_batches=4",
        "train.log_every=1",
        f"train.save_every={2 if job.kind == 'full' else 0}",  # full: checkpoints mid-run and trains on
        f"train.compile={str(job.compile).lower()}",
        "lora.r=8",
        "lora.alpha=16",
        "lora.dropout=0",
    ]
    if job.precision == "fp32":
        args += ["model.dtype=fp32", "train.mixed_precision=no", "model.attn_implementation=sdpa"]
    else:
        args += ["model.dtype=auto", "train.mixed_precision=bf16"]
    # The chunked loss calls the head after the wrapped model's forward (DDP, ZeRO-2; FSDP and ZeRO-3
    # turn it off). 64 tokens: several chunks a micro-batch, where the GPU default of 4096 makes one.
    args += [f"train.loss_chunk_tokens={LOSS_CHUNK}"]
    if job.kind == "stop":
        args += ["--stop-after", str(STOP_AFTER)]
    elif job.kind == "resume":
        args += ["--resume"]
    return [*args, "--debug"]  # tracebacks, not one-line errors


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(job: Job, inputs: dict[str, Path], work: Path, cuda: bool = True) -> list[str]:
    args = ["-m", "fimtune", *overrides(job, inputs, work)]
    if job.engine == "plain":
        return [sys.executable, *args]
    if not cuda and job.engine != "ddp":  # accelerate sets these engines up for GPUs only
        args = [str(ENGINES_ON_CPU), *args[2:]]
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / ENGINE_CONFIGS[job.engine]),
        "--num_processes",
        str(job.processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no" if job.precision == "fp32" else "bf16",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    return [*launch, *args]


def child_env(job: Job, work: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "FIMTUNE_CACHE": str(work / "cache" / job.name),  # token caches are private: no concurrent writers
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def run_job(job: Job, inputs: dict[str, Path], work: Path, timeout: float) -> Job:
    """Run ``job`` in its own process session (a timeout kills the launcher and its workers)."""
    import torch

    job.command = command(job, inputs, work, cuda=torch.cuda.is_available())
    log = job.log = work / "logs" / f"{job.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(
            job.command,
            cwd=ROOT,
            env=child_env(job, work),
            stdout=err,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    job.seconds = time.perf_counter() - t0
    if rc == 0:
        job.status = "ok"
        return job
    job.status = "timeout" if rc is None else "failed"
    text = log.read_text(errors="replace")
    job.note = f"timed out after {timeout:.0f} s" if rc is None else f"exit code {rc}: {last_error(text)}"
    job.stderr_tail = error_tail(text)
    return job


def _worker_lines(text: str) -> list[str]:
    """The lines of the training process: under `accelerate launch` those prefixed `[rankN]: `
    (the launcher's own ChildFailedError report follows them and says nothing more)."""
    lines = text.splitlines()
    ranked = [line.split(": ", 1)[1] if ": " in line else "" for line in lines if line.startswith("[rank")]
    return ranked or lines


def _error_index(lines: list[str]) -> int | None:
    """The training process's last error line, except one that only reports another process gone (a
    rank blocked in a collective when its peer failed): the peer's own error is the cause."""
    found = [i for i, line in enumerate(lines) if ERROR_LINE.match(line.strip()) and not LAUNCHER_ERROR.search(line)]
    causes = [i for i in found if not PEER_GONE.search(lines[i])]
    return (causes or found)[-1] if found else None


def last_error(text: str, width: int = 200) -> str:
    """The training process's last `SomethingError: message` line (not a report of a peer gone), cut to
    ``width``."""
    lines = _worker_lines(text)
    i = _error_index(lines)
    return "no error line" if i is None else lines[i].strip()[:width]


def error_tail(text: str) -> str:
    """About TAIL_CHARS of the training process's output around its last error line (the end without one)."""
    lines = _worker_lines(text)
    i = _error_index(lines)
    if i is None:
        return "\n".join(lines)[-TAIL_CHARS:]
    before, after = "\n".join(lines[:i]), "\n".join(lines[i:])
    return before[-(TAIL_CHARS // 2) :] + "\n" + after[: TAIL_CHARS // 2]


def plan_jobs(
    engines: list[str], families: list[str], precisions: list[str], processes: int = 1, compile: bool = False
) -> list[Job]:
    """Every launch with its prerequisite: an engine that could not run `full` is not asked for
    `ga2`, and `resume` continues `stop`. First the Llama fp32 runs (stop before full: the
    stop -> resume chain is the longest), then bf16, then GPTBigCode (fp32, `full` only)."""
    order = {"stop": 0, "full": 1, "resume": 2, "ga2": 3}
    jobs = []
    for family in families:
        for precision in precisions:
            if family != "llama" and precision != "fp32":
                continue
            core = family == "llama" and precision == "fp32"
            rank = 0 if core else 10 if family == "llama" else 20
            for i, engine in enumerate(e for e in ENGINES if e in engines):
                for kind in ["stop", "full", "resume", "ga2"] if core else ["full"]:
                    after = {"resume": "stop", "ga2": "full"}.get(kind)
                    job = Job(engine, family, precision, kind, processes, priority=rank + order[kind] + 0.1 * i)
                    job.compile = compile and precision == "bf16"
                    job.after = f"{family}-{precision}-{engine}-{after}" if after else None
                    jobs.append(job)
    return jobs


def schedule(jobs: list[Job], inputs: dict[str, Path], work: Path, deadline: float, workers: int) -> None:
    """Run ``jobs`` concurrently in priority order, each after its prerequisite, inside ``deadline``."""
    by_name = {j.name: j for j in jobs}
    running: dict[Future, Job] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while True:
            for job in sorted((j for j in jobs if j.status == "pending"), key=lambda j: j.priority):
                if len(running) >= workers:
                    break
                dep = by_name.get(job.after) if job.after else None
                if dep is not None and dep.status in ("pending", "running"):
                    continue
                if dep is not None and dep.status != "ok":
                    job.status, job.note = "skipped", f"{dep.kind} run did not succeed ({dep.status})"
                    continue
                left = deadline - time.monotonic()
                if left < MIN_LAUNCH_S:
                    job.status, job.note = "skipped", f"budget: {left:.0f} s left, a launch needs ~{MIN_LAUNCH_S} s"
                    continue
                job.status = "running"
                print(f"[{time.strftime('%H:%M:%S')}] start {job.name}", flush=True)
                timeout = min(COMPILE_LAUNCH_TIMEOUT_S if job.compile else LAUNCH_TIMEOUT_S, left)
                running[pool.submit(run_job, job, inputs, work, timeout)] = job
            if not running:
                if any(j.status == "pending" for j in jobs):
                    continue  # only jobs whose prerequisite just settled: the next pass decides them
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                fut.result()
                print(f"[{time.strftime('%H:%M:%S')}] {job.status:7s} {job.name} ({job.seconds:.1f} s)", flush=True)


# --------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------


def metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}


def val_loss(run: Path) -> float | None:
    vals = [r["val_loss"] for r in metrics(run) if "val_loss" in r]
    return vals[-1] if vals else None


def max_loss_diff(a: dict[int, float], b: dict[int, float]) -> float | None:
    """Largest |a - b| over the steps of both; None when the steps differ or one is empty."""
    if not a or a.keys() != b.keys():
        return None
    return max(abs(a[k] - b[k]) for k in a)


def adapter_diff(a: Path, b: Path) -> float | None:
    """Largest |a - b| over the adapter tensors of two runs; None when one is missing or keys differ."""
    from safetensors.torch import load_file

    fa, fb = a / "adapter" / "adapter_model.safetensors", b / "adapter" / "adapter_model.safetensors"
    if not (fa.is_file() and fb.is_file()):
        return None
    ta, tb = load_file(str(fa)), load_file(str(fb))
    if ta.keys() != tb.keys():
        return None
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)


@dataclass
class Row:
    """One line of the table: an engine on a family and precision, against plain's runs."""

    engine: str
    family: str
    precision: str
    status: str = ""
    steps: int = 0
    final_loss: float | None = None
    loss_diff: float | None = None  # max |loss - plain's| over the steps of `full`
    val_loss_diff: float | None = None
    adapter_vs_plain: float | None = None
    ga2_loss_diff: float | None = None  # max |ga2 loss - plain full's|
    resume_ok: bool | None = None
    resume_adapter_diff: float | None = None  # max |adapter(stop + resume) - adapter(full)|
    seconds: float | None = None  # the `full` launch
    problems: list[str] = field(default_factory=list)


def compare(jobs: list[Job], work: Path) -> list[Row]:
    multi = any(j.processes > 1 for j in jobs)
    by_name = {j.name: j for j in jobs}
    rows = []
    for job in (j for j in jobs if j.kind == "full"):
        fam, prec = job.family, job.precision
        row = Row(job.engine, fam, prec, seconds=round(job.seconds, 1) if job.status != "skipped" else None)
        runs = work / "runs"
        run, plain = runs / job.run_name, runs / f"{fam}-{prec}-plain-full"
        tol, atol = LOSS_TOL[prec], (MULTI_PROCESS_ADAPTER_TOL if multi else ADAPTER_TOL)[prec]
        mine = losses(run)
        row.steps, row.final_loss = len(mine), mine[max(mine)] if mine else None
        if job.status != "ok":
            row.problems.append(f"full: {job.status} ({job.note})")
        elif row.steps != MAX_STEPS:
            row.problems.append(f"full: {row.steps} steps logged, expected {MAX_STEPS}")
        if job.engine != "plain" and job.status == "ok" and by_name[f"{fam}-{prec}-plain-full"].status == "ok":
            row.loss_diff = max_loss_diff(mine, losses(plain))
            va, vb = val_loss(run), val_loss(plain)
            row.val_loss_diff = abs(va - vb) if va is not None and vb is not None else None
            row.adapter_vs_plain = adapter_diff(run, plain)
            check(row, "loss vs plain", row.loss_diff, tol)
            check(row, "adapter vs plain", row.adapter_vs_plain, atol)
        ga2 = by_name.get(f"{fam}-{prec}-{job.engine}-ga2")
        if ga2 is not None:
            if ga2.status == "ok" and by_name[f"{fam}-{prec}-plain-full"].status == "ok":
                row.ga2_loss_diff = max_loss_diff(losses(runs / ga2.run_name), losses(plain))
                check(row, "ga2 loss vs plain", row.ga2_loss_diff, tol)
            elif ga2.status != "ok":
                row.problems.append(f"ga2: {ga2.status} ({ga2.note})")
        resume = by_name.get(f"{fam}-{prec}-{job.engine}-resume")
        if resume is not None:
            if resume.status == "ok" and job.status == "ok":
                parted = runs / resume.run_name
                row.resume_adapter_diff = adapter_diff(parted, run)
                loss_gap = max_loss_diff(losses(parted), mine)
                row.resume_ok = (
                    row.resume_adapter_diff is not None
                    and row.resume_adapter_diff <= atol
                    and loss_gap is not None
                    and loss_gap <= tol
                )
                if not row.resume_ok:
                    row.problems.append(
                        f"resume: adapter diff {fmt(row.resume_adapter_diff)}, loss diff {fmt(loss_gap)}"
                    )
            else:
                stop = by_name[f"{fam}-{prec}-{job.engine}-stop"]
                failed = stop if stop.status != "ok" else resume
                row.problems.append(f"{failed.kind}: {failed.status} ({failed.note})")
        row.status = "ok" if not row.problems else "FAIL" if job.status != "skipped" else "skipped"
        rows.append(row)
    return rows


def check(row: Row, what: str, value: float | None, tol: float) -> None:
    if value is None:
        row.problems.append(f"{what}: not comparable (steps or adapter keys differ)")
    elif not value <= tol:
        row.problems.append(f"{what}: {value:.3g} > {tol:g}")


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

COLUMNS = [
    ("engine", "engine"),
    ("model", "family"),
    ("prec", "precision"),
    ("steps", "steps"),
    ("final loss", "final_loss"),
    ("max abs loss diff vs plain", "loss_diff"),
    ("ga2 max abs loss diff vs plain", "ga2_loss_diff"),
    ("resume ok", "resume_ok"),
    ("adapter max abs diff (resume)", "resume_adapter_diff"),
    ("adapter vs plain", "adapter_vs_plain"),
    ("seconds", "seconds"),
    ("status", "status"),
]


def fmt(v: Any, key: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float) and key == "seconds":
        return f"{v:.1f}"
    if isinstance(v, float):
        return f"{v:.4f}" if v >= 0.01 or v == 0 else f"{v:.1e}"
    if isinstance(v, str):
        return v.replace("|", "/")
    return str(v)


def table(rows: list[Row]) -> str:
    """A Markdown table (also what stdout shows)."""
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(getattr(r, key), key) for _, key in COLUMNS) + " |")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    names = ("torch", "transformers", "peft", "accelerate", "deepspeed", "datasets", "pyarrow", "fsspec", "pydantic")
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86'})"


def write_report(out: Path, report: dict[str, Any], rows: list[Row], jobs: list[Job]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaleout.json").write_text(json.dumps(report, indent=2))
    processes = report["settings"]["processes"]
    md = [f"# fimtune under accelerate configs, {processes} process(es): {report['device']}", "", table(rows), ""]
    md += [f"- {r.engine}/{r.family}/{r.precision}: {'; '.join(r.problems)}" for r in rows if r.problems]
    skipped = [f"- skipped {j.name}: {j.note}" for j in jobs if j.status == "skipped"]
    tolerances = f"tolerances: loss {LOSS_TOL}, adapter {report['tolerances']['adapter']}"
    md += skipped + ["", tolerances, f"versions: {report['versions']}"]
    md += [f"elapsed {report['elapsed_s']} s of a {report['budget_s']} s budget"]
    text = "\n".join(md) + "\n"
    (out / "scaleout.md").write_text(text)
    failed = [j for j in jobs if j.stderr_tail]
    if failed:
        (out / "failures.txt").write_text(
            "".join(f"===== {j.name}: {j.note}\n$ {' '.join(j.command)}\n{j.stderr_tail}\n" for j in failed)
        )
    for j in failed:  # every rank's whole output: the tail shows one error, the cause may be another rank's
        if j.log is not None and j.log.is_file():
            (out / "logs").mkdir(exist_ok=True)
            shutil.copyfile(j.log, out / "logs" / j.log.name)
    return text


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for scaleout.json, scaleout.md, failures.txt")
    p.add_argument("--budget-s", type=float, default=170.0, help="wall-clock budget for everything")
    p.add_argument("--engines", default=None, help=f"comma list of {','.join(ENGINES)} (default: all on CUDA)")
    p.add_argument("--families", default=None, help=f"comma list of {','.join(FAMILIES)} (default: all)")
    p.add_argument("--precisions", default=None, help="comma list of fp32,bf16 (default: both on CUDA)")
    p.add_argument("--processes", type=int, default=1, help="processes per engine launch (GPUs; CPU: gloo)")
    p.add_argument(
        "--workers", type=int, default=None, help="launches at a time (default: cores / 1.5 / processes, at most 12)"
    )
    p.add_argument("--work-dir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--compile", action="store_true", help="bf16 runs compile each block (train.compile=true)")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    cuda = torch.cuda.is_available()
    engines = _choose(args.engines, ENGINES if cuda else ["plain"], ENGINES)
    families = _choose(args.families, FAMILIES, FAMILIES)
    precisions = _choose(args.precisions, PRECISIONS if cuda else ["fp32"], PRECISIONS)
    if args.processes < 1 or (cuda and args.processes > torch.cuda.device_count()):
        p.error(f"--processes {args.processes}: this machine has {torch.cuda.device_count()} GPU(s)")
    if not cuda and {"zero2", "zero3"} & set(engines) and importlib.util.find_spec("deepspeed") is None:
        p.error("the DeepSpeed engines need deepspeed (pip install deepspeed): on CPU processes it runs too")
    if "plain" not in engines:
        engines = ["plain", *engines]  # the reference
    workers = args.workers or max(1, min(12, int((os.cpu_count() or 2) / 1.5 / args.processes)))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="scaleout-"))
    work.mkdir(parents=True, exist_ok=True)
    notes = []
    if not cuda:
        engines_note = "plain runs only" if engines == ["plain"] else "engines on CPU processes (gloo)"
        notes.append(f"no CUDA device: {engines_note} ({','.join(precisions)})")

    print(f"device {device_name()}; {json.dumps(versions())}", flush=True)
    inputs = prepare_inputs(work, families, dropout=args.processes == 1)
    jobs = plan_jobs(engines, families, precisions, args.processes, args.compile)
    print(f"{len(jobs)} launches, {workers} at a time, {deadline - time.monotonic():.0f} s left; work dir {work}")
    schedule(jobs, inputs, work, deadline, workers)
    rows = compare(jobs, work)
    report = {
        "device": device_name(),
        "versions": versions(),
        "budget_s": args.budget_s,
        "elapsed_s": round(time.monotonic() - t0, 1),
        "settings": {
            "max_steps": MAX_STEPS,
            "stop_after": STOP_AFTER,
            "batch_size": BATCH_SIZE,
            "seq_length": SEQ_LENGTH,
            "processes": args.processes,
            "loss_chunk_tokens": LOSS_CHUNK,
            "compile_bf16": args.compile,
        },
        "tolerances": {"loss": LOSS_TOL, "adapter": MULTI_PROCESS_ADAPTER_TOL if args.processes > 1 else ADAPTER_TOL},
        "notes": notes,
        "rows": [asdict(r) for r in rows],
        "launches": [
            {k: v for k, v in asdict(j).items() if k not in ("stderr_tail", "log")}
            | {"name": j.name, "losses": losses(work / "runs" / j.run_name)}
            for j in jobs
        ],
    }
    text = write_report(args.out, report, rows, jobs)
    for j in (j for j in jobs if j.stderr_tail):
        print(f"\n===== {j.name}: {j.note}; stderr tail:\n{j.stderr_tail[-1500:]}")
    print("\n" + text)
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.status == "ok" for r in rows) else 1


def _choose(given: str | None, default: list[str], known: list[str]) -> list[str]:
    names = default if given is None else [n.strip() for n in given.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown name(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return names


if __name__ == "__main__":
    sys.exit(main())
