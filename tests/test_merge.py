"""`fimtune merge`: a plain transformers model with the logits of base + adapter."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fimtune.cli import main
from fimtune.model import load_run
from tests.runs import model_dir, quiet_fit, run_config


@pytest.mark.parametrize(("family", "fim_in_vocab"), [("gpt_bigcode", False), ("llama", True)])
def test_merged_model_matches_base_plus_adapter(
    tmp_path, tiny_tokenizer, tiny_tokenizer_without_fim, repetitive_data, token_cache, family, fim_in_vocab
):
    tok = tiny_tokenizer if fim_in_vocab else tiny_tokenizer_without_fim
    base = model_dir(tmp_path, tok, family)
    run = quiet_fit(run_config(tmp_path, base, repetitive_data, "run", "train.max_steps=5", "train.eval_every=0"))
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    merged_tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged_tok.convert_tokens_to_ids("<fim_middle>") == tok.get_vocab().get(
        "<fim_middle>", len(tok) + 1
    )  # added tokens kept their ids
    ids = torch.tensor([merged_tok.encode("<fim_prefix>def f(x):<fim_suffix>\n<fim_middle>    return x")])
    with torch.no_grad():
        expected = load_run(run, torch.device("cpu")).model(ids).logits
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert not list((tmp_path / "merged").glob("adapter_*"))  # a plain model, not an adapter


def test_merge_refuses_non_run_and_non_empty_out(tmp_path, capsys):
    assert main(["merge", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "not a run folder" in capsys.readouterr().err
