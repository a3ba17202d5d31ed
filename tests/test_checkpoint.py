"""Checkpoints whose optimizer state is split over processes: each writes its part, one completes it."""

import json

import pytest
import torch

from fimtune import checkpoint
from fimtune.errors import FimtuneError


def optimizer_after_a_step(seed: int) -> tuple[torch.nn.Parameter, torch.optim.Optimizer, object]:
    """A real AdamW one step in; ``seed`` makes its state differ from another process's."""
    w = torch.nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)))
    opt = torch.optim.AdamW([w], lr=1e-2)
    w.grad = w.detach() * 0.5
    opt.step()
    return w, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def write_adapter(folder):
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"")


def write_split_checkpoint(run_dir, step, optimizers) -> None:
    """What the main process and each process do in turn (`fimtune.train.save`), in one process."""
    checkpoint.start_pending(run_dir, step)
    for rank, opt in enumerate(optimizers):
        checkpoint.save_optimizer_part(run_dir, step, rank, opt.state_dict())
    extra = {"optimizer_sharding": "FSDP"}
    sched = torch.optim.lr_scheduler.LambdaLR(optimizers[0], lambda s: 1.0)
    checkpoint.save_checkpoint(run_dir, step, write_adapter, None, sched, {"offset": 3}, extra, len(optimizers))


