"""The GPU fast path (static KV cache + compiled one-token step), run here on the CPU.

On a CPU the same code runs uncompiled (`backend=None`), through dynamo with the `eager`
backend (the graph that CUDA graphs would replay, with its guards), or with inductor (slow).
Each is checked against plain `model.generate`: the greedy tokens must be the same.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from serve_helpers import make_app, running
from tests import tiny
from tests.conftest import code_samples

from fimtune.generate import Completion, FimPrompter, GenerationParams, complete_batch
from fimtune.serve.decoding import Decoder, Row
from fimtune.serve.static import StaticDecoding, batch_buckets, static_decoding

SOURCE = code_samples()[0]
BUDGET = 200  # prompt tokens (the tiny GPTBigCode has 256 positions)
NEW = 12
MAX_LENGTH = BUDGET + NEW


def tiny_model(family: str, tokenizer, attn: str = "sdpa"):
    model = {"gpt_bigcode": tiny.gpt_bigcode, "llama": tiny.llama}[family](len(tokenizer))
    model.set_attn_implementation(attn)
    return model


def holes(n: int) -> list[tuple[str, str]]:
    """Holes whose prompts have different lengths (about 60, 150 and 200 tokens)."""
    return [(SOURCE[: 60 + 97 * i], SOURCE[400 + 29 * i : 440 + 53 * i]) for i in range(n)]


def rows_for(pr: FimPrompter, params: GenerationParams, n: int = 3) -> list[Row]:
    return [Row(pr.build(p, s, max_input_tokens=BUDGET), params) for p, s in holes(n)]


def summary(done: list[Completion]) -> list[tuple]:
    return [(c.text, c.completion_tokens, c.finish_reason) for c in done]


def fresh_dynamo() -> dict:
    """Forget compiled graphs (dynamo stops compiling a function after some recompiles); its counters."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    return counters


def check_against_generate(model, pr: FimPrompter, backend: str | None, params: GenerationParams) -> Decoder:
    """Batch 1 (each row) and a padded batch of 3 (bucket 4) give `generate`'s completions."""
    counters = fresh_dynamo()
    expected = summary([complete_batch(model, pr, [h], params)[0] for h in holes(3)])
    rows = rows_for(pr, params)
    assert len({len(r.prompt) for r in rows}) == 3  # three prompt lengths: left padding matters
    decoder = Decoder(model, pr, static=StaticDecoding(model, MAX_LENGTH, 4, backend=backend))
    assert summary([decoder.run([row])[0] for row in rows]) == expected
    assert summary(decoder.run(rows)) == expected
    assert decoder.static is not None and decoder.static.batches == 4  # no fallback to the eager path
    if backend is not None:  # one graph per bucket (1 and 4), nothing else
        assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"], dict(counters["graph_break"])
    return decoder


@pytest.mark.parametrize("family", ["gpt_bigcode", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_static_decoding_is_greedy_generate_uncompiled(tiny_tokenizer, family, attn):
    model, pr = tiny_model(family, tiny_tokenizer, attn), FimPrompter(tiny_tokenizer)
    check_against_generate(model, pr, None, GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET))


@pytest.mark.parametrize("family", ["gpt_bigcode", "llama"])
def test_static_decoding_compiled_by_dynamo_has_no_graph_breaks(tiny_tokenizer, family):
    model, pr = tiny_model(family, tiny_tokenizer), FimPrompter(tiny_tokenizer)
    check_against_generate(model, pr, "eager", GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET))


@pytest.mark.slow
def test_static_decoding_compiled_by_inductor(tiny_tokenizer):
    """The GPU's compiler (`reduce-overhead` records CUDA graphs on a GPU only): ~30 s on 2 cores."""
    model, pr = tiny_model("gpt_bigcode", tiny_tokenizer), FimPrompter(tiny_tokenizer)
    check_against_generate(model, pr, "inductor", GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET))


def test_end_tokens_stop_rows_while_the_others_go_on(tiny_tokenizer):
    model, pr = tiny_model("llama", tiny_tokenizer), FimPrompter(tiny_tokenizer)
    params = GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET)
    first = complete_batch(model, pr, holes(1), params)[0]
    fourth = pr.encode(first.text)[3]  # make an end token win wherever this token would have
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[pr.fim.middle] = head[fourth] * 1.01
    decoder = check_against_generate(model, pr, "eager", params)
    done = decoder.run(rows_for(pr, params))
    assert done[0].finish_reason == "stop" and done[0].completion_tokens <= 4
    assert any(c.finish_reason == "length" for c in done[1:])


def test_stop_strings_streaming_and_cancellation(tiny_tokenizer):
    model, pr = tiny_model("llama", tiny_tokenizer), FimPrompter(tiny_tokenizer)
    eager = Decoder(model, pr)
    fast = Decoder(model, pr, static=StaticDecoding(model, MAX_LENGTH, 4, backend=None))
    plain = GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET)
    text = eager.run(rows_for(pr, plain, 1))[0].text
    params = GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET, stop=[text[3:6]])
    streams: dict[str, list[str]] = {"eager": [], "fast": []}
    out = {}
    for name, decoder in (("eager", eager), ("fast", fast)):
        on_token = lambda t, piece, end, name=name: streams[name].append(piece)  # noqa: E731
        rows = [Row(r.prompt, params, on_token) for r in rows_for(pr, params, 1)]
        out[name] = summary(decoder.run(rows))
    assert out["fast"] == out["eager"] and out["fast"][0][2] == "stop" and out["fast"][0][0] == text[:3]
    assert streams["fast"] == streams["eager"]
    steps = iter(range(100))
    cut = Row(rows_for(pr, plain, 1)[0].prompt, plain, should_stop=lambda: next(steps) >= 3)
    assert fast.run([cut])[0].completion_tokens == 4  # the checks after tokens 1, 2, 3 pass; the 4th stops it
    assert fast.static is not None and fast.static.batches == 2


