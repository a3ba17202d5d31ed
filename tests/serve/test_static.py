"""The GPU fast path (static KV cache + compiled one-token step), run here on the CPU.

On a CPU the same code runs uncompiled (`backend=None`), through dynamo with the `eager`
backend (the graph that CUDA graphs would replay, with its guards), or with inductor (slow).
Each is checked against plain `model.generate`: the greedy tokens must be the same.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from serve_helpers import make_app, never_ending, running, wait_until
from tests import tiny
from tests.conftest import code_samples
from torch.overrides import TorchFunctionMode

from fimtune import fast
from fimtune.errors import FimtuneError
from fimtune.generate import Completion, FimPrompter, GenerationParams, complete_batch
from fimtune.serve import static as static_module
from fimtune.serve.decoding import Decoder, Row
from fimtune.serve.static import (
    DECODE_ATTENTIONS,
    FLEX,
    GROUPED,
    StaticDecoding,
    StaticSession,
    batch_buckets,
    chosen_decoding,
    chosen_name,
    fastest,
    flex_decoding,
    grouped_sdpa,
    kv_groups,
    matmul_decoding,
    prefill_lengths,
    static_decoding,
    time_decoding_attention,
)

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


def generated(model, pr: FimPrompter, params: GenerationParams) -> list[tuple]:
    """`generate`'s completions of the three :func:`holes`, one at a time (what the engine must give)."""
    return summary([complete_batch(model, pr, [h], params)[0] for h in holes(3)])


def fresh_dynamo() -> dict:
    """Forget compiled graphs (dynamo stops compiling a function after some recompiles); its counters."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    return counters


def joining_rows(pr: FimPrompter, params: GenerationParams) -> tuple[Row, Row, Row, dict[int, Completion]]:
    """The rows of :func:`holes` (about 60, 150 and 200 tokens) and where their completions land (by index)."""
    done: dict[int, Completion] = {}
    rows = [
        Row(r.prompt, r.params, on_done=lambda c, i=i: done.__setitem__(i, c))
        for i, r in enumerate(rows_for(pr, params))
    ]
    return rows[0], rows[1], rows[2], done


def joining(model, pr: FimPrompter) -> tuple[list[tuple], tuple[Row, Row, Row, dict[int, Completion]]]:
    """For the join tests: `generate`'s completions of the three holes (NEW tokens each) and
    :func:`joining_rows` for them."""
    params = GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET)
    return generated(model, pr, params), joining_rows(pr, params)


def check_against_generate(model, pr: FimPrompter, backend: str | None, params: GenerationParams, **options) -> Decoder:
    """Batch 1 (each row) and a padded batch of 3 (bucket 4) give `generate`'s completions."""
    counters = fresh_dynamo()
    expected = generated(model, pr, params)
    rows = rows_for(pr, params)
    assert len({len(r.prompt) for r in rows}) == 3  # three prompt lengths: left padding matters
    decoder = Decoder(model, pr, static=StaticDecoding(model, MAX_LENGTH, 4, backend=backend, **options))
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


@pytest.mark.parametrize("family", ["gpt_bigcode", "llama"])
def test_a_compiled_prefill_gives_the_same_tokens_with_one_graph_for_all_lengths(tiny_tokenizer, family):
    counters = fresh_dynamo()
    model, pr = tiny_model(family, tiny_tokenizer), FimPrompter(tiny_tokenizer)
    params = GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET)
    expected = generated(model, pr, params)
    static = StaticDecoding(model, MAX_LENGTH, 4, backend="eager", compile_prefill=True)
    static.warmup()
    assert static.prefill_compiled and 0 < static.prefill_warmup_s < static.warmup_s
    decoder = Decoder(model, pr, static=static)
    assert summary([decoder.run([row])[0] for row in rows_for(pr, params)]) == expected
    assert summary(decoder.run(rows_for(pr, params))) == expected
    same = [Row(r.prompt, params) for r in rows_for(pr, params, 1) * 3]  # bucket 4, no padding
    assert summary(decoder.run(same)) == expected[:1] * 3
    # the prefill's graphs (one prompt; several; several padded), a step graph per bucket (1, 4);
    # three prompt lengths and the warm-up's compiled nothing more
    assert counters["stats"]["unique_graphs"] == 3 + 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_prefill_length_buckets():
    assert prefill_lengths(1088, 2048, 8192) == [128, 256, 384, 512, 640, 768, 896, 1024, 1088]
    assert prefill_lengths(4096, 2048, None) == [128 * i for i in range(1, 17)]
    assert prefill_lengths(512, 2048, 256) == [128, 256]  # pads never reach positions the model lacks
    assert prefill_lengths(100, 2048, 8192) == [100]


@pytest.mark.parametrize("family, backend", [("gpt_bigcode", None), ("llama", "eager")])
def test_single_prompts_prefilled_padded_to_a_length_bucket_give_generate_tokens(tiny_tokenizer, family, backend):
    """The forward a prefill graph replays (right padding, the kept logits' index in a tensor, shared
    buffers), run uncaptured: single prompts of three lengths take it; the batch of three does not."""
    model, pr = tiny_model(family, tiny_tokenizer), FimPrompter(tiny_tokenizer)
    params = GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET)
    assert not StaticDecoding(model, MAX_LENGTH, 4, backend=None).prefill_graphs_on  # off without CUDA
    decoder = check_against_generate(model, pr, backend, params, prefill_graphs=True)
    static = decoder.static
    assert static.prefill_lengths == [128, 256] and static.single_prefills == 3  # buckets 128, 256, 256
    # SDPA's mask holds additive biases: booleans would be turned into them in every layer
    assert static.mask_dtype == torch.float32 and (static.open, static.shut) == (0.0, -float("inf"))
    assert static._single.states[0][0].shape[2] == 256 and not static._prefill_graphs  # no CUDA: nothing captured


