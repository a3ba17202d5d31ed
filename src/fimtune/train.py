"""`fimtune train`: setup -> fit -> validate, an explicit loop on `accelerate.Accelerator`.

Each optimizer step, in this order: learning rate (scheduler) -> validation / checkpoint
-> micro-steps (forward, loss / label tokens of the whole step, backward) -> clip -> step
-> log. The loss of every micro-batch is a *sum* over its label tokens divided by the
label tokens of the whole accumulation window (all processes), so a step's gradient is
the mean over its tokens however they fall into micro-batches.

On a GPU the host never waits for a step while queueing it: label tokens and document
bounds are counted on the host before the batch is copied (through pinned memory), and the
step's loss and gradient norm are read back once the next step is queued (before a
validation, a checkpoint or the end, they are read first). So the GPU runs one step while
the host prepares the next, instead of idling between them.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fimtune import checkpoint
from fimtune.config import RunConfig, TrainConfig, resolved_paths, save_config
from fimtune.errors import FimtuneError
from fimtune.fast import copy_to_host

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------


@dataclass
class Setup:
    accelerator: Any
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    train_rows: Any
    make_eval_rows: Any
    max_steps: int
    tokens_per_step: int
    loss_chunk: int = 0  # tokens per chunk of the loss (0: all logits at once)
    cuda_graphs: bool = False  # blocks replayed as CUDA graphs (on a GPU): steps marked, bounds padded
    skipped_in_a_row: int = 0  # steps fp16's loss scaler skipped in a row, up to the last
    resumed_window: dict[str, Any] = field(default_factory=dict)  # a checkpoint's steps since its last log line


MAX_SKIPPED_STEPS = 25  # in a row: the scaler halves its scale at each (2^16 down to 2^-9), then it is a divergence


def check_context(model: Any, seq_length: int) -> None:
    """Refuse rows longer than a model's learned position embeddings (GPT-BigCode's `wpe`: an index
    past them is an IndexError, on a GPU a device-side assert); warn past a rotary model's stated
    context (it runs, but past what it was trained on)."""
    from fimtune.model import position_limit

    check_positions(*position_limit(model), seq_length)


def check_positions(limit: int | None, learned: bool, seq_length: int) -> None:
    """:func:`check_context` on a model's position limit and whether its positions are learned."""
    if limit is None or seq_length <= limit:
        return
    if learned:
        raise FimtuneError(
            f"packing.seq_length={seq_length} is longer than the model's {limit} learned positions: "
            f"set packing.seq_length to {limit} or less"
        )
    log.warning("packing.seq_length=%d is past the model's stated context of %d tokens", seq_length, limit)


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices (LoRA's, and the rows of added tokens), none on norms, biases
    and other 1-D parameters (the Trainer's groups for LoRA; it would decay DoRA's magnitude vector).

    An empty group is left out (LoRA alone has no 1-D parameters): DeepSpeed drops empty groups,
    and the learning-rate schedule, built on the optimizer's groups, would then have one too many.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_accelerator(cfg: RunConfig) -> Any:
    """An Accelerator for ``cfg``; a run in a process that already trained (tests, notebooks) starts afresh.

    Accelerate keeps its state in process-wide singletons and refuses a second run with
    another precision; the process-group part (PartialState) is kept.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()

    mp = resolve_mixed_precision(cfg.train.mixed_precision)
    # cpu=True on machines without CUDA: several processes (`accelerate launch --multi_gpu`,
    # torchrun) then form a gloo process group instead of running alone.
    return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())


def resolve_mixed_precision(mp: str) -> str:
    """`train.mixed_precision` as Accelerate gets it: "auto" is bf16 on a GPU that has it, else none."""
    if mp == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return mp


def setup(cfg: RunConfig, accelerator: Any) -> Setup:
    from accelerate.utils import set_seed

    from fimtune.dataset import check_folder, check_source, training_rows
    from fimtune.engines import configure_deepspeed, refuse_fsdp1, tied_embeddings_shown
    from fimtune.model import add_token_rows, load_base_model
    from fimtune.tokens import ensure_fim_tokens

    refuse_fsdp1(accelerator)
    check_source(cfg.data)  # a mistyped data.path fails now, not after the model's minutes of loading
    if cfg.data.path:
        check_folder(Path(cfg.data.path))
    set_seed(cfg.seed)
    tokenizer = _fresh_tokenizer(cfg.model.name_or_path)
    fim_tokens, added = ensure_fim_tokens(tokenizer)
    model = load_base_model(cfg.model, accelerator.device, training=True)
    check_context(model, cfg.packing.seq_length)
    new_ids = add_token_rows(model, tokenizer, added, fim_tokens)
    model, loss_chunk = prepare_model(model, cfg, accelerator, new_ids)

    train_rows, make_eval_rows, n_rows = training_rows(cfg, tokenizer, fim_tokens, accelerator)
    world = accelerator.num_processes
    rows_per_step = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * world
    max_steps = run_steps(cfg.train, n_rows, rows_per_step)
    optimizer, scheduler = make_optimizer(model, cfg, accelerator.device, max_steps)
    configure_deepspeed(accelerator, cfg.train.batch_size, cfg.train.max_grad_norm)
    with tied_embeddings_shown(accelerator, model):
        model, optimizer = accelerator.prepare(model, optimizer)
    return Setup(
        accelerator,
        model,
        tokenizer,
        optimizer,
        scheduler,
        train_rows,
        make_eval_rows,
        max_steps,
        rows_per_step * cfg.packing.seq_length,
        loss_chunk,
        cfg.train.cuda_graphs,
    )


def run_steps(tc: TrainConfig, rows_per_epoch: int, rows_per_step: int) -> int:
    """The run's optimizer steps: `train.max_steps`, else `train.num_epochs` passes over the rows.

    `max_steps` is 100 by default, so epochs given alone would be dropped without a word: warned.
    """
    if tc.max_steps is None:
        return max(1, math.ceil(tc.num_epochs * rows_per_epoch / rows_per_step))
    if tc.num_epochs != TrainConfig.num_epochs:
        log.warning(
            "train.num_epochs=%g is ignored: train.max_steps=%d sets the run's length "
            "(train.max_steps=null trains by epochs)",
            tc.num_epochs,
            tc.max_steps,
        )
    return tc.max_steps


def prepare_model(model: Any, cfg: RunConfig, accelerator: Any, new_token_ids: list[int]) -> tuple[Any, int]:
    """A loaded base model made ready to train: checkpointing, k-bit preparation, LoRA, the fast
    path (attention dropout off under `varlen`, LoRA inputs uncast, compiled blocks);
    returns it with the loss chunk (tokens; 0: whole logits)."""
    from fimtune.engines import deepspeed_stage, sharded_parameters
    from fimtune.fast import VARLEN, disable_attention_dropout, logit_softcap, speed_up
    from fimtune.model import attach_lora

    tc = cfg.train
    if tc.fp8_base:
        _check_fp8(accelerator)
    checkpointing = {"use_reentrant": False}
    cuda = accelerator.device.type == "cuda"
    want_compile = _compiles(cfg, cuda)
    if tc.cuda_graphs:
        _check_cuda_graphs(cfg, accelerator, want_compile)

    def no_input_grads(model: Any) -> Any:
        # Non-reentrant checkpointing gives the LoRA weights in a block their gradients whether or not
        # the block's input asks for one. transformers (when checkpointing is switched on) and PEFT
        # (when it wraps a checkpointed model) still hook the embeddings to make their output ask, for
        # the reentrant kind: that costs the first block's whole input gradient, which nothing reads
        # (trainable embedding rows ask on their own). Each hook is removed as soon as it is made: the
        # next one's bookkeeping would forget it.
        if tc.gradient_checkpointing:
            model.disable_input_require_grads()
        return model

    if tc.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        no_input_grads(model)
    if cfg.model.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = no_input_grads(
            prepare_model_for_kbit_training(
                model, tc.gradient_checkpointing, gradient_checkpointing_kwargs=checkpointing
            )
        )
    model = no_input_grads(attach_lora(model, cfg.lora, new_token_ids))
    if getattr(model.config, "_attn_implementation", None) == VARLEN and (p := disable_attention_dropout(model)):
        log.warning(
            "attention dropout %g is off: the varlen kernel has none (model.attn_implementation=sdpa keeps it)", p
        )
    if want_compile and deepspeed_stage(accelerator) == 3:
        # ZeRO-3 fetches and releases parameters in hooks on every module: compiled blocks trace them,
        # and recompile at each module until the compiler gives up (64 times a frame).
        (log.warning if tc.compile else log.info)(
            "the blocks are not compiled: under DeepSpeed ZeRO-3 its per-module parameter hooks make "
            "torch.compile recompile without end (ZeRO-2, FSDP2 and DDP compile)"
        )
        want_compile = False
    # Torch autocast, which makes LoRA's input casts needless; not under DeepSpeed (bf16 weights instead).
    autocast = bool(accelerator.native_amp)
    notes = speed_up(
        model,
        want_compile,
        autocast,
        tc.activation_memory,
        tc.hashed_dropout,
        tc.attention_kernel,
        tc.fp8_base,
        tc.cuda_graphs,
    )
    for note in notes:
        log.info(note)
    chunk = tc.loss_chunk_tokens if tc.loss_chunk_tokens is not None else (4096 if cuda else 0)
    if chunk and (engine := sharded_parameters(accelerator)):
        # The chunked loss calls the output head outside the model's forward, where its weight is split.
        log.info(
            "the loss takes all logits at once (no chunks of %d tokens): under %s the output head is "
            "whole only inside the model's forward",
            chunk,
            engine,
        )
        chunk = 0
    if chunk and (cap := logit_softcap(model)):
        log.info(
            "the loss takes all logits at once (no chunks of %d tokens): the model caps its logits after "
            "the output head (final_logit_softcapping=%g), which the chunks bypass",
            chunk,
            cap,
        )
        chunk = 0
    return model, chunk


def make_optimizer(model: Any, cfg: RunConfig, device: torch.device, max_steps: int) -> tuple[Any, Any]:
    """AdamW (fused on CUDA) over the trainable parameters, and the warmup + decay schedule."""
    from transformers import get_scheduler

    tc = cfg.train
    if tc.warmup_steps >= max_steps > 0:
        log.warning(
            "train.warmup_steps=%d is not less than the run's %d steps: the learning rate rises all the "
            "run and never reaches train.learning_rate=%g (lower train.warmup_steps)",
            tc.warmup_steps,
            max_steps,
            tc.learning_rate,
        )
    optimizer = torch.optim.AdamW(
        param_groups(model, tc.weight_decay), lr=tc.learning_rate, fused=(device.type == "cuda") or None
    )
    scheduler = get_scheduler(
        tc.lr_scheduler if tc.lr_scheduler != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=tc.warmup_steps,
        num_training_steps=max_steps,
    )
    return optimizer, scheduler


def _fresh_tokenizer(name: str) -> Any:
    """A private copy of the (cached) tokenizer: adding FIM tokens must not leak."""
    import copy

    from fimtune.hub import load_tokenizer

    return copy.deepcopy(load_tokenizer(name))


# --------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------


def forward_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (batch, seq, vocab) of packed rows; attention stays inside each document.

    ``use_cache=False`` matters: transformers builds the block-diagonal mask of packed rows
    from position ids only when no KV cache exists. Under `varlen` attention and FlashAttention-2
    the documents' boundaries go to the kernel instead (as cumulative lengths): transformers finds
    packed documents in the position ids for FlashAttention-2 in rows of one only, and GPT-BigCode
    hands its attention no position ids at all (its documents would see each other).
    """
    from fimtune.fast import VARLEN, varlen_kwargs

    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    attn = getattr(_config(model), "_attn_implementation", None)
    if attn == VARLEN:
        kwargs.update(varlen_kwargs(batch))
    elif attn == "flash_attention_2" and "position_ids" in batch:
        # not varlen's 4D placeholder mask: FlashAttention-2 takes a 2D mask of padding, or none
        kwargs.update({k: v for k, v in varlen_kwargs(batch).items() if k != "attention_mask"})
    return model(**kwargs).logits


def _config(model: Any) -> Any:
    return getattr(getattr(model, "module", model), "config", None)


def _on_host_bounds(model: Any, batch: dict[str, Any], padded: bool = False) -> dict[str, Any]:
    """A host batch, with its documents' bounds added when ``model`` attends through `varlen` or
    FlashAttention-2 (``padded``: with empty documents, for blocks replayed as CUDA graphs)."""
    from fimtune.fast import VARLEN, with_cu_seq_lens

    attn = getattr(_config(model), "_attn_implementation", None)
    bounded = attn == VARLEN or (attn == "flash_attention_2" and "position_ids" in batch)
    return with_cu_seq_lens(batch, padded) if bounded else batch


def summed_loss(
    model: Any, batch: dict[str, torch.Tensor], chunk: int = 0, count: bool = True
) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over label tokens, number of label tokens).

    ``chunk`` > 0: the head and the loss run that many tokens at a time (same value).
    ``count=False``: the tokens are not counted (0), so the host does not wait for the GPU here.
    """
    labels = batch["labels"][:, 1:]
    n = int((labels != IGNORE_INDEX).sum()) if count else 0
    if chunk:
        from fimtune.fast import chunked_cross_entropy, head_bypassed

        with head_bypassed(model) as head:
            hidden = forward_logits(model, batch)  # hidden states: the head is bypassed
        # The label of position t is token t + 1; the last position of each row has none.
        shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)
        return chunked_cross_entropy(hidden.flatten(0, 1), head, shifted.flatten(), chunk), n
    logits = forward_logits(model, batch)
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, n


@torch.no_grad()
def validate(s: Setup, max_batches: int | None) -> dict[str, float]:
    """Mean validation loss per label token (all processes), with perplexity."""
    from fimtune.engines import eval_model, sharded_parameters

    acc = s.accelerator
    s.model.eval()
    # Under ZeRO-3 and FSDP every forward gathers parameters from all processes: all run as many
    # forwards, those out of batches on a batch without labels (row counts differ by up to one).
    lockstep = sharded_parameters(acc) is not None
    model = eval_model(acc, s.model)
    # The losses are summed on the device and the label tokens on the host: nothing is read back
    # until the end, so the host queues each batch while the GPU runs the one before.
    loss_sum = torch.zeros((), device=acc.device, dtype=torch.float64)
    tokens = rows = 0
    batches, last = s.make_eval_rows(), None
    for i in itertools.count():
        batch = next(batches, None) if max_batches is None or i < max_batches else None
        if lockstep and acc.reduce(_on_device(float(batch is not None), acc.device), "sum") > 0:
            batch = batch if batch is not None else _without_labels(last) if last is not None else NO_LABELS_BATCH
        if batch is None:
            break
        # Every batch as many rows as the first: compiled blocks given a short last batch would be
        # compiled again for any number of rows, and the training step's too (torch.compile marks a
        # dimension dynamic for the code, whichever call it is).
        rows = rows or len(batch["labels"])
        batch = last = _filled(batch, rows)
        if s.cuda_graphs:  # the last batch's graph outputs are done with (the loss is not one)
            torch.compiler.cudagraph_mark_step_begin()
        tokens += _label_tokens(batch)
        batch = _to_device(_on_host_bounds(model, batch, s.cuda_graphs), acc.device)
        with acc.autocast():
            loss, _ = summed_loss(model, batch, s.loss_chunk, count=False)
        loss_sum += loss.detach().double()
    s.model.train()
    total = torch.stack([loss_sum, torch.full((), tokens, dtype=torch.float64, device=acc.device)])
    total = acc.reduce(total, reduction="sum")
    if total[1] == 0:
        return {}
    mean = float(total[0] / total[1])
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0)), "val_tokens": int(total[1])}


# One token, no label: a forward that adds nothing to the validation loss (a process with no batch at all).
NO_LABELS_BATCH = {"input_ids": [[0]], "labels": [[IGNORE_INDEX]]}


def _without_labels(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` adding nothing to the loss: its inputs, every label ignored."""
    return {**batch, "labels": torch.full_like(torch.as_tensor(batch["labels"]), IGNORE_INDEX)}


