"""What the loop does under DeepSpeed and FSDP, decided from accelerate's state (no deepspeed needed).

The accelerators here are stand-ins carrying only the state these decisions read; the engines
themselves run in the DeepSpeed CPU experiments described in fimtune/engines.py's module docstring.
"""

import logging
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from fimtune.config import load_run_config
from fimtune.engines import (
    configure_deepspeed,
    optimizer_part,
    optimizer_sharding,
    refuse_fsdp1,
    sharded_parameters,
    tied_embeddings_shown,
)
from fimtune.errors import FimtuneError
from fimtune.train import prepare_model
from tests import tiny


def accelerator(kind: DistributedType, processes: int, deepspeed_plugin: object = None) -> SimpleNamespace:
    """What fimtune reads of an Accelerator, for a CPU run without torch autocast."""
    return SimpleNamespace(
        state=SimpleNamespace(deepspeed_plugin=deepspeed_plugin),
        distributed_type=kind,
        num_processes=processes,
        device=torch.device("cpu"),
        mixed_precision="no",
        native_amp=False,
    )


def deepspeed(stage: int, processes: int = 2, **config) -> SimpleNamespace:
    plugin = SimpleNamespace(zero_stage=stage, deepspeed_config=config)
    return accelerator(DistributedType.DEEPSPEED, processes, plugin)


def fsdp(strategy: str, processes: int, version: int = 1) -> SimpleNamespace:
    plugin = SimpleNamespace(sharding_strategy=SimpleNamespace(name=strategy), reshard_after_forward=None)
    return SimpleNamespace(
        state=SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=plugin),
        distributed_type=DistributedType.FSDP,
        is_fsdp2=version == 2,
        num_processes=processes,
    )


def ddp(processes: int = 2) -> SimpleNamespace:
    return accelerator(DistributedType.MULTI_CPU, processes)


def test_deepspeed_gets_the_run_configs_batch_and_clipping():
    acc = deepspeed(2, gradient_accumulation_steps=1, gradient_clipping=1.0, train_micro_batch_size_per_gpu="auto")
    configure_deepspeed(acc, batch_size=4, max_grad_norm=0.5)
    ds = acc.state.deepspeed_plugin.deepspeed_config
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["train_batch_size"] == 8
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.5
    configure_deepspeed(acc, batch_size=4, max_grad_norm=0)
    assert ds["gradient_clipping"] == 0.0  # no clipping, as without DeepSpeed


def test_deepspeed_accumulation_of_its_own_is_refused():
    with pytest.raises(FimtuneError, match="train.gradient_accumulation_steps=8"):
        configure_deepspeed(deepspeed(2, gradient_accumulation_steps=8), batch_size=4, max_grad_norm=1.0)


def test_configure_deepspeed_leaves_other_engines_alone():
    configure_deepspeed(ddp(), batch_size=4, max_grad_norm=1.0)  # no plugin: nothing to do


@pytest.mark.parametrize(
    ("acc", "split_optimizer", "split_parameters"),
    [
        (deepspeed(1, processes=1), "DeepSpeed ZeRO-1", None),
        (deepspeed(2), "DeepSpeed ZeRO-2", None),
        (deepspeed(3), "DeepSpeed ZeRO-3", "DeepSpeed ZeRO-3"),
        (fsdp("FULL_SHARD", 2), "FSDP", "FSDP"),
        (fsdp("SHARD_GRAD_OP", 2), "FSDP", "FSDP"),
        (fsdp("NO_SHARD", 2), None, "FSDP"),
        (fsdp("FULL_SHARD", 1), None, "FSDP"),
        (fsdp("FULL_SHARD", 2, version=2), "FSDP", "FSDP"),
        (fsdp("FULL_SHARD", 1, version=2), "FSDP", "FSDP"),  # DTensor states on one process too
        (ddp(), None, None),
    ],
)
def test_which_engines_split_the_optimizer_and_the_parameters(acc, split_optimizer, split_parameters):
    assert optimizer_sharding(acc) == split_optimizer
    assert sharded_parameters(acc) == split_parameters


def test_chunked_loss_falls_back_to_whole_logits_under_zero3(tiny_tokenizer, caplog):
    cfg = load_run_config(None, ["model.name_or_path=x", "train.loss_chunk_tokens=16", "train.compile=false"])
    with caplog.at_level(logging.INFO, logger="fimtune.train"):
        _, chunk = prepare_model(tiny.llama(len(tiny_tokenizer)), cfg, deepspeed(3), [])
    assert chunk == 0
    assert any("DeepSpeed ZeRO-3" in r.getMessage() and "all logits" in r.getMessage() for r in caplog.records)
    _, chunk = prepare_model(tiny.llama(len(tiny_tokenizer)), cfg, deepspeed(2), [])
    assert chunk == 16  # ZeRO-2 keeps whole parameters: the chunked loss stays


