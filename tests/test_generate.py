"""Completion engine: FIM prompts, context fitting, stopping, sampling, the decoder and its KV-cache reuse."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from fimtune.generate import (
    Completion,
    FimPrompter,
    GenerationParams,
    TextTracker,
    complete_batch,
    fit_context,
    pick_tokens,
    postprocess,
)
from fimtune.serve.decoding import Decoder, Row
from fimtune.serve.kvcache import MIN_CACHE_ROOM, Drafter, common_prefix
from tests import tiny
from tests.conftest import code_samples

SOURCE = code_samples()[0]
BUDGET = 200  # the tiny GPTBigCode has 256 positions


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models run on one thread here (see tests/conftest.py)."""


def tiny_model(family: str, tokenizer):
    model = {"gpt_bigcode": tiny.gpt_bigcode, "llama": tiny.llama}[family](len(tokenizer))
    model.set_attn_implementation("sdpa")
    return model


def holes(n: int) -> list[tuple[str, str]]:
    return [(SOURCE[: 150 + 41 * i], SOURCE[300 + 29 * i : 500 + 17 * i]) for i in range(n)]


# --------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------


def test_psm_and_spm_layouts_and_split(tiny_tokenizer):
    pr = FimPrompter(tiny_tokenizer)
    f = pr.fim
    p, s = pr.encode("def f(x):\n    "), pr.encode("\nprint(f(1))\n")
    assert pr.build("def f(x):\n    ", "\nprint(f(1))\n") == [f.prefix, *p, f.suffix, *s, f.middle]
    assert pr.build("def f(x):\n    ", "\nprint(f(1))\n", "spm") == [f.prefix, f.suffix, *s, f.middle, *p]
    assert pr.split("<fim_prefix>a = <fim_suffix>\nb<fim_middle>") == ("a = ", "\nb")
    assert pr.split("<fim_prefix><fim_suffix>\nb<fim_middle>a = ") == ("a = ", "\nb")
    assert pr.split("a = 1") is None and pr.split("<fim_prefix>a<fim_middle>") is None
    psm = pr.template()["psm"].format(prefix="a = ", suffix="\nb")
    assert pr.encode_formatted(psm) == pr.build("a = ", "\nb")


def test_fim_token_text_in_code_stays_text(tiny_tokenizer):
    pr = FimPrompter(tiny_tokenizer)
    ids = pr.build("s = '<fim_middle>'", "")
    assert ids.count(pr.fim.middle) == 1 and ids[-1] == pr.fim.middle


@pytest.mark.parametrize("prepend", ["normalizer", "metaspace"])
def test_a_sentencepiece_style_suffix_and_completion_keep_their_spaces(prepend):
    """Llama-style tokenizers put a "▁" before each text they encode, and their decoders drop the
    first space of a text. A hole's suffix goes on from the code before it, as in training (the
    document's tokens, or a char-unit suffix encoded as a continuation): no "▁" added. A completion
    goes on from the prefix: its leading spaces are kept. The prefix starts the file: it keeps its."""
    from fimtune.generate import _completion
    from fimtune.tokenization import encode_flat
    from tests.conftest import train_sentencepiece_style_tokenizer

    tokenizer = train_sentencepiece_style_tokenizer(prepend)
    pr = FimPrompter(tokenizer)
    prefix, suffix = "def add(a, b):\n", "    return a + b\n"
    ids = pr.build(prefix, suffix)
    start, end = ids.index(pr.fim.suffix), ids.index(pr.fim.middle)
    assert ids[1:start] == encode_flat(tokenizer, [prefix])[0].tolist()
    pieces = "".join(tokenizer.convert_ids_to_tokens(ids[start + 1 : end]))
    assert pieces == suffix.replace(" ", "\u2581"), pieces
    assert ids[start + 1 : end] == encode_flat(tokenizer, [suffix], True)[0].tolist()
    for middle in ("    s = a + b\n", "turn a + b", " x"):
        assert pr.decode(pr.encode_continued(middle)) == middle
    new = [*pr.encode_continued("    return a"), pr.end_ids[0]]  # a model's new tokens, then an end
    assert _completion(pr, new, 3, GenerationParams()).text == "    return a"


@pytest.mark.parametrize("prepend", ["normalizer", "metaspace"])
def test_a_completion_that_starts_its_document_loses_the_dummy_prefix_training_gave_it(prepend):
    """A hole with no prefix: training (char unit: the middle is the document's first part; token
    unit: the document's own tokens) taught a SentencePiece-style model to write "▁def", the dummy
    prefix included; decoded as a continuation, the completion began with a space the file lacks."""
    from unittest import mock

    import numpy as np

    from fimtune.fim import TextCut
    from fimtune.generate import TextTracker, _completion
    from fimtune.packing import Documents, PackSpec, pack_epoch
    from fimtune.tokenization import encode_flat
    from tests.conftest import train_sentencepiece_style_tokenizer

    tokenizer = train_sentencepiece_style_tokenizer(prepend)
    pr = FimPrompter(tokenizer)
    middle, suffix = "def add(a, b):\n", "    return a + b\n"
    docs = Documents(np.zeros(1, np.int32), np.array([0, 1]), texts=[middle + suffix])
    docs.encode = lambda texts, continued: encode_flat(tokenizer, texts, continued)
    spec = PackSpec(tokens=pr.fim, separator=2, seq_length=1, fim_rate=1.0, unit="char", shuffle=False)
    with mock.patch("fimtune.packing.cut_text", return_value=TextCut("", middle, suffix, False)):
        trained = pack_epoch(docs, spec, 0).ids.tolist()
    prompt = pr.build("", suffix)
    assert trained[: len(prompt)] == prompt and pr.starts_document(prompt)
    new = trained[len(prompt) :]  # what the model learned to write here: the middle, then the separator
    assert _completion(pr, new, len(prompt), GenerationParams(), pr.starts_document(prompt)).text == middle
    tracker = TextTracker(pr, GenerationParams(), pr.starts_document(prompt))
    assert "".join(tracker.push(t) for t in new[:-1]) + tracker.flush() == middle
    assert not pr.starts_document(pr.build("x = 1\n", suffix))  # after a prefix: a continuation, as before
    assert not pr.starts_document(pr.build("", suffix, context="# a.py\n"))