def _filled(batch: dict[str, Any], rows: int) -> dict[str, Any]:
    """``batch`` with copies of its last row, without labels, up to ``rows`` rows (the loss and
    the label tokens are those of ``batch``)."""
    short = rows - len(batch["labels"])
    if short <= 0:
        return batch
    tensors = {key: torch.as_tensor(value) for key, value in batch.items()}
    more = _without_labels({key: value[-1:].expand(short, *value.shape[1:]) for key, value in tensors.items()})
    return {key: torch.cat([value, more[key]]) for key, value in tensors.items()}


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on ``device``; to a GPU through pinned memory, so the copy does not wait for the
    work queued before it (the host goes on queueing the step). Tensors already there stay as they are."""
    pin = device.type == "cuda"
    tensors = {k: torch.as_tensor(v) for k, v in batch.items()}
    return {
        k: (t.pin_memory() if pin and t.device.type == "cpu" else t).to(device, non_blocking=True)
        for k, t in tensors.items()
    }


# --------------------------------------------------------------------------------------
# Fit
# --------------------------------------------------------------------------------------


def fit(cfg: RunConfig, resume: bool = False, stop_after: int | None = None) -> Path:
    """Train per ``cfg``; return the run folder.

    ``stop_after`` ends the run after that step with a checkpoint, as an interruption would
    (the schedule still spans ``max_steps``); ``fit(cfg, resume=True)`` continues it.
    """
    cfg = resolved_paths(cfg)  # config.yaml and the adapter's base name then load from any folder
    run_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg)
    if not accelerator.is_main_process:  # the main process warns for all: each warning once a run, not once a process
        import warnings

        from transformers.utils import logging as transformers_logging

        logging.getLogger("fimtune").setLevel(logging.ERROR)
        warnings.simplefilter("ignore")  # Python's warnings too (a LoRA target that matches no module)
        transformers_logging.disable_progress_bar()  # and shows the model's loading, once
    from_checkpoint = prepare_run_dir(run_dir, resume)  # every process checks before any writes
    if resume:
        check_same_checkpoint(accelerator, run_dir)
    if from_checkpoint:
        check_resumed_config(cfg, run_dir)
    elif resume:  # a run stopped before its first checkpoint starts over; so does a mistyped output_dir
        log.warning("--resume: '%s' holds no checkpoint yet: the run starts at step 0", run_dir)
    accelerator.wait_for_everyone()
    created = not run_dir.exists()
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        s = setup(cfg, accelerator)
    except BaseException:  # a refused setting, a model or data that does not load: no empty run folder left
        if created and accelerator.is_main_process and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise
    acc, tc = s.accelerator, cfg.train
    start_step = restore(s, run_dir) if from_checkpoint else 0
    if from_checkpoint and acc.is_main_process:
        print(_resuming(run_dir, start_step, s.max_steps))
    if stop_after is not None and stop_after <= start_step:
        raise FimtuneError(f"--stop-after {stop_after}: the run is at step {start_step} already (its last checkpoint)")
    if stop_after is not None and stop_after >= s.max_steps:
        log.warning("--stop-after %d: the run's last step is %d; it runs to its end", stop_after, s.max_steps)
        stop_after = None  # its end: the final validation too, not a stop to resume from
    if acc.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
        checkpoint.save_tokenizer(s.tokenizer, run_dir / "tokenizer")
    acc.wait_for_everyone()
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=acc.is_main_process, resumed_at=start_step)
    metrics.truncate(start_step)  # events logged after the checkpoint by an interrupted run
    bar = _progress(start_step, s.max_steps, disable=not acc.is_main_process)
    try:
        s.model.train()
        log_window = _Window(**s.resumed_window)  # the steps since the last log line, before the checkpoint
        pending: _Pending | None = None  # the step whose loss is not read yet (read once the next is queued)
        for step in range(start_step, s.max_steps):
            if tc.eval_every and step % tc.eval_every == 0:
                _finish(pending, s, tc, metrics, bar, log_window)  # read first: log lines stay in order
                pending = None
                metrics.write({"step": step, **validate(s, tc.eval_batches)})
            values = train_step(s, tc, run_dir, step)
            done = step + 1
            _finish(pending, s, tc, metrics, bar, log_window)  # waits for the previous step only
            pending = _Pending(done, values)
            if (tc.save_every and done % tc.save_every == 0) or done in (s.max_steps, stop_after):
                _finish(pending, s, tc, metrics, bar, log_window)
                pending = None
                save(s, run_dir, done, log_window)
            if done == stop_after:
                bar.close()
                if acc.is_main_process:
                    print(
                        f"stopped after step {done} of {s.max_steps} (--stop-after), checkpoint "
                        f"{checkpoint.latest_checkpoint(run_dir).name}: the same command with --resume continues"
                    )
                return run_dir
        _finish(pending, s, tc, metrics, bar, log_window)
        bar.close()
        final = validate(s, tc.eval_batches)
        metrics.write({"step": s.max_steps, **final})
        if final and not math.isfinite(final["val_loss"]):
            raise diverged(f"the validation loss is {final['val_loss']} after the last step", run_dir)
        if acc.is_main_process and final:
            print(f"validation loss {final['val_loss']:.4f} (ppl {final['val_ppl']:.2f}) after {s.max_steps} steps")
        acc.wait_for_everyone()
    except BaseException as e:
        bar.close()  # what is said next goes on a line of its own, not after the bar's
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C, or SIGTERM (`Terminated`): the same kind, told
            raise type(e)(_stopped(run_dir)) from None
        raise
    return run_dir


def _kept(run_dir: Path) -> str | None:
    """What a run that stopped early keeps, said so; None before its first checkpoint."""
    last = checkpoint.latest_checkpoint(run_dir)
    return f"its last checkpoint ({last.name}) is kept in {run_dir}" if last else None


def _resuming(run_dir: Path, step: int, max_steps: int) -> str:
    """Where a resumed run continues: its checkpoint and step (the run restored it already)."""
    said = f"resuming from checkpoint {checkpoint.latest_checkpoint(run_dir).name} (step {step} of {max_steps})"
    return f"{said}: the run has ended; its final validation runs again" if step >= max_steps else said


def _stopped(run_dir: Path) -> str:
    """What an interrupted run kept, and how to continue it."""
    if (kept := _kept(run_dir)) is None:
        return f"training stopped before its first checkpoint; the same command with --resume starts {run_dir} over"
    return f"training stopped; {kept}: the same command with --resume continues from it"


def exit_launched_process() -> None:
    """Under a launcher of several processes, end this one (exit code 0) once every process has
    finished, without the interpreter's teardown; elsewhere, return.

    A finished two-process FSDP2 run on gloo sometimes ended in a SIGABRT at exit ("terminate called
    without an active exception", pytorch/pytorch#190489): ProcessGroupGloo's worker threads live on
    until the interpreter is torn down, even after `destroy_process_group` and a garbage collection
    (the C++ group stays referenced), and one of them touching the interpreter then aborts the
    process. Everything a run writes is on disk by now (checkpoints, metrics, TensorBoard, flushed
    at each write); the output streams and log handlers are flushed here.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    dist.barrier()  # no process leaves while another still talks to it
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def _check_fp8(accelerator: Any) -> None:
    """`train.fp8_base` where it can run: FP8 products (compute capability 8.9+ on a GPU), whole weights."""
    from fimtune.engines import weight_engine

    if engine := weight_engine(accelerator):
        raise FimtuneError(
            f"train.fp8_base: the FP8 copies of the weights are made from whole weights, which {engine} "
            "splits or casts; train on one process or under DDP, or drop train.fp8_base"
        )
    device = accelerator.device
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise FimtuneError(
            f"train.fp8_base: this GPU (compute capability {major}.{minor}) has no FP8 matrix units; "
            "they come with 8.9 (Ada), 9.0 (Hopper) and 10.x (Blackwell). Drop train.fp8_base"
        )


def _check_cuda_graphs(cfg: RunConfig, accelerator: Any, compiled: bool) -> None:
    """`train.cuda_graphs` where compiled blocks can replay graphs; on a CPU, a note that they will not."""
    from fimtune.engines import weight_engine

    engine = weight_engine(accelerator)
    why = _cuda_graphs_refusal(cfg.train, compiled)
    if why is None and engine:
        why = f"{engine} gathers or moves the parameters in hooks around each block"
    if why:
        raise FimtuneError(f"train.cuda_graphs: {why}; drop train.cuda_graphs")
    if accelerator.device.type != "cuda":
        log.warning("train.cuda_graphs: no CUDA device; the blocks run compiled, without CUDA graphs")


def _cuda_graphs_refusal(tc: Any, compiled: bool) -> str | None:
    """Why the config's blocks cannot replay CUDA graphs (None: they can, as far as the config tells)."""
    if not compiled:
        return "the graphs are the compiled blocks', and train.compile is off (its default off CUDA GPUs and for quantized models)"
    if tc.gradient_checkpointing:
        return "checkpointed blocks run their forward pass again inside the backward pass, outside the recorded order"
    return None


def _compiles(cfg: RunConfig, cuda: bool) -> bool:
    """Whether the blocks are compiled: `train.compile`, by default on CUDA GPUs for unquantized models."""
    return cfg.train.compile if cfg.train.compile is not None else cuda and cfg.model.quantization == "none"


def train_step(s: Setup, tc: Any, run_dir: Path, step: int) -> Callable[[], tuple[float, float | None, float]]:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches, queued on the device
    with no wait for it: returns a function that waits for the step and gives (mean loss, grad norm,
    seconds the step took: on a GPU, between CUDA events at its start and end, so the time the host
    spent on other work after queueing it does not count).

    Nothing in the step reads a value back from the GPU, so the host queues the next step while
    this one runs (:func:`fit` reads each step's loss once the next is queued). A loss that is not
    finite raises when it is read (FimtuneError: the checkpoint written before it is the last good one).
    """
    acc = s.accelerator
    if s.cuda_graphs:  # the last step's graph outputs are done with: the graphs may replay over them
        torch.compiler.cudagraph_mark_step_begin()
    in_place = s.cuda_graphs and tc.gradient_accumulation_steps > 1
    if in_place:
        _allocate_gradients(s.optimizer)
    took = _step_clock(acc.device)
    rows = [next(s.train_rows) for _ in range(tc.gradient_accumulation_steps)]
    n_tokens = _global_label_tokens(acc, rows)  # counted on the host, before the copies
    batches = [_to_device(_on_host_bounds(s.model, b, s.cuda_graphs), acc.device) for b in rows]
    step_loss: torch.Tensor | None = None
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        # The backward of the last micro-batch ends the window: DeepSpeed's engine then reduces,
        # clips and steps (inside `acc.backward`; `optimizer.step()` below is a no-op there).
        acc.sync_gradients = last
        ctx = acc.no_sync(s.model) if not last else _nullcontext()
        with ctx, acc.autocast():
            loss, _ = summed_loss(s.model, batch, s.loss_chunk, count=False)
            # DDP (and DeepSpeed) average gradients over processes: scale so the result is the global mean.
            acc.backward(loss * acc.num_processes / n_tokens)
        loss = loss.detach().float()
        step_loss = loss if step_loss is None else step_loss + loss
    # Under DeepSpeed this clips nothing (its step did, by train.max_grad_norm) and returns the norm it saw.
    grad_norm = acc.clip_grad_norm_(_clipped_parameters(s), tc.max_grad_norm) if tc.max_grad_norm else None
    lr = s.scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler's next is the next step's)
    s.optimizer.step()
    # fp16's loss scaler skips a step whose gradients overflowed (inf or NaN) and lowers its scale:
    # routine in the first steps, not a divergence; the schedule waits for a step that is taken, as
    # in transformers' Trainer. (The scaler read its overflow flag on the host already.)
    skipped = acc.scaler is not None and acc.optimizer_step_was_skipped
    s.skipped_in_a_row = s.skipped_in_a_row + 1 if skipped else 0
    if s.skipped_in_a_row >= MAX_SKIPPED_STEPS:
        raise diverged(
            f"fp16's loss scaler skipped {MAX_SKIPPED_STEPS} steps in a row (their gradients overflowed)", run_dir
        )
    if not skipped:
        s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=not in_place)
    assert step_loss is not None
    loss_mean = acc.reduce(step_loss, "sum") / n_tokens
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    norm = _on_device(grad_norm if grad_norm is not None else 0.0, loss_mean.device)
    read = copy_to_host(torch.stack([loss_mean.float().reshape(()), norm.float().reshape(())]))
    seconds = took()

    def values() -> tuple[float, float | None, float, float]:
        loss_value, norm_value = read()
        # before this step's checkpoint: a gradient norm of inf or NaN gave the weights NaN (unless
        # fp16's loss scaler skipped the step)
        checked = norm_value if grad_norm is not None and not skipped else 0.0
        for what, value in (("loss", loss_value), ("gradient norm", checked)):
            if not math.isfinite(value):
                raise diverged(f"the {what} became {value} at step {step + 1}", run_dir)
        if skipped:
            log.info("step %d: fp16 gradients overflowed; the loss scaler skipped the step", step + 1)
        return loss_value, None if grad_norm is None or skipped else norm_value, seconds(), lr

    return values


def diverged(what: str, run_dir: Path) -> FimtuneError:
    """The error of a run that diverged: what happened, its last good checkpoint (if any), what to try."""
    kept = _kept(run_dir) or "no checkpoint was written yet"
    return FimtuneError(
        f"{what}: training stopped; {kept}. A new run (a new output_dir) with a lower train.learning_rate "
        "(or model.dtype=fp32) may avoid it"
    )


def _on_device(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float32 scalar on ``device``, without a wait: a number is filled in there (a copy from the
    host's pageable memory would wait for the work queued before it); a tensor is moved, if need be."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32)
    return torch.full((), float(value), dtype=torch.float32, device=device)


def _allocate_gradients(optimizer: Any) -> None:
    """Give each trainable parameter a gradient of zeros where it has none, so backward passes add
    into it in place.

    Under `train.cuda_graphs` a block's backward graph writes its LoRA gradients into the graphs'
    memory pool. A parameter with no gradient takes that output as its gradient (autograd keeps
    the tensor it is given); the next micro-batch's forward starts a new graph step, whose replays
    write over the same memory, so accumulated gradients would be lost or raise
    (pytorch/pytorch#169545). A gradient of the parameter's own is added to, never replaced.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)


def _clipped_parameters(s: Setup) -> Any:
    """The parameters whose gradients are clipped: the optimizer's (the trainable ones), not every
    parameter of the model, whose frozen ones have no gradient but cost the host a walk over all
    modules a step (twice, in accelerate). Under FSDP and DeepSpeed, the model's: accelerate picks
    their own clipping by comparing the parameters given to the model's."""
    from accelerate.utils import DistributedType

    if s.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return s.model.parameters()
    return [p for group in s.optimizer.param_groups for p in group["params"]]


def _step_clock(device: torch.device) -> Callable[[], Callable[[], float]]:
    """Start timing a step; the function returned ends it and gives a reader of its seconds.

    On a GPU the step is only queued: CUDA events mark its start and end on the stream (the start
    runs when the GPU gets there, after the previous step), and reading waits for the end. Elsewhere
    the work is done when the host returns: wall time.
    """
    if device.type != "cuda":
        began = time.perf_counter()

        def end_on_host() -> Callable[[], float]:
            seconds = time.perf_counter() - began
            return lambda: seconds

        return end_on_host
    start = torch.cuda.Event(enable_timing=True)
    start.record()

    def end_on_gpu() -> Callable[[], float]:
        end = torch.cuda.Event(enable_timing=True)
        end.record()

        def read() -> float:
            end.synchronize()
            return start.elapsed_time(end) / 1000

        return read

    return end_on_gpu


@dataclass
class _Window:
    """Steps' time and tokens since the last log line (validation and saving excluded)."""

    seconds: float = 0.0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)  # each step's loss
    norms: list[float] = field(default_factory=list)  # each step's gradient norm (skipped steps' none)


@dataclass
class _Pending:
    """A step queued on the device whose loss is not read yet."""

    done: int  # steps done once it finishes
    values: Callable[[], tuple[float, float | None, float, float]]  # loss, grad norm, seconds, its learning rate


def _finish(pending: _Pending | None, s: Setup, tc: Any, metrics: Any, bar: Any, window: _Window) -> None:
    """Read ``pending``'s loss (waiting for that step), log it and move the progress bar."""
    if pending is None:
        return
    loss, grad_norm, seconds, lr = pending.values()
    window.seconds, window.tokens = window.seconds + seconds, window.tokens + s.tokens_per_step
    window.losses.append(loss)
    if grad_norm is not None:
        window.norms.append(grad_norm)
    if pending.done % tc.log_every == 0 or pending.done == s.max_steps:
        # the means over the steps since the last line: the loss as transformers' Trainer logs it, the
        # gradient norm too (the Trainer logs the last step's); the learning rate the last step used
        loss_mean = sum(window.losses) / len(window.losses)
        rec = {"step": pending.done, "loss": loss_mean, "lr": lr, "tokens_per_s": window.tokens / window.seconds}
        metrics.write({**rec, "grad_norm": sum(window.norms) / len(window.norms)} if window.norms else rec)
        window.seconds, window.tokens, window.losses, window.norms = 0.0, 0, [], []
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{s.tokens_per_step / seconds:,.0f}")
    bar.update(1)


def _global_label_tokens(acc: Any, rows: list[dict[str, Any]]) -> int | torch.Tensor:
    """Label tokens of a step's micro-batches (host data), over all processes: an int for one
    process, else a tensor on the device (summed there, so the host does not wait for it)."""
    local = sum(_label_tokens(r) for r in rows)
    if acc.num_processes == 1:
        return max(1, local)
    # torch.full fills on the device; torch.tensor(local, device=...) would copy from pageable host
    # memory, and PyTorch waits for the stream after such a copy: for the step queued before.
    return acc.reduce(torch.full((), local, dtype=torch.long, device=acc.device), "sum").clamp(min=1)


def _label_tokens(batch: dict[str, Any]) -> int:
    """Label tokens of a host batch (each row's first token has no label: it is no one's next)."""
    return int((torch.as_tensor(batch["labels"])[:, 1:] != IGNORE_INDEX).sum())


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(start: int, total: int, disable: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", disable=disable, dynamic_ncols=True)


# What a resumed run may set differently from the run it continues: when to evaluate, log and save,
# and how the same steps are computed (kernels, compilation, memory, precision); the rest (data, FIM,
# packing, LoRA, optimizer, schedule, seed) is the run itself.
RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "model.attn_implementation",
        "model.dtype",
        "train.mixed_precision",
        "train.gradient_checkpointing",
        "train.compile",
        "train.hashed_dropout",  # with compile by default: another mask stream, the same rates
        "train.activation_memory",
        "train.attention_kernel",
        "train.cuda_graphs",
        "train.fp8_base",  # the frozen products' precision: the adapter and its state are as without it
        "train.loss_chunk_tokens",
        "train.eval_every",
        "train.eval_batches",
        "train.log_every",
        "train.save_every",
    }
)


def check_resumed_config(cfg: RunConfig, run_dir: Path) -> None:
    """Refuse to resume ``run_dir`` with settings that change the run (its ``config.yaml`` says what
    it was): the optimizer's state and the schedule would silently keep some of the old ones."""
    from fimtune.config import changes, load_run_config

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    before = resolved_paths(load_run_config(saved))  # a run saved with relative paths: as from here
    # epochs set nothing while max_steps sets the run's length (`run_steps` warns that they are ignored)
    ignored = {"train.num_epochs"} if before.train.max_steps is not None and cfg.train.max_steps is not None else set()
    changed = [c for c in changes(before, cfg) if c[0] not in RESUMABLE_CHANGES | ignored]
    if changed:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed)
        raise FimtuneError(
            f"--resume: these settings differ from the run's {saved}: {listed}. Resume with that file "
            f"(fimtune train --config {saved} --resume), or train into a new output_dir"
        )


