"""Each API shape against a real server on a tiny run: TGI, OpenAI, llama.cpp infill, info, models, metrics."""

from __future__ import annotations

import httpx
import pytest
import torch
from serve_helpers import TEST_LIMITS, sse_events

from fimtune.generate import FimPrompter, GenerationParams, complete_batch

PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\nprint(add(1, 2))\n"
PSM_INPUTS = f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>"
# What llm-vscode (llm-ls, TGI backend) sends, byte for byte in shape.
LLM_VSCODE_BODY = {
    "inputs": PSM_INPUTS,
    "parameters": {"max_new_tokens": 60, "temperature": 0.2, "top_p": 0.95, "return_full_text": False},
}
GREEDY = {"max_new_tokens": 12, "do_sample": False}
MODELS = ("run", "base", "other")


@pytest.fixture(scope="module")
def reference(tiny_run):
    """Greedy completions from `generate` on the run, as the server builds its prompts (SPM, fitted)."""
    from fimtune.generate import merge_adapter
    from fimtune.model import load_for_inference

    loaded = load_for_inference(tiny_run, torch.device("cpu"))
    merge_adapter(loaded.model)
    prompter = FimPrompter(loaded.tokenizer)

    def complete(prefix: str, suffix: str, n: int) -> str:
        params = GenerationParams(
            max_new_tokens=n, mode="spm", max_input_tokens=TEST_LIMITS["max_input_tokens"], trim_step=16
        )
        return complete_batch(loaded.model, prompter, [(prefix, suffix)], params)[0].text

    return complete


def test_llm_vscode_body_gets_a_completion(client):
    r = client.post("/generate", json=LLM_VSCODE_BODY)
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"generated_text"} and r.json()["generated_text"]


def test_tgi_generate_is_greedy_generate_on_the_fim_prompt(client, reference):
    r = client.post("/generate", json={"inputs": PSM_INPUTS, "parameters": GREEDY})
    assert r.json()["generated_text"] == reference(PREFIX, SUFFIX, 12)
    full = client.post("/generate", json={"inputs": PSM_INPUTS, "parameters": {**GREEDY, "return_full_text": True}})
    assert full.json()["generated_text"] == PSM_INPUTS + r.json()["generated_text"]
    details = client.post("/generate", json={"inputs": PSM_INPUTS, "parameters": {**GREEDY, "details": True}}).json()
    assert {k: details["details"][k] for k in ("finish_reason", "generated_tokens", "seed")} == {
        "finish_reason": "length",
        "generated_tokens": 12,
        "seed": None,
    }


def test_tgi_details_list_the_generated_tokens(client):
    """TGI's `details` hold `prefill` (empty unless `decoder_input_details`) and `tokens`, the generated
    ones: TGI's own Python client (`text_generation`, which always asks for details) requires both."""
    body = {"inputs": PSM_INPUTS, "parameters": {**GREEDY, "details": True}}
    out = client.post("/generate", json=body).json()
    details = out["details"]
    assert details["prefill"] == [] and len(details["tokens"]) == details["generated_tokens"] == 12
    assert "".join(t["text"] for t in details["tokens"]) == out["generated_text"]
    with client.stream("POST", "/generate_stream", json=body) as r:
        events = sse_events(r)
    assert [t["id"] for t in details["tokens"]] == [e["token"]["id"] for e in events]
    stop = out["generated_text"].strip()[2:4]
    cut = client.post("/generate", json={**body, "parameters": {**body["parameters"], "stop": [stop]}}).json()
    assert "".join(t["text"] for t in cut["details"]["tokens"]) == cut["generated_text"]
    assert len(cut["details"]["tokens"]) == cut["details"]["generated_tokens"]


def test_tgi_root_answers_a_list_of_one(client):
    """TGI's `POST /` (its `compat_generate`) wraps the answer in a list, as the Inference API does:
    TGI's own Python client reads `payload[0]`. Streamed, it is `/generate_stream`'s stream."""
    body = {"inputs": PSM_INPUTS, "parameters": {**GREEDY, "details": True}}
    one = client.post("/generate", json=body).json()
    r = client.post("/", json=body)
    assert r.status_code == 200 and r.json() == [one]
    assert int(r.headers["x-generated-tokens"]) == 12


