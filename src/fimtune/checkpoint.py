"""Atomic checkpoints and exact resume.

A run folder after two saves::

    runs/mine/
      config.yaml           the resolved config
      tokenizer/            the tokenizer, FIM tokens included
      metrics.jsonl         one JSON object per log/eval event
      checkpoints/
        step-000050/        adapter/ + state/  (written as .tmp-*, fsynced, then renamed)
        step-000100/
      adapter -> checkpoints/step-000100/adapter    (relative links, swapped with os.replace)
      state   -> checkpoints/step-000100/state

A checkpoint folder appears complete or not at all (rename is atomic), and the links move
to it only afterwards, so a crash at any moment leaves the previous checkpoint readable.
`state/` holds the optimizer, scheduler, fp16 loss scaler, RNG states and the data position.

When each process holds only its part of the optimizer state (DeepSpeed ZeRO, sharded FSDP),
every process writes its part into the same temporary folder and the main process completes
and renames it once all have::

    step-000050/state/
      training_state.pt           scheduler, RNG (no optimizer)
      optimizer-rank0.pt ...      optimizer-rank{N-1}.pt: each process's part
      trainer_state.json          ... "processes": N, "world_size": N, "optimizer_sharding": "DeepSpeed ZeRO-2"
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fimtune.errors import FimtuneError

CHECKPOINTS = "checkpoints"
KEEP_LAST = 2
_STEP_DIR = re.compile(r"^step-(\d+)$")
# What reading a damaged file raises: torch.load a cut archive RuntimeError, an empty file EOFError,
# other bytes UnpicklingError; json ValueError; safetensors its own type.
_UNREADABLE = (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError)


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` (and the folders) to disk."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """``tokenizer.save_pretrained(folder)``, each file written whole before it replaces the old one:
    a resumed run writes the folder again, and one stopped meanwhile (a full disk, a kill) keeps a
    tokenizer that loads."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer.save_pretrained(tmp)
        fsync_tree(tmp)
        folder.mkdir(exist_ok=True)
        for path in sorted(tmp.iterdir()):
            os.replace(path, folder / path.name)
        _fsync_dir(folder)
    except Exception as e:  # tokenizers' Rust side raises a plain Exception: "File too large (os error 27)"
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise FimtuneError(f"could not write the tokenizer to '{folder}' ({why}); it is as it was") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def umask_modes(folder: Path, like: Path) -> None:
    """Give the safetensors files in ``folder`` the mode of ``like``, a file written beside them the
    plain way (the umask's): safetensors writes its files 0600, which the others sharing a run
    folder, a merged model or the cache could not read."""
    mode = like.stat().st_mode & 0o777
    for file in folder.glob("*.safetensors"):
        file.chmod(mode)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _link(run_dir: Path, name: str, target: Path) -> None:
    """Point ``run_dir/name`` at ``target`` (relative), replacing the old link atomically."""
    tmp, path = run_dir / f".{name}.link-tmp", run_dir / name
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target.relative_to(run_dir))
    if path.is_dir() and not path.is_symlink():  # a copy of the run folder that followed the links
        shutil.rmtree(path)
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: Path,
    step: int,
    save_adapter: Any,
    optimizer: Any,
    scheduler: Any,
    data_state: dict[str, Any],
    extra: dict[str, Any] | None = None,
    optimizer_parts: int = 0,
    rng: list[dict[str, Any]] | None = None,
    scaler: Any = None,
) -> Path:
    """Write `checkpoints/step-N/{adapter,state}` atomically and point `adapter`, `state` at it.

    ``save_adapter(folder)`` writes the PEFT adapter (``model.save_pretrained``).
    ``optimizer_parts`` > 0: ``optimizer`` is None and the processes have written that many parts of
    it into :func:`pending_folder` (:func:`save_optimizer_part`), which this completes.
    ``rng``: each process's :func:`rng_state`, in process order (default: this process's alone).
    ``scaler``: fp16's loss scaler (its scale and growth count), if the run has one.
    """
    ckpt_root = run_dir / CHECKPOINTS
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:06d}"
    if optimizer_parts:
        tmp = pending_folder(run_dir, step)
    else:
        tmp = ckpt_root / f".tmp-step-{step:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_adapter(tmp / "adapter")
        (tmp / "state").mkdir(parents=True, exist_ok=bool(optimizer_parts))
        per_process = rng or [rng_state()]
        states = {"scheduler": scheduler.state_dict(), "rng": per_process[0], "rng_per_process": per_process}
        if scaler is not None:
            states["scaler"] = scaler.state_dict()
        if optimizer_parts:
            _check_parts(tmp, optimizer_parts)
        else:
            states = {"optimizer": optimizer.state_dict(), **states}
        torch.save(states, tmp / "state" / "training_state.pt")
        meta = {"step": step, "data": data_state, **(extra or {})}
        if optimizer_parts:
            meta["world_size"] = optimizer_parts
        (tmp / "state" / "trainer_state.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        umask_modes(tmp / "adapter", tmp / "state" / "trainer_state.json")
        fsync_tree(tmp)
        if final.exists():  # a re-save of the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(ckpt_root)
    except Exception as e:  # disk full, quota, permissions (safetensors raises its own type for these)
        shutil.rmtree(tmp, ignore_errors=True)
        raise FimtuneError(f"could not write checkpoint step {step} in '{ckpt_root}' ({e}); {_kept(run_dir)}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _link(run_dir, "adapter", final / "adapter")
    _link(run_dir, "state", final / "state")
    _fsync_dir(run_dir)
    prune(run_dir, keep=KEEP_LAST)
    return final


def pending_folder(run_dir: Path, step: int) -> Path:
    """The temporary folder every process writes its optimizer part of checkpoint ``step`` into."""
    return run_dir / CHECKPOINTS / f".tmp-step-{step:06d}-parts"


def start_pending(run_dir: Path, step: int) -> None:
    """Create an empty :func:`pending_folder` (the main process, before any process writes to it)."""
    folder = pending_folder(run_dir, step)
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "state").mkdir(parents=True)


def optimizer_part_path(folder: Path, rank: int) -> Path:
    return folder / "state" / f"optimizer-rank{rank}.pt"


def save_optimizer_part(run_dir: Path, step: int, rank: int, state: dict[str, Any]) -> None:
    """Write process ``rank``'s part of the optimizer state (its ``state_dict()``, plain tensors) into the
    pending checkpoint ``step``."""
    path = optimizer_part_path(pending_folder(run_dir, step), rank)
    try:
        torch.save(state, path)
    except Exception as e:  # disk full, quota, permissions
        raise FimtuneError(f"could not write checkpoint step {step}: '{path}' ({e}); {_kept(run_dir)}") from e


def _kept(run_dir: Path) -> str:
    previous = latest_checkpoint(run_dir)
    return f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"


def _check_parts(folder: Path, world_size: int) -> None:
    missing = [r for r in range(world_size) if not optimizer_part_path(folder, r).is_file()]
    if missing:
        raise FimtuneError(
            f"the optimizer state of process(es) {missing} is missing from '{folder / 'state'}': with a sharded "
            "optimizer (DeepSpeed, FSDP) every process writes its part, so output_dir must be on a filesystem "
            "all machines share"
        )


def read_optimizer_part(ckpt: Path, rank: int) -> dict[str, Any]:
    """Process ``rank``'s part of the optimizer state in checkpoint folder ``ckpt``."""
    path = optimizer_part_path(ckpt, rank)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except _UNREADABLE as e:
        raise _unreadable(ckpt, e) from None


def _unreadable(ckpt: Path, e: Exception) -> FimtuneError:
    """The error of a damaged checkpoint folder, with what deleting it leads to."""
    found = [p.name for p in checkpoints(ckpt.parent.parent)]  # ckpt is run_dir/checkpoints/step-N
    earlier = [
        name
        for name in (found[: found.index(ckpt.name)] if ckpt.name in found else [])
        if (ckpt.parent / name / "state" / "trainer_state.json").is_file()
    ]
    then = f"to resume from {earlier[-1]}" if earlier else "and --resume starts the run over at step 0"
    return FimtuneError(f"checkpoint '{ckpt}' is unreadable ({e}); delete it {then}")


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary leftovers are ignored)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints and any temporary leftovers."""
    root = run_dir / CHECKPOINTS
    for p in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def step_of(ckpt: Path) -> int:
    """The step a checkpoint folder was saved at (``step-000040``: 40)."""
    return int(_STEP_DIR.match(ckpt.name).group(1))  # type: ignore[union-attr]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint that `state` points to, else the newest complete one."""
    link = run_dir / "state"
    if link.is_symlink() and (link.resolve() / "trainer_state.json").is_file():
        return link.resolve().parent
    found = [p for p in checkpoints(run_dir) if (p / "state" / "trainer_state.json").is_file()]
    return found[-1] if found else None


def load_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state.json, training_state.pt) of checkpoint folder ``ckpt``."""
    meta = load_meta(ckpt)
    try:
        tensors = torch.load(ckpt / "state" / "training_state.pt", map_location="cpu", weights_only=False)
    except _UNREADABLE as e:
        raise _unreadable(ckpt, e) from None
    return meta, tensors


def load_meta(ckpt: Path) -> dict[str, Any]:
    """trainer_state.json of checkpoint folder ``ckpt``: its step, data position, processes."""
    try:
        return json.loads((ckpt / "state" / "trainer_state.json").read_text(encoding="utf-8"))
    except _UNREADABLE as e:
        raise _unreadable(ckpt, e) from None


def load_adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    """The adapter weights of checkpoint folder ``ckpt``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    except (*_UNREADABLE, SafetensorError) as e:
        raise _unreadable(ckpt, e) from None