def test_blocks_are_not_compiled_under_zero3(tiny_tokenizer, caplog):
    """ZeRO-3's per-module parameter hooks run inside a compiled block: the compiler traces them and
    recompiled every module on 2 CPU processes until its limit. ZeRO-2 keeps compiled blocks."""
    from fimtune.fast import transformer_blocks

    def compiled(model) -> list[bool]:
        return [block._compiled_call_impl is not None for block in transformer_blocks(model)]

    cfg = load_run_config(None, ["model.name_or_path=x", "train.compile=true"])
    with caplog.at_level(logging.WARNING, logger="fimtune.train"):
        model, _ = prepare_model(tiny.llama(len(tiny_tokenizer)), cfg, deepspeed(3), [])
    assert compiled(model) == [False, False]
    assert any("ZeRO-3" in r.getMessage() and "not compiled" in r.getMessage() for r in caplog.records)
    model, _ = prepare_model(tiny.llama(len(tiny_tokenizer)), cfg, deepspeed(2), [])
    assert compiled(model) == [True, True]


def test_fp8_base_is_refused_where_the_weights_are_not_whole(tiny_tokenizer):
    cfg = load_run_config(None, ["model.name_or_path=x", "train.compile=false", "train.fp8_base=true"])
    for acc, engine in ((deepspeed(2), "DeepSpeed"), (fsdp("FULL_SHARD", 2, version=2), "FSDP")):
        with pytest.raises(FimtuneError, match=f"train.fp8_base: .* which {engine} splits or casts"):
            prepare_model(tiny.llama(len(tiny_tokenizer)), cfg, acc, [])
    model, _ = prepare_model(tiny.llama(len(tiny_tokenizer)), cfg, ddp(), [])  # whole weights on each process
    assert sum(type(m).__name__ == "_Float8Frozen" for m in model.modules()) == 2 * 7  # 7 adapted layers a block


def test_fsdp1_is_refused_before_anything_loads():
    with pytest.raises(FimtuneError, match="FSDP1.*fsdp_version: 2"):
        refuse_fsdp1(fsdp("FULL_SHARD", 2))
    refuse_fsdp1(fsdp("FULL_SHARD", 2, version=2))
    refuse_fsdp1(deepspeed(3))
    refuse_fsdp1(ddp())


@pytest.mark.parametrize("tie", [True, False])
def test_tied_embeddings_with_trained_token_rows_look_tied_to_fsdp2(tie):
    """PEFT's wrappers of tied embeddings answer `weight` with a new tensor each: within the block both show
    the one shared weight (accelerate then groups them together), and tie_weights ties their base layers."""
    from fimtune.config import LoraConfig
    from fimtune.model import attach_lora

    model = attach_lora(tiny.llama(64, tie=tie), LoraConfig(r=2, alpha=4, dropout=0.0), [62, 63])
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    assert inp.weight is not out.weight  # what accelerate sees without the block
    with tied_embeddings_shown(fsdp("FULL_SHARD", 2, version=2), model):
        assert (inp.weight is out.weight) == tie
        if tie:
            base_in, base_out = inp.original_module, out.original_module
            base_out.weight = torch.nn.Parameter(base_out.weight.detach().clone())  # as after a move to meta
            model.tie_weights()
            assert base_out.weight is base_in.weight
    assert inp.weight is not out.weight and "tie_weights" not in model.__dict__
    assert not any("weight" in m.__dict__ for m in (inp, out))
    with tied_embeddings_shown(fsdp("FULL_SHARD", 2), model):  # FSDP1, DDP, ...: nothing changes
        assert inp.weight is not out.weight


def test_lora_inputs_keep_their_casts_without_torch_autocast(tiny_tokenizer, caplog):
    """DeepSpeed runs bf16 without torch autocast (`native_amp` off): PEFT's casts of LoRA inputs stay."""
    cfg = load_run_config(None, ["model.name_or_path=x", "train.compile=false"])
    under_deepspeed = deepspeed(3)
    under_deepspeed.mixed_precision = "bf16"  # as accelerate reports it under DeepSpeed's bf16
    with caplog.at_level(logging.INFO, logger="fimtune.train"):
        prepare_model(tiny.llama(len(tiny_tokenizer)), cfg, under_deepspeed, [])
        assert not any("LoRA inputs" in r.getMessage() for r in caplog.records)
        amp = ddp()
        amp.native_amp = True
        prepare_model(tiny.llama(len(tiny_tokenizer)), cfg, amp, [])
    assert any("LoRA inputs stay in the autocast dtype" in r.getMessage() for r in caplog.records)


def test_optimizer_parts_keep_plain_and_engine_specific_states_as_they_are():
    """Only FSDP2's DTensor states change (to their local shards: the 2-process FSDP2 tests in
    test_distributed.py); a plain optimizer's state and DeepSpeed's own layout (no "state") are saved as is."""
    w = torch.nn.Parameter(torch.ones(3, 2))
    opt = torch.optim.AdamW([w])
    w.grad = torch.full_like(w, 0.5)
    opt.step()
    part = optimizer_part(opt)
    assert torch.equal(part["state"][0]["exp_avg"], opt.state[w]["exp_avg"])
    deepspeed_like = SimpleNamespace(state_dict=lambda: {"base_optimizer_state": [1], "zero_stage": 2})
    assert optimizer_part(deepspeed_like) == {"base_optimizer_state": [1], "zero_stage": 2}
