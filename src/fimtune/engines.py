"""What the training loop does differently under DeepSpeed and FSDP (`accelerate launch --config_file ...`).

The loop in :mod:`fimtune.train` is written for one process or DDP. The shipped configs
`configs/accelerate/{deepspeed-zero2,deepspeed-zero3,fsdp}.yaml` put the model and the
optimizer under an engine (fsdp.yaml: FSDP2, `fully_shard`), which changes this::

    DeepSpeed          needs the micro-batch size (fimtune prepares no dataloader), takes the
                       optimizer step inside the backward that ends the accumulation window and
                       clips by its own config: all set from the run config before `prepare`
                       (:func:`configure_deepspeed`; train.py tells it which backward ends the window)
    ZeRO (any stage),  each process holds only its part of the optimizer state: a checkpoint holds
    FSDP sharded       one optimizer file per process (:func:`optimizer_sharding`,
                       :func:`load_optimizer_part`)
    ZeRO-3, FSDP       parameters are split too: the output head's weight is whole only inside the
                       model's forward, so the loss takes all logits at once, and every process runs
                       as many validation forwards (:func:`sharded_parameters`); a checkpoint gathers
                       the trainable parameters alone (:func:`adapter_state_dict`), and resuming loads
                       the adapter into whole (ZeRO-3) or implicitly replicated (FSDP2) parameters
                       (:func:`whole_parameters`)
    FSDP2              parameters and their optimizer state are DTensors: a process saves its own
                       shards as plain tensors and puts them back into DTensors on resume
                       (:func:`optimizer_part`, :func:`load_optimizer_part`); tied embeddings whose
                       added token rows PEFT trains stay one group (:func:`tied_embeddings_shown`)
    FSDP1              refused at start (:func:`refuse_fsdp1`): its flat parameters cannot hold LoRA's
                       fp32 weights beside a bf16 base, and PEFT (0.21) cannot find adapter weights
                       under its renamed (`_fsdp_wrapped_module`) blocks

deepspeed is imported only on its own path: it is no dependency of fimtune.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch

from fimtune.errors import FimtuneError

log = logging.getLogger(__name__)


def deepspeed_stage(accelerator: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed run, None without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin  # None unless the run is under DeepSpeed
    return None if plugin is None else int(plugin.zero_stage)


def optimizer_sharding(accelerator: Any) -> str | None:
    """The engine that splits the optimizer state across processes ("DeepSpeed ZeRO-2", "FSDP"), or None.

    Every DeepSpeed run counts (its optimizer loads only its own rank's state), and every FSDP2 run
    (its optimizer states are DTensors, shards of their parameters', on one process too); FSDP1 only
    on more than one process and with a sharding strategy other than NO_SHARD.
    """
    from accelerate.utils import DistributedType

    stage = deepspeed_stage(accelerator)
    if stage is not None:
        return f"DeepSpeed ZeRO-{stage}"
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    if accelerator.is_fsdp2:
        return "FSDP"
    plugin = accelerator.state.fsdp_plugin
    strategy = plugin.sharding_strategy or plugin.reshard_after_forward
    if accelerator.num_processes > 1 and getattr(strategy, "name", strategy) != "NO_SHARD":
        return "FSDP"
    return None


def sharded_parameters(accelerator: Any) -> str | None:
    """The engine under which a parameter may be whole only inside the model's forward (DeepSpeed ZeRO-3,
    FSDP), or None."""
    from accelerate.utils import DistributedType

    if deepspeed_stage(accelerator) == 3:
        return "DeepSpeed ZeRO-3"
    return "FSDP" if accelerator.distributed_type == DistributedType.FSDP else None


def weight_engine(accelerator: Any) -> str | None:
    """The engine that casts, splits or moves the weights around each block ("DeepSpeed" at any
    ZeRO stage, "FSDP"), or None (one process, DDP)."""
    return "DeepSpeed" if deepspeed_stage(accelerator) is not None else sharded_parameters(accelerator)


def eval_model(accelerator: Any, model: Any) -> Any:
    """The model validation runs: unwrapped (no DDP hooks, so processes may run different numbers of
    batches), except under FSDP, which makes its parameters whole only in the prepared model's forward."""
    from accelerate.utils import DistributedType

    return model if accelerator.distributed_type == DistributedType.FSDP else accelerator.unwrap_model(model)


def refuse_fsdp1(accelerator: Any) -> None:
    """Stop a run under FSDP1 (`fsdp_version: 1`) before it loads anything. On an H200 (torch 2.11,
    accelerate 1.15, PEFT 0.21) it failed in every mode tried: bf16, LoRA's fp32 weights and the bf16
    base cannot be flattened together; fp32, gathering the state dict at the first checkpoint;
    GPTBigCode, an FSDP assertion on its parameters. See benchmarks/RESULTS.md. FSDP2 shards each
    parameter on its own and keeps module names: fimtune trains under it."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise FimtuneError(
            "training under FSDP1 (fsdp_version: 1) does not work with fimtune's LoRA adapters: set "
            "fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp.yaml is FSDP2), or pass "
            "--fsdp_version 2 to accelerate launch"
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
def tied_embeddings_shown(accelerator: Any, model: Any) -> Iterator[None]:
    """Within the block (`accelerator.prepare` under FSDP2), a model whose tied embeddings PEFT wrapped
    to train the rows of added tokens looks to accelerate (1.15) as tied as it is:

    - accelerate puts tied embeddings into one FSDP2 group, but finds the tie by
      `input.weight is output.weight`, and PEFT's wrappers answer `weight` with a new merged tensor:
      both wrappers show their one shared base weight instead. Seen untied, the shared rows would go
      into two groups and `fully_shard` fails;
    - with `fsdp_cpu_ram_efficient_loading` accelerate moves the model to the meta device and calls
      `tie_weights()`, which cannot set `weight` on a wrapper: the base layers are tied instead.
    """
    inp = getattr(model, "get_input_embeddings", lambda: None)()
    out = getattr(model, "get_output_embeddings", lambda: None)()
    if not (getattr(accelerator, "is_fsdp2", False) and inp is not None and out is not None):
        yield
        return
    base_in = getattr(inp, "original_module", None) or inp
    base_out = getattr(out, "original_module", None) or out
    weight = getattr(base_in, "weight", None)
    if weight is None or weight is not getattr(base_out, "weight", None) or inp.weight is out.weight:
        yield
        return

    def tie_weights(*args: Any, **kwargs: Any) -> None:
        base_out.weight = base_in.weight

    shown = [m for m in (inp, out) if "weight" not in m.__dict__]
    for m in shown:
        m.__dict__["weight"] = weight  # an instance attribute: found before the wrapper's __getattr__
    model.__dict__["tie_weights"] = tie_weights
    try:
        yield
    finally:
        for m in shown:
            m.__dict__.pop("weight", None)
        model.__dict__.pop("tie_weights", None)


def adapter_state_dict(accelerator: Any, model: Any) -> dict[str, Any]:
    """The trainable parameters by name, each whole, on every process: what PEFT's `save_pretrained`
    selects the adapter's weights from. Collective under ZeRO-3 and FSDP2 (every process calls it);
    the frozen base weights are never gathered."""
    module = accelerator.unwrap_model(model)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if deepspeed_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().clone() for n, p in named}
    return {n: _whole(p).detach() for n, p in named}


def _whole(tensor: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@contextlib.contextmanager
def whole_parameters(accelerator: Any, model: Any) -> Iterator[Any]:
    """Within the block, the model to load adapter weights into as whole tensors (PEFT's
    `set_peft_model_state_dict`): its parameters gathered under ZeRO-3 (and split again, with the values
    loaded, on leaving); under FSDP2 the DTensor parameters take a whole tensor as replicated and keep
    their own shard of it; else the unwrapped model as it is."""
    module = accelerator.unwrap_model(model)
    if deepspeed_stage(accelerator) == 3:
        import deepspeed

        trainable = [p for p in module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=0):
            yield module
    elif getattr(accelerator, "is_fsdp2", False):
        from torch.distributed.tensor.experimental import implicit_replication

        with implicit_replication():
            yield module
    else:
        yield module


def optimizer_part(optimizer: Any) -> dict[str, Any]:
    """This process's optimizer state to save: its ``state_dict()``, with FSDP2's DTensor states (each a
    shard of its parameter's state) as the plain local tensors they hold. DeepSpeed's optimizers have
    state dicts of their own layout (no "state"): they are saved as they are."""
    from torch.distributed.tensor import DTensor

    state = optimizer.state_dict()
    if "state" in state:  # new dicts: state_dict() shares each parameter's state dict with the optimizer
        state["state"] = {
            index: {key: value.to_local() if isinstance(value, DTensor) else value for key, value in per.items()}
            for index, per in state["state"].items()
        }
    return state


def load_optimizer_part(accelerator: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Load this process's part of a split optimizer state (what its ``state_dict()`` returned when saved).

    DeepSpeed's optimizers (ZeRO, bf16) take a list of every rank's state indexed by data-parallel
    rank, and read only their own from it; the fp32 master weights come from that state, not from
    the (possibly bf16) parameters. Under FSDP2 the plain shards :func:`optimizer_part` saved become
    DTensors again, laid out as their parameters.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    takes_list = "state_dict_list" in inspect.signature(inner.load_state_dict).parameters
    if deepspeed_stage(accelerator) is None or not takes_list:
        optimizer.load_state_dict(state)
        _redistribute_states(inner)
        return
    import torch.distributed as dist

    if getattr(inner, "elastic_checkpoint", False):
        raise FimtuneError("fimtune's checkpoints need DeepSpeed's zero_optimization.elastic_checkpoint off")
    group = getattr(inner, "dp_process_group", None)
    states: list[dict[str, Any] | None] = [None] * dist.get_world_size(group)
    states[dist.get_rank(group)] = state
    inner.load_state_dict(states, load_from_fp32_weights=True)


def _redistribute_states(optimizer: Any) -> None:
    """Make each plain-tensor state of a DTensor parameter (as :func:`optimizer_part` saved it) a DTensor
    sharded as that parameter; scalar states (Adam's step) stay as they are."""
    from torch.distributed.tensor import DTensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            local = p.to_local()
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, DTensor) or not isinstance(value, torch.Tensor) or value.shape != local.shape:
                    continue
                optimizer.state[p][key] = DTensor.from_local(
                    value.to(local.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                )