def test_a_completion_cut_inside_a_character_keeps_the_text_streamed_before_it():
    """A byte-fallback decoder makes a whole run of byte tokens U+FFFD when its last character is
    unfinished (generation stopped inside it), the characters before it too, a newline written as
    <0x0A> included: the final text went back on what had been streamed."""
    from fimtune.generate import TextTracker, _completion
    from fimtune.tokens import ensure_fim_tokens
    from tests.conftest import train_sentencepiece_style_tokenizer

    tokenizer = train_sentencepiece_style_tokenizer()
    ensure_fim_tokens(tokenizer)
    pr, vocab = FimPrompter(tokenizer), tokenizer.get_vocab()
    full = pr.encode_continued("x = 1\n# \u4e2d\u6587")  # two 3-byte characters
    newline_then_cut = [vocab["x"], vocab["<0x0A>"], vocab["<0xF0>"], vocab["<0x9F>"]]  # an emoji's first 2 bytes
    for ids in (full[:-2], full[:-1], newline_then_cut):
        tracker = TextTracker(pr, GenerationParams())
        streamed = "".join(tracker.push(i) for i in ids)
        final = _completion(pr, ids, 0, GenerationParams()).text
        assert final.startswith(streamed) and final == tracker.text, (streamed, final)
        assert final.rstrip("\ufffd") and final.endswith("\ufffd")
    assert _completion(pr, newline_then_cut, 0, GenerationParams()).text.startswith("x\n")
    assert pr.decode(full) == "x = 1\n# \u4e2d\u6587"  # a whole text decodes as it did


def test_an_empty_stop_string_stops_nothing(tiny_tokenizer):
    """`--stop ""` (or an API's empty stop) ended generation after the first token in `generate`'s
    path, where the server's decoder ignores it."""
    model, pr = tiny.gpt_bigcode(len(tiny_tokenizer)), FimPrompter(tiny_tokenizer)
    hole = [("def f(x):\n    ", "\n")]
    plain = complete_batch(model, pr, hole, GenerationParams(max_new_tokens=8))
    empty = complete_batch(model, pr, hole, GenerationParams(max_new_tokens=8, stop=[""]))
    assert [(c.text, c.completion_tokens) for c in empty] == [(c.text, c.completion_tokens) for c in plain]
    assert plain[0].completion_tokens > 1


def test_batched_completion_leaves_cudnn_attention_out(tiny_tokenizer):
    """Each batch's width and each step's keys are new shapes, and cuDNN's attention builds a plan
    for each (on Hopper, where PyTorch prefers it): `generate` runs without it, and the flag is back after."""
    model, pr = tiny.gpt_bigcode(len(tiny_tokenizer)), FimPrompter(tiny_tokenizer)
    cudnn = []
    model.register_forward_pre_hook(lambda *_: cudnn.append(torch.backends.cuda.cudnn_sdp_enabled()))
    done = complete_batch(model, pr, holes(2), GenerationParams(max_new_tokens=4))
    assert len(done) == 2 and len(cudnn) > 2 and not any(cudnn) and torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.parametrize("prepend", ["normalizer", "metaspace"])
def test_a_prefix_after_context_goes_on_from_it(prepend):
    """Other files' text (llama.cpp's `input_extra`) goes before the prefix: the prefix then goes on
    from it, with no "▁" of its own before it, as the second part of a training text."""
    from tests.conftest import train_sentencepiece_style_tokenizer

    pr = FimPrompter(train_sentencepiece_style_tokenizer(prepend))
    ids = pr.build("def f():\n    return ", "\n", context="import os\n")
    text = pr.tokenizer.decode(ids[1 : ids.index(pr.fim.suffix)])  # a text from its start: its first "▁" dropped
    assert text == "import os\ndef f():\n    return "
    alone = pr.build("def f():\n    return ", "\n")
    assert alone[1 : alone.index(pr.fim.suffix)] == pr.encode("def f():\n    return ")


def test_a_byte_level_tokenizer_needs_no_continuation_copy(tiny_tokenizer):
    """StarCoder's and SmolLM2's byte-level tokenizers put nothing before a text: no copy is made."""
    from fimtune.tokenization import continuation, fast_backend

    backend = fast_backend(tiny_tokenizer)
    assert continuation(backend) is backend


def test_prompts_encode_as_the_training_cache_and_from_many_threads_at_once(tiny_tokenizer):
    """The server tokenizes requests in a thread pool while its worker decodes: the prompter never
    changes a tokenizer setting (once it flipped special-token parsing around each encode)."""
    from concurrent.futures import ThreadPoolExecutor

    from fimtune.tokenization import encode_batch

    pr = FimPrompter(tiny_tokenizer)
    texts = [f"def f{i}(x):\n    s = '<fim_middle>' * {i}\n" * (1 + i % 7) for i in range(64)]
    assert [pr.encode(t) for t in texts] == [ids.tolist() for ids in encode_batch(tiny_tokenizer, texts)]
    formatted = [f"<fim_prefix>{t}<fim_suffix>\n<fim_middle>" for t in texts]

    def one(i: int) -> tuple[list[int], list[int], str]:
        return pr.encode(texts[i]), pr.encode_formatted(formatted[i]), pr.decode(pr.encode(texts[i]))

    alone = [one(i) for i in range(len(texts))]

    with ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            assert list(pool.map(one, range(len(texts)))) == alone
    # in code the token's text is text; in a formatted prompt it is the token (4 in the code, 1 closing)
    assert alone[3][0].count(pr.fim.middle) == 0 and alone[3][1].count(pr.fim.middle) == 4 + 1


