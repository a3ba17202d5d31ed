"""benchmarks/fp8_quality.py end to end on a tiny Llama (its sizes are multiples of 16, so every
frozen layer under LoRA takes FP8 products through the CPU's `_scaled_mm`)."""

import json

import pytest

from tests.runs import model_dir, run_script


@pytest.mark.slow
def test_fp8_quality_trains_both_arms_and_evaluates_each_adapter_served_plain(
    tmp_path, tiny_tokenizer, repetitive_data
):
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    out = tmp_path / "figures.json"
    proc = run_script(
        "benchmarks/fp8_quality.py", "--data", str(repetitive_data), "--out", str(tmp_path / "runs"),
        "--steps", "4", "--limit", "2", "--holes", "2", "--json", str(out),
        f"model.name_or_path={base}", "packing.seq_length=64", "fim.piece_tokens=24", "train.eval_every=2",
        "train.save_every=0", "train.log_every=1",
    )  # fmt: skip
    figures = json.loads(out.read_text())["figures"]
    plain, fp8 = figures["plain"], figures["fp8"]
    # the FP8 arm ran FP8 products (the same seed, data and steps otherwise): the base's validation
    # loss before the first step moved, a little
    assert plain["val_start"][0] == 0 and plain["val_loss"][0] == 4
    assert fp8["val_start"][1] != plain["val_start"][1] and fp8["val_start"][1] == pytest.approx(
        plain["val_start"][1], rel=0.05
    )
    # each adapter was evaluated the same way (plain products): the same base figures, its own tuned ones
    assert fp8["base_loss"] == plain["base_loss"] and set(fp8["loss"]) == {"left_to_right", "psm", "spm"}
    assert all(fp8["loss"][f]["value"] == pytest.approx(plain["loss"][f]["value"], rel=0.05) for f in fp8["loss"])
    assert "| validation loss, base (step 0) |" in proc.stdout
