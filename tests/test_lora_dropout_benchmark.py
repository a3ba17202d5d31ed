"""The LoRA dropout and LoRA products benchmarks run on a tiny block; hashed masks keep less than PyTorch's."""

import json

from tests.runs import run_script


def test_hashed_masks_keep_fewer_activations_than_torch_dropout(tmp_path):
    out = tmp_path / "dropout.json"
    run_script("benchmarks/lora_dropout.py", "--shape", "tiny", "--tokens", "48", "--steps", "1", "--json", str(out))
    res = json.loads(out.read_text())["results"]
    kept = {s: r["kept_bytes_per_token"] for s, r in res.items()}
    assert kept["torch"] > kept["hashed"] >= kept["none"] > 0
    assert all(r["step_ms"] > 0 for r in res.values())


def test_the_lora_products_benchmark_runs_on_a_tiny_block(tmp_path):
    out = tmp_path / "products.json"
    run_script("benchmarks/lora_products.py", "--shape", "tiny", "--tokens", "48", "--steps", "1", "--json", str(out))
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"mm", "sums"} and all(r["step_ms"] > 0 for r in res.values())
    # the same block either way: the fused sums keep what the products keep
    assert res["mm"]["kept_bytes_per_token"] == res["sums"]["kept_bytes_per_token"] > 0