def test_eager_prefills_are_counted_by_whether_their_shape_was_seen_before(tiny_tokenizer):
    """Batches of prompts prefill eagerly; each call counts as a new shape (rows, width) or one seen
    before, with the host's seconds in it: kernels that plan per shape pay on a shape's first call,
    so cuDNN's attention, which does, is left out of them (and back after each); so is it from the
    eager decoder's forwards, whose keys grow a step at a time."""
    model, pr = tiny_model("gpt_bigcode", tiny_tokenizer), FimPrompter(tiny_tokenizer)
    static = StaticDecoding(model, MAX_LENGTH, 4, backend=None)
    cudnn = []
    model.register_forward_pre_hook(lambda *_: cudnn.append(torch.backends.cuda.cudnn_sdp_enabled()))
    for prompts in ([[5, 6, 7], [8, 9]], [[1, 2], [3, 4, 5]], [[1, 2, 3, 4], [5]], [[7]], [[9, 9, 9], [1]]):
        static.run_prefill(prompts)
    assert static.eager_shapes == {(2, 3), (2, 4), (1, 1)}
    assert static.eager_prefills == [2, 3]  # (2, 3) twice more after its first call
    assert all(s > 0 for s in static.eager_prefill_s)
    assert cudnn == [False] * 5 and torch.backends.cuda.cudnn_sdp_enabled()
    cudnn.clear()
    Decoder(model, pr).run(rows_for(pr, GenerationParams(max_new_tokens=3), 2))
    assert len(cudnn) >= 3 and not any(cudnn) and torch.backends.cuda.cudnn_sdp_enabled()


def test_joins_never_take_a_session_past_learned_positions(tiny_tokenizer):
    """The cache rounds its slots up to a multiple of 64, past a GPT-BigCode's 250 learned
    positions: a join must fit the positions, since the slots of finished rows decode on until the
    session ends (past them, an IndexError, on a GPU a device-side assert)."""
    model, pr = (
        never_ending(tiny.gpt_bigcode(len(tiny_tokenizer), n_positions=250), tiny_tokenizer),
        FimPrompter(tiny_tokenizer),
    )
    static = StaticDecoding(model, 250, 4, backend=None)  # as the server: 200 input + 50 new tokens
    assert static.max_length == 256 and static.fits(1, 200, 50) and not static.fits(1, 200, 51)
    first = pr.encode("def f(x):\n    return x\n" * 40)[-200:]
    late = pr.encode("y = 1\n")
    offered, done = [], {}

    def join(room, fits):
        offered.append(fits(len(late), 46))
        return (
            [Row(late, GenerationParams(max_new_tokens=46), on_done=lambda c: done.setdefault("late", c))]
            if len(offered) == 10 and offered[-1]
            else []
        )

    decoder = Decoder(model, pr, static=static)
    [out] = decoder.run([Row(first, GenerationParams(max_new_tokens=50))], join=join)
    assert out.completion_tokens == 50 and decoder.static is static  # no fault turned the fast path off
    assert offered[9] is False and "late" not in done  # at length 210: 210 + 46 > 250
    assert offered[0] is True  # at length 201: 201 + 46 <= 250


def test_a_joining_row_is_prefilled_padded_and_gets_its_own_tokens(tiny_tokenizer):
    model, pr = never_ending(tiny_model("gpt_bigcode", tiny_tokenizer), tiny_tokenizer), FimPrompter(tiny_tokenizer)
    params = GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET)
    expected = summary([complete_batch(model, pr, [h], params)[0] for h in holes(2)])
    done: dict[int, Completion] = {}
    short, long = (
        Row(r.prompt, r.params, on_done=lambda c, i=i: done.__setitem__(i, c))
        for i, r in enumerate(rows_for(pr, params, 2))
    )
    static = StaticDecoding(model, 256, 4, backend=None, prefill_graphs=True)
    joins = iter([[], [short]])
    Decoder(model, pr, static=static).run([long], join=lambda room, fits: next(joins, []))
    assert summary([done[0], done[1]]) == expected and static.single_prefills == 2


@pytest.mark.slow
def test_static_decoding_compiled_by_inductor(tiny_tokenizer):
    """The GPU's compiler (`reduce-overhead` records CUDA graphs on a GPU only): ~30 s on 2 cores."""
    model, pr = tiny_model("gpt_bigcode", tiny_tokenizer), FimPrompter(tiny_tokenizer)
    check_against_generate(model, pr, "inductor", GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET))


@pytest.mark.slow
def test_matrix_vector_steps_compiled_by_inductor(tiny_tokenizer):
    """A batch of one's products as reductions (the GPU default), forced on the CPU: generate's tokens,
    through inductor's C++ kernels; bucket 4 keeps its products. ~40 s on 2 cores."""
    model, pr = tiny_model("gpt_bigcode", tiny_tokenizer), FimPrompter(tiny_tokenizer)
    before = fast.PRODUCT_COUNTS["row"]
    decoder = check_against_generate(
        model, pr, "inductor", GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET), gemv=True
    )
    assert decoder.static.gemv
    assert not StaticDecoding(model, MAX_LENGTH, 4, backend="inductor").gemv  # by default on CUDA only
    assert not StaticDecoding(model, MAX_LENGTH, 4, backend="eager", gemv=True).gemv  # inductor's rules only
    # bucket 1's graph: each layer's 4 biased products (c_attn, c_proj, c_fc, mlp c_proj), the head's plain one
    layers = model.config.n_layer
    assert fast.PRODUCT_COUNTS["row"] - before == 4 * layers + 1


@pytest.mark.slow
def test_a_matrix_vector_step_that_fails_to_compile_falls_back_to_the_plain_step(tiny_tokenizer, monkeypatch, caplog):
    def broken(mode, devices):
        def backend(graph, example_inputs):
            raise RuntimeError("no reduction kernels today")

        return backend

    monkeypatch.setattr(static_module, "gemv_backend", broken)
    fresh_dynamo()
    model, pr = tiny_model("gpt_bigcode", tiny_tokenizer), FimPrompter(tiny_tokenizer)
    params = GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET)
    static = StaticDecoding(model, MAX_LENGTH, 1, backend="inductor", mode=None, gemv=True)
    with caplog.at_level("WARNING"):
        static.warmup()
    assert not static.gemv and "matrix-vector decoding step failed" in caplog.text
    row = rows_for(pr, params, 1)[0]
    assert summary(Decoder(model, pr, static=static).run([row])) == summary(complete_batch(model, pr, holes(1), params))