def prepare_run_dir(run_dir: Path, resume: bool) -> bool:
    """Check the run folder; return whether to restore a checkpoint.

    A new run needs an empty folder. ``--resume`` needs a checkpoint, or a run interrupted
    before its first one (an empty folder, or a run folder: its config.yaml beside its tokenizer):
    that starts over. A folder's own config.yaml (a project's) is no run's, and is not written over.
    """
    from fimtune.corpus.files import is_run_folder

    if file := next((p for p in [run_dir, *run_dir.parents] if p.exists() and not p.is_dir()), None):
        raise FimtuneError(f"output_dir '{run_dir}': '{file}' is a file, not a folder: pass output_dir=NEW_DIR")
    if resume:
        if checkpoint.latest_checkpoint(run_dir) is not None:
            return True
        if not run_dir.exists() or not any(run_dir.iterdir()) or is_run_folder(run_dir):
            return False
        raise FimtuneError(f"--resume: '{run_dir}' holds no checkpoint to resume from")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FimtuneError(f"output_dir '{run_dir}' is not empty: pass --resume to continue it, or output_dir=NEW_DIR")
    return False


def check_same_checkpoint(accelerator: Any, run_dir: Path) -> None:
    """Refuse a resume whose processes find different checkpoints in ``run_dir`` (or some none): each
    process loads the checkpoint itself, so on machines that do not share output_dir one would start
    from another step (or step 0) with other weights, and the processes' collectives fall out of step."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    latest = checkpoint.latest_checkpoint(run_dir)
    found = gather_object([latest.name if latest is not None else None])
    if len(set(found)) > 1:
        listed = ", ".join(f"process {rank}: {name or 'none'}" for rank, name in enumerate(found))
        raise FimtuneError(
            f"--resume: the processes find different checkpoints in '{run_dir}' ({listed}): every process "
            "loads the checkpoint, so output_dir must be a folder all machines share"
        )


def save(s: Setup, run_dir: Path, step: int, window: _Window | None = None) -> None:
    """Checkpoint ``step``: the main process writes it, except a split optimizer state (DeepSpeed ZeRO,
    sharded FSDP), of which every process writes its part first."""
    from accelerate.utils import gather_object

    from fimtune.engines import adapter_state_dict, optimizer_part, optimizer_sharding

    acc = s.accelerator
    acc.wait_for_everyone()
    state_dict = adapter_state_dict(acc, s.model)  # collective: gathers shards under FSDP / ZeRO-3
    # Weights made NaN by a step whose loss was finite (unclipped inf gradients, say) are never saved.
    bad = sum(not bool(v.isfinite().all()) for v in state_dict.values() if v.is_floating_point())
    if acc.reduce(_on_device(float(bad), acc.device), "sum") > 0:
        raise diverged(f"the adapter's weights are not finite after step {step} (not saved)", run_dir)
    # each process's random state (a GPU's dropout draws from its own device's generator)
    rng = gather_object([checkpoint.rng_state()]) if acc.num_processes > 1 else [checkpoint.rng_state()]
    sharding = optimizer_sharding(acc)
    if sharding:
        if acc.is_main_process:
            checkpoint.start_pending(run_dir, step)
        acc.wait_for_everyone()
        checkpoint.save_optimizer_part(run_dir, step, acc.process_index, optimizer_part(s.optimizer))
        acc.wait_for_everyone()
    if acc.is_main_process:
        model = acc.unwrap_model(s.model)

        def save_adapter(folder: Path) -> None:
            # PEFT keeps only the adapter's keys. Added token rows are saved by their trainable-token
            # adapter (or modules_to_save), never the whole resized embedding matrix in every checkpoint.
            model.save_pretrained(folder, state_dict=state_dict, save_embedding_layers=False)
            check_not_empty(folder / "adapter_model.safetensors", model)

        data = s.train_rows.state_dict()  # each process's place in its share of the rows
        extra: dict[str, Any] = {"processes": acc.num_processes, "training_split": s.train_rows.split_size()}
        if window is not None:  # the losses of the steps since the last log line: a resumed run logs their mean
            extra["log_window"] = {"losses": window.losses, "norms": window.norms}
        if sharding:
            extra["optimizer_sharding"] = sharding
            parts = acc.num_processes
            checkpoint.save_checkpoint(
                run_dir, step, save_adapter, None, s.scheduler, data, extra, parts, rng, acc.scaler
            )
        else:
            checkpoint.save_checkpoint(
                run_dir, step, save_adapter, s.optimizer, s.scheduler, data, extra, rng=rng, scaler=acc.scaler
            )
    acc.wait_for_everyone()


def check_not_empty(adapter_file: Path, model: Any) -> None:
    """Refuse an adapter file without weights from a model that trains some (PEFT selects the adapter's
    keys by module names: under an engine that renamed the modules, as FSDP1 does, PEFT 0.21 writes none)."""
    from safetensors import safe_open

    with safe_open(str(adapter_file), framework="pt") as f:
        if f.keys() or not any(p.requires_grad for p in model.parameters()):
            return
    raise FimtuneError(
        "PEFT wrote the adapter without weights (it found none of the trainable parameters by name; an engine "
        "that renames modules, as FSDP1 does, causes this): train with configs/accelerate/fsdp.yaml (FSDP2) "
        "or deepspeed-zero3.yaml"
    )


def restore(s: Setup, run_dir: Path) -> int:
    """Load adapter weights, optimizer, scheduler, loss scaler, RNG and data position; return the step."""
    from peft import set_peft_model_state_dict

    from fimtune.engines import load_optimizer_part, optimizer_sharding, whole_parameters

    acc = s.accelerator
    ckpt = checkpoint.latest_checkpoint(run_dir)
    meta, state = checkpoint.load_state(ckpt)
    sharding = optimizer_sharding(acc)
    check_same_sharding(ckpt, meta, sharding, acc.num_processes)
    check_same_processes(ckpt, meta, acc.num_processes)
    weights = checkpoint.load_adapter(ckpt)
    with whole_parameters(acc, s.model) as model:
        loaded = set_peft_model_state_dict(model, weights)
    if loaded.unexpected_keys:  # PEFT loads what matches by name, silently
        raise FimtuneError(
            f"the adapter of checkpoint '{ckpt}' does not fit this model: {len(loaded.unexpected_keys)} of its "
            f"{len(weights)} weights match no parameter (e.g. {loaded.unexpected_keys[0]}); resume with the "
            "run's own config.yaml and accelerate config"
        )
    if sharding:  # after the adapter: DeepSpeed's optimizer may read the parameters
        load_optimizer_part(acc, s.optimizer, checkpoint.read_optimizer_part(ckpt, acc.process_index))
    else:
        drop_empty_groups(state["optimizer"], state["scheduler"])
        s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    if acc.scaler is not None and "scaler" in state:  # fp16: the scale it had reached, not the initial one
        acc.scaler.load_state_dict(state["scaler"])
    per_process = state.get("rng_per_process") or []  # checkpoints before it: the main process's alone
    checkpoint.set_rng_state(per_process[acc.process_index] if len(per_process) == acc.num_processes else state["rng"])
    check_same_split(ckpt, meta.get("training_split"), s.train_rows.split_size())
    s.train_rows.load_state_dict(meta["data"])
    s.resumed_window = meta.get("log_window", {})
    return int(meta["step"])


def check_same_processes(ckpt: Path, meta: dict[str, Any], processes: int) -> None:
    """Refuse a checkpoint written by another number of processes: each saved its place in its share of the rows."""
    saved = meta.get("processes", processes)  # not recorded before: as this run
    if saved != processes:
        raise FimtuneError(
            f"checkpoint '{ckpt}' was written by {saved} process(es) and this run has {processes}: "
            "each process's place in its share of the data was saved; resume with the number of processes "
            "it was trained with"
        )


def check_same_split(ckpt: Path, saved: dict[str, Any] | None, split: dict[str, Any]) -> None:
    """Refuse a checkpoint trained on another training split: its place in the rows would point into
    other data. What a checkpoint did not record (written before it was) is not checked."""
    if saved is None or all(saved.get(key, value) == value for key, value in split.items()):
        return
    now = (
        "as many, with other content (files edited or in another order, or another tokenizer)"
        if (saved["documents"], saved["tokens"]) == (split["documents"], split["tokens"])
        else f"{split['documents']:,} ({split['tokens']:,})"
    )
    raise FimtuneError(
        f"checkpoint '{ckpt}' was trained on a training split of {saved['documents']:,} documents "
        f"({saved['tokens']:,} tokens) and the data now holds {now}: its place in the rows would point into "
        "other data; resume with the data it was trained on, or train into a new output_dir"
    )


def check_same_sharding(ckpt: Path, meta: dict[str, Any], sharding: str | None, world_size: int) -> None:
    """Refuse a checkpoint whose optimizer state is split differently from this run's."""
    saved, saved_world = meta.get("optimizer_sharding"), meta.get("world_size")
    if saved == sharding and (sharding is None or saved_world == world_size):
        return

    def run(engine: str | None, world: int) -> str:
        return f"{engine} on {world} process(es)" if engine else "one process or DDP (no split optimizer state)"

    raise FimtuneError(
        f"checkpoint '{ckpt}' was written under {run(saved, saved_world)} but this run is under "
        f"{run(sharding, world_size)}: resume with the accelerate config and number of processes it was trained with"
    )


