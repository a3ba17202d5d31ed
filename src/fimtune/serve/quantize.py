"""Int8 weights for CPU serving: weight-only quantization, bf16 activations (`--quantize int8`).

Decoding one token reads every weight once, so on a CPU its time is the bytes read:
SmolLM2-135M reads 540 MB a token in fp32 and 135 MB in int8 (plus the bf16 embeddings).
Each Linear keeps int8 weights with one bf16 scale per output row (symmetric, absmax)::

    W[o, :] ~= scale[o] * q[o, :],   q in [-127, 127],   scale[o] = max|W[o, :]| / 127

and multiplies with PyTorch's int8-weight kernel (`torch._weight_int8pack_mm`, bf16 inputs).
Only the weights are quantized, so a row's output does not depend on the other rows of the
batch (dynamic activation quantization would make it do so). Outputs differ from fp32.
"""

from __future__ import annotations

from typing import Any

import torch

from fimtune.errors import FimtuneError

INT8_MAX = 127
MIN_SCALE = 1e-8  # an all-zero row keeps a non-zero scale


class Int8Linear(torch.nn.Module):
    """A Linear layer with int8 weights and per-row bf16 scales."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=MIN_SCALE) / INT8_MAX
        self.register_buffer("weight_int8", torch.round(weight / scales[:, None]).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def quantize_int8(model: Any) -> Any:
    """``model`` in bf16 with every Linear layer (the LM head too) as :class:`Int8Linear`; CPU only.

    A PEFT model's active adapter is merged in first, so the result serves that adapter only.
    """
    if next(model.parameters()).device.type != "cpu":
        raise FimtuneError("--quantize int8 runs on a CPU only; on a GPU use --dtype bf16")
    if not hasattr(torch, "_weight_int8pack_mm"):
        raise FimtuneError(f"--quantize int8 needs PyTorch's int8 kernel, missing from torch {torch.__version__}")
    if hasattr(model, "merge_and_unload"):
        from fimtune.model import lora_on_tied_embeddings, tied_embedding_names, tied_lora_problem

        if on_tied := lora_on_tied_embeddings(model):  # as `fimtune merge` refuses it
            tied = tied_embedding_names(model.get_base_model())
            raise FimtuneError(
                f"--quantize int8 merges the adapter into the weights, but it has LoRA on {', '.join(on_tied)}: "
                f"{tied_lora_problem(on_tied, tied)}; serve this run without --quantize"
            )
        model = model.merge_and_unload()
    model = model.to(torch.bfloat16)
    _replace_linears(model)
    return model.eval()


def _replace_linears(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, Int8Linear(child))
        else:
            _replace_linears(child)