def test_no_step_runs_after_every_row_s_last_token(tiny_tokenizer):
    """N new tokens: a prefill and N - 1 steps (the step after the last token by length is not run)."""
    model, pr = never_ending(tiny_model("gpt_bigcode", tiny_tokenizer), tiny_tokenizer), FimPrompter(tiny_tokenizer)
    params = GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET)
    decoder = Decoder(model, pr, static=StaticDecoding(model, MAX_LENGTH, 4, backend=None))
    short = Row(rows_for(pr, params, 1)[0].prompt, GenerationParams(max_new_tokens=3, max_input_tokens=BUDGET))
    done = decoder.run([*rows_for(pr, params, 2), short])
    assert [c.completion_tokens for c in done] == [NEW, NEW, 3]
    assert decoder.stats.forwards == NEW  # the prefill, then a step for each token but the last


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bf16_models_decode_with_masks_of_their_dtype(tiny_tokenizer, attn):
    """A bf16 model: the mask's biases are bf16 (prompts, padding and a joining row write them)."""
    model = never_ending(tiny_model("gpt_bigcode", tiny_tokenizer, attn).to(torch.bfloat16), tiny_tokenizer)
    pr, params = FimPrompter(tiny_tokenizer), GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET)
    static = StaticDecoding(model, 256, 4, backend=None)
    decoder = Decoder(model, pr, static=static)
    joins = iter([[], rows_for(pr, params, 1)])
    done = decoder.run(rows_for(pr, params, 3)[1:], join=lambda room, fits: next(joins, []))
    assert static.mask_dtype == torch.bfloat16 and decoder.static is static and decoder.stats.joined == 1
    assert [c.completion_tokens for c in done] == [NEW, NEW]


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


def test_what_a_request_asks_for_fails_it_and_leaves_the_fast_path_on(tiny_tokenizer):
    model, pr = tiny_model("gpt_bigcode", tiny_tokenizer), FimPrompter(tiny_tokenizer)
    fast = Decoder(model, pr, static=StaticDecoding(model, MAX_LENGTH, 4, backend=None))
    params = GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET)
    with pytest.raises(ValueError):  # a seed torch's generators do not take
        fast.run(rows_for(pr, dataclasses.replace(params, temperature=0.8, seed=2**64), 2))
    # a temperature so small that logits / temperature overflows samples the likeliest token
    tiny = summary(fast.run(rows_for(pr, dataclasses.replace(params, temperature=1e-40, seed=1), 2)))
    assert tiny == summary(fast.run(rows_for(pr, params, 2)))
    assert fast.static is not None and fast.static.batches == 2


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
    # a failure after the prefill (its prompts counted), before a first token: counted once, not twice
    other = StaticDecoding(model, 100, 2, backend=None)
    decoder = Decoder(model, pr, static=other)
    start = other.start

    def failing_steps(prompts):
        session, logits = start(prompts)
        monkeypatch.setattr(session, "step", broken)
        return session, logits

    monkeypatch.setattr(other, "start", failing_steps)
    rows = rows_for(pr, params, 1)
    assert summary(decoder.run(rows)) == expected[:1] and decoder.static is None
    assert decoder.stats.prompt_tokens == decoder.stats.fed_tokens == len(rows[0].prompt)


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
    engine.decoder.static = StaticDecoding(engine.model, 264, 4, backend="eager", prefill_graphs=True)
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
        assert info["prefill_graphs_active"] and info["limits"]["prefill_graphs"] is True  # uncaptured on a CPU
        assert info["gemv_steps_active"] is False and info["limits"]["gemv_steps"] is True  # the eager backend
        assert info["decode_attention_active"] == {"1": "sdpa", "4": "sdpa"}  # StaticDecoding's own default
        alone = [c.post(route, json=body).json() for route, body in calls]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda call: c.post(call[0], json=call[1]).json(), calls * 2))
    assert alone == expected and together == expected * 2
    assert engine.decoder.static is not None and engine.decoder.static.batches > len(calls)
    assert engine.decoder.static.single_prefills >= len(calls)  # each request alone, then some batches of one
    # a graph per bucket (1, 4) and adapter state (the run's merged, none, `other` merged): compiled, no breaks
    assert 3 <= counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_no_cuda_graphs_and_no_continuous_batching_flags():
    from fimtune.cli import build_parser
    from fimtune.serve.app import limits_from_args

    ns = build_parser().parse_args(["serve", "embedded", "--no-cuda-graphs", "--continuous-batching"])
    assert limits_from_args(ns).cuda_graphs is False and limits_from_args(ns).continuous_batching is True
    ns = build_parser().parse_args(["serve", "embedded", "--join-min-rows", "2", "--join-wait-ms", "5"])
    assert (limits_from_args(ns).join_min_rows, limits_from_args(ns).join_wait_ms) == (2, 5.0)
    with pytest.raises(FimtuneError, match="join-wait-ms"):
        limits_from_args(build_parser().parse_args(["serve", "embedded", "--join-wait-ms", "-1"]))
    ns = build_parser().parse_args(["serve", "embedded", "--switch-interval-ms", "0.25"])
    assert limits_from_args(ns).switch_interval_ms == 0.25
    with pytest.raises(FimtuneError, match="--switch-interval-ms must be more than 0"):
        limits_from_args(build_parser().parse_args(["serve", "embedded", "--switch-interval-ms", "0"]))
    defaults = limits_from_args(build_parser().parse_args(["serve", "embedded"]))
    assert defaults.switch_interval_ms == 0.5
    assert defaults.cuda_graphs is True and defaults.continuous_batching is True
    ns = build_parser().parse_args(["serve", "embedded", "--no-continuous-batching"])
    assert limits_from_args(ns).continuous_batching is False
    assert defaults.prefill_graphs is True and defaults.decode_attention == "auto"
    ns = build_parser().parse_args(["serve", "embedded", "--no-prefill-graphs", "--decode-attention", "flex"])
    assert (limits_from_args(ns).prefill_graphs, limits_from_args(ns).decode_attention) == (False, "flex")
    for kind in DECODE_ATTENTIONS:  # the CLI lists them (without importing torch)
        ns = build_parser().parse_args(["serve", "embedded", "--decode-attention", kind])
        assert limits_from_args(ns).decode_attention == kind
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "embedded", "--decode-attention", "fast"])
    assert defaults.gemv_steps is True and defaults.overlap_joins is True
    assert (
        limits_from_args(build_parser().parse_args(["serve", "embedded", "--no-overlap-joins"])).overlap_joins is False
    )
    assert limits_from_args(build_parser().parse_args(["serve", "embedded", "--no-gemv-steps"])).gemv_steps is False
    ns = build_parser().parse_args(["serve", "embedded", "--batch-wait-ms", "5", "--batch-max-wait-ms", "0"])
    assert (limits_from_args(ns).batch_wait_ms, limits_from_args(ns).batch_max_wait_ms) == (5.0, 0.0)
    with pytest.raises(FimtuneError, match="batch-max-wait-ms"):
        limits_from_args(build_parser().parse_args(["serve", "embedded", "--batch-max-wait-ms", "-2"]))