def drop_empty_groups(optimizer_state: dict[str, Any], scheduler_state: dict[str, Any]) -> None:
    """Remove the empty parameter groups of a checkpoint written before :func:`param_groups` left them out,
    from the optimizer state and the schedule's per-group lists (in place)."""
    groups = optimizer_state["param_groups"]
    keep = [i for i, g in enumerate(groups) if g["params"]]
    if len(keep) == len(groups):
        return
    optimizer_state["param_groups"] = [groups[i] for i in keep]
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        if isinstance(scheduler_state.get(key), list) and len(scheduler_state[key]) == len(groups):
            scheduler_state[key] = [scheduler_state[key][i] for i in keep]


def metrics_records(path: Path) -> list[dict[str, Any]]:
    """The records of a run's `metrics.jsonl`; a line that is not JSON is skipped: the last one of a
    run killed while writing it, or of a run still training (the log is appended to as it goes)."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


class MetricsLog:
    """Append-only `metrics.jsonl` (and TensorBoard when installed)."""

    def __init__(self, path: Path, enabled: bool, resumed_at: int = 0) -> None:
        self.path, self.enabled = path, enabled
        # a resumed run's TensorBoard drops what the interrupted one logged after its checkpoint
        self.tb = _tensorboard(path.parent, resumed_at + 1 if resumed_at else None) if enabled else None

    def truncate(self, step: int) -> None:
        """Keep the events before ``step`` (and the training log of ``step`` itself); atomic."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [
            json.dumps(rec) + "\n"  # as `write` wrote it
            for rec in metrics_records(self.path)
            if rec.get("step", 0) < step or (rec.get("step") == step and "loss" in rec)
        ]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled or len(record) <= 1:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()


