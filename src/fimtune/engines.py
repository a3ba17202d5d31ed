"""What the training loop does differently under DeepSpeed and FSDP (`accelerate launch --config_file ...`).

The loop in :mod:`fimtune.train` is written for one process or DDP. The shipped configs
`configs/accelerate/{deepspeed-zero2,deepspeed-zero3,fsdp}.yaml` put the model and the
optimizer under an engine, which changes this::

    DeepSpeed          needs the micro-batch size (fimtune prepares no dataloader), takes the
                       optimizer step inside the backward that ends the accumulation window and
                       clips by its own config: all set from the run config before `prepare`
                       (:func:`configure_deepspeed`; train.py tells it which backward ends the window)
    ZeRO (any stage),  each process holds only its part of the optimizer state: a checkpoint holds
    FSDP sharded       one optimizer file per process (:func:`optimizer_sharding`,
                       :func:`load_optimizer_part`)
    ZeRO-3, FSDP       parameters are split too: the output head's weight is whole only inside the
                       model's forward, so the loss takes all logits at once, and every process runs
                       as many validation forwards (:func:`sharded_parameters`); under ZeRO-3 the
                       adapter is loaded into gathered parameters (:func:`whole_parameters`)
    FSDP               PEFT (0.21) selects and loads adapter weights by module names, which FSDP's
                       wrapped blocks change: it writes an empty adapter and loads nothing, silently.
                       fimtune refuses both (train.check_not_empty, :func:`whole_parameters`)

deepspeed is imported only on its own path: it is no dependency of fimtune.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

from fimtune.errors import FimtuneError

log = logging.getLogger(__name__)


def deepspeed_stage(accelerator: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed run, None without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin  # None unless the run is under DeepSpeed
    return None if plugin is None else int(plugin.zero_stage)


def optimizer_sharding(accelerator: Any) -> str | None:
    """The engine that splits the optimizer state across processes ("DeepSpeed ZeRO-2", "FSDP"), or None.

    Every DeepSpeed run counts (its optimizer loads only its own rank's state); FSDP only on more
    than one process and with a sharding strategy other than NO_SHARD.
    """
    from accelerate.utils import DistributedType

    stage = deepspeed_stage(accelerator)
    if stage is not None:
        return f"DeepSpeed ZeRO-{stage}"
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.num_processes > 1:
        plugin = accelerator.state.fsdp_plugin
        strategy = None if accelerator.is_fsdp2 else (plugin.sharding_strategy or plugin.reshard_after_forward)
        if getattr(strategy, "name", strategy) != "NO_SHARD":
            return "FSDP"
    return None


def sharded_parameters(accelerator: Any) -> str | None:
    """The engine under which a parameter may be whole only inside the model's forward (DeepSpeed ZeRO-3,
    FSDP), or None."""
    from accelerate.utils import DistributedType

    if deepspeed_stage(accelerator) == 3:
        return "DeepSpeed ZeRO-3"
    return "FSDP" if accelerator.distributed_type == DistributedType.FSDP else None


def eval_model(accelerator: Any, model: Any) -> Any:
    """The model validation runs: unwrapped (no DDP hooks, so processes may run different numbers of
    batches), except under FSDP, which makes its parameters whole only in the prepared model's forward."""
    from accelerate.utils import DistributedType

    return model if accelerator.distributed_type == DistributedType.FSDP else accelerator.unwrap_model(model)