def test_prompts_are_tokenized_with_the_interpreter_lock_let_go(tiny_tokenizer):
    """The server tokenizes requests in threads beside its event loop and the engine's worker: while
    a long prompt is tokenized, another thread runs Python (`tokenizers`' `encode` held the lock for
    the whole call, so none did)."""
    import threading
    import time

    pr = FimPrompter(tiny_tokenizer)
    text = SOURCE * max(1, 400_000 // len(SOURCE))  # tens of ms of tokenizing
    ticks: list[float] = []
    stop = threading.Event()

    def other() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(1e-4)  # lets the lock go between ticks

    thread = threading.Thread(target=other)
    thread.start()
    try:
        time.sleep(0.05)
        inside = []
        for encode in (pr.encode, pr.encode_formatted, lambda t: pr.build(t, t, max_input_tokens=10**6)):
            began = time.perf_counter()
            ids = encode(text)
            ended = time.perf_counter()
            inside.append(sum(began < t < ended for t in list(ticks)))
            assert len(ids) > 10_000
    finally:
        stop.set()
        thread.join()
    # let go: a tick each ~0.15 ms of a call's ~100 ms (hundreds here); held: only in the Python
    # between calls (0-3)
    assert min(inside) >= 10, inside


@pytest.mark.parametrize("step", [1, 16, 64])
def test_fit_context_keeps_the_text_nearest_the_cursor(step):
    rng = random.Random(step)
    for _ in range(200):
        prefix, suffix = list(range(rng.randrange(400))), list(range(1000, 1000 + rng.randrange(400)))
        budget = rng.randrange(20, 300)
        p, s = fit_context(prefix, suffix, budget, step)
        assert len(p) + len(s) <= budget
        assert p == prefix[len(prefix) - len(p) :] and s == suffix[: len(s)]
        if len(prefix) + len(suffix) <= budget:
            assert (p, s) == (prefix, suffix)
        if 0 < len(p) < len(prefix):  # dropped in whole steps (or all of it)
            assert (len(prefix) - len(p)) % step == 0


def test_a_growing_prefix_rarely_moves_the_window_start():
    suffix = list(range(1000, 1100))
    starts = {fit_context(list(range(n)), suffix, BUDGET, 64)[0][0] for n in range(300, 428)}
    assert len(starts) <= 3  # 128 keystrokes of one token, the start moved twice at most


def test_context_files_are_trimmed_before_the_hole(tiny_tokenizer):
    pr = FimPrompter(tiny_tokenizer)
    prefix, suffix = "def f(x):\n    ", "\nprint(f(1))\n"
    plain = pr.build(prefix, suffix, max_input_tokens=BUDGET)
    ids = pr.build(prefix, suffix, max_input_tokens=BUDGET, context=SOURCE)
    assert len(plain) < len(ids) <= BUDGET
    assert ids[-len(plain) + 1 :] == plain[1:]  # the hole is whole; the context's end sits before the prefix


def test_build_fitted_says_whether_any_text_was_cut(tiny_tokenizer):
    pr = FimPrompter(tiny_tokenizer)
    prefix, suffix = "def f(x):\n    ", "\nprint(f(1))\n"
    assert pr.build_fitted(prefix, suffix, max_input_tokens=BUDGET) == (
        pr.build(prefix, suffix, max_input_tokens=BUDGET),
        False,
    )
    assert pr.build_fitted(prefix, suffix, max_input_tokens=BUDGET, context="x = 1\n")[1] is False
    assert pr.build_fitted(prefix, suffix, max_input_tokens=BUDGET, context=SOURCE)[1] is True  # context cut
    assert pr.build_fitted(SOURCE + prefix, suffix, max_input_tokens=BUDGET)[1] is True  # prefix cut
    assert pr.build_fitted(prefix, suffix + SOURCE, max_input_tokens=BUDGET)[1] is True  # suffix cut


# --------------------------------------------------------------------------------------
# Stopping and sampling
# --------------------------------------------------------------------------------------


def test_postprocess_stops_and_names_the_stop_string():
    assert postprocess("a\nb<stop>c", GenerationParams(stop=["<stop>"])) == ("a\nb", "<stop>")
    assert postprocess("a\nb", GenerationParams(single_line=True)) == ("a", "\n")
    assert postprocess("a<s>b\nc", GenerationParams(stop=["\n", "<s>"])) == ("a", "<s>")
    assert postprocess("ab\nc<s>", GenerationParams(stop=["<s>"], single_line=True)) == ("ab", "\n")
    assert postprocess("abc", GenerationParams(stop=["x"])) == ("abc", "")


def test_streamed_pieces_never_show_a_stop_string(tiny_tokenizer):
    pr = FimPrompter(tiny_tokenizer)
    params = GenerationParams(stop=["\n\n"])
    tracker = TextTracker(pr, params)
    pieces = []
    for token in pr.encode("x = 1\n\ny = 2"):
        pieces.append(tracker.push(token))
        if tracker.stopped:
            break
    assert tracker.stopped == "\n\n" and tracker.text == "x = 1"
    assert "".join(pieces) == "x = 1" and not any("\n" in p for p in pieces)


def test_a_single_line_ends_before_a_crlf_line_end(tiny_tokenizer):
    """In a CRLF file (the corpus keeps line ends) a line ends with "\r\n": a single line is cut before
    its CR too, streamed or not, or an editor gets a stray CR before the line end after the cursor."""
    assert postprocess("x = 1\r\ny", GenerationParams(single_line=True)) == ("x = 1", "\r\n")
    assert postprocess("x = 1\ry\nz", GenerationParams(single_line=True)) == ("x = 1\ry", "\n")
    pr = FimPrompter(tiny_tokenizer)
    ids = pr.encode("x = 1\r\ny = 2")
    assert any(pr.decode(ids[:i]).endswith("\r") for i in range(len(ids)))  # the CR comes alone
    tracker, streamed = TextTracker(pr, GenerationParams(single_line=True)), ""
    for token in ids:
        streamed += tracker.push(token)
        if tracker.stopped:
            break
    assert tracker.stopped and streamed == tracker.text == "x = 1"


@pytest.mark.parametrize("text, stop", [("x = 1 # é", " # é"), ("print('注释')", "'注")])
def test_a_stop_string_is_held_back_while_a_character_after_its_start_is_incomplete(tiny_tokenizer, text, stop):
    """A character of several bytes comes in several tokens, shown as U+FFFD until whole: the start
    of a stop string before it may still become that stop string, and is not streamed."""
    pr = FimPrompter(tiny_tokenizer)
    ids = pr.encode(text)
    assert any(pr.decode(ids[:i]).endswith("\ufffd") for i in range(len(ids)))  # split into bytes
    tracker, streamed = TextTracker(pr, GenerationParams(stop=[stop])), ""
    for token in ids:
        streamed += tracker.push(token)
        if tracker.stopped:
            break
    assert tracker.stopped and streamed + tracker.flush() == tracker.text == text[: text.index(stop)]


def test_pick_tokens():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 0.0]])
    assert pick_tokens(logits, GenerationParams()).tolist() == [1, 0]
    assert pick_tokens(logits, GenerationParams(temperature=1.0, top_k=1)).tolist() == [1, 0]
    assert pick_tokens(logits, GenerationParams(temperature=1.0, top_p=0.01)).tolist() == [1, 0]

    def draws(seed):
        gen = torch.Generator().manual_seed(seed)
        return [pick_tokens(logits, GenerationParams(temperature=1.0, top_k=2), gen).tolist() for _ in range(20)]

    assert draws(1) == draws(1)
    assert {d[0] for d in draws(2)} == {1, 2}  # top-2: both near-ties are drawn, never 0 or 3