def _tensorboard(run_dir: Path, purge_step: int | None = None) -> Any:
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)


# --------------------------------------------------------------------------------------
# The plan (`--dry-run`): no weights, no data
# --------------------------------------------------------------------------------------

# Sustained training throughput assumed for the duration estimate, FLOP/s, by device class, in the
# plan's own count (4 x the parameters a token; 6 x with gradient checkpointing). Hopper (compute
# capability 9.x): fimtune's own LoRA step on the StarCoderBase-1B shape with the GPU preset's
# settings ran at 78,192 tokens/s on an H200 (benchmarks/RESULTS.md, run 10), 357 TFLOP/s in that
# count; other bf16 GPUs: about half an A100's dense peak.
ASSUMED_FLOPS = {
    "hopper-bf16": 350e12,
    "cuda-bf16": 150e12,
    "cuda-fp16": 100e12,
    "cuda-fp32": 20e12,
    "cpu": 0.1e12,
}


def preflight(cfg: RunConfig) -> None:
    """Refuse what a run would refuse only after loading its model and data: its data source, rows
    longer than the model's learned positions, quantization (bitsandbytes) without a CUDA GPU, and
    CUDA graphs of blocks that cannot replay them. `fimtune train` checks it before the plan, so
    `--dry-run` says so too."""
    from fimtune.dataset import check_source
    from fimtune.model import quantization_config, stated_positions

    check_source(cfg.data)
    limit, learned = stated_positions(cfg.model.name_or_path)  # the model's config, on the meta device
    if learned:  # a rotary model's long rows are a warning, which the run gives
        check_positions(limit, learned, cfg.packing.seq_length)
    cuda = torch.cuda.is_available()
    if cfg.model.quantization != "none" and not cuda:
        quantization_config(cfg.model.quantization, torch.device("cpu"))  # its error, with what to do
    if cfg.train.cuda_graphs and (why := _cuda_graphs_refusal(cfg.train, _compiles(cfg, cuda))):
        raise FimtuneError(f"train.cuda_graphs: {why}; drop train.cuda_graphs")