def refuse_fsdp(accelerator: Any) -> None:
    """Stop a run under FSDP before it loads anything: on an H200 (torch 2.11, accelerate 1.15, PEFT
    0.21) the shipped config failed in every mode tried (bf16: LoRA's fp32 weights and the bf16
    base weights cannot be flattened together; fp32: gathering the state dict at the first
    checkpoint; GPTBigCode: an FSDP assertion on its parameters), and on CPU processes PEFT wrote
    an empty adapter. See benchmarks/RESULTS.md."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        raise FimtuneError(
            "training under FSDP does not work yet with fimtune's LoRA adapters (it fails at the first "
            "checkpoint, or at start in bf16; see benchmarks/RESULTS.md): shard with "
            "configs/accelerate/deepspeed-zero3.yaml (parameters too) or deepspeed-zero2.yaml instead"
        )


def configure_deepspeed(accelerator: Any, batch_size: int, max_grad_norm: float | None) -> None:
    """Write the run config's micro-batch and clipping into DeepSpeed's config; call before `prepare`.

    fimtune accumulates gradients itself (the loss is normalised by the label tokens of the
    whole window), so DeepSpeed sees micro-batches of ``batch_size`` rows, counts no
    accumulation of its own and is told which backward ends the window. DeepSpeed clips
    inside its step: ``max_grad_norm`` becomes its ``gradient_clipping`` (0 or None: none), so a
    run config means the same with and without DeepSpeed.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    steps = ds.get("gradient_accumulation_steps", 1)
    if steps not in (1, "auto"):
        raise FimtuneError(
            f"the DeepSpeed config sets gradient_accumulation_steps={steps}, but fimtune accumulates gradients "
            f"itself: set it to 1 (accelerate config or --gradient_accumulation_steps) and "
            f"train.gradient_accumulation_steps={steps} instead"
        )
    clip = float(max_grad_norm or 0.0)
    if ds.get("gradient_clipping", "auto") not in ("auto", clip):
        log.info("DeepSpeed gradient_clipping %s replaced by train.max_grad_norm=%g", ds["gradient_clipping"], clip)
    ds["gradient_accumulation_steps"] = 1
    ds["train_micro_batch_size_per_gpu"] = batch_size
    ds["train_batch_size"] = batch_size * accelerator.num_processes
    ds["gradient_clipping"] = clip


@contextlib.contextmanager
def whole_parameters(accelerator: Any, model: Any) -> Iterator[Any]:
    """Within the block, the model to load adapter weights into, its parameters whole: gathered under
    ZeRO-3 (and split again, with the values loaded, on leaving), else the unwrapped model as it is.
    FSDP over several processes: a FimtuneError."""
    if deepspeed_stage(accelerator) == 3:
        import deepspeed

        module = accelerator.unwrap_model(model)
        trainable = [p for p in module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=0):
            yield module
    elif optimizer_sharding(accelerator) == "FSDP":
        # PEFT maps adapter keys to modules by their names, which FSDP's wrapped blocks change; loading
        # through FSDP's full state dict then silently loads nothing (PEFT 0.21).
        raise FimtuneError(
            "resuming a run sharded by FSDP over several processes is not supported: PEFT cannot load the adapter "
            "into FSDP-wrapped blocks; train with configs/accelerate/deepspeed-zero3.yaml (parameters sharded too) "
            "or deepspeed-zero2.yaml to resume"
        )
    else:
        yield accelerator.unwrap_model(model)


def load_optimizer_part(accelerator: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Load this process's part of a split optimizer state (what its ``state_dict()`` returned when saved).

    DeepSpeed's optimizers (ZeRO, bf16) take a list of every rank's state indexed by data-parallel
    rank, and read only their own from it; the fp32 master weights come from that state, not from
    the (possibly bf16) parameters.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    takes_list = "state_dict_list" in inspect.signature(inner.load_state_dict).parameters
    if deepspeed_stage(accelerator) is None or not takes_list:
        optimizer.load_state_dict(state)
        return
    import torch.distributed as dist

    if getattr(inner, "elastic_checkpoint", False):
        raise FimtuneError("fimtune's checkpoints need DeepSpeed's zero_optimization.elastic_checkpoint off")
    group = getattr(inner, "dp_process_group", None)
    states: list[dict[str, Any] | None] = [None] * dist.get_world_size(group)
    states[dist.get_rank(group)] = state
    inner.load_state_dict(states, load_from_fp32_weights=True)