@pytest.mark.parametrize("kv_heads", [1, 2, 8])
@pytest.mark.parametrize("attention", [grouped_sdpa, flex_decoding, matmul_decoding], ids=["grouped", "flex", "matmul"])
def test_one_token_step_attention_is_sdpa_with_the_same_mask(attention, kv_heads):
    """A one-token step with a mask: grouped SDPA folds the query heads of a key/value head into its
    rows; FlexAttention (its reference implementation here) takes the mask as a score modification;
    the matrix products fold them as grouped SDPA does. All give SDPA's attention (repeated heads),
    with a boolean mask and with the engine's biases; anything else goes to SDPA itself."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gen = torch.Generator().manual_seed(0)
    heads, length = 8, 48
    key, value = (torch.randn(3, kv_heads, length, 16, generator=gen) for _ in range(2))
    mask = torch.ones(3, 1, 1, length, dtype=torch.bool)
    mask[0, ..., :5] = False  # left padding
    mask[1, ..., 10:30] = False  # a joined row's gap between its prompt and its new tokens
    mask[2, ..., 40:] = False  # slots not written yet
    module = static_module._Heads(heads // kv_heads)
    for q_len, m in ((1, mask), (4, mask.expand(3, 1, 4, length)), (1, None)):
        query = torch.randn(3, heads, q_len, 16, generator=gen)
        ours, _ = attention(module, query, key, value, m, scaling=0.25)
        theirs, _ = sdpa_attention_forward(module, query, key, value, m, scaling=0.25)
        assert ours.shape == theirs.shape == (3, q_len, heads, 16)
        torch.testing.assert_close(ours, theirs)
        if attention is matmul_decoding and m is mask:  # the engine's additive mask
            bias = torch.zeros(mask.shape).masked_fill_(~mask, -float("inf"))
            torch.testing.assert_close(attention(module, query, key, value, bias, scaling=0.25)[0], theirs)


def test_grouped_attention_is_an_option_for_grouped_sdpa_models_and_gives_generate_tokens(tiny_tokenizer):
    mqa, gqa = tiny_model("gpt_bigcode", tiny_tokenizer), tiny_model("llama", tiny_tokenizer)
    assert (kv_groups(mqa.config), kv_groups(gqa.config)) == (4, 2)
    static = StaticDecoding(mqa, MAX_LENGTH, 4, backend=None, attention="grouped")
    StaticDecoding(gqa, MAX_LENGTH, 4, backend=None)  # SDPA by default (the server's default is auto)
    assert mqa.config._attn_implementation == GROUPED and gqa.config._attn_implementation == "sdpa"
    assert static.decode_attention == {1: "grouped", 4: "grouped"}
    eager = tiny_model("llama", tiny_tokenizer, "eager")
    assert StaticDecoding(eager, MAX_LENGTH, 4, backend=None, attention="grouped").decode_attention == {
        1: "sdpa",
        4: "sdpa",
    }
    assert eager.config._attn_implementation == "eager"  # another attention than SDPA stays as it is
    pr, params = FimPrompter(tiny_tokenizer), GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET)
    mqa.set_attn_implementation("sdpa")
    expected = summary([complete_batch(mqa, pr, [h], params)[0] for h in holes(3)])
    mqa.set_attn_implementation(GROUPED)
    assert summary(Decoder(mqa, pr, static=static).run(rows_for(pr, params))) == expected


@pytest.mark.parametrize("family, backend", [("gpt_bigcode", "eager"), ("llama", None)])
def test_flex_decoding_steps_give_generate_tokens(tiny_tokenizer, family, backend):
    model, pr = tiny_model(family, tiny_tokenizer), FimPrompter(tiny_tokenizer)
    params = GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET)
    expected = generated(model, pr, params)
    static = StaticDecoding(model, MAX_LENGTH, 4, backend=backend, attention="flex")
    assert model.config._attn_implementation == FLEX and static.mask_dtype == torch.bool  # read by score_mod
    decoder = Decoder(model, pr, static=static)
    assert summary([decoder.run([row])[0] for row in rows_for(pr, params)]) == expected
    assert summary(decoder.run(rows_for(pr, params))) == expected
    with pytest.raises(ValueError, match="attention='fast': one of auto, sdpa, grouped, matmul, flex"):
        StaticDecoding(model, MAX_LENGTH, 4, attention="fast")


@pytest.mark.parametrize("family, backend", [("gpt_bigcode", None), ("llama", "eager")])
def test_auto_attention_takes_the_fastest_per_bucket_and_gives_generate_tokens(tiny_tokenizer, family, backend):
    """Auto: times SDPA, the matrix products and grouped SDPA on each bucket's shapes (here on the
    CPU, the calls themselves) and routes each bucket to its fastest; whatever it chose, the tokens are
    `generate`'s."""
    model, pr = tiny_model(family, tiny_tokenizer), FimPrompter(tiny_tokenizer)
    params = GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET)
    expected = generated(model, pr, params)
    static = StaticDecoding(model, MAX_LENGTH, 4, backend=backend, attention="auto")
    assert static.decode_attention == {} and model.config._attn_implementation == "sdpa"  # timed at the first batch
    decoder = Decoder(model, pr, static=static)
    assert summary([decoder.run([row])[0] for row in rows_for(pr, params)]) == expected
    assert summary(decoder.run(rows_for(pr, params))) == expected
    assert (
        static.attention == "auto" and set(static.attention_ms) == {1, 4} and not any(static.attention_errors.values())
    )
    for size in (1, 4):
        assert set(static.attention_ms[size]) == {"sdpa", "matmul", "grouped"}
        assert all(ms > 0 for ms in static.attention_ms[size].values())
    assert static.decode_attention == {size: fastest(static.attention_ms[size]) for size in (1, 4)}
    routed = set(static.decode_attention.values()) != {"sdpa"}
    assert model.config._attn_implementation == (chosen_name(static.decode_attention) if routed else "sdpa")
    assert static.mask_dtype == model.dtype and static.attention_s > 0  # additive biases, whichever it chose
    assert static.choose_attention() is static.decode_attention  # once