# Where launchers give a process the number of processes: torchrun (and `accelerate launch`), and the
# MPI implementations Accelerate's CPU runs use (Intel MPI and MPICH, Open MPI, MVAPICH).
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes() -> int:
    """The number of processes a launcher started this one among (1: none did)."""
    return next((int(os.environ[v]) for v in WORLD_SIZE_VARIABLES if os.environ.get(v, "").isdigit()), 1)


def describe_plan(cfg: RunConfig, first_step: int = 0, stop_after: int | None = None) -> str:
    """What `fimtune train` will do: trainable parameters, tokens per step, device, dtype, duration.

    A call that resumes at ``first_step`` or stops after ``stop_after`` says which steps it runs, and
    its estimate is for those."""
    from fimtune.model import KNOWN_CONFIGS, plan, resolve_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(cfg.model.dtype, device)
    added: list[str] = []
    if cfg.model.name_or_path not in KNOWN_CONFIGS:  # shipped configs are of models with FIM tokens
        from fimtune.hub import load_tokenizer
        from fimtune.tokens import missing_fim_tokens

        added = missing_fim_tokens(load_tokenizer(cfg.model.name_or_path))
    p = plan(cfg.model, cfg.lora, added)
    world = launched_processes()  # under mpirun too (Accelerate's several CPU processes)
    tokens_per_step = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * world * cfg.packing.seq_length
    steps, about = cfg.train.max_steps, ""
    if steps is None and (data := _estimated_train_tokens(cfg)):  # by epochs: the rows are packed at the run
        tokens, about = data
        steps = max(1, math.ceil(cfg.train.num_epochs * tokens / tokens_per_step))
    flops_per_token = (6 if cfg.train.gradient_checkpointing else 4) * p.total  # frozen base: no weight grads
    klass = (
        "cpu"
        if device.type == "cpu"
        else f"cuda-{str(dtype).removeprefix('torch.').replace('bfloat16', 'bf16').replace('float16', 'fp16').replace('float32', 'fp32')}"
    )
    if klass == "cuda-bf16" and torch.cuda.get_device_capability()[0] == 9:
        klass = "hopper-bf16"
    lines = [
        f"model            {cfg.model.name_or_path} ({p.model_type}, {p.total:,} parameters)",
        f"trainable        {p.trainable:,} ({100 * p.trainable / p.total:.3f}%)  LoRA r={cfg.lora.r}"
        + (f" + rows of added tokens {', '.join(added)}" if added else ""),
        f"device           {device.type} x{world}, weights {str(dtype).removeprefix('torch.')}, "
        f"mixed precision {resolve_mixed_precision(cfg.train.mixed_precision)}"
        + (" (auto)" if cfg.train.mixed_precision == "auto" else "")
        + f", quantization {cfg.model.quantization}",
        f"tokens per step  {tokens_per_step:,} ({cfg.train.batch_size} x {cfg.train.gradient_accumulation_steps} "
        f"x {world} x {cfg.packing.seq_length})",
    ]
    if steps:
        n_now, now = _this_call(steps, first_step, stop_after)
        seconds = n_now * tokens_per_step * flops_per_token / (ASSUMED_FLOPS.get(klass, 20e12) * world)
        lines.append(
            f"steps            {'about ' if about else ''}{steps} ({steps * tokens_per_step:,} tokens){now}{about}"
        )
        tc = cfg.train
        never = " (not fewer than the steps: the rate never reaches it)" if tc.warmup_steps >= steps else ""
        lines.append(
            f"schedule         {tc.lr_scheduler}, learning rate {tc.learning_rate:g} after {tc.warmup_steps} warmup steps{never}"
        )
        lines.append(
            f"estimated time   {_duration(seconds)} (assuming {ASSUMED_FLOPS.get(klass, 20e12) / 1e12:g} TFLOP/s "
            f"sustained per {klass} device, {flops_per_token / 1e9:.2f} GFLOP per token)"
        )
    lines.append(f"output_dir       {cfg.output_dir}")
    return "\n".join(lines)


