"""A cursor after indentation (the line so far only spaces or tabs, where an editor puts it after
Enter): every API shape answers without the one space the model writes before its code, streamed or
not, with the prompt and the token counts as before; elsewhere nothing changes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from serve_helpers import make_app, never_ending, psm, running, sse_events
from tests import tiny

from fimtune.generate import indent_cut

NEW = 12
WHITESPACE_PULL = 20.0  # the length of the "   " output row (the others' are ~0.2 x sqrt(32))
SUFFIX = "\n\nprint(f(1))\n"


def ask(client, shape: str, prefix: str, suffix: str = SUFFIX, stream: bool = False) -> tuple[str, int, int]:
    """(text, prompt tokens, new tokens) of a greedy request of ``shape``; streamed: the pieces joined."""
    body = {
        "tgi": {"inputs": psm(prefix, suffix), "parameters": {"max_new_tokens": NEW, "do_sample": False}},
        "openai": {"prompt": prefix, "suffix": suffix, "max_tokens": NEW, "temperature": 0},
        "infill": {"input_prefix": prefix, "input_suffix": suffix, "n_predict": NEW, "temperature": 0},
    }[shape]
    path = {"tgi": "/generate_stream" if stream else "/generate", "openai": "/v1/completions", "infill": "/infill"}
    if shape != "tgi" and stream:
        body = {**body, "stream": True}
    if not stream:
        r = client.post(path[shape], json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        if shape == "tgi":
            return out["generated_text"], int(r.headers["x-prompt-tokens"]), int(r.headers["x-generated-tokens"])
        if shape == "openai":
            return out["choices"][0]["text"], out["usage"]["prompt_tokens"], out["usage"]["completion_tokens"]
        return out["content"], out["tokens_evaluated"], out["tokens_predicted"]
    with client.stream("POST", path[shape], json=body) as r:
        events = [e for e in sse_events(r) if isinstance(e, dict)]
    if shape == "tgi":
        assert "".join(e["token"]["text"] for e in events) == events[-1]["generated_text"]
        return events[-1]["generated_text"], -1, len(events)
    if shape == "openai":
        return "".join(e["choices"][0]["text"] for e in events), events[-1]["usage"]["prompt_tokens"], -1
    return "".join(e["content"] for e in events), events[-1]["tokens_evaluated"], events[-1]["tokens_predicted"]


@pytest.fixture(scope="module")
def indenting_model(tmp_path_factory, _tiny_tokenizer_session) -> Path:
    """A tiny base model folder that starts most middles with " return" (PSM prompts: a base model's)."""
    from fimtune.generate import FimPrompter

    tok = _tiny_tokenizer_session
    model = never_ending(tiny.llama(len(tok)), tok)
    tiny.writes_first(model, tok.convert_tokens_to_ids("Ġreturn"), FimPrompter(tok).fim.middle)
    return tiny.save_model_folder(model, tok, tmp_path_factory.mktemp("indenting") / "base")


@pytest.fixture(scope="module")
def indenting(indenting_model) -> Iterator[httpx.Client]:
    with running(make_app(indenting_model)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def test_a_cursor_after_indentation_keeps_its_prompt(server):
    from fimtune.serve.service import Service

    engine = server[1]
    svc = Service(engine, engine.decoder.prompter, "spm", set())
    cursors = [("class A:\n    def f(self):\n        ", True), ("x = 1\n\t", True), ("  ", True)]
    for prefix, typed in [*cursors, ("class A:\n    x", False), ("x = 1\n", False), ("x = 1 ", False)]:
        ids = engine.decoder.prompter.build(prefix, SUFFIX, "spm", svc.limits.max_input_tokens, "", 16)
        assert svc.fim_prompt(prefix, SUFFIX)[:2] == (ids, typed)
        assert svc.formatted_prompt(psm(prefix, SUFFIX), "inputs")[:2] == (ids, typed)
    assert svc.formatted_prompt("def f(x):\n    ", "inputs").after_indent is False  # not a FIM prompt: as sent


@pytest.mark.parametrize("shape", ["tgi", "openai", "infill"])
def test_every_shape_answers_from_the_code_streamed_or_not(indenting, shape):
    """The model writes " return" first after `start` + typed: the answer is what it writes less the space;
    after a line start (nothing typed on the line), and after code, the answer is as written."""
    start = "for i in range(3):\n"
    line, prompt_tokens, new_tokens = ask(indenting, shape, start, "\n")
    assert line.startswith(" return"), line  # at the line start: as written
    cut = 0
    for typed in ("    ", "\t", " "):
        written = ask(indenting, shape, start + "x = 1\n" + typed + "y", "\n")[0]  # after code: as written
        whole = ask(indenting, shape, start + typed, "\n")
        streamed = ask(indenting, shape, start + typed, "\n", stream=True)
        assert whole[0] == streamed[0] and not whole[0][:1].isspace()
        assert whole[2] == NEW and whole[1] > 0
        cut += bool(whole[0])
        assert written  # a completion came
    assert cut


def test_the_answer_is_the_model_s_text_less_its_leading_whitespace(indenting, indenting_model):
    """Against the model's own text: the same prompt through `generate` (`complete_prompts` leaves the
    whitespace in), for each shape; the same prompt and new tokens counted."""
    from fimtune.generate import FimPrompter, GenerationParams, complete_prompts, merge_adapter
    from fimtune.model import load_for_inference

    loaded = load_for_inference(indenting_model, torch.device("cpu"))
    merge_adapter(loaded.model)
    pr = FimPrompter(loaded.tokenizer)
    params = GenerationParams(max_new_tokens=NEW, mode="psm", max_input_tokens=200, trim_step=16)
    cuts = []
    for prefix in ("for i in range(3):\n    ", "try:\n\t", "class A:\n    def f(self):\n        "):
        ids = pr.build(prefix, "\n", "psm", 200, trim_step=16)
        [raw] = complete_prompts(loaded.model, pr, [ids], params)
        for shape in ("tgi", "openai", "infill"):
            assert ask(indenting, shape, prefix, "\n") == (raw.text[indent_cut(raw.text) :], len(ids), NEW)
        cuts.append(indent_cut(raw.text))
    assert min(cuts) > 0  # the model wrote " return" first each time, and its space went


def test_stop_strings_cut_the_model_s_text_then_the_whitespace_goes(indenting):
    start = "for i in range(3):\n    "
    text = ask(indenting, "openai", start, "\n")[0]
    stop = text[1:3]
    body = {"suffix": "\n", "max_tokens": NEW, "temperature": 0, "stop": [stop]}
    cut = indenting.post("/v1/completions", json={**body, "prompt": start}).json()["choices"][0]["text"]
    assert cut == text[: text.index(stop, 1)] and len(cut) < len(text)
    tgi = {"inputs": psm(start, "\n"), "parameters": {"max_new_tokens": NEW, "do_sample": False, "stop": [stop]}}
    with indenting.stream("POST", "/generate_stream", json=tgi) as r:
        events = sse_events(r)
    assert "".join(e["token"]["text"] for e in events) == events[-1]["generated_text"] == cut


def test_typing_after_the_indentation_reuses_the_cache(client):
    """SPM puts the prefix last: the prompt after Enter and the indentation is the start of the next
    one, after a character is typed, up to the tokens the indentation and that character make."""
    start = "class A:\n    def f(self):\n"
    body = {"input_suffix": SUFFIX, "n_predict": 2, "temperature": 0}
    client.post("/infill", json={**body, "input_prefix": start + "        "})
    again = client.post("/infill", json={**body, "input_prefix": start + "        r"}).json()
    assert again["tokens_evaluated"] - again["tokens_cached"] <= 3
