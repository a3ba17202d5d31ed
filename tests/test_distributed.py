"""Training under `accelerate launch` with 2 CPU processes (gloo), without code changes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import tiny
from tests.conftest import STARCODER_SPECIALS, corpus_texts, train_tiny_tokenizer, write_dataset_dir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    tok = train_tiny_tokenizer(STARCODER_SPECIALS)
    tiny.save_model_folder(tiny.llama(len(tok)), tok, root / "base")
    texts = corpus_texts(12, lines_per_doc=12)[:10]
    write_dataset_dir(root / "data", texts * 4, texts[:4])
    return root


def train(
    root: Path,
    name: str,
    processes: int,
    batch_size: int,
    *flags: str,
    script: Path | None = None,
    launch: tuple[str, ...] = ("--multi_gpu", "--mixed_precision", "no"),
) -> Path:
    args = [
        "train",
        f"model.name_or_path={root / 'base'}",
        f"data.path={root / 'data'}",
        f"output_dir={root / name}",
        "packing.seq_length=64",
        f"train.batch_size={batch_size}",
        "train.max_steps=6",
        "train.eval_every=3",
        "train.log_every=1",
        "train.save_every=0",
        "lora.dropout=0",
        *flags,
    ]
    if processes == 1:
        cmd = [sys.executable, "-m", "fimtune", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *launch,
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "0",
            *(["-m", "fimtune"] if script is None else [str(script)]),
            *args,
        ]
    env = {**os.environ, "FIMTUNE_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    PRINTED[name], WARNED[name] = res.stdout, res.stderr
    return root / name


PRINTED: dict[str, str] = {}  # each run's standard output, by run name
WARNED: dict[str, str] = {}  # and its standard error


def records(run: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


# Llama's linear layers, and GPT-BigCode's q_attn (in the seed recipe), which matches none here: a warning
UNMATCHED_TARGET = "lora.target_modules=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,q_attn"


def test_two_processes_match_one_with_the_same_global_batch(setup_dirs):
    one = train(setup_dirs, "one", 1, 4, UNMATCHED_TARGET)
    two = train(setup_dirs, "two", 2, 2, UNMATCHED_TARGET)
    for key in ("loss", "val_loss"):
        a, b = records(one, key), records(two, key)
        assert a.keys() == b.keys() and len(a) >= 3
        assert list(b.values()) == pytest.approx(list(a.values()), rel=1e-5)
    # Only rank 0 writes: one metrics line per event, one checkpoint, no stray files.
    assert len((two / "metrics.jsonl").read_text().splitlines()) == len(
        (one / "metrics.jsonl").read_text().splitlines()
    )
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for line in ("run folder:", "validation loss"):  # and one process says it
        assert PRINTED["one"].count(line) == PRINTED["two"].count(line) == 1, PRINTED["two"]
    # the warning of 6 steps under train.warmup_steps=30: the main process gives it, once
    assert WARNED["one"].count("train.warmup_steps=") == WARNED["two"].count("train.warmup_steps=") == 1
    # and Python's warnings (the LoRA target that matches no module): as many as one process gives
    unmatched = [WARNED[run].count("q_attn matches no module") for run in ("one", "two")]
    assert unmatched[0] == unmatched[1] >= 1, WARNED["two"][-3000:]
    # and the progress bar of the model's loading (transformers'), once
    loaded = [WARNED[run].count("Loading weights: 100%") for run in ("one", "two")]
    assert loaded[0] == loaded[1] >= 1, WARNED["two"][-3000:]


def test_two_process_checkpoint_resumes_exactly(setup_dirs):
    whole = train(setup_dirs, "whole", 2, 2)
    train(setup_dirs, "parted", 2, 2, "--stop-after", "3")
    parted = train(setup_dirs, "parted", 2, 2, "--resume")
    assert records(parted, "loss") == pytest.approx(records(whole, "loss"), rel=1e-6)
    assert records(parted, "val_loss") == pytest.approx(records(whole, "val_loss"), rel=1e-6)


# fimtune's CLI as if each process held only its part of the optimizer state (as under DeepSpeed ZeRO
# or sharded FSDP): every process writes its own optimizer file, and reloads its own on resume.
SPLIT_OPTIMIZER = """
import sys
import fimtune.engines
fimtune.engines.optimizer_sharding = lambda accelerator: "split (test)"
from fimtune.cli import main
sys.exit(main())
"""


def test_two_process_split_optimizer_checkpoint_resumes_exactly(setup_dirs, tmp_path):
    script = tmp_path / "split_optimizer.py"
    script.write_text(SPLIT_OPTIMIZER)
    # The uninterrupted DDP run of the test above when it ran first (the same settings), else a new one.
    whole = setup_dirs / "whole"
    if not (whole / "adapter").exists():
        whole = train(setup_dirs, "whole-ddp", 2, 2)
    train(setup_dirs, "parted-split", 2, 2, "--stop-after", "3", script=script)
    state = setup_dirs / "parted-split" / "state"
    assert {"optimizer-rank0.pt", "optimizer-rank1.pt"} <= {p.name for p in state.iterdir()}
    assert json.loads((state / "trainer_state.json").read_text())["world_size"] == 2
    parted = train(setup_dirs, "parted-split", 2, 2, "--resume", script=script)
    assert records(parted, "loss") == pytest.approx(records(whole, "loss"), rel=1e-6)
    assert records(parted, "val_loss") == pytest.approx(records(whole, "val_loss"), rel=1e-6)
    res = subprocess.run(  # one process cannot take the parts of two
        [sys.executable, str(script), "train", "--config", str(parted / "config.yaml"), "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "FIMTUNE_CACHE": str(setup_dirs / "cache")},
    )
    assert res.returncode == 2 and "split (test) on 2 process(es)" in res.stderr


# FSDP on CPU processes: tests/engines_on_cpu.py makes fimtune's Accelerator the FSDP one it would be on
# GPUs (accelerate selects FSDP only for GPU-style process groups; torch's FSDP2 runs over gloo).
ENGINES_ON_CPU = ROOT / "tests" / "engines_on_cpu.py"
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"


@pytest.fixture(scope="module")
def fsdp_dirs(tmp_path_factory):
    """A tied-embeddings Llama whose tokenizer has no FIM tokens: LoRA plus the trained rows of the added
    tokens, shared by the input and output embeddings (the case FSDP2 groups with most care)."""
    root = tmp_path_factory.mktemp("fsdp")
    tok = train_tiny_tokenizer(["<|endoftext|>"])
    tiny.save_model_folder(tiny.llama(len(tok), tie=True), tok, root / "base")
    texts = corpus_texts(12, lines_per_doc=12)[:10]
    write_dataset_dir(root / "data", texts * 4, texts[:4])
    return root


def adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def fsdp(root: Path, name: str, mixed_precision: str, *flags: str) -> Path:
    """A 2-process run under the shipped configs/accelerate/fsdp.yaml (FSDP2), 2 micro-batches of 1 row per
    process and step (the first without gradient reduction: FSDP2's requires_gradient_sync off)."""
    launch = ("--config_file", str(FSDP_CONFIG), "--mixed_precision", mixed_precision)
    args = (f"train.mixed_precision={mixed_precision}", "train.gradient_accumulation_steps=2", *flags)
    return train(root, name, 2, 1, *args, script=ENGINES_ON_CPU, launch=launch)


def test_fsdp2_matches_one_process_and_resumes_exactly(fsdp_dirs):
    one = train(fsdp_dirs, "one", 1, 4)
    whole = fsdp(fsdp_dirs, "fsdp", "no", "train.save_every=2")  # checkpoints mid-run, then trains on
    for key in ("loss", "val_loss"):
        a, b = records(one, key), records(whole, key)
        assert a.keys() == b.keys() and len(a) >= 3
        assert list(b.values()) == pytest.approx(list(a.values()), rel=1e-5)
    want, got = adapter(one), adapter(whole)
    assert got.keys() == want.keys() and any("trainable_tokens_delta" in k for k in got)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-6
    assert sorted(p.name for p in whole.iterdir()) == sorted(p.name for p in one.iterdir())  # rank 0 writes

    fsdp(fsdp_dirs, "parted", "no", "--stop-after", "3")
    state = fsdp_dirs / "parted" / "state"
    assert {"optimizer-rank0.pt", "optimizer-rank1.pt"} <= {p.name for p in state.iterdir()}
    assert json.loads((state / "trainer_state.json").read_text())["optimizer_sharding"] == "FSDP"
    parted = fsdp(fsdp_dirs, "parted", "no", "--resume")
    assert records(parted, "loss") == records(whole, "loss")
    assert records(parted, "val_loss") == records(whole, "val_loss")
    resumed = adapter(parted)
    assert all(torch.equal(resumed[k], got[k]) for k in got)


def test_fsdp2_in_bf16_follows_one_process(fsdp_dirs):
    """FSDP2 computes in bf16 by its mixed-precision policy (parameters cast once per gather), a single
    process under bf16 autocast: the same training, up to bf16 round-off."""
    one = train(fsdp_dirs, "one-bf16", 1, 4, "train.mixed_precision=bf16")
    sharded = fsdp(fsdp_dirs, "fsdp-bf16", "bf16")
    for key in ("loss", "val_loss"):
        a, b = records(one, key), records(sharded, key)
        assert a.keys() == b.keys()
        assert list(b.values()) == pytest.approx(list(a.values()), abs=1e-2)


def test_a_launched_process_ends_at_the_last_barrier_without_the_interpreters_teardown(tmp_path):
    """`exit_launched_process` under a launcher of two gloo processes: both reach it, leave with exit
    code 0, and nothing after it runs: no line printed after it, no at-exit handler (the teardown in
    which gloo's threads could abort a finished run)."""
    script = tmp_path / "launched.py"
    script.write_text(
        "import atexit, sys, torch.distributed as dist\n"
        "from fimtune.train import exit_launched_process\n"
        "dist.init_process_group('gloo')\n"
        f"log = open(f'{tmp_path}/rank{{dist.get_rank()}}.txt', 'a', buffering=1)\n"
        "atexit.register(lambda: log.write('teardown\\n'))\n"
        "log.write('before\\n')\n"
        "exit_launched_process()\n"
        "log.write('after\\n')\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["before\n", "before\n"]


# Each process's random state at a place of its own (as each GPU's generator is: a process draws its
# dropout masks on its own device), made after the setup, which a resume's restore then replaces.
RANKS_APART = """
import sys
import torch
import fimtune.train

setup = fimtune.train.setup


def setup_apart(cfg, accelerator):
    s = setup(cfg, accelerator)
    torch.rand(1 + 7 * accelerator.process_index)
    return s


fimtune.train.setup = setup_apart
from fimtune.cli import main
sys.exit(main())
"""


def test_each_process_resumes_its_own_random_state(setup_dirs, tmp_path):
    """A checkpoint keeps every process's random state, and each process gets its own back: with
    LoRA dropout drawing different masks on each, a resumed run matches the uninterrupted one."""
    script = tmp_path / "ranks_apart.py"
    script.write_text(RANKS_APART)
    whole = train(setup_dirs, "whole-apart", 2, 2, "lora.dropout=0.1", script=script)
    train(setup_dirs, "parted-apart", 2, 2, "lora.dropout=0.1", "--stop-after", "3", script=script)
    parted = train(setup_dirs, "parted-apart", 2, 2, "lora.dropout=0.1", "--resume", script=script)
    assert records(parted, "loss") == pytest.approx(records(whole, "loss"), rel=1e-6)


# Each process in a working folder of its own, given a relative output_dir: as on several machines
# whose output_dir is not one shared folder (process 1 sees no run folder where process 0 sees its own).
FOLDERS_APART = """
import os
import sys

if os.environ["RANK"] == "1":
    os.chdir(os.environ["FOLDER_OF_PROCESS_1"])
from fimtune.cli import main
sys.exit(main())
"""


def test_a_resume_whose_processes_see_different_checkpoints_is_refused(setup_dirs, tmp_path):
    """Every process loads the checkpoint itself: one that finds none would start at step 0 beside the
    others at step 3 (their weights apart, their collectives out of step until gloo's timeout). All
    refuse, naming what each process found."""
    train(setup_dirs, "apart", 2, 2, "--stop-after", "3")
    script = tmp_path / "folders_apart.py"
    script.write_text(FOLDERS_APART)
    launch = ["--multi_gpu", "--mixed_precision", "no", "--num_processes", "2", "--num_machines", "1"]
    config = setup_dirs / "apart" / "config.yaml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", *launch, "--dynamo_backend", "no"]
        + ["--main_process_port", "0", str(script), "train", "--config", str(config), "output_dir=apart", "--resume"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=setup_dirs,
        env={**os.environ, "FIMTUNE_CACHE": str(setup_dirs / "cache"), "FOLDER_OF_PROCESS_1": str(tmp_path)},
    )
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # the launcher ends its processes (each in a session of its own) on SIGTERM
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    assert res.returncode != 0
    assert "process 0: step-000003, process 1: none" in res.stderr, res.stderr[-3000:]
    assert "a folder all machines share" in res.stderr


def test_sigterm_to_the_launcher_stops_both_processes_and_says_the_checkpoint_once(setup_dirs):
    """SIGTERM to `accelerate launch` (a scheduler's preemption): the launcher passes it to both
    processes, which stop; the kept checkpoint and `--resume` are said once, by the main process."""
    args = [
        "train",
        f"model.name_or_path={setup_dirs / 'base'}",
        f"data.path={setup_dirs / 'data'}",
        f"output_dir={setup_dirs / 'stopped'}",
        "packing.seq_length=64",
        "train.batch_size=2",
        "train.max_steps=100000",
        "train.eval_every=0",
        "train.log_every=1",
        "train.save_every=2",
    ]
    launch = ["--multi_gpu", "--mixed_precision", "no", "--num_processes", "2", "--num_machines", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", *launch, "--dynamo_backend", "no"]
        + ["--main_process_port", "0", "-m", "fimtune", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "FIMTUNE_CACHE": str(setup_dirs / "cache"), "OMP_NUM_THREADS": "1"},
    )
    metrics, deadline = setup_dirs / "stopped" / "metrics.jsonl", time.monotonic() + 120
    while proc.poll() is None and len(records(setup_dirs / "stopped", "loss") if metrics.exists() else {}) < 3:
        assert time.monotonic() < deadline, "the run logged no 3 steps in 2 minutes"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    told = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("terminated: ")]
    assert len(told) == 1, stderr[-3000:]
    assert "is kept in" in told[0] and "--resume continues" in told[0]