def test_auto_attention_keeps_sdpa_where_the_timing_fails(tiny_tokenizer, monkeypatch, caplog):
    def no_memory(config, size, *args, **kwargs):
        if size == 4:
            raise torch.OutOfMemoryError("no room for the caches")
        return {"sdpa": 1.0, "matmul": 0.5}, {"grouped": "RuntimeError: cannot capture"}

    monkeypatch.setattr(static_module, "time_decoding_attention", no_memory)
    model = tiny_model("gpt_bigcode", tiny_tokenizer)
    static = StaticDecoding(model, MAX_LENGTH, 4, backend=None, attention="auto")
    with caplog.at_level(logging.WARNING, logger="fimtune.serve.static"):
        assert static.choose_attention() == {1: "matmul", 4: "sdpa"}
    assert static.attention_errors[4] == {"timing": "OutOfMemoryError: no room for the caches"}
    assert "'grouped' failed its timing at batch size 1" in caplog.text
    assert model.config._attn_implementation == chosen_name({1: "matmul", 4: "sdpa"})


def test_chosen_attention_routes_each_batch_size_to_its_kind(monkeypatch):
    """Bucket sizes go to their kind, other batches and multi-token queries to SDPA; every route
    gives SDPA's values."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []
    for kind in ("matmul", "grouped"):
        real = static_module.DECODING_FUNCTIONS[kind]
        spy = lambda *a, kind=kind, real=real, **k: calls.append((kind, a[1].shape[:3])) or real(*a, **k)  # noqa: E731
        monkeypatch.setitem(static_module.DECODING_FUNCTIONS, kind, spy)
    attend = chosen_decoding({1: "matmul", 4: "grouped", 16: "sdpa"})
    module, gen = static_module._Heads(4), torch.Generator().manual_seed(1)
    for batch, q_len in ((1, 1), (4, 1), (3, 1), (16, 1), (4, 5)):
        key, value = (torch.randn(batch, 2, 40, 8, generator=gen) for _ in range(2))
        query = torch.randn(batch, 8, q_len, 8, generator=gen)
        bias = torch.zeros(batch, 1, q_len, 40).masked_fill_(torch.rand(batch, 1, 1, 40, generator=gen) < 0.3, -1e4)
        torch.testing.assert_close(
            attend(module, query, key, value, bias, scaling=0.3)[0],
            sdpa_attention_forward(module, query, key, value, bias, scaling=0.3)[0],
        )
    # the 5-token query of batch 4 reached grouped SDPA, which hands anything but a one-token step to SDPA
    assert calls == [("matmul", (1, 8, 1)), ("grouped", (4, 8, 1)), ("grouped", (4, 8, 5))]


def test_attention_timing_compiles_each_kind_once_per_bucket_and_runs_it_on_every_layer():
    """The timing calls the compiled layer once per model layer, and each kind is timed; the caches
    it allocates stay under its bound (taken again across layers)."""
    from transformers import GPTBigCodeConfig

    config = GPTBigCodeConfig(n_embd=64, n_layer=3, n_head=4, multi_query=True)
    counters = fresh_dynamo()
    times, errors = time_decoding_attention(
        config, 2, 128, ["sdpa", "matmul", "grouped"], torch.device("cpu"), torch.float32, backend="eager"
    )
    assert set(times) == {"sdpa", "matmul", "grouped"} and not errors
    assert counters["stats"]["unique_graphs"] == 3  # one graph per kind, called for each of the 3 layers


@pytest.mark.slow
def test_auto_attention_compiled_by_inductor(tiny_tokenizer):
    """The candidates timed as the step compiles them (inductor, its C++ kernels here), then the
    chosen bucket steps: `generate`'s tokens, no graph breaks. ~15 s on 2 cores."""
    counters = fresh_dynamo()
    model, pr = tiny_model("gpt_bigcode", tiny_tokenizer), FimPrompter(tiny_tokenizer)
    params = GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET)
    expected = generated(model, pr, params)
    static = StaticDecoding(model, MAX_LENGTH, 4, backend="inductor", mode=None, attention="auto")
    static.choose_attention()
    assert counters["stats"]["unique_graphs"] == 6  # three kinds x two buckets
    decoder = Decoder(model, pr, static=static)
    assert summary([decoder.run([row])[0] for row in rows_for(pr, params)]) == expected
    assert summary(decoder.run(rows_for(pr, params))) == expected
    assert counters["stats"]["unique_graphs"] == 8 and not counters["graph_break"]  # then a step per bucket


@pytest.mark.slow
def test_flex_decoding_compiled_by_inductor(tiny_tokenizer):
    """FlexAttention lowered by the GPU's compiler (here its CPU kernel; a decoding kernel on a GPU)."""
    model, pr = tiny_model("gpt_bigcode", tiny_tokenizer), FimPrompter(tiny_tokenizer)
    params = GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET)
    expected = generated(model, pr, params)
    decoder = Decoder(model, pr, static=StaticDecoding(model, MAX_LENGTH, 4, backend="inductor", attention="flex"))
    assert summary([decoder.run([row])[0] for row in rows_for(pr, params)]) == expected


@pytest.mark.parametrize("backend", [None, "eager"])
def test_rows_join_the_batch_in_flight_and_get_their_own_tokens(tiny_tokenizer, backend):
    """A 200-token row decodes; a 60-token row joins (the bucket grows from 1 to 4), then a 150-token one."""
    counters = fresh_dynamo()
    model, pr = never_ending(tiny_model("gpt_bigcode", tiny_tokenizer), tiny_tokenizer), FimPrompter(tiny_tokenizer)
    expected, (short, middle, long, done) = joining(model, pr)
    assert all(c[1] == NEW for c in expected)  # no row ends early: the joins happen while the first decodes
    rooms: list[int] = []

    def join(room, fits):
        rooms.append(room)
        assert not fits(len(long.prompt) + 100, 1) and not fits(10, 10_000)  # longer than filled / no room after
        return {2: [short], 5: [middle]}.get(len(rooms) - 1, [])

    static = StaticDecoding(model, 256, 4, backend=backend)
    decoder = Decoder(model, pr, static=static)
    first = decoder.run([long], join=join)
    assert summary(first) == expected[2:] and summary([done[i] for i in range(3)]) == expected
    assert (
        decoder.stats.joined == decoder.stats.joins == 2 and static.batches == 3 and sorted(static._buckets) == [1, 4]
    )
    assert rooms[:7] == [3, 3, 3, 2, 2, 2, 1]  # free rows of the largest bucket
    assert decoder.stats.generated_tokens == sum(c.completion_tokens for c in done.values())
    # the batch's prefill and the two joins' took time; the picks were read at once (no device here)
    assert decoder.stats.prefill_s > 0 and decoder.stats.device_wait_s < decoder.stats.prefill_s
    if backend is not None:  # bucket 1, then bucket 4 after the growth: no other graph
        assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("prefill_steps", [1, 3, 100])