def test_sampling_draws_what_multinomial_draws_and_survives_what_it_refuses():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    params = GenerationParams(temperature=0.7, top_k=20, top_p=0.9)
    ours, theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(30):  # the same tokens for a seed as torch.multinomial, draw after draw
        scaled = pick_tokens(logits, params, ours)
        probs = _filtered(logits, params).softmax(-1)
        assert scaled.tolist() == torch.multinomial(probs, 1, generator=theirs).squeeze(-1).tolist()
    # a temperature so small that logits / temperature overflows: the likeliest token, as greedy
    tiny = GenerationParams(temperature=1e-40)
    assert pick_tokens(logits, tiny, ours).tolist() == logits.argmax(-1).tolist()
    with pytest.raises(RuntimeError):  # multinomial refuses NaN (on a GPU: a device-side assert)
        torch.multinomial(torch.full((1, 4), float("nan")), 1)
    nan = torch.full((1, 4), float("nan"))
    assert pick_tokens(nan, GenerationParams(temperature=1.0), ours).shape == (1,)  # a token, no error


def _filtered(logits: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """The logits top-k and top-p keep (others -inf), computed here the plain way, row by row."""
    out = torch.full_like(logits, float("-inf"))
    for r, row in enumerate((logits - logits.amax(-1, keepdim=True)) / params.temperature):
        order = row.argsort(descending=True)[: params.top_k]
        probs = row[order].softmax(-1)
        keep = (probs.cumsum(-1) - probs) <= params.top_p
        out[r, order[keep]] = row[order[keep]]
    return out


# --------------------------------------------------------------------------------------
# The decoder against `generate`
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt_bigcode", "llama"])
def test_decoder_is_greedy_generate_alone_and_batched(tiny_tokenizer, family):
    model, pr = tiny_model(family, tiny_tokenizer), FimPrompter(tiny_tokenizer)
    params = GenerationParams(max_new_tokens=16, max_input_tokens=BUDGET, stop=["\n\n\n"])
    expected = [complete_batch(model, pr, [h], params)[0] for h in holes(5)]
    rows = [Row(pr.build(p, s, max_input_tokens=BUDGET), params) for p, s in holes(5)]
    decoder = Decoder(model, pr)
    alone = [decoder.run([row])[0] for row in rows]
    batched = decoder.run(rows)
    for done in (alone, batched):
        assert [(c.text, c.completion_tokens, c.finish_reason) for c in done] == [
            (c.text, c.completion_tokens, c.finish_reason) for c in expected
        ]


def test_the_kv_buffers_grow_past_their_first_size(tiny_tokenizer):
    model, pr = tiny_model("llama", tiny_tokenizer), FimPrompter(tiny_tokenizer)
    params = GenerationParams(max_new_tokens=MIN_CACHE_ROOM, max_input_tokens=150)
    two = holes(2)
    expected = [c.text for c in complete_batch(model, pr, two, params)]
    rows = [Row(pr.build(p, s, max_input_tokens=150), params) for p, s in two]
    assert [Decoder(model, pr).run([row])[0].text for row in rows] == expected
    assert [c.text for c in Decoder(model, pr).run(rows)] == expected


@pytest.mark.parametrize("mode", ["spm", "psm"])
def test_kv_cache_reuse_gives_the_same_greedy_output_and_feeds_few_tokens(tiny_tokenizer, mode):
    model, pr = tiny_model("llama", tiny_tokenizer), FimPrompter(tiny_tokenizer)
    params = GenerationParams(max_new_tokens=8, mode=mode, max_input_tokens=BUDGET, trim_step=16)
    reusing, fresh = Decoder(model, pr), Decoder(model, pr, cache_slots=0, max_draft=0)
    suffix, fed = SOURCE[2000:2300], []
    cursor = [1500 + 4 * i for i in range(12)] + [1530, 1520]  # typing, then deleting
    for end in cursor:
        prompt = pr.build(SOURCE[:end], suffix, mode, BUDGET, trim_step=16)
        before = reusing.stats.fed_tokens
        a = reusing.run([Row(prompt, params)])[0]
        fed.append(reusing.stats.fed_tokens - before)
        assert a.text == fresh.run([Row(prompt, params)])[0].text
        assert a.cached_tokens == len(prompt) - fed[-1]
    if mode == "spm":  # the suffix comes first: only the typed tokens (and a moved window) are fed
        assert sorted(fed[1:])[len(fed) // 2] <= 4 and fed[0] > 150
    else:  # the suffix follows the prefix: it is fed again each time
        assert min(fed[1:]) > 40
    assert reusing.stats.cached_tokens > fresh.stats.cached_tokens == 0


def test_typing_along_the_suggestion_is_checked_in_few_forwards(tiny_tokenizer):
    model, pr = tiny_model("llama", tiny_tokenizer), FimPrompter(tiny_tokenizer)
    with torch.no_grad():  # never end on its own: every request generates max_new_tokens
        model.get_output_embeddings().weight[pr.end_ids] = 0.0
    params = GenerationParams(max_new_tokens=24)
    drafting, plain = Decoder(model, pr), Decoder(model, pr, cache_slots=0, max_draft=0)
    first = pr.build(SOURCE[:1500], SOURCE[1600:1900], "spm", BUDGET, trim_step=16)
    ids: list[int] = []
    drafting.run([Row(first, params, lambda t, text, end: ids.append(t))])
    typed = first + ids[:6]  # the person types the first 6 suggested tokens
    forwards, accepted = drafting.stats.forwards, drafting.stats.accepted_tokens
    second = drafting.run([Row(typed, params)])[0]
    assert second.text == plain.run([Row(typed, params)])[0].text
    assert second.text.startswith(pr.decode(ids[6:]))  # the rest of the suggestion, then more
    # The 18 suggested tokens left come in a few forwards (drafts of 4, 6, 8 tokens + the model's own
    # each time); the 6 tokens past the old suggestion take a forward each.
    assert drafting.stats.accepted_tokens - accepted >= 14
    assert drafting.stats.forwards - forwards <= 4 + 6


def test_drafts_come_from_earlier_occurrences():
    d = Drafter(previous=[5, 6, 7, 8, 9])
    d.extend([1, 2, 3, 1, 2])
    assert d.propose(4) == []  # (3, 1, 2) was never followed by anything
    d.extend([3])
    assert d.propose(4) == [1, 2, 3]  # (1, 2, 3) was followed by 1, 2, 3 in this sequence
    d.extend([5, 6, 7])
    assert d.propose(2) == [8, 9]  # (5, 6, 7) came from the previous request


class EndsAfter(torch.nn.Module):
    """A model whose end token wins once ``n`` tokens were generated after a ``prompt_len`` prompt."""

    def __init__(self, inner, prompt_len: int, n: int, end: int) -> None:
        super().__init__()
        self.inner, self.config, self.last, self.end = inner, inner.config, prompt_len - 1 + n, end

    def forward(self, input_ids, position_ids, cache=None, logits_to_keep=0, **kw):
        out = self.inner(input_ids=input_ids, position_ids=position_ids, cache=cache, logits_to_keep=logits_to_keep)
        if int(position_ids.max()) >= self.last:
            out.logits[..., self.end] = 1e4
        return out


def test_end_token_and_cancellation_stop_a_row(tiny_tokenizer):
    model, pr = tiny_model("llama", tiny_tokenizer), FimPrompter(tiny_tokenizer)
    prompt = pr.build("def f(x):\n", "", max_input_tokens=BUDGET)
    params = GenerationParams(max_new_tokens=20)
    free = Decoder(model, pr).run([Row(prompt, params)])[0]
    ended = Decoder(EndsAfter(model, len(prompt), 5, pr.fim.middle), pr).run([Row(prompt, params)])[0]
    assert (ended.completion_tokens, ended.finish_reason) == (6, "stop")
    assert free.text.startswith(ended.text) and free.completion_tokens == 20
    streamed = []
    steps = iter(range(100))
    row = Row(prompt, params, on_token=lambda t, text, end: streamed.append(t), should_stop=lambda: next(steps) >= 3)
    cut = Decoder(model, pr).run([row])[0]
    assert cut.completion_tokens == len(streamed) < 20


def test_complete_command_prints_the_completion(tmp_path, tiny_tokenizer, capsys, monkeypatch):
    import io

    from fimtune.cli import main

    model = tiny_model("llama", tiny_tokenizer)
    folder = tiny.save_model_folder(model, tiny_tokenizer, tmp_path / "base")
    (tmp_path / "prefix.py").write_text("def f(x):\n    ")
    args = [
        "complete",
        str(folder),
        "--prefix-file",
        str(tmp_path / "prefix.py"),
        "--suffix",
        "\n",
        "--max-new-tokens",
        "6",
    ]
    assert main(args) == 0
    out = capsys.readouterr()
    expected: Completion = complete_batch(
        model, FimPrompter(tiny_tokenizer), [("def f(x):\n    ", "\n")], GenerationParams(max_new_tokens=6)
    )[0]
    assert out.out == expected.text + "\n"
    assert "new tokens" in out.err
    assert main(["complete", str(folder), "--prefix-file", str(tmp_path / "missing.py")]) == 2
    assert "missing.py: cannot read it (No such file or directory)" in capsys.readouterr().err  # not "as UTF-8"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"def f(x):\n    ")))  # `-`: the standard input
    assert main([*args[:3], "-", *args[4:]]) == 0 and capsys.readouterr().out == expected.text + "\n"
    assert main(["complete", str(folder), "--prefix-file", "-", "--suffix-file", "-"]) == 2
    assert "one standard input" in capsys.readouterr().err
    for flag, value in (("--max-input-tokens", "0"), ("--max-new-tokens", "0"), ("--top-p", "0")):
        assert main(["complete", str(folder), "--prefix", "x", flag, value]) == 2
        assert capsys.readouterr().err.startswith(f"error: {flag} must be")


def test_a_sampling_seed_draws_the_same_completion_whatever_torch_s_random_state(tmp_path, tiny_tokenizer, capsys):
    """`GenerationParams.seed` (`complete --seed`) makes sampled completions repeat, whatever torch's random
    stream held, and leaves that stream as it was; without one, they follow the stream."""
    from fimtune.cli import main

    model, pr = tiny_model("llama", tiny_tokenizer), FimPrompter(tiny_tokenizer)
    sampled = GenerationParams(max_new_tokens=12, temperature=1.0, max_input_tokens=BUDGET)
    texts = {}
    for seed in (None, 3):
        for state in (1, 2):
            torch.manual_seed(state)
            untouched = torch.rand(1).item()
            torch.manual_seed(state)
            texts[seed, state] = [c.text for c in complete_batch(model, pr, holes(2), replace(sampled, seed=seed))]
            assert (torch.rand(1).item() == untouched) == (seed is not None)  # a seeded call leaves the stream
    assert texts[None, 1] != texts[None, 2]
    assert texts[3, 1] == texts[3, 2]
    folder = tiny.save_model_folder(model, tiny_tokenizer, tmp_path / "base")
    outputs = []
    for state in (1, 2):
        torch.manual_seed(state)
        args = ["--prefix", SOURCE[:150], "--temperature", "1", "--seed", "3", "--max-new-tokens", "12"]
        assert main(["complete", str(folder), *args]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert main(["complete", str(folder), "--prefix", "x", "--seed", "-1"]) == 2
    assert capsys.readouterr().err.startswith("error: --seed must be")


def test_complete_at_a_cursor_in_a_file_cuts_it_there(tmp_path, tiny_tokenizer, capsys):
    """`--at FILE:LINE[:COL]` (an editor's cursor, counted from 1) completes as the prefix and suffix
    files cut at that place would; out-of-range places and a suffix given besides are refused."""
    from fimtune.cli import main
    from fimtune.generate import split_at

    text = "def f(x):\r\n    y = x\r\n    \r\n    return y\r\n"
    assert split_at(text, 3) == ("def f(x):\r\n    y = x\r\n", "    \r\n    return y\r\n")
    assert split_at(text, 2, 10) == ("def f(x):\r\n    y = x", "\r\n    \r\n    return y\r\n")
    assert split_at(text, 5) == (text, "")  # after the last line end
    for line, column in ((0, None), (6, None), (2, 11), (1, 0)):
        with pytest.raises(ValueError, match=f"line {line}"):
            split_at(text, line, column)
    folder = tiny.save_model_folder(tiny_model("llama", tiny_tokenizer), tiny_tokenizer, tmp_path / "base")
    source = tmp_path / "a:b.py"  # a colon in the name: the place is read from the end
    source.write_bytes(text.encode())
    (tmp_path / "prefix.py").write_bytes(b"def f(x):\r\n    y = x\r\n    ")
    (tmp_path / "suffix.py").write_bytes(b"\r\n    return y\r\n")
    outputs = []
    for cut in (
        ["--at", f"{source}:3:5"],
        ["--prefix-file", str(tmp_path / "prefix.py"), "--suffix-file", str(tmp_path / "suffix.py")],
    ):
        assert main(["complete", str(folder), *cut, "--max-new-tokens", "5"]) == 0
        out = capsys.readouterr()
        outputs.append((out.out, out.err.splitlines()[-1]))  # the text; its prompt's and completion's tokens
    assert outputs[0] == outputs[1] and "new tokens" in outputs[0][1]
    for args, said in (
        (["--at", f"{source}:9"], "line 9 is not in it (lines 1 to 5)"),
        (["--at", str(source)], "give FILE:LINE"),
        (["--at", f"{source}:3", "--suffix", "x"], "drop --suffix"),
        (["--at", f"{tmp_path / 'missing.py'}:1"], "--at"),
    ):
        assert main(["complete", str(folder), *args]) == 2
        assert said in capsys.readouterr().err


def test_complete_fits_a_long_prompt_to_learned_positions_and_reads_files_as_the_corpus_does(
    tmp_path, tiny_tokenizer, capsys
):
    """A prompt of 2,048 tokens + 128 new is past the tiny GPT-BigCode's 256 learned positions: the
    prompt is cut to fit (as `fimtune eval` and the server fit theirs), not an IndexError. A file's
    UTF-8 BOM is not code, and its CRLF line ends are kept (as the corpus keeps them)."""
    from fimtune.cli import main

    model = tiny.gpt_bigcode(len(tiny_tokenizer))
    folder = tiny.save_model_folder(model, tiny_tokenizer, tmp_path / "base")
    (tmp_path / "long.py").write_text("def f(x):\n    return x + 1\n" * 400)
    assert main(["complete", str(folder), "--prefix-file", str(tmp_path / "long.py"), "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert "to fit the model's 256 positions" in err and "4 new tokens" in err, err
    (tmp_path / "bom.py").write_bytes("\ufeffdef f():\r\n    ".encode())
    from fimtune.generate import _read_text

    assert _read_text(None, str(tmp_path / "bom.py"), "--prefix-file") == "def f():\r\n    "


def test_common_prefix():
    assert common_prefix([1, 2], [1, 2, 3]) == 2


def test_int8_weights_decode_each_row_as_alone(tiny_tokenizer):
    from fimtune.serve.quantize import Int8Linear, quantize_int8

    model, pr = tiny_model("llama", tiny_tokenizer), FimPrompter(tiny_tokenizer)
    layer = model.model.layers[0].mlp.up_proj
    q = Int8Linear(layer)
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(q(x).float(), layer(x), rtol=0.05, atol=0.05)
    model = quantize_int8(model)
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 2 * 7 + 1  # 2 layers x 7, and the head
    params = GenerationParams(max_new_tokens=10, max_input_tokens=BUDGET)
    rows = [Row(pr.build(p, s, max_input_tokens=BUDGET), params) for p, s in holes(3)]
    alone = [Decoder(model, pr).run([row])[0].text for row in rows]
    assert alone == [c.text for c in Decoder(model, pr).run(rows)]
    assert alone == [c.text for c in complete_batch(model, pr, holes(3), params)]


def test_complete_compare_base_prints_base_and_tuned(tmp_path, tiny_tokenizer, repetitive_data, token_cache, capsys):
    from transformers import AutoModelForCausalLM

    from fimtune.cli import main
    from tests.runs import model_dir, quiet_fit, run_config

    base_dir = model_dir(tmp_path, tiny_tokenizer, "llama")
    run = quiet_fit(run_config(tmp_path, base_dir, repetitive_data, "run", "train.max_steps=3", "train.eval_every=0"))
    capsys.readouterr()
    assert main(["complete", str(run), "--prefix", "def f(x):\n    ", "--max-new-tokens", "5", "--compare-base"]) == 0
    out = capsys.readouterr().out
    assert "--- base" in out and f"--- tuned ({run})" in out
    base_text = out.split("\n", 1)[1].split("--- tuned")[0][:-1]
    plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    hole, params = [("def f(x):\n    ", "")], GenerationParams(max_new_tokens=5, mode="spm")  # the run's layout
    [expected] = complete_batch(plain, FimPrompter(tiny_tokenizer), hole, params)
    assert base_text == expected.text
    # a model folder (merged, or a base) has no base to compare: said, not a tuned completion alone
    assert main(["complete", str(base_dir), "--prefix", "x", "--compare-base"]) == 2
    captured = capsys.readouterr()
    assert "--compare-base" in captured.err and "not a run folder" in captured.err and not captured.out


def test_the_base_of_a_run_that_added_fim_tokens_is_its_base_model_at_every_load(
    tmp_path, tiny_tokenizer_without_fim, repetitive_data, token_cache
):
    """The base behind a run (adapter disabled: `complete --compare-base`, `fimtune eval`, the server's
    `base`) reads the FIM tokens the run added through the rows training started from, as the base
    model loads alone: not through random rows drawn anew at each load."""
    from fimtune.model import load_for_inference, load_run
    from tests.runs import model_dir, quiet_fit, run_config

    base_dir = model_dir(tmp_path, tiny_tokenizer_without_fim, "llama")
    run = quiet_fit(run_config(tmp_path, base_dir, repetitive_data, "run", "train.max_steps=2", "train.eval_every=0"))
    prompter = FimPrompter(load_for_inference(base_dir).tokenizer)
    ids = torch.tensor([prompter.build("def f(x):\n    ", "\n    return y\n")])
    with torch.no_grad():
        plain = load_for_inference(base_dir).model(ids).logits
        for seed in (1, 2):
            torch.manual_seed(seed)
            model = load_run(run, torch.device("cpu")).model
            with model.disable_adapter():
                # rows at the mean, plus transformers' noise of 1e-9 times their covariance
                torch.testing.assert_close(model(ids).logits, plain, rtol=0, atol=0.05)


def test_a_tokenizer_that_pads_and_truncates_changes_no_prompt_or_cached_ids(tiny_tokenizer):
    """A tokenizer.json may carry padding and truncation (and a `tokenizer(..., padding=True)` call
    leaves them set on its backend): fimtune's own encoding (prompts, the training cache) neither
    pads nor cuts, and leaves those settings as it found them."""
    from fimtune.tokenization import encode_batch

    prefix, suffix = SOURCE[:600], SOURCE[600:700]
    plain = FimPrompter(tiny_tokenizer)
    expected = (plain.build(prefix, suffix), plain.encode_formatted(f"<fim_prefix>{prefix}"), plain.encode(prefix))
    cached = [ids.tolist() for ids in encode_batch(tiny_tokenizer, [prefix, suffix])]
    backend = tiny_tokenizer.backend_tokenizer
    backend.enable_padding(pad_id=0, pad_token="<|endoftext|>", pad_to_multiple_of=64)
    backend.enable_truncation(max_length=16)
    settings = (backend.padding, backend.truncation)
    for pr in (plain, FimPrompter(tiny_tokenizer)):  # made before the settings, and after
        got = (pr.build(prefix, suffix), pr.encode_formatted(f"<fim_prefix>{prefix}"), pr.encode(prefix))
        assert got == expected
    assert [ids.tolist() for ids in encode_batch(tiny_tokenizer, [prefix, suffix])] == cached
    assert (backend.padding, backend.truncation) == settings
    assert len(expected[0]) > 64 and len(cached[1]) % 64 != 0  # what padding or cutting would have changed


def test_int8_refuses_a_run_with_lora_on_tied_embeddings(tiny_tokenizer):
    """Merged, LoRA on a tied head lands in the input embeddings too (`fimtune merge` refuses it):
    int8 would serve logits far from base + adapter, or fail at the first request."""
    from peft import LoraConfig, get_peft_model

    from fimtune.errors import FimtuneError
    from fimtune.serve.quantize import quantize_int8

    model = tiny_model("gpt_bigcode", tiny_tokenizer)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn", "lm_head"], init_lora_weights=False))
    with pytest.raises(FimtuneError, match="LoRA on lm_head"):
        quantize_int8(peft_model)


# --------------------------------------------------------------------------------------
# A cursor after indentation
# --------------------------------------------------------------------------------------


def _streamed(pr: FimPrompter, text: str, params: GenerationParams) -> tuple[str, str]:
    """(the pieces a stream sends, the final text) of a model that writes ``text``, token by token."""
    from fimtune.generate import _completion

    ids = pr.encode(text)
    tracker = TextTracker(pr, params)
    pieces = []
    for t in ids:
        pieces.append(tracker.push(t))
        if tracker.stopped:
            break
    pieces.append(tracker.flush())
    final = _completion(pr, ids, 0, params).text
    assert tracker.text == final
    return "".join(pieces), final


@pytest.mark.parametrize(
    ("written", "answer"),
    [
        (" return x\n    y = 1", "return x\n    y = 1"),  # the space a byte-level BPE model's word brings
        (" ", ""),  # that space, then the end
        ("    x = 1", "    x = 1"),  # deeper: the model's own indentation stays
        (" \tx = 1", " \tx = 1"),
        ("\tx = 1", "\tx = 1"),
        ("return x", "return x"),
        ("\n    x = 1", "\n    x = 1"),  # an empty first line: as written
    ],
)
def test_after_indentation_the_answer_starts_at_code_streamed_or_not(tiny_tokenizer, written, answer):
    pr = FimPrompter(tiny_tokenizer)
    assert _streamed(pr, written, GenerationParams(after_indent=True)) == (answer, answer)
    assert _streamed(pr, written, GenerationParams()) == (written, written)  # elsewhere: as written


def test_stop_strings_and_single_line_cut_the_model_s_text_then_the_indentation_goes(tiny_tokenizer):
    pr = FimPrompter(tiny_tokenizer)
    one_line = GenerationParams(after_indent=True, single_line=True)
    assert _streamed(pr, " return x\n    y = 1", one_line) == ("return x", "return x")
    assert _streamed(pr, " \n    y = 1", one_line) == ("", "")
    stop = GenerationParams(after_indent=True, stop=[" + "])
    assert _streamed(pr, " return x + y", stop) == ("return x", "return x")
    assert _streamed(pr, "     return x + y", stop) == ("     return x", "     return x")


def test_complete_at_a_cursor_after_indentation_keeps_the_prompt_and_answers_from_the_code(tiny_tokenizer):
    """`fimtune complete` (and evaluation) through `complete_batch`: the prompt as before, the same
    tokens counted, the answer less the one space the model writes before its code; a cursor after
    code on its line, as before."""
    from fimtune.generate import after_indent, complete_prompts, indent_cut

    model, pr = tiny_model("llama", tiny_tokenizer), FimPrompter(tiny_tokenizer)
    tiny.writes_first(model, tiny_tokenizer.convert_tokens_to_ids("Ġreturn"), pr.fim.middle)
    params = GenerationParams(max_new_tokens=10, mode="psm")
    assert after_indent("x\n\t ") and not after_indent("x\n") and not after_indent("x\n  y")
    written = 0
    for prefix in ("def f(x):\n    ", "class A:\n    def f(self):\n\t\t", "for i in range(3):\n "):
        ids = pr.build(prefix, "\n", "psm")
        [raw] = complete_prompts(model, pr, [ids], params)
        [at] = complete_batch(model, pr, [(prefix, "\n")], params)
        assert at.text == raw.text[indent_cut(raw.text) :]
        assert (at.prompt_tokens, at.completion_tokens) == (len(ids), raw.completion_tokens)
        written += indent_cut(raw.text) > 0
        [code] = complete_batch(model, pr, [(prefix + "y", "\n")], params)  # after code: as written
        assert code.text == complete_prompts(model, pr, [pr.build(prefix + "y", "\n", "psm")], params)[0].text
    assert written  # the model wrote " return" first somewhere, and its space went


def test_a_models_own_generation_settings_do_not_change_completions(tiny_tokenizer):
    """`generate` fills what it is not told from the model's `generation_config`: a base that sets a
    repetition penalty or a no-repeat n-gram size completed otherwise in `complete` and `eval` than in
    the server, whose decoder applies neither. Greedy and seeded sampling alike; the config stays."""
    model = tiny_model("llama", tiny_tokenizer)
    pr = FimPrompter(tiny_tokenizer)
    holes = [("def f(x):\n    ", "\n"), ("class A:\n    def g(self):\n        ", "\n")]
    settings = [GenerationParams(max_new_tokens=12), GenerationParams(max_new_tokens=12, temperature=0.9, seed=3)]
    plain = [[c.text for c in complete_batch(model, pr, holes, params)] for params in settings]
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.no_repeat_ngram_size = 1
    assert [[c.text for c in complete_batch(model, pr, holes, params)] for params in settings] == plain
    assert model.generation_config.repetition_penalty == 5.0
    greedy = Decoder(model, pr).run([Row(pr.build(*holes[0]), settings[0])])[0].text
    assert greedy == plain[0][0]  # as the server's decoder answers


def test_completions_keep_their_spaces_before_punctuation_whatever_the_tokenizer_config_says():
    """A tokenizer config's `clean_up_tokenization_spaces` (StarCoder's says true) makes transformers'
    `decode` strip spaces before punctuation where it applies it (this version skips it for BPE, not
    for other models): a completion's `f(a , b)` would reach the editor as `f(a, b)`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "[UNK]"]
    vocab = {w: i for i, w in enumerate([*names, "f", "(", "a", ",", "b", ")", "x", "=", "."])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece(cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", clean_up_tokenization_spaces=True
    )
    tok.add_special_tokens({"additional_special_tokens": names[1:5]})
    ids = tok("x = f ( a , b ) .", add_special_tokens=False).input_ids
    assert tok.decode(ids) == "x = f ( a, b )."  # what the config asks of `decode`
    assert FimPrompter(tok).decode(ids) == FimPrompter(tok).decode(ids, True) == "x = f ( a , b ) ."
    from fimtune.preview import render_ids

    assert render_ids(ids, tok, {}, color=False) == "x = f ( a , b ) ."  # `data inspect` alike
