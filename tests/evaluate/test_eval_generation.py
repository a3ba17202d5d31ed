"""Batched generation for evaluation: order kept, rows stopped early, prompts fitted; HumanEval prompts."""

from __future__ import annotations

import pytest
import torch
from tests import tiny

from fimtune.evaluate.humaneval import PlainPrompter, load_problems
from fimtune.evaluate.variants import fit_params, generate
from fimtune.generate import FimPrompter, GenerationParams, TextStop
from fimtune.tokens import document_separator_id

HOLES = [("def add(a, b):\n    return ", "\n"), ("x = 1\n", ""), ("import os\n\ndef main():\n", "\n\nmain()\n")]


def test_batching_keeps_the_input_order(tiny_tokenizer):
    model = tiny.llama(len(tiny_tokenizer))
    prompter = FimPrompter(tiny_tokenizer)
    params = GenerationParams(max_new_tokens=6)
    one = [c.text for c in generate(model, prompter, HOLES, params, batch_size=1)]
    seen = []
    three = [c.text for c in generate(model, prompter, HOLES, params, batch_size=3, progress=seen.append)]
    assert one == three and seen == [3]


def test_rows_stop_at_stop_strings_or_a_predicate(tiny_tokenizer):
    head, rows = tiny_tokenizer.encode("AB"), [tiny_tokenizer.encode(t) for t in ("x = 1\ny", "x = 1 + 2")]
    width = max(len(r) for r in rows)
    ids = torch.tensor([head + r + [0] * (width - len(r)) for r in rows])  # 0: <|endoftext|>, as padding
    assert TextStop(tiny_tokenizer, len(head), ["\n"], None)(ids, None).tolist() == [True, False]
    assert TextStop(tiny_tokenizer, len(head), [], lambda t: "+" in t)(ids, None).tolist() == [False, True]


def test_params_fit_a_short_context(tiny_tokenizer):
    model = tiny.llama(len(tiny_tokenizer))  # 256 positions
    fitted = fit_params(model, GenerationParams(max_new_tokens=320, max_input_tokens=1024))
    assert fitted.max_new_tokens + fitted.max_input_tokens <= 256 and fitted.max_new_tokens == 128
    same = GenerationParams(max_new_tokens=32, max_input_tokens=128)
    assert fit_params(model, same) is same


def test_humaneval_prompts_are_plain_left_to_right(tiny_tokenizer):
    prompt = load_problems(1)[0]["prompt"].rstrip()
    ids = PlainPrompter(tiny_tokenizer).build(prompt, "", "psm", 64, trim_step=1)
    fim = FimPrompter(tiny_tokenizer).fim
    assert ids[0] == document_separator_id(tiny_tokenizer) and len(ids) == 64
    assert not {fim.prefix, fim.suffix, fim.middle} & set(ids)
    assert tiny_tokenizer.decode(ids[1:]) == prompt[-len(tiny_tokenizer.decode(ids[1:])) :]  # the end is kept


def test_complete_batch_stops_each_row_at_its_stop(tiny_tokenizer):
    from fimtune.generate import complete_batch

    model, prompter = tiny.llama(len(tiny_tokenizer)), FimPrompter(tiny_tokenizer)
    holes = HOLES * 3
    full = complete_batch(model, prompter, holes, GenerationParams(max_new_tokens=40))
    stop = full[0].text[4:6]  # a stop string that the first row reaches early
    assert len(stop) == 2
    cut = complete_batch(model, prompter, holes, GenerationParams(max_new_tokens=40, stop=[stop]))
    assert [c.text for c in cut] == [c.text.split(stop)[0] for c in full]
    assert all(c.completion_tokens <= f.completion_tokens for c, f in zip(cut, full, strict=True))
    assert cut[0].finish_reason == "stop" and cut[0].completion_tokens < full[0].completion_tokens


@pytest.mark.parametrize("family", ["llama", "gpt_bigcode"])
def test_finished_rows_leave_a_greedy_batch(tiny_tokenizer, family):
    """Greedy rows that are done leave the batch (with their KV cache rows): the other rows' tokens
    are those each gets alone, and the later steps run fewer rows."""
    from dataclasses import replace

    from fimtune.generate import complete_batch

    model, prompter = getattr(tiny, family)(len(tiny_tokenizer)), FimPrompter(tiny_tokenizer)
    holes = [HOLES[0]] * 5 + HOLES[1:]
    params = GenerationParams(max_new_tokens=40)
    stop = complete_batch(model, prompter, holes[:1], params)[0].text[4:6]  # the first 5 rows reach it early
    params = replace(params, stop=[stop])
    rows: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    together = complete_batch(model, prompter, holes, params)
    hook.remove()
    alone = [complete_batch(model, prompter, [h], params)[0] for h in holes]
    assert together == alone
    assert rows[0] == len(holes) and rows[-1] < len(holes)  # the batch went on with the unfinished rows only


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_the_base_of_a_run_whose_adapter_trained_biases_is_the_base_model(tmp_path, tiny_tokenizer, bias):
    """`lora.bias=all|lora_only` trains the base layers' own biases: `disable_adapter()` leaves them
    trained, so `fimtune eval`'s base (and `complete --compare-base`) was not the base model."""
    from transformers import AutoModelForCausalLM

    from fimtune.evaluate.variants import variant
    from fimtune.model import load_run

    base = tiny.save_model_folder(tiny.gpt_bigcode(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "base")
    tiny.save_run(tmp_path / "run", base, tiny_tokenizer, tiny.lora_with_trained_biases(base, bias))
    ids = torch.tensor([[5, 9, 3, 7, 11, 2]])
    expected = AutoModelForCausalLM.from_pretrained(base)(ids).logits
    run = load_run(tmp_path / "run", torch.device("cpu")).model
    with torch.no_grad():
        tuned = run(ids).logits
        with variant(run, "base") as m:
            torch.testing.assert_close(m(ids).logits, expected)
        with variant(run, "tuned") as m:
            torch.testing.assert_close(m(ids).logits, tuned, rtol=1e-5, atol=1e-5)  # the trained biases again
    assert not torch.allclose(tuned, expected, atol=1e-2)