def test_overlapped_joins_decode_beside_the_prefill_and_get_their_own_tokens(
    tiny_tokenizer, monkeypatch, prefill_steps
):
    """Overlapped joins: a joining row's prefill runs beside the decoding (here its prefill 'ends'
    after ``prefill_steps`` steps: 100 is never, so it is waited for after OVERLAP_MAX_STEPS), its
    slot decoding along unused meanwhile; every row gets its own tokens. One join at a time."""
    from fimtune.serve.static import OVERLAP_MAX_STEPS, Admission

    checks: dict[int, int] = {}

    def ready(admission):
        checks[id(admission)] = checks.get(id(admission), 0) + 1
        return checks[id(admission)] >= prefill_steps

    monkeypatch.setattr(Admission, "ready", ready)
    events: list[tuple[str, int]] = []  # ("begin" | "finish" | "join", forwards so far)
    for name in ("begin_admit", "finish_admit"):
        original = getattr(StaticSession, name)

        def traced(self, *args, _original=original, _name=name):
            events.append((_name[:-6], decoder.stats.forwards))
            return _original(self, *args)

        monkeypatch.setattr(StaticSession, name, traced)
    model, pr = never_ending(tiny_model("gpt_bigcode", tiny_tokenizer), tiny_tokenizer), FimPrompter(tiny_tokenizer)
    expected, (short, middle, long, done) = joining(model, pr)
    calls: list[int] = []

    def join(room, fits):
        calls.append(room)
        events.append(("join", decoder.stats.forwards))
        assert fits(len(short.prompt), NEW) and not fits(len(long.prompt) + 100, 1)
        return {2: [short], 3: [middle]}.get(len(calls), [])

    static = StaticDecoding(model, 256, 4, backend=None, prefill_graphs=True)
    decoder = Decoder(model, pr, static=static)
    assert summary(decoder.run([long], join=join, overlap_joins=True)) == expected[2:]
    assert summary([done[i] for i in range(3)]) == expected
    assert decoder.stats.joined == decoder.stats.joins == 2 and static.batches == 3
    assert static.single_prefills == 3  # the first row too
    waited = min(prefill_steps, OVERLAP_MAX_STEPS)  # decoding steps while a prefill runs
    kinds = [kind for kind, _ in events]
    begins = [n for kind, n in events if kind == "begin"]
    finishes = [n for kind, n in events if kind == "finish"]
    assert [b - a for a, b in zip(begins, finishes, strict=True)] == [waited] * 2
    # no join is asked for while a prefill runs: the second is asked for as the first joins
    assert kinds[kinds.index("begin") + 1] == "finish" and kinds[kinds.index("finish") + 1] == "join"
    assert calls[:3] == [3, 3, 2]  # the largest bucket's free rows (the first joiner's once it is in)
    assert decoder.stats.generated_tokens == sum(c.completion_tokens for c in done.values())


def test_rows_that_wait_together_join_together_with_overlapped_joins(tiny_tokenizer, monkeypatch):
    """With overlapped joins, two rows that wait at the same step (a burst) join together, the batch
    waiting for their prefill, not one after the other beside the steps; a row that then waits
    alone is prefilled beside them. Every row gets `generate`'s tokens."""
    began: list[int] = []
    original = StaticSession.begin_admit
    monkeypatch.setattr(
        StaticSession, "begin_admit", lambda self, prompt, slot: began.append(slot) or original(self, prompt, slot)
    )
    model, pr = never_ending(tiny_model("gpt_bigcode", tiny_tokenizer), tiny_tokenizer), FimPrompter(tiny_tokenizer)
    expected, (short, middle, long, done) = joining(model, pr)
    alone = Row(short.prompt, short.params, on_done=lambda c: done.__setitem__(3, c))
    calls: list[int] = []

    def join(room, fits):
        calls.append(room)
        return {2: [short, middle], 4: [alone]}.get(len(calls), [])

    static = StaticDecoding(model, 256, 4, backend=None, prefill_graphs=True)
    decoder = Decoder(model, pr, static=static)
    decoder.run([long], join=join, overlap_joins=True)
    assert summary([done[i] for i in range(4)]) == [*expected, expected[0]]
    assert decoder.stats.joined == 3 and decoder.stats.joins == 2  # the burst of two in one join, then one
    assert len(began) == 1 and static.single_prefills == 2  # only the lone row beside the steps (and the first)


def calling_code():
    """The code that called the torch function a mode's `__torch_function__` is handling (past the
    modes above it on the stack, each of which calls the function on from its own
    `__torch_function__`)."""
    frame = sys._getframe(2)
    while frame.f_code.co_name == "__torch_function__":
        frame = frame.f_back
    return frame.f_code


