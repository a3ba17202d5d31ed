"""Faults during training: SIGKILL at random moments, a NaN loss, a full disk while saving."""

import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fimtune import checkpoint
from fimtune.config import load_run_config
from fimtune.errors import FimtuneError
from tests.runs import model_dir, quiet_fit, run_config

ROOT = Path(__file__).parents[1]


def cli_args(tmp_path: Path, base: Path, data: Path, name: str, steps: int) -> list[str]:
    return [
        "train",
        f"model.name_or_path={base}",
        f"data.path={data}",
        f"output_dir={tmp_path / name}",
        "packing.seq_length=64",
        "train.batch_size=4",
        f"train.max_steps={steps}",
        "train.eval_every=5",
        "train.log_every=1",
        "train.save_every=1",
        "lora.dropout=0.1",
    ]


def logged_steps(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines() if x.endswith("}")]
    return max(steps, default=0)


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path, tiny_tokenizer, repetitive_data, token_cache):
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    steps = 100
    env = {**os.environ, "FIMTUNE_CACHE": os.environ["FIMTUNE_CACHE"], "OMP_NUM_THREADS": "1"}
    whole_cmd = [sys.executable, "-m", "fimtune", *cli_args(tmp_path, base, repetitive_data, "whole", steps)]
    subprocess.run(whole_cmd, cwd=ROOT, env=env, capture_output=True, timeout=600, check=True)
    whole = tmp_path / "whole"
    rng = random.Random(0)
    kills, metrics = 0, tmp_path / "killed" / "metrics.jsonl"
    for attempt in range(5):
        cmd = [sys.executable, "-m", "fimtune", *cli_args(tmp_path, base, repetitive_data, "killed", steps)]
        if attempt:
            cmd.append("--resume")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Let it train a random number of steps (a checkpoint is written after every step), then kill it
        # a random fraction of a step later: sometimes mid-step, sometimes mid-checkpoint.
        target, deadline = logged_steps(metrics) + rng.randint(2, 12), time.monotonic() + 120
        while proc.poll() is None and logged_steps(metrics) < target and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.15))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills == 5, "the run finished before it could be killed: give it more steps"
    res = subprocess.run(
        [sys.executable, "-m", "fimtune", *cli_args(tmp_path, base, repetitive_data, "killed", steps), "--resume"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = adapter(whole), adapter(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in losses if "loss" in r) == list(range(1, steps + 1))  # no step twice


@pytest.mark.parametrize(
    ("sig", "save_every", "said", "code"),
    [
        (signal.SIGINT, 2, "interrupted", 130),
        (signal.SIGINT, 0, "interrupted", 130),
        (signal.SIGTERM, 2, "terminated", 143),
    ],
)
def test_ctrl_c_says_which_checkpoint_is_kept_and_how_to_continue(
    tmp_path, tiny_tokenizer, repetitive_data, token_cache, sig, save_every, said, code
):
    """Ctrl-C (SIGINT) mid-run: the message names the last checkpoint and `--resume` (or says none was
    written), on a line of its own rather than after the progress bar's; the exit code stays 130.
    SIGTERM (`kill`, a scheduler's preemption) says the same, with a shell's code for it, 143; it
    ended the run without a word."""
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    args = [*cli_args(tmp_path, base, repetitive_data, "int", 100_000), f"train.save_every={save_every}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fimtune", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    metrics, deadline = tmp_path / "int" / "metrics.jsonl", time.monotonic() + 120
    while proc.poll() is None and logged_steps(metrics) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    lines = err.decode().replace("\r", "\n").splitlines()
    told = [line for line in lines if said in line]
    assert proc.returncode == code and len(told) == 1 and told[0].startswith(f"{said}: "), lines[-5:]
    last = checkpoint.latest_checkpoint(tmp_path / "int")
    if save_every:
        assert f"its last checkpoint ({last.name}) is kept" in told[0] and "--resume continues" in told[0]
    else:
        assert last is None and "before its first checkpoint" in told[0] and "--resume starts" in told[0]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_tokenizer, repetitive_data, token_cache):
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    cfg = run_config(
        tmp_path,
        base,
        repetitive_data,
        "nan",
        "train.learning_rate=1e12",
        "train.max_grad_norm=0",
        "train.save_every=1",
        "train.eval_every=0",
        "train.max_steps=30",
    )
    with pytest.raises(FimtuneError, match=r"loss became (nan|inf) at step (\d+)") as err:
        quiet_fit(cfg)
    failed = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    last = checkpoint.latest_checkpoint(tmp_path / "nan")
    assert last is not None and last.name == f"step-{failed - 1:06d}"
    assert f"its last checkpoint ({last.name}) is kept" in str(err.value)
    assert all(torch.isfinite(t).all() for t in adapter(tmp_path / "nan").values())


def test_nan_loss_before_any_checkpoint_says_none_was_written(tmp_path, tiny_tokenizer, repetitive_data, token_cache):
    """A run that diverges before its first checkpoint does not claim checkpoints it never wrote."""
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    overrides = ("train.learning_rate=1e12", "train.max_grad_norm=0", "train.save_every=0", "train.eval_every=0")
    with pytest.raises(FimtuneError, match="loss became") as err:
        quiet_fit(run_config(tmp_path, base, repetitive_data, "nan", *overrides, "train.max_steps=30"))
    assert checkpoint.latest_checkpoint(tmp_path / "nan") is None
    assert "no checkpoint was written yet" in str(err.value) and "is kept" not in str(err.value)


@pytest.mark.parametrize("max_grad_norm", [1.0, 0])
def test_an_infinite_gradient_never_reaches_a_checkpoint(
    tmp_path, tiny_tokenizer, repetitive_data, token_cache, monkeypatch, max_grad_norm
):
    """One gradient overflows at step 3 (as fp16 activations can) while the loss stays finite:
    clipped, the gradient norm is inf and the clipped gradients NaN; unclipped, AdamW makes the
    weights NaN. Either way the run stops without a checkpoint of step 3, even as its last step."""
    from fimtune import train

    def with_an_overflow(cfg, accelerator):
        s = setup(cfg, accelerator)
        first = next(p for p in s.model.parameters() if p.requires_grad)
        calls = iter(range(10**6))

        def overflow(p):
            if next(calls) == 2:
                p.grad.view(-1)[0] = float("inf")

        first.register_post_accumulate_grad_hook(overflow)
        return s

    setup = train.setup
    monkeypatch.setattr(train, "setup", with_an_overflow)
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    name = f"inf-{max_grad_norm}"
    overrides = (
        "train.save_every=1",
        "train.eval_every=0",
        "train.max_steps=3",
        f"train.max_grad_norm={max_grad_norm}",
    )
    why = "gradient norm became inf at step 3" if max_grad_norm else "weights are not finite after step 3"
    with pytest.raises(FimtuneError, match=why):
        quiet_fit(run_config(tmp_path, base, repetitive_data, name, *overrides))
    assert checkpoint.latest_checkpoint(tmp_path / name).name == "step-000002"
    assert all(torch.isfinite(t).all() for t in adapter(tmp_path / name).values())


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_tokenizer, repetitive_data, token_cache):
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    args = [*cli_args(tmp_path, base, repetitive_data, "disk", 8), "train.save_every=2"]
    quiet_fit(load_run_config(None, args[1:]), stop_after=4)  # the settings the command below resumes with
    run = tmp_path / "disk"
    before = {p.name for p in checkpoint.checkpoints(run)}
    state_size = (run / "state" / "training_state.pt").stat().st_size
    small = max(p.stat().st_size for p in run.rglob("*") if p.is_file() and "checkpoints" not in p.parts)
    limit = small + 4096
    assert limit < state_size, "the fake disk limit must stop the checkpoint, not the rest"

    def fill_disk():  # files may grow to `limit` bytes, then writes fail with EFBIG like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, "-m", "fimtune", *args, "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, preexec_fn=fill_disk)
    assert res.returncode == 2
    assert "could not write checkpoint step 6" in res.stderr and "is intact" in res.stderr
    assert {p.name for p in checkpoint.checkpoints(run)} == before
    assert checkpoint.latest_checkpoint(run).name == "step-000004"
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert adapter(run)  # still loads


def test_full_disk_while_a_resumed_run_rewrites_its_tokenizer_keeps_one_that_loads(
    tmp_path, tiny_tokenizer, repetitive_data, token_cache
):
    from transformers import AutoTokenizer

    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    args = [*cli_args(tmp_path, base, repetitive_data, "tok", 8), "train.save_every=2"]
    quiet_fit(load_run_config(None, args[1:]), stop_after=2)
    run = tmp_path / "tok"
    before = {p.name: p.read_bytes() for p in (run / "tokenizer").iterdir()}
    vocab = AutoTokenizer.from_pretrained(run / "tokenizer").get_vocab()
    largest = max(len(b) for b in before.values())
    limit = largest // 2  # the largest tokenizer file cannot be written whole; config.yaml can
    assert limit > (run / "config.yaml").stat().st_size

    def fill_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, "-m", "fimtune", *args, "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, preexec_fn=fill_disk)
    assert res.returncode == 2 and "tokenizer" in res.stderr.splitlines()[-1], res.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in (run / "tokenizer").iterdir()} == before
    assert AutoTokenizer.from_pretrained(run / "tokenizer").get_vocab() == vocab
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