def _this_call(steps: int, first_step: int, stop_after: int | None) -> tuple[int, str]:
    """How many of a run's ``steps`` a call resuming at ``first_step`` and stopping after ``stop_after``
    runs, and the words saying which ("" for the whole run).

    >>> _this_call(100, 40, 60)
    (20, '; this call runs steps 41-60 (--resume from step 40, --stop-after 60)')
    """
    end = min(stop_after or steps, steps)
    start = min(first_step, end)
    if (start, end) == (0, steps):
        return steps, ""
    if end == start:
        return 0, f"; none left (its checkpoint is at step {first_step}): its final validation runs again"
    why = [f"--resume from step {first_step}" if first_step else "", f"--stop-after {end}" if end < steps else ""]
    return end - start, f"; this call runs steps {start + 1}-{end} ({', '.join(w for w in why if w)})"


def _estimated_train_tokens(cfg: RunConfig) -> tuple[int, str] | None:
    """An epoch run's tokens, estimated from its `fimtune data build` folder's stats.json (the
    training split's bytes, at the characters per token its table assumes), and the words saying so;
    None where that is not known (a Hub dataset, a folder without stats)."""
    from fimtune.corpus.stats import CHARS_PER_TOKEN_ESTIMATE

    if not cfg.data.path:
        return None
    try:
        stats = json.loads((Path(cfg.data.path) / "stats.json").read_text(encoding="utf-8"))
        train_bytes = int(stats["splits"]["train"]["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    tokens = int(train_bytes / CHARS_PER_TOKEN_ESTIMATE)
    return tokens, (
        f"; train.num_epochs={cfg.train.num_epochs:g} of about {tokens:,} tokens (the training split's bytes / "
        f"{CHARS_PER_TOKEN_ESTIMATE:g}; the run counts its packed rows)"
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