def test_an_answer_cut_at_a_stop_string_says_so_in_each_apis_words(client):
    text = client.post("/generate", json={"inputs": PSM_INPUTS, "parameters": GREEDY}).json()["generated_text"]
    stop = text.strip()[2:4]  # in the greedy answer, after its start
    assert len(stop) == 2 and stop in text
    tgi = {"inputs": PSM_INPUTS, "parameters": {**GREEDY, "stop": [stop], "details": True}}
    details = client.post("/generate", json=tgi).json()["details"]
    assert details["finish_reason"] == "stop_sequence"  # TGI's: "eos_token" is the model's end token
    infill = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 12, "temperature": 0}
    plain = client.post("/infill", json=infill).json()
    assert plain["stop_type"] == "limit" and plain["stopping_word"] == ""
    cut = plain["content"].strip()[2:4]
    worded = client.post("/infill", json={**infill, "stop": ["never there", cut]}).json()
    assert cut and (worded["stop_type"], worded["stopping_word"]) == ("word", cut)  # llama.cpp's, the stop it met


@pytest.mark.parametrize("route,body", [("/generate_stream", {}), ("/", {"stream": True})])
def test_tgi_stream_sends_token_events_then_the_text(client, route, body):
    expected = client.post("/generate", json={"inputs": PSM_INPUTS, "parameters": GREEDY}).json()["generated_text"]
    with client.stream("POST", route, json={"inputs": PSM_INPUTS, "parameters": GREEDY, **body}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert len(events) == 12
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == expected
    assert "".join(e["token"]["text"] for e in events) == expected
    assert {"id", "text", "logprob", "special"} <= set(events[0]["token"])


def test_stream_events_survive_clients_that_split_lines_at_unicode_line_breaks(client):
    """httpx's iter_lines (huggingface_hub's InferenceClient reads streams with it) splits at U+2028,
    U+2029 and U+0085 as str.splitlines does: the events escape them, so each stays one line."""
    import json

    inputs = "<fim_prefix>s = 'a\u2028b\u2029c\x85d'\n<fim_suffix>\n<fim_middle>"
    body = {"inputs": inputs, "parameters": {**GREEDY, "max_new_tokens": 2, "return_full_text": True}}
    with client.stream("POST", "/generate_stream", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    events = [json.loads(line.removeprefix("data:")) for line in lines]
    assert events[-1]["generated_text"].startswith(inputs)


def test_options_at_their_neutral_values_are_taken_and_echo_streams_the_prompt_first(client):
    """Clients send other servers' options at their neutral values (huggingface_hub sends TGI's as
    null, OpenAI clients penalties of 0): those are taken; any other value is refused (422, above).
    OpenAI's `echo` streams the prompt first, as its answer without streaming starts with it."""
    tgi = {"repetition_penalty": None, "frequency_penalty": None, "top_n_tokens": None, "watermark": False}
    r = client.post("/generate", json={"inputs": PSM_INPUTS, "parameters": {**GREEDY, **tgi}})
    assert r.status_code == 200, r.text
    body = {
        "prompt": "def f(",
        "max_tokens": 3,
        "temperature": 0,
        "echo": True,
        "presence_penalty": 0,
        "logit_bias": {},
    }
    whole = client.post("/v1/completions", json=body)
    assert whole.status_code == 200, whole.text
    text = whole.json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = [e for e in sse_events(r) if isinstance(e, dict)]
    assert text.startswith("def f(") and "".join(e["choices"][0]["text"] for e in events) == text


def test_an_infill_of_no_tokens_reads_the_prompt_and_generates_nothing(client):
    """llama.vim warms the server up with `n_predict: 0` requests (its ring of context chunks)."""
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 0}
    r = client.post("/infill", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["content"], out["tokens_predicted"]) == ("", 0) and out["tokens_evaluated"] > 5
    with client.stream("POST", "/infill", json={**body, "stream": True}) as r:
        events = sse_events(r)
    assert len(events) == 1 and events[0]["stop"] is True and events[0]["content"] == ""


def test_infill_answers_the_response_fields_asked_for(client):
    """llama.vim names the fields it reads (`response_fields`), nested ones as "timings/prompt_n": the
    answer holds those alone, flattened, and leaves out what it lacks, as llama.cpp's server does."""
    fields = ["content", "timings/prompt_n", "timings/predicted_n", "tokens_cached", "truncated"]
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 4, "temperature": 0}
    client.post("/infill", json=body)  # cached alike for the two below, whatever ran before
    whole = client.post("/infill", json=body).json()
    r = client.post("/infill", json={**body, "response_fields": fields})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "content": whole["content"],
        "timings/prompt_n": whole["timings"]["prompt_n"],
        "timings/predicted_n": whole["timings"]["predicted_n"],
        "tokens_cached": whole["tokens_cached"],
        "truncated": False,
    }
    with client.stream("POST", "/infill", json={**body, "stream": True, "response_fields": fields}) as r:
        events = sse_events(r)
    assert set(events[-1]) == {"content", "timings/prompt_n", "timings/predicted_n", "tokens_cached", "truncated"}
    assert "".join(e["content"] for e in events) == whole["content"]
    warm = client.post("/infill", json={**body, "n_predict": 0, "response_fields": ["content", "tokens_cached"]})
    assert warm.json() == {"content": "", "tokens_cached": 0}


