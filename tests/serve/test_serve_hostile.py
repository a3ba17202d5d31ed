"""Bad input never gets a 500: fuzzed request bodies, invalid UTF-8, oversized bodies, wrong keys."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import make_app, running

ROUTES = ["/generate", "/generate_stream", "/", "/v1/completions", "/infill"]
FIELDS = {
    "/generate": ["inputs", "parameters", "stream"],
    "/generate_stream": ["inputs", "parameters"],
    "/": ["inputs", "parameters", "stream"],
    "/v1/completions": ["model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "stop", "stream", "n"],
    "/infill": ["input_prefix", "input_suffix", "input_extra", "n_predict", "temperature", "stream", "prompt"],
}
PARAMS = ["max_new_tokens", "temperature", "top_p", "do_sample", "return_full_text", "stop", "top_k", "seed"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


@st.composite
def bodies(draw, route: str):
    keys = draw(st.lists(st.sampled_from(FIELDS[route] + ["junk"]), unique=True, max_size=6))
    body = {k: draw(values) for k in keys}
    if "parameters" in body and draw(st.booleans()):
        body["parameters"] = {k: draw(values) for k in draw(st.lists(st.sampled_from(PARAMS), unique=True))}
    return body


@pytest.fixture(scope="module")
def fuzz_url(tiny_run, other_adapter):
    # Small output limits keep each fuzzed generation short; the checks are about status codes.
    app = make_app(tiny_run, [f"other={other_adapter}"], max_new_tokens=8, api_key=None)
    with running(app) as url:
        yield url


def assert_not_5xx(response: httpx.Response) -> None:
    assert response.status_code < 500 or response.status_code == 503, response.text[:500]
    if response.status_code >= 400:
        body = response.json()
        assert "error" in body, body


@pytest.mark.parametrize("route", ROUTES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_bodies_get_no_500(fuzz_url, route, data):
    body = data.draw(bodies(route))
    with httpx.Client(base_url=fuzz_url, timeout=60) as c:
        assert_not_5xx(c.post(route, json=body))


GENERIC = [
    (b"\xff\xfe\xfa not utf-8", "invalid UTF-8"),
    (
        b'{"inputs": "\\ud800x", "prompt": "\\udc00", "input_prefix": "x", "input_extra": [{"filename": "\\ud800"}]}',
        "lone surrogates",
    ),
    (b'{"inputs": "x", ', "truncated JSON"),
    (b"[1, 2, 3]", "not an object"),
    (b"x" * 200_000, "oversized body"),
    (b'{"inputs": "x", "z": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested deeper than the parser goes"),
    (b'{"inputs": "x", "prompt": "x", "z": ' + b"[" * 600 + b'"\\ud800"' + b"]" * 600 + b"}", "a surrogate deep down"),
]
SPECIFIC = {
    "/generate": [
        {"inputs": "x", "parameters": {"max_new_tokens": -5}},
        {"inputs": "x", "parameters": {"max_new_tokens": 10**12}},
        {"inputs": "x", "parameters": {"temperature": -1.0}},
        {"inputs": "x", "parameters": {"do_sample": True, "temperature": float("inf")}},
        {"inputs": "x", "parameters": {"do_sample": True, "seed": 2**64}},  # past torch's seeds
        {"inputs": 5},
    ],
    "/generate_stream": [{"inputs": "x", "parameters": {"top_p": 7.5}}, {"parameters": {}}],
    "/": [{"inputs": "x", "parameters": {"max_new_tokens": 10**12}}, {"inputs": ["x"]}],
    "/v1/completions": [
        {"prompt": "x", "model": "no-such-adapter"},
        {"prompt": "x", "max_tokens": -3},
        {"prompt": "x", "max_tokens": 10**12},
        {"prompt": "x", "temperature": "hot"},
        {"prompt": "x", "max_tokens": 2, "seed": -(2**63) - 1},
    ],
    "/infill": [
        {"input_prefix": "x", "n_predict": -5},
        {"input_prefix": "x", "input_extra": "not a list"},
        {"input_prefix": 5},
        {"input_prefix": "x", "n_predict": 2, "temperature": float("nan")},
    ],  # llama.cpp reads temperature <= 0 as greedy: not an error
}


@pytest.mark.parametrize("route", ROUTES)
def test_hand_picked_bad_input_gets_a_clear_4xx(fuzz_url, route):
    cases = GENERIC + [(json.dumps(b).encode(), json.dumps(b)[:60]) for b in SPECIFIC[route]]
    with httpx.Client(base_url=fuzz_url, timeout=60) as c:
        for raw, what in cases:
            r = c.post(route, content=raw, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (route, what, r.status_code, r.text[:300])
            assert "error" in r.json(), (route, what, r.text[:300])


def test_sampling_values_at_their_edges_complete(fuzz_url):
    # a temperature whose logits / temperature overflows, the seeds at both ends of the range:
    # each completes (it was a 500 that, on the GPU's fast path,
    # turned the CUDA graphs off for every later request)
    cases = [
        ("/generate", {"inputs": "x", "parameters": {"do_sample": True, "temperature": 1e-40, "seed": 2**64 - 1}}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 2, "temperature": 1e-40, "seed": -(2**63)}),
        ("/v1/completions", {"prompt": "s = '\U0001f600'", "max_tokens": 2}),  # sent as a surrogate pair: one character
        ("/v1/completions", {"prompt": "x", "suffix": "y"}),  # no max_tokens: OpenAI's 16, within the server's 8
        ("/infill", {"input_prefix": "x", "n_predict": 2, "temperature": 1e-40, "seed": 2**64 - 1}),
    ]
    with httpx.Client(base_url=fuzz_url, timeout=60) as c:
        for route, body in cases:
            r = c.post(route, json=body)
            assert r.status_code == 200, (route, body, r.text[:300])


def test_a_seed_gives_its_answer_whatever_is_asked_beside_it(fuzz_url):
    # sampling jobs of the same parameters share a batch, whose rows draw from one generator: seeded
    # ones go alone, so two prompts of one request, and two requests at once, each get the answer alone
    body = {"prompt": "def f(", "suffix": "\n", "max_tokens": 6, "temperature": 1.0, "seed": 7}
    with httpx.Client(base_url=fuzz_url, timeout=60) as c:
        alone = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
        both = c.post("/v1/completions", json={**body, "prompt": ["def f(", "def f("]}).json()["choices"]
        with ThreadPoolExecutor(2) as pool:
            at_once = list(pool.map(lambda _: c.post("/v1/completions", json=body).json(), range(2)))
    assert [x["text"] for x in both] == [alone, alone]
    assert [r["choices"][0]["text"] for r in at_once] == [alone, alone]


def test_llamacpp_seed_minus_one_is_a_random_seed(fuzz_url):
    body = {"input_prefix": "def f(", "n_predict": 6, "temperature": 2.0, "top_k": 0, "top_p": 1.0}
    with httpx.Client(base_url=fuzz_url, timeout=60) as c:
        seeded = {c.post("/infill", json={**body, "seed": 3}).json()["content"] for _ in range(3)}
        unseeded = {c.post("/infill", json={**body, "seed": -1}).json()["content"] for _ in range(4)}
    assert len(seeded) == 1 and len(unseeded) > 1  # a seed repeats; -1, llama.cpp's default, does not


def test_wrong_api_key_is_401_json(tiny_run):
    with running(make_app(tiny_run, api_key="s3cret")) as url, httpx.Client(base_url=url, timeout=30) as c:
        for route in ROUTES:
            r = c.post(
                route,
                json={"inputs": "x", "prompt": "x", "input_prefix": "x"},
                headers={"Authorization": "Bearer wrong"},
            )
            assert r.status_code == 401 and "error" in r.json()
        assert c.get("/health").status_code == 200


def test_a_failed_generation_is_tgis_generation_error(tiny_run):
    """TGI names a generation that failed `generation` (huggingface_hub raises its GenerationError for
    that name only), answered or streamed; the OpenAI routes answer the same failure in their own shape."""

    def fail() -> None:
        raise RuntimeError("device fault")

    app = make_app(tiny_run)
    app.state.service.engine.decoder.step_hook = fail
    body = {"inputs": "<fim_prefix>x<fim_suffix>y<fim_middle>", "parameters": {"max_new_tokens": 2}}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        answered = c.post("/generate", json=body)
        assert answered.status_code == 500 and answered.json()["error_type"] == "generation", answered.text
        streamed = c.post("/generate_stream", json=body)
        assert json.loads(streamed.text.split("data:")[-1])["error_type"] == "generation", streamed.text
        openai = c.post("/v1/completions", json={"prompt": "x", "suffix": "y", "max_tokens": 2})
        assert openai.status_code == 500 and "generation" in openai.json()["error"]["message"], openai.text
        # the OpenAI clients retry a 5xx twice unless told not to: the same request fails again
        assert answered.headers["x-should-retry"] == openai.headers["x-should-retry"] == "false"