def test_split_optimizer_checkpoint_layout(tmp_path):
    opts = [optimizer_after_a_step(seed)[1] for seed in (0, 1)]
    write_split_checkpoint(tmp_path, 5, opts)
    ckpt = checkpoint.latest_checkpoint(tmp_path)
    assert ckpt.name == "step-000005" and not list((tmp_path / "checkpoints").glob(".tmp-*"))
    files = sorted(p.name for p in (ckpt / "state").iterdir())
    assert files == ["optimizer-rank0.pt", "optimizer-rank1.pt", "trainer_state.json", "training_state.pt"]
    meta, state = checkpoint.load_state(ckpt)
    assert meta["world_size"] == 2 and meta["optimizer_sharding"] == "FSDP" and meta["data"] == {"offset": 3}
    assert "optimizer" not in state and {"scheduler", "rng"} <= state.keys()
    for rank, opt in enumerate(opts):
        part = checkpoint.read_optimizer_part(ckpt, rank)
        assert torch.equal(part["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_a_missing_part_keeps_the_previous_checkpoint(tmp_path):
    opts = [optimizer_after_a_step(seed)[1] for seed in (0, 1)]
    write_split_checkpoint(tmp_path, 5, opts)
    checkpoint.start_pending(tmp_path, 6)
    checkpoint.save_optimizer_part(
        tmp_path, 6, 0, opts[0].state_dict()
    )  # process 1 wrote elsewhere (no shared filesystem)
    sched = torch.optim.lr_scheduler.LambdaLR(opts[0], lambda s: 1.0)
    with pytest.raises(FimtuneError, match=r"process\(es\) \[1\] is missing .* filesystem all machines share"):
        checkpoint.save_checkpoint(tmp_path, 6, write_adapter, None, sched, {}, None, 2)
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-000005"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_whole_optimizer_checkpoint_layout_is_unchanged(tmp_path):
    _, opt, sched = optimizer_after_a_step(0)
    checkpoint.save_checkpoint(tmp_path, 1, write_adapter, opt, sched, {"offset": 0})
    ckpt = checkpoint.latest_checkpoint(tmp_path)
    assert sorted(p.name for p in (ckpt / "state").iterdir()) == ["trainer_state.json", "training_state.pt"]
    assert json.loads((ckpt / "state" / "trainer_state.json").read_text()) == {"step": 1, "data": {"offset": 0}}
    # "rng" stays the main process's random state (what checkpoints before "rng_per_process" hold)
    state = checkpoint.load_state(ckpt)[1]
    assert {"optimizer", "scheduler", "rng", "rng_per_process"} == state.keys()
    assert state["rng_per_process"][0]["python"] == state["rng"]["python"]


def _two_writers(rank: int, run_dir, store) -> None:
    """One of two processes (gloo): each writes its own optimizer's part, then reloads exactly its own."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        w, opt, sched = optimizer_after_a_step(seed=rank)
        if rank == 0:
            checkpoint.start_pending(run_dir, 1)
        dist.barrier()
        checkpoint.save_optimizer_part(run_dir, 1, rank, opt.state_dict())
        dist.barrier()
        if rank == 0:
            checkpoint.save_checkpoint(run_dir, 1, write_adapter, None, sched, {}, {"optimizer_sharding": "x"}, 2)
        dist.barrier()
        fresh = torch.optim.AdamW([w], lr=1e-2)
        fresh.load_state_dict(checkpoint.read_optimizer_part(checkpoint.latest_checkpoint(run_dir), rank))
        mine = optimizer_after_a_step(seed=rank)[1].state_dict()["state"][0]["exp_avg"]
        other = optimizer_after_a_step(seed=1 - rank)[1].state_dict()["state"][0]["exp_avg"]
        assert torch.equal(fresh.state[w]["exp_avg"], mine) and not torch.equal(mine, other)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_write_and_reload_their_own_parts(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_writers, args=(tmp_path / "run", tmp_path / "store"), nprocs=2)
    ckpt = checkpoint.latest_checkpoint(tmp_path / "run")
    assert checkpoint.load_state(ckpt)[0]["world_size"] == 2


@pytest.mark.parametrize("content", [b"", b"hello world" * 10], ids=["empty", "garbage"])
@pytest.mark.parametrize(
    "damaged", ["state/training_state.pt", "state/trainer_state.json", "adapter/adapter_model.safetensors"]
)
def test_a_damaged_checkpoint_is_named_with_what_to_do(tmp_path, damaged, content):
    """A file of a checkpoint cut or overwritten (a filesystem's crash, an interrupted copy): the error
    names the checkpoint and says to delete it, whatever the reader raises (torch.load: EOFError or
    UnpicklingError; safetensors: its own type)."""
    import re

    _, opt, sched = optimizer_after_a_step(0)
    ckpt = checkpoint.save_checkpoint(tmp_path, 1, write_adapter, opt, sched, {"offset": 0})
    (ckpt / damaged).write_bytes(content)
    with pytest.raises(FimtuneError, match=rf"checkpoint '{re.escape(str(ckpt))}' is unreadable .*; delete it"):
        checkpoint.load_state(ckpt)
        checkpoint.load_adapter(ckpt)


def test_a_damaged_checkpoint_names_the_one_to_resume_from_or_says_there_is_none(tmp_path):
    """Deleting it resumes from the checkpoint before, which is named; with none before, the run starts over."""
    _, opt, sched = optimizer_after_a_step(0)
    for run, steps in ((tmp_path / "one", [1]), (tmp_path / "two", [1, 2])):
        for step in steps:
            last = checkpoint.save_checkpoint(run, step, write_adapter, opt, sched, {"offset": 0})
        (last / "state" / "training_state.pt").write_bytes(b"")
        told = "to resume from step-000001" if len(steps) == 2 else "and --resume starts the run over at step 0"
        with pytest.raises(FimtuneError, match=rf"delete it {told}"):
            checkpoint.load_state(last)


def test_a_run_folder_copied_with_its_links_followed_saves_again(tmp_path):
    """A copy that followed the links (shutil.copytree's default, `cp -L`, object-store syncs) has
    folders for `adapter` and `state`: the next checkpoint makes them links again."""
    import shutil

    _, opt, sched = optimizer_after_a_step(0)
    checkpoint.save_checkpoint(tmp_path / "run", 1, write_adapter, opt, sched, {"offset": 0})
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy)
    assert (copy / "state").is_dir() and not (copy / "state").is_symlink()
    assert checkpoint.latest_checkpoint(copy).name == "step-000001"
    checkpoint.save_checkpoint(copy, 2, write_adapter, opt, sched, {"offset": 1})
    for name in ("adapter", "state"):
        assert (copy / name).is_symlink() and (copy / name).resolve() == copy / "checkpoints" / "step-000002" / name
    assert checkpoint.latest_checkpoint(copy).name == "step-000002"


def test_a_checkpoints_adapter_is_readable_as_the_umask_allows(tmp_path):
    """safetensors writes its files 0600: a run folder shared by a team (or served by another user)
    had every file readable but the adapter's weights."""
    import os

    def save_adapter(folder):
        from safetensors.torch import save_file

        folder.mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, folder / "adapter_model.safetensors")

    _, opt, sched = optimizer_after_a_step(0)
    old = os.umask(0o022)
    try:
        ckpt = checkpoint.save_checkpoint(tmp_path, 1, save_adapter, opt, sched, {"offset": 0})
    finally:
        os.umask(old)
    assert (ckpt / "adapter" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o644