def test_stop_strings_cut_the_text(client):
    whole = client.post("/generate", json={"inputs": PSM_INPUTS, "parameters": {**GREEDY, "max_new_tokens": 30}})
    text = whole.json()["generated_text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text[: text.index(stop)]
    params = {**GREEDY, "max_new_tokens": 30, "stop": [stop]}
    assert client.post("/generate", json={"inputs": PSM_INPUTS, "parameters": params}).json()["generated_text"] == cut
    with client.stream("POST", "/generate_stream", json={"inputs": PSM_INPUTS, "parameters": params}) as r:
        events = sse_events(r)
    assert "".join(e["token"]["text"] for e in events) == cut == events[-1]["generated_text"]
    oa = client.post("/v1/completions", json={"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 30, "temperature": 0})
    oa_cut = client.post(
        "/v1/completions",
        json={"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 30, "temperature": 0, "stop": stop},
    )
    assert oa.json()["choices"][0]["text"] == text  # same hole, same prompt, whichever API
    assert oa_cut.json()["choices"][0] == {"index": 0, "text": cut, "logprobs": None, "finish_reason": "stop"}


def test_openai_completion_builds_the_fim_prompt_from_prompt_and_suffix(client, reference):
    body = {"model": "run", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 10, "temperature": 0}
    out = client.post("/v1/completions", json=body).json()
    assert out["object"] == "text_completion" and out["model"] == "run"
    assert out["choices"][0]["text"] == reference(PREFIX, SUFFIX, 10)
    assert out["choices"][0]["finish_reason"] == "length"
    usage = out["usage"]
    assert usage["completion_tokens"] == 10 and usage["total_tokens"] == usage["prompt_tokens"] + 10


def test_openai_fields_sent_as_null_take_their_defaults(client):
    """OpenAI's API takes null for each optional field (`n`, `stream` and `echo` too), as clients
    that write every field of their request type send them."""
    body = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 3, "temperature": 0}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    r = client.post("/v1/completions", json={**body, "n": None, "stream": None, "echo": None})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == plain


def test_continue_style_streaming_request(client):
    body = {
        "model": "run",
        "prompt": PREFIX,
        "suffix": SUFFIX,
        "max_tokens": 10,
        "temperature": 0.01,
        "top_p": 1,
        "stop": ["\n\n\n", "\ndef "],
        "stream": True,
    }
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["model"] == "run" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(c["choices"][0]["text"] for c in chunks)
    # as OpenAI's chunks: `finish_reason` null until the last, `logprobs` null (clients test `=== null`)
    assert all(c["choices"][0]["finish_reason"] is None and "usage" not in c for c in chunks[:-1])
    assert all(c["choices"][0]["logprobs"] is None for c in chunks)


def test_models_pick_the_adapter(client):
    names = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert names == ["run", "base", "other"]
    texts = {
        name: client.post(
            "/v1/completions",
            json={"model": name, "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 8, "temperature": 0},
        ).json()["choices"][0]["text"]
        for name in names
    }
    assert len(set(texts.values())) == 3  # three sets of weights, three answers
    again = client.post("/generate", json={"inputs": PSM_INPUTS, "parameters": {**GREEDY, "max_new_tokens": 8}})
    assert again.json()["generated_text"] == texts["run"]  # switching back restores the run's adapter
    tgi_other = {"inputs": PSM_INPUTS, "parameters": {**GREEDY, "max_new_tokens": 8, "adapter_id": "other"}}
    assert client.post("/generate", json=tgi_other).json()["generated_text"] == texts["other"]
    unknown = client.post("/v1/completions", json={"model": "/etc/passwd", "prompt": "x", "suffix": ""})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"


def test_adapters_of_a_quantized_model_run_beside_its_weights(client, tiny_run, other_adapter):
    """Into weights marked quantized (bitsandbytes' 4-bit, say) no adapter is merged: PEFT would
    quantize W + dW again and lose most of dW. Each model answers as the merged server does."""
    from serve_helpers import make_app, running

    def texts(c: httpx.Client) -> dict[str, str]:
        body = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 8, "temperature": 0}
        return {m: c.post("/v1/completions", json={**body, "model": m}).json()["choices"][0]["text"] for m in MODELS}

    app = make_app(tiny_run, [f"other={other_adapter}"])
    model = app.state.service.engine.decoder.model
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        quantized = texts(c)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # nothing merged
    assert quantized == texts(client) and len(set(quantized.values())) == 3


def test_infill_puts_extra_files_before_the_prefix(client, server):
    engine = server[1]
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 6, "temperature": 0}
    plain = client.post("/infill", json=body).json()
    assert set(plain) >= {"content", "stop", "tokens_predicted", "tokens_evaluated"} and plain["tokens_predicted"] == 6
    extra = {**body, "input_extra": [{"filename": "util.py", "text": "def helper():\n    return 1\n"}]}
    before = engine.decoder.stats.prompt_tokens
    with_extra = client.post("/infill", json=extra).json()
    assert with_extra["tokens_evaluated"] > plain["tokens_evaluated"]
    assert engine.decoder.stats.prompt_tokens - before == with_extra["tokens_evaluated"]
    with client.stream("POST", "/infill", json={**body, "stream": True}) as r:
        events = sse_events(r)
    assert events[-1]["stop"] is True and all(e["stop"] is False for e in events[:-1])
    assert "".join(e["content"] for e in events) == plain["content"]


def test_long_extra_context_is_trimmed_first(client):
    huge = [{"filename": f"f{i}.py", "text": "x = 1\n" * 40} for i in range(10)]
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": huge, "n_predict": 4, "temperature": 0}
    out = client.post("/infill", json=body).json()
    assert out["tokens_evaluated"] <= TEST_LIMITS["max_input_tokens"]
    plain = client.post("/infill", json={**body, "input_extra": []}).json()
    assert out["tokens_evaluated"] > plain["tokens_evaluated"]
    assert out["truncated"] is True and plain["truncated"] is False  # llama.cpp's: some of the text was cut
    with client.stream("POST", "/infill", json={**body, "stream": True}) as r:
        assert sse_events(r)[-1]["truncated"] is True


def test_info_health_and_metrics(client):
    info = client.get("/info").json()
    assert info["fim"]["mode"] == "spm" and info["fim"]["prefix"] == "<fim_prefix>"
    assert info["fim"]["template"] == "<fim_prefix><fim_suffix>{suffix}<fim_middle>{prefix}"
    assert info["fim"]["templates"]["psm"] == "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"
    assert info["limits"]["max_new_tokens"] == 64 and info["max_input_tokens"] == info["max_input_length"] == 200
    assert info["models"] == ["run", "base", "other"] and info["adapters"] == ["run", "other"]
    assert client.get("/health").json() == {"status": "ok"}
    assert client.head("/health").status_code == 200
    client.post("/generate", json={"inputs": PSM_INPUTS, "parameters": GREEDY})
    text = client.get("/metrics").text
    assert 'fimtune_requests_total{route="/generate",status="200"}' in text
    assert 'fimtune_request_duration_seconds_bucket{route="/generate",le="+Inf"}' in text
    assert "# TYPE fimtune_request_duration_seconds histogram" in text
    generated = next(line for line in text.splitlines() if line.startswith("fimtune_generated_tokens_total "))
    assert int(generated.split()[1]) >= 12
    busy = next(line for line in text.splitlines() if line.startswith("fimtune_busy_seconds_total "))
    assert 0 < float(busy.split()[1]) < 60  # the model ran, for a moment
    for name in ("fimtune_prefill_seconds_total", "fimtune_device_wait_seconds_total"):  # the GPU path's only
        assert float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[1]) == 0


def test_bf16_weights_come_back_exactly_after_any_number_of_adapter_switches(tiny_run, other_adapter):
    """In bf16, W + dW - dW is not W: unmerging at each switch let the rounding add up, and every
    model the server serves drifted. The base layers' own weights are put back instead: after 30
    switches among two adapters and the base, the weights are the loaded ones, bit for bit, and each
    adapter's logits are those of its first use."""
    from fimtune.serve.engine import Limits, load_engine

    limits = Limits(**TEST_LIMITS)
    engine, prompter, mode = load_engine(str(tiny_run), [f"other={other_adapter}"], limits, "auto", torch.bfloat16)
    model = engine.decoder.model
    loaded = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([prompter.build(PREFIX, SUFFIX, mode, 200)])

    def logits(adapter):
        with engine._use_adapter(adapter), torch.no_grad():
            return model(input_ids=ids).logits[0, -1].float()

    first = {a: logits(a) for a in ("default", "other", None)}
    assert not torch.equal(first["default"], first[None])  # the adapter is folded in, and changes the output
    for _ in range(15):
        logits("default"), logits("other")
    again = {a: logits(a) for a in ("default", "other", None)}
    assert all(torch.equal(again[a], first[a]) for a in first)
    assert all(torch.equal(p, loaded[n]) for n, p in model.named_parameters())
