"""Tiny random causal LMs (2 layers) of the two families the product meets most: GPTBigCode and Llama."""

from __future__ import annotations

from pathlib import Path

import torch


def gpt_bigcode(vocab_size: int, seed: int = 0, tie: bool = True, n_embd: int = 32, n_positions: int = 256):
    """Four multi-query heads of ``n_embd // 4`` (8 by default), ``n_positions`` learned positions."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    torch.manual_seed(seed)
    cfg = GPTBigCodeConfig(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=2,
        n_head=4,
        n_inner=2 * n_embd,
        multi_query=True,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=0.2,
    )
    return GPTBigCodeForCausalLM(cfg).eval()


def llama(vocab_size: int, seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(cfg).eval()


def save_model_folder(model, tokenizer, path: Path) -> Path:
    """A local transformers folder (config + safetensors + tokenizer) that `model.name_or_path` can name."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def save_run(folder: Path, base: Path | str, tokenizer, adapter=None) -> Path:
    """A run folder as `fimtune train` leaves it: config.yaml naming ``base``, the tokenizer, and
    ``adapter`` (a PEFT model) saved in `adapter/` when given."""
    from fimtune.config import load_run_config, save_config

    if adapter is not None:
        adapter.save_pretrained(folder / "adapter")
    tokenizer.save_pretrained(folder / "tokenizer")
    save_config(load_run_config(None, [f"model.name_or_path={base}"]), folder / "config.yaml")
    return folder


def lora_with_trained_biases(base: Path, bias: str, seed: int = 0):
    """LoRA on ``base``'s `c_attn` (GPTBigCode) with `bias` ("none", "all", "lora_only"), every bias it
    trains moved off the base's, as training would move it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], bias=bias, init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if name.endswith(".bias") and p.requires_grad:
                p.add_(1.0)
    return peft


def writes_first(model, token: int, middle: int, pull: float = 20.0):
    """Make ``model`` start most middles with ``token``: its output row becomes the input embedding
    of the FIM middle token, scaled to ``pull`` (PSM: that token is the prompt's last), and other
    tokens follow it (the other rows are ~0.2 x sqrt(hidden size) long)."""
    with torch.no_grad():
        row = model.get_input_embeddings().weight[middle]
        model.get_output_embeddings().weight[token] = pull * row / row.norm()
    return model
