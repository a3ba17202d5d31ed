"""The training loop end to end on tiny GPTBigCode and Llama models, on real files."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fimtune.config import load_run_config
from fimtune.dataset import training_rows
from fimtune.train import forward_logits
from tests import tiny
from tests.runs import metrics, model_dir, quiet_fit, run_config


@pytest.mark.parametrize("family", ["gpt_bigcode", "llama"])
def test_loss_falls_and_only_adapter_trains(tmp_path, tiny_tokenizer, repetitive_data, token_cache, family):
    base = model_dir(tmp_path, tiny_tokenizer, family)
    run = quiet_fit(run_config(tmp_path, base, repetitive_data))
    rec = metrics(run)
    losses = [r["loss"] for r in rec if "loss" in r]
    vals = [r["val_loss"] for r in rec if "val_loss" in r]
    # A random tiny model with LoRA alone cannot go far, but it must learn the corpus's token statistics.
    assert sum(losses[-10:]) / 10 < sum(losses[:3]) / 3 - 0.2
    assert vals[-1] < vals[0] - 0.3
    # The run folder holds everything needed to reload it.
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "tokenizer/tokenizer.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "state/trainer_state.json",
        "state/training_state.pt",
    ):
        assert (run / name).exists(), name
    from safetensors.torch import load_file

    keys = load_file(str(run / "adapter" / "adapter_model.safetensors")).keys()
    assert keys and all("lora_" in k for k in keys)


@pytest.mark.parametrize("family", ["gpt_bigcode", "llama"])
def test_added_fim_tokens_train_and_reload_with_plain_peft(
    tmp_path, tiny_tokenizer_without_fim, repetitive_data, token_cache, family
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = model_dir(tmp_path, tiny_tokenizer_without_fim, family)
    run = quiet_fit(run_config(tmp_path, base, repetitive_data, "run", "train.max_steps=6"))
    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    assert len(tok) == len(tiny_tokenizer_without_fim) + 4
    assert tok.convert_tokens_to_ids("<fim_middle>") >= len(tiny_tokenizer_without_fim)

    def tuned():
        model = AutoModelForCausalLM.from_pretrained(base)
        model.resize_token_embeddings(len(tok))
        return PeftModel.from_pretrained(model, run / "adapter").eval()

    ids = torch.tensor([tok.encode("<fim_prefix>def f(x):<fim_suffix>\n<fim_middle>    return")])
    with torch.no_grad():
        torch.testing.assert_close(tuned()(ids).logits, tuned()(ids).logits, rtol=0, atol=0)
    # The reloaded model reproduces the validation loss the trained model reported.
    final = [r["val_loss"] for r in metrics(run) if "val_loss" in r][-1]
    assert validation_loss(tuned(), tok, load_run_config(run / "config.yaml")) == pytest.approx(final, rel=1e-5)


def validation_loss(model, tokenizer, cfg) -> float:
    from accelerate import Accelerator

    from fimtune.tokens import ensure_fim_tokens
    from fimtune.train import summed_loss

    fim_tokens, added = ensure_fim_tokens(tokenizer)
    assert added == []  # the saved tokenizer already holds the FIM tokens
    _, make_eval, _ = training_rows(cfg, tokenizer, fim_tokens, Accelerator(cpu=True))
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in make_eval():
            loss, n = summed_loss(model, {k: torch.as_tensor(v) for k, v in batch.items()})
            total, count = total + loss.item(), count + n
    return total / count


def test_resume_is_exact(tmp_path, tiny_tokenizer, repetitive_data, token_cache):
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    extra = ("train.max_steps=12", "train.save_every=0", "train.eval_every=4", "lora.dropout=0.1")
    whole = quiet_fit(run_config(tmp_path, base, repetitive_data, "whole", *extra))
    parted_cfg = run_config(tmp_path, base, repetitive_data, "parted", *extra)
    quiet_fit(parted_cfg, stop_after=6)
    quiet_fit(parted_cfg, resume=True)

    def by_step(run, key):
        return {r["step"]: r[key] for r in metrics(run) if key in r}

    assert by_step(whole, "loss") == by_step(tmp_path / "parted", "loss")
    assert by_step(whole, "val_loss") == by_step(tmp_path / "parted", "val_loss")
    from safetensors.torch import load_file

    wa = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "parted" / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_new_run_refuses_a_non_empty_folder(tmp_path, tiny_tokenizer, repetitive_data, token_cache):
    from fimtune.errors import FimtuneError

    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("keep me")
    with pytest.raises(FimtuneError, match="--resume"):
        quiet_fit(run_config(tmp_path, base, repetitive_data))
    with pytest.raises(FimtuneError, match="no checkpoint"):
        quiet_fit(run_config(tmp_path, base, repetitive_data), resume=True)
    assert (tmp_path / "run" / "x").read_text() == "keep me"


@pytest.mark.parametrize("family", ["gpt_bigcode", "llama"])
def test_packed_attention_stays_inside_documents(tiny_tokenizer, family):
    """With restarting position ids, a token's logits ignore other documents in the row."""
    make = {"gpt_bigcode": tiny.gpt_bigcode, "llama": tiny.llama}[family]
    model = make(len(tiny_tokenizer))
    model.set_attn_implementation("sdpa")
    g = torch.Generator().manual_seed(0)
    doc_a = torch.randint(5, 500, (10,), generator=g)
    doc_b1, doc_b2 = torch.randint(5, 500, (6,), generator=g), torch.randint(5, 500, (6,), generator=g)
    pos = torch.cat([torch.arange(6), torch.arange(10)])[None]
    with torch.no_grad():
        l1 = forward_logits(model, {"input_ids": torch.cat([doc_b1, doc_a])[None], "position_ids": pos})[0, 6:]
        l2 = forward_logits(model, {"input_ids": torch.cat([doc_b2, doc_a])[None], "position_ids": pos})[0, 6:]
        alone = model(input_ids=doc_a[None]).logits[0]
        crossing = model(input_ids=torch.cat([doc_b2, doc_a])[None]).logits[0, 6:]
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    torch.testing.assert_close(l1, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(crossing, alone, atol=1e-3)  # without position ids, attention crosses


def test_dry_run_prints_the_seed_plan_offline():
    res = subprocess.run(
        [sys.executable, "-m", "fimtune", "train", "--config", "configs/seed-starcoderbase-1b.yaml", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert res.returncode == 0, res.stderr
    assert "2,777,088" in res.stdout and "tokens per step  8,192" in res.stdout
    assert "q_attn matches no module" in res.stderr


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_tokenizer, repetitive_data, token_cache):
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    extra = ("train.max_steps=4", "train.eval_every=0", "lora.dropout=0.0")
    plain = quiet_fit(run_config(tmp_path, base, repetitive_data, "plain", *extra))
    ckpt = quiet_fit(run_config(tmp_path, base, repetitive_data, "ckpt", *extra, "train.gradient_checkpointing=true"))
    a = [r["loss"] for r in metrics(plain) if "loss" in r]
    b = [r["loss"] for r in metrics(ckpt) if "loss" in r]
    assert len(a) == 4 and a == pytest.approx(b, rel=1e-4)


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path, tiny_tokenizer, repetitive_data, token_cache):
    """Loss normalised by the label tokens of the whole step: 2 x 2 rows == 1 x 4 rows."""
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    extra = ("train.max_steps=3", "train.eval_every=0", "lora.dropout=0.0")
    big = quiet_fit(run_config(tmp_path, base, repetitive_data, "big", *extra))
    acc = quiet_fit(
        run_config(
            tmp_path, base, repetitive_data, "acc", *extra, "train.batch_size=2", "train.gradient_accumulation_steps=2"
        )
    )
    a = [r["loss"] for r in metrics(big) if "loss" in r]
    b = [r["loss"] for r in metrics(acc) if "loss" in r]
    assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.gpu
def test_qlora_trains_on_cuda(tmp_path, tiny_tokenizer, repetitive_data, token_cache):
    pytest.importorskip("bitsandbytes")
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    run = quiet_fit(run_config(tmp_path, base, repetitive_data, "q", "model.quantization=4bit", "train.max_steps=3"))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics(run) if "loss" in r)


@pytest.mark.slow
def test_embedded_model_learns_an_installed_package(tmp_path):
    """SmolLM2 (the embedded default) on a corpus built from installed source: validation loss falls."""
    from fimtune.cli import main

    assert main(["data", "build", "--package", "pathspec", "--out", str(tmp_path / "data"), "--quiet"]) == 0
    cfg = load_run_config(
        Path(__file__).parents[1] / "configs" / "smollm2-demo.yaml",
        [
            f"data.path={tmp_path / 'data'}",
            f"output_dir={tmp_path / 'run'}",
            "packing.seq_length=256",
            "train.max_steps=12",
            "train.eval_every=12",
            "train.eval_batches=3",
            "train.save_every=0",
        ],
    )
    run = quiet_fit(cfg)
    vals = [r["val_loss"] for r in metrics(run) if "val_loss" in r]
    assert len(vals) >= 2 and vals[-1] < vals[0]