class HostValuesOnADevice(TorchFunctionMode):
    """Records where fimtune's code makes a tensor of host values on a device (`torch.tensor(...,
    device=...)`), or sets a number at tensor indices (`t[index] = 0.0`: PyTorch makes the number a
    host tensor and `index_put_` copies it to the device): on a GPU, PyTorch waits for the stream
    after such a copy (all the work queued before it), so the decoding loop must not make one."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        made = func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None
        if made or (func is torch.Tensor.__setitem__ and self.number_at_indices(*args)):
            caller = calling_code()
            if f"{os.sep}fimtune{os.sep}" in caller.co_filename:
                self.calls.append(f"{caller.co_filename}:{caller.co_name}")
        return func(*args, **kwargs)

    @staticmethod
    def number_at_indices(tensor, key, value) -> bool:
        key = key if isinstance(key, tuple) else (key,)
        advanced = any(isinstance(k, (torch.Tensor, list)) for k in key)
        return advanced and isinstance(value, (bool, int, float))


class HostReads(TorchFunctionMode):
    """Records each read of a tensor's values into Python (`bool(t)`, `.item()`, `.tolist()`, ...)
    outside `fast.copy_to_host` (which reads after an event, copied to pinned memory): on a GPU,
    each waits for the stream."""

    READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            caller = calling_code()
            if caller is not fast.copy_to_host.__code__:
                self.calls.append(f"{func.__name__} in {os.path.basename(caller.co_filename)}:{caller.co_name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("overlap", [False, True])
def test_starts_joins_and_steps_copy_no_host_values_in_a_way_that_waits(tiny_tokenizer, overlap):
    """A batch of two starts (prefilled together, padded to its bucket of 4), then two rows join:
    together (``overlap``: one at a time, each prefilled alone beside the steps). Each index and
    prompt goes to the device through pinned memory (`fast.copy_to_device`), never as
    `torch.tensor(..., device=)`; nothing is read from the device but the picked tokens (the two
    joining together, of two lengths, are padded: transformers would read whether from a 2D mask);
    every row gets `generate`'s tokens."""
    model, pr = never_ending(tiny_model("gpt_bigcode", tiny_tokenizer), tiny_tokenizer), FimPrompter(tiny_tokenizer)
    expected, (short, middle, long, done) = joining(model, pr)
    second = Row(long.prompt, long.params, on_done=lambda c: done.__setitem__(3, c))
    waiting, calls = [short, middle], []

    def join(room, fits):
        calls.append(room)
        if len(calls) < 2:
            return []
        take = 1 if overlap else room  # overlapped: one waits at a time (together they would join together)
        taken, waiting[:] = waiting[:take], waiting[take:]
        return taken

    static = StaticDecoding(model, 256, 4, backend=None, prefill_graphs=True)
    decoder = Decoder(model, pr, static=static)
    with HostValuesOnADevice() as seen, HostReads() as reads:
        decoder.run([long, second], join=join, overlap_joins=overlap)
    assert seen.calls == [] and reads.calls == []
    assert len(short.prompt) != len(middle.prompt)
    assert decoder.stats.joined == 2 and calls[1] == 2
    assert decoder.stats.joins == (2 if overlap else 1)  # together, or one at a time beside the steps
    assert summary([done[i] for i in range(4)]) == [*expected, expected[2]]


def test_copy_to_device_gives_the_values_as_long_tensors():
    got = fast.copy_to_device([[1, 2], [3, 4]], torch.device("cpu"))
    assert got.dtype == torch.long and got.tolist() == [[1, 2], [3, 4]]


def held_until_queued(engine, n: int):
    """A step hook: each forward 10 ms slower, the first batch's held in its first forward until
    ``n`` more requests are queued, so that they come while it is in flight (not before it began,
    nor after it ended, as a busy machine's timing could have them). ``.in_flight``: it began."""
    in_flight, queued = threading.Event(), threading.Event()

    def hook() -> None:
        time.sleep(0.01)
        if not queued.is_set():
            in_flight.set()
            wait_until(lambda: engine.queue_depth() >= n)
            queued.set()

    hook.in_flight = in_flight
    return hook


@pytest.mark.parametrize(
    "continuous, join_min_rows, join_wait_ms, joined",
    [
        (True, 1, 0.0, 2),  # as they come
        (True, 4, 20.0, 2),  # fewer than 4 wait, so they join once the first waited 20 ms
        (True, 2, 10_000.0, 2),  # two wait: enough
        (True, 3, 10_000.0, 0),  # never three: they wait for the next batch
        (False, 1, 0.0, 0),
        ("overlap", 1, 0.0, 2),  # prefilled beside the decoding (uncaptured here) alone, or together
    ],
)
def test_requests_join_the_batch_in_flight_through_the_server(
    tiny_run, continuous, join_min_rows, join_wait_ms, joined
):
    overlap = continuous == "overlap"
    limits = dict(continuous_batching=bool(continuous), join_min_rows=join_min_rows, join_wait_ms=join_wait_ms)
    app = make_app(tiny_run, max_batch_size=4, overlap_joins=overlap, **limits)
    engine = app.state.service.engine
    engine.decoder.static = StaticDecoding(engine.model, 264, 4, backend=None, prefill_graphs=overlap)
    prompts = [f"<fim_prefix>def f{i}(x):\n<fim_suffix>\n<fim_middle>" for i in range(3)]
    calls = [{"inputs": p, "parameters": {"max_new_tokens": n}} for p, n in zip(prompts, (40, 12, 10), strict=True)]
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert engine.ready.wait(60)
        alone = [c.post("/generate", json=body).json() for body in calls]
        assert engine.decoder.stats.joined == 0
        engine.decoder.step_hook = held_until_queued(engine, 2)
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(c.post, "/generate", json=calls[0])
            assert engine.decoder.step_hook.in_flight.wait(30)  # the first request decodes (held in a forward)
            later = [pool.submit(c.post, "/generate", json=body) for body in calls[1:]]
            together = [first.result().json(), *(f.result().json() for f in later)]
        metrics = c.get("/metrics").text
    assert together == alone
    assert engine.decoder.stats.joined == joined and f"fimtune_joined_total {joined}" in metrics
    joins = engine.decoder.stats.joins  # the two later requests joined together, or one by one
    assert (1 <= joins <= joined if joined else joins == 0) and f"fimtune_joins_total {joins}" in metrics