def test_sampling_with_a_seed_repeats(tiny_tokenizer):
    model, pr = tiny_model("gpt_bigcode", tiny_tokenizer), FimPrompter(tiny_tokenizer)
    fast = Decoder(model, pr, static=StaticDecoding(model, MAX_LENGTH, 4, backend=None))
    params = GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET, temperature=0.8, top_p=0.95, seed=7)
    runs = [summary(fast.run(rows_for(pr, params, 2))) for _ in range(2)]
    assert runs[0] == runs[1] and all(c[1] == NEW or c[2] == "stop" for c in runs[0])


def test_what_does_not_fit_decodes_eagerly_and_a_failure_turns_the_path_off(tiny_tokenizer, monkeypatch, caplog):
    model, pr = tiny_model("llama", tiny_tokenizer), FimPrompter(tiny_tokenizer)
    params = GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET)
    expected = summary([Decoder(model, pr).run([row])[0] for row in rows_for(pr, params)])
    small = StaticDecoding(model, 100, 2, backend=None)  # too short for the longer prompts, too few rows for 3
    decoder = Decoder(model, pr, static=small)
    assert summary(decoder.run(rows_for(pr, params))) == expected and small.batches == 0
    assert summary(decoder.run(rows_for(pr, params, 1))) == expected[:1] and small.batches == 1

    def broken(prompts):
        raise RuntimeError("no graph today")

    monkeypatch.setattr(small, "start", broken)
    assert summary(decoder.run(rows_for(pr, params, 1))) == expected[:1]  # nothing went out: decoded eagerly
    assert decoder.static is None and "decoding eagerly" in caplog.text


def test_buckets_and_when_the_fast_path_applies(tiny_tokenizer):
    assert batch_buckets(32) == [1, 4, 16, 32] and batch_buckets(4) == [1, 4]
    model = tiny_model("llama", tiny_tokenizer)
    assert static_decoding(model, MAX_LENGTH, 4) is None  # on a CPU: the eager decoder
    model.config._attn_implementation = "flash_attention_2"  # a mask format not handled here
    with pytest.raises(ValueError, match="attention"):
        StaticDecoding(model, MAX_LENGTH, 4)


def test_server_with_the_fast_path_answers_as_the_eager_one(tiny_run, other_adapter, server):
    """Adapters merged and unmerged between batches, concurrent requests, the worker thread's warm-up."""
    app = make_app(tiny_run, [f"other={other_adapter}"], max_batch_size=4)
    engine = app.state.service.engine
    assert engine.decoder.static is None  # a CPU
    counters = fresh_dynamo()
    engine.decoder.static = StaticDecoding(engine.model, 264, 4, backend="eager")
    calls = [
        ("/generate", {"inputs": f"<fim_prefix>def f{i}(x):\n<fim_suffix>\n<fim_middle>", "parameters": params})
        for i, params in enumerate(
            [{"max_new_tokens": 6}, {"max_new_tokens": 9, "adapter_id": "base"}, {"max_new_tokens": 5}]
            + [{"max_new_tokens": 7, "adapter_id": "other"}, {"max_new_tokens": 8, "stop": ["\n"]}]
        )
    ]
    with httpx.Client(base_url=server[0], timeout=30) as c:
        expected = [c.post(route, json=body).json() for route, body in calls]
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert engine.ready.wait(60) and engine.warmup_s > 0
        info = c.get("/info").json()
        assert info["cuda_graphs_active"] and info["limits"]["cuda_graphs"] is True
        alone = [c.post(route, json=body).json() for route, body in calls]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda call: c.post(call[0], json=call[1]).json(), calls * 2))
    assert alone == expected and together == expected * 2
    assert engine.decoder.static is not None and engine.decoder.static.batches > len(calls)
    # a graph per bucket (1, 4) and adapter state (the run's merged, none, `other` merged): compiled, no breaks
    assert 3 <= counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_no_cuda_graphs_flag():
    from fimtune.cli import build_parser
    from fimtune.serve.app import limits_from_args

    ns = build_parser().parse_args(["serve", "embedded", "--no-cuda-graphs"])
    assert limits_from_args(ns).cuda_graphs is False
    assert limits_from_args(build_parser().parse_args(["serve", "embedded"])).cuda_graphs is True


@pytest.mark.gpu
def test_cuda_graphs_on_a_gpu_give_generate_tokens(tiny_tokenizer):
    counters = fresh_dynamo()
    model, pr = tiny_model("gpt_bigcode", tiny_tokenizer).cuda(), FimPrompter(tiny_tokenizer)
    static = static_decoding(model, MAX_LENGTH, 4)
    assert static is not None
    started = time.perf_counter()
    static.warmup()
    assert time.perf_counter() - started < 300
    params = GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET)
    expected = summary([complete_batch(model, pr, [h], params)[0] for h in holes(3)])
    decoder = Decoder(model, pr, static=static)
    assert summary([decoder.run([row])[0] for row in rows_for(pr, params)]) == expected
    assert summary(decoder.run(rows_for(pr, params))) == expected
    assert not counters["inductor"]["cudagraph_skips"]
