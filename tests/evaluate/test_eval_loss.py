"""The loss task: the same rows for base and tuned; equal with a fresh adapter, different after training."""

from __future__ import annotations

import pytest
import torch
from tests import tiny

from fimtune.config import LoraConfig, load_run_config
from fimtune.evaluate import loss
from fimtune.evaluate.variants import variant


def fresh_peft_model(tokenizer):
    """A tiny Llama with added FIM tokens and a freshly initialised LoRA (B = 0): tuned == base."""
    from fimtune.model import add_token_rows, attach_lora
    from fimtune.tokens import ensure_fim_tokens

    _, added = ensure_fim_tokens(tokenizer)
    model = tiny.llama(len(tokenizer) - len(added))
    new_ids = add_token_rows(model, tokenizer, added)
    return attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), new_ids).eval()


def loss_config(data_dir, tmp_path, *extra):
    return load_run_config(None, [f"data.path={data_dir}", "packing.seq_length=64", "train.batch_size=4",
                                  f"output_dir={tmp_path / 'unused'}", *extra])  # fmt: skip


@pytest.mark.parametrize(("mixed_precision", "precision"), [("auto", "full"), ("bf16", "bfloat16 autocast")])
def test_fresh_adapter_gives_base_equal_to_tuned(
    tiny_tokenizer_without_fim, eval_dataset_dir, token_cache, tmp_path, mixed_precision, precision
):
    model = fresh_peft_model(tiny_tokenizer_without_fim)
    cfg = loss_config(eval_dataset_dir, tmp_path, f"train.mixed_precision={mixed_precision}")
    result = loss.evaluate(model, tiny_tokenizer_without_fim, cfg, limit=8)
    assert result["precision"] == precision
    assert set(result["formats"]) == {"left_to_right", "psm", "spm"}
    for fmt, r in result["formats"].items():
        assert r["rows"] == 8 and r["tokens"] == 8 * 63, fmt  # --limit 8 rows, 63 predicted tokens each
        assert r["base"]["loss"]["value"] == pytest.approx(r["tuned"]["loss"]["value"], abs=1e-4), fmt
        assert r["delta"]["loss"]["value"] == pytest.approx(0.0, abs=1e-4)
        assert r["base"]["loss"]["lo"] < r["base"]["loss"]["value"] < r["base"]["loss"]["hi"]
        assert r["base"]["perplexity"]["n"] == 8


def test_formats_see_different_tokens(tiny_tokenizer_without_fim, eval_dataset_dir, token_cache, tmp_path):
    """Left-to-right rows hold no FIM token; PSM and SPM rows do, in their own order."""
    import dataclasses

    from fimtune.dataset import load_splits
    from fimtune.packing import documents, pack_spec
    from fimtune.tokens import document_separator_id, ensure_fim_tokens

    cfg = loss_config(eval_dataset_dir, tmp_path)
    tok = tiny_tokenizer_without_fim
    fim, _ = ensure_fim_tokens(tok)
    docs = documents(load_splits(cfg.data)["validation"], tok, cfg, progress=False)
    spec = pack_spec(cfg, fim, document_separator_id(tok), shuffle=False)
    first = {}
    for name, (fim_rate, spm_rate) in loss.FORMATS.items():
        batches = loss.format_batches(docs, dataclasses.replace(spec, fim_rate=fim_rate, spm_rate=spm_rate), 4, 1)
        ids = batches[0]["input_ids"]
        first[name] = ids[0, :3].tolist()
        assert (fim.prefix in ids) == (name != "left_to_right")
    assert first["psm"][0] == fim.prefix and first["psm"][1] != fim.suffix
    assert first["spm"][:2] == [fim.prefix, fim.suffix]


def test_trained_run_differs_from_base(tiny_run, token_cache):
    from fimtune.model import load_run

    loaded = load_run(tiny_run, torch.device("cpu"))
    cfg = load_run_config(tiny_run / "config.yaml")
    result = loss.evaluate(loaded.model, loaded.tokenizer, cfg, limit=4)
    for fmt, r in result["formats"].items():
        assert r["tuned"]["loss"]["value"] < r["base"]["loss"]["value"] - 0.1, fmt
        assert r["delta"]["loss"]["hi"] < 0, fmt  # the paired interval excludes no change
    # Switching variants back and forth leaves the tuned model as it was.
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), variant(loaded.model, "tuned"):
        a = loaded.model(input_ids=ids).logits
    with torch.no_grad(), variant(loaded.model, "base"):
        loaded.model(input_ids=ids)
    with torch.no_grad(), variant(loaded.model, "tuned"):
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, a, rtol=1e-4, atol=1e-4)


def test_base_is_exactly_the_base_after_tuned_in_bf16_and_quantized_weights_are_never_merged(tiny_run):
    """bf16 weights (a GPU's) keep the adapter unmerged: base after tuned is the base bit for bit (a
    merge and an unmerge in bf16 would move some of its weights by a rounding step). Weights marked
    quantized are never merged (PEFT would quantize W + dW again and lose most of dW)."""
    from fimtune.generate import merge_adapter, mergeable
    from fimtune.model import load_run

    loaded = load_run(tiny_run, torch.device("cpu"), dtype=torch.bfloat16)
    model, ids = loaded.model, torch.tensor([[5, 6, 7, 8]])
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad(), variant(model, "base"):
        base = model(input_ids=ids).logits
    with torch.no_grad(), variant(model, "tuned"):
        tuned = model(input_ids=ids).logits
    with torch.no_grad(), variant(model, "base"):
        torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=0)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert not torch.equal(tuned, base)
    assert mergeable(model) and not mergeable(model, exactly=True)
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    merge_adapter(model)
    assert not mergeable(model) and all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