@pytest.mark.gpu
def test_a_captured_product_keeps_its_cublas_workspace_when_the_cache_is_let_go_of():
    """A graph captured through `capture` after eager products on the same stream (the stream
    PyTorch hands out again from its pool) replays right after cuBLAS's workspace cache is let go
    of (as inductor's CUDA graph trees do at each recording) and its memory handed to new tensors:
    the product is still right, and the new tensors are untouched (pytorch/pytorch#193402)."""
    from fimtune.serve.static import capture

    torch.manual_seed(0)
    a = torch.randn(16, 8192, device="cuda", dtype=torch.bfloat16)  # few rows, long sums: split-K products
    b = torch.randn(8192, 256, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(16, 256, device="cuda", dtype=torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.graph.default_capture_stream or torch.cuda.Stream()
    torch.cuda.graph.default_capture_stream = stream
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # eager products there first: cuBLAS caches a workspace for it
        want = a @ b
    torch.cuda.current_stream().wait_stream(stream)
    with capture(graph):
        out.copy_(a @ b)
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    fills = [torch.full((1 << 20,), 7.0, device="cuda") for _ in range(64)]  # 256 MiB of new tensors
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want)
    assert all(bool((t == 7.0).all()) for t in fills)


@pytest.mark.gpu
def test_overlapped_joins_on_a_gpu_give_each_row_its_tokens(tiny_tokenizer):
    """Joining prompts prefilled on a stream of their own beside the CUDA-graph steps."""
    fresh_dynamo()
    model = tiny.gpt_bigcode(len(tiny_tokenizer), n_embd=32)
    model.set_attn_implementation("sdpa")
    model, pr = never_ending(model.cuda(), tiny_tokenizer), FimPrompter(tiny_tokenizer)
    static = static_decoding(model, 256, 4)
    static.warmup()
    expected, (short, middle, long, done) = joining(model, pr)
    calls: list[int] = []

    def join(room, fits):
        calls.append(room)
        return {2: [short], 3: [middle]}.get(len(calls), [])

    decoder = Decoder(model, pr, static=static)
    decoder.run([long], join=join, overlap_joins=True)
    assert summary([done[i] for i in range(3)]) == expected and decoder.stats.joined == 2
    assert static._side is not None  # the prefills ran on a stream of their own


@pytest.mark.gpu
def test_a_gpu_batch_with_joins_never_waits_for_the_stream(tiny_tokenizer):
    """After the warm-up, a batch of one that two rows join, one at a time (growing from bucket 1
    to 4), then again with each prefilled beside the steps (overlapped), then both at once (two
    lengths: a padded prefill), runs with PyTorch's sync debug mode set to raise at any call that
    waits for a stream (a blocking copy, `.item()`): the host only waits for its picks, through an
    event; and every row gets `generate`'s tokens. The steps run on the decoding stream, of a higher
    priority than the overlapped prefills' stream."""
    fresh_dynamo()
    model = tiny.gpt_bigcode(len(tiny_tokenizer), n_embd=32)
    model.set_attn_implementation("sdpa")
    model, pr = never_ending(model.cuda(), tiny_tokenizer), FimPrompter(tiny_tokenizer)
    static = static_decoding(model, 256, 4)
    static.warmup()  # one warm-up for both runs (a GPU check's time is short)
    decoder = Decoder(model, pr, static=static)
    streams = []
    decoder.step_hook = lambda: streams.append(torch.cuda.current_stream())
    for overlap, together in ((False, False), (True, False), (False, True)):
        expected, (short, middle, long, done) = joining(model, pr)  # `generate` first: it waits
        calls: list[int] = []
        joins = {2: [short, middle]} if together else {2: [short], 6: [middle]}

        def join(room, fits, calls=calls, joins=joins):
            calls.append(room)
            return joins.get(len(calls), [])

        joined = decoder.stats.joined
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            decoder.run([long], join=join, overlap_joins=overlap)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert summary([done[i] for i in range(3)]) == expected, overlap
        assert decoder.stats.joined == joined + 2
    assert streams and all(stream == static.stream for stream in streams)
    assert static.stream.priority < static._side.priority == torch.cuda.default_stream().priority


@pytest.mark.gpu
@pytest.mark.parametrize("graphs, attention", [("trees", "auto"), ("captured", "sdpa"), ("trees", "flex")])
def test_cuda_graphs_on_a_gpu_give_generate_tokens(tiny_tokenizer, graphs, attention):
    counters = fresh_dynamo()
    # FlexAttention's GPU kernels take heads of 16 or more
    model = tiny.gpt_bigcode(len(tiny_tokenizer), n_embd=64 if attention == "flex" else 32)
    model.set_attn_implementation("sdpa")
    model, pr = model.cuda(), FimPrompter(tiny_tokenizer)
    static = static_decoding(model, MAX_LENGTH, 4, graphs=graphs, attention=attention)
    assert static is not None
    started = time.perf_counter()
    static.warmup()  # times the candidates first, for "auto"
    assert time.perf_counter() - started < 300
    if attention == "auto":  # every candidate timed through CUDA graphs of compiled code, none failed
        assert not any(static.attention_errors.values()), static.attention_errors
        assert all(set(static.attention_ms[size]) == {"sdpa", "matmul", "grouped"} for size in (1, 4))
        assert static.decode_attention == {size: fastest(static.attention_ms[size]) for size in (1, 4)}
    params = GenerationParams(max_new_tokens=NEW, max_input_tokens=BUDGET)
    expected = generated(model, pr, params)
    decoder = Decoder(model, pr, static=static)
    assert summary([decoder.run([row])[0] for row in rows_for(pr, params)]) == expected
    assert summary(decoder.run(rows_for(pr, params))) == expected
    assert not counters["inductor"]["cudagraph_skips"]
    assert static.gemv  # a batch of one's products as reductions: compiled, no fallback
    assert static.captured == (graphs == "captured") and len(static._graphs) == (2 if static.captured else 0)
    # single prompts went through prefill graphs, captured at the warm-up (one per length bucket)
    assert static.prefill_graphs_on and len(static._prefill_graphs) == len(static.prefill_lengths) == 2
    assert static.single_prefills == 1 + 3  # the warm-up's batch of one, then each row alone


def test_a_failure_after_joins_fails_every_request_of_the_batch_and_the_server_goes_on(tiny_run):
    app = make_app(tiny_run, max_batch_size=4, continuous_batching=True)
    engine = app.state.service.engine
    engine.decoder.static = StaticDecoding(engine.model, 264, 4, backend=None)
    body = {"inputs": "<fim_prefix>def f(x):\n<fim_suffix>\n<fim_middle>", "parameters": {"max_new_tokens": 30}}
    forwards = iter(range(1000))

    held = held_until_queued(engine, 2)

    def hook():
        held()
        if engine.decoder.stats.joined and next(forwards) >= 8:  # a few steps after the joins
            raise RuntimeError("the device went away")

    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert engine.ready.wait(60)
        engine.decoder.step_hook = hook
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(c.post, "/generate", json=body)
            assert held.in_flight.wait(30)  # the first request decodes (held in a forward)
            later = [f.result() for f in [pool.submit(c.post, "/generate", json=body) for _ in range(2)]]
        statuses = [first.result().status_code, *(r.status_code for r in later)]
        errors = [first.result().json(), *(r.json() for r in later)]
        engine.decoder.step_hook = None
        after = c.post("/generate", json=body)
    assert engine.decoder.stats.joined == 2
    assert statuses == [500, 500, 500] and all("generation failed" in str(e) for e in errors), errors
    assert engine.counters.errors == 3 and after.status_code == 200  # the worker lives on, eagerly
    assert engine.decoder.static is None
