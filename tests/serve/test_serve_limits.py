"""Limits, bad requests and auth: every refusal is a 4xx JSON error naming the field, never a 500."""

from __future__ import annotations

import re
import socket
from urllib.parse import urlparse

import httpx
import pytest
from serve_helpers import TEST_LIMITS, error_field, make_app, running, wait_until

PSM = "<fim_prefix>def f(x):\n    <fim_suffix>\n<fim_middle>"


@pytest.mark.parametrize(
    "route,body,status,field",
    [
        ("/generate", {"inputs": PSM, "parameters": {"max_new_tokens": 65}}, 422, "parameters.max_new_tokens"),
        ("/v1/completions", {"prompt": "x", "suffix": "", "max_tokens": 1000}, 422, "max_tokens"),
        ("/infill", {"input_prefix": "x", "n_predict": -2}, 422, "n_predict"),
        ("/v1/completions", {"prompt": "x", "logprobs": 2}, 422, "logprobs"),
        ("/v1/completions", {"prompt": "x", "best_of": 3}, 422, "best_of"),
        ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, 422, "presence_penalty"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"50256": -100}}, 422, "logit_bias"),
        ("/generate", {"inputs": PSM, "parameters": {"repetition_penalty": 1.2}}, 422, "parameters.repetition_penalty"),
        ("/generate", {"inputs": PSM, "parameters": {"top_n_tokens": 5}}, 422, "parameters.top_n_tokens"),
        ("/generate", {"inputs": PSM, "parameters": {"best_of": 2, "do_sample": True}}, 422, "parameters.best_of"),
        (
            "/generate",
            {"inputs": PSM, "parameters": {"grammar": {"type": "regex", "value": "a+"}}},
            422,
            "parameters.grammar",
        ),
        (
            "/generate",
            {"inputs": PSM, "parameters": {"decoder_input_details": True}},
            422,
            "parameters.decoder_input_details",
        ),
        ("/generate", {"inputs": "x = 1\n" * 300}, 422, "inputs"),  # not a FIM prompt: too long is an error
        ("/v1/completions", {"prompt": "x = 1\n" * 300}, 422, "prompt"),
        ("/generate", {"inputs": PSM, "parameters": {"stop": ["a"] * 17}}, 422, "parameters.stop"),
        ("/generate", {"parameters": {}}, 422, "inputs"),
        ("/generate", {"inputs": 5}, 422, "inputs"),
        ("/generate", {"inputs": PSM, "parameters": {"temperature": "hot"}}, 422, "parameters.temperature"),
        ("/generate", {"inputs": PSM, "parameters": {"top_p": 2}}, 422, "parameters.top_p"),
        ("/generate", {"inputs": PSM, "parameters": {"max_new_tokens": 0}}, 422, "parameters.max_new_tokens"),
        ("/generate", {"inputs": PSM, "parameters": {"adapter_id": "nope"}}, 404, "parameters.adapter_id"),
        ("/v1/completions", {"prompt": 5}, 422, "prompt"),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, 422, "temperature"),
        ("/v1/completions", {"prompt": "x", "n": 2}, 422, "n"),
        ("/v1/completions", {"prompt": ["a", "b"], "suffix": "", "stream": True}, 422, "prompt"),
        ("/infill", {"input_extra": [{"filename": 3}]}, 422, "input_extra.0.filename"),
        ("/generate", [1, 2], 422, "body"),
    ],
)
def test_bad_requests_name_the_field(client, route, body, status, field):
    r = client.post(route, json=body)
    assert r.status_code == status, r.text
    assert error_field(r.json()) == field


def test_unknown_routes_and_methods_answer_in_the_apis_shape(client):
    """A path or method not served is an error in the shape of the API the path is of, as others are."""
    chat = client.post("/v1/chat/completions", json={"messages": []})
    assert chat.status_code == 404 and chat.json()["error"]["param"] == "path"
    assert "POST /v1/chat/completions" in chat.json()["error"]["message"]
    get = client.get("/generate")
    assert get.status_code == 405 and get.json()["error_type"] == "invalid_request" and get.headers["allow"] == "POST"
    assert client.get("/infill").json()["error"]["code"] == 405


def test_a_long_fim_prompt_is_fitted_not_refused(client):
    long_psm = "<fim_prefix>" + "x = 1\n" * 300 + "<fim_suffix>" + "y = 2\n" * 300 + "<fim_middle>"
    r = client.post("/generate", json={"inputs": long_psm, "parameters": {"max_new_tokens": 2, "details": True}})
    assert r.status_code == 200 and r.json()["details"]["generated_tokens"] == 2


def test_bad_json_and_large_bodies(client):
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and error_field(r.json()) == "body"
    big = {"inputs": "x" * (TEST_LIMITS["max_body_bytes"] + 1)}
    r = client.post("/generate", json=big)
    assert r.status_code == 413 and error_field(r.json()) == "body"

    def chunks():  # no Content-Length: the server counts while reading
        for _ in range(30):
            yield b" " * 1000

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"


def test_a_client_gone_before_its_body_ended_is_499_not_a_server_error(server, client):
    """An editor that cancels a request while its body is on the way: counted as a client gone (499),
    not as the server's failure (500, with a traceback in the log)."""
    address = urlparse(server[0])
    routes = ("/generate", "/v1/completions", "/infill")

    def count(route: str, status: int) -> int:
        found = re.search(
            rf'fimtune_requests_total{{route="{route}",status="{status}"}} (\d+)', client.get("/metrics").text
        )
        return int(found[1]) if found else 0

    before = {route: (count(route, 499), count(route, 500)) for route in routes}
    for route in routes:
        with socket.create_connection((address.hostname, address.port)) as sock:
            head = f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            sock.sendall(head.encode() + b'{"inputs": "def')  # then hang up
    wait_until(lambda: all(count(route, 499) == before[route][0] + 1 for route in routes))
    assert all(count(route, 500) == before[route][1] for route in routes)


def test_api_key_guards_every_route_but_health(tiny_run):
    with running(make_app(tiny_run, api_key="sekrit")) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/health").status_code == c.head("/health").status_code == 200
        for method, path in [("GET", "/info"), ("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/generate")]:
            r = c.request(method, path, json={"inputs": PSM})
            assert r.status_code == 401 and error_field(r.json()) == "authorization", path
        wrong = c.get("/info", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        for scheme in ("Bearer", "bearer", "BEARER"):  # the scheme's case does not matter (RFC 9110)
            ok = c.post(
                "/generate",
                json={"inputs": PSM, "parameters": {"max_new_tokens": 2}},
                headers={"Authorization": f"{scheme} sekrit"},
            )
            assert ok.status_code == 200 and ok.json()["generated_text"], scheme
        for header in ("sekrit", "Basic sekrit", "Bearer  sekrit x", "Bearersekrit"):
            assert c.get("/info", headers={"Authorization": header}).status_code == 401, header


def test_the_api_key_can_come_from_the_environment(monkeypatch):
    """$FIMTUNE_API_KEY keeps the key out of the process list (a flag's value is in it); --api-key wins."""
    from fimtune.cli import build_parser

    monkeypatch.setenv("FIMTUNE_API_KEY", "from-env")
    assert build_parser().parse_args(["serve", "embedded"]).api_key == "from-env"
    assert build_parser().parse_args(["serve", "embedded", "--api-key", "flag"]).api_key == "flag"
    monkeypatch.delenv("FIMTUNE_API_KEY")
    assert build_parser().parse_args(["serve", "embedded"]).api_key is None


def test_a_key_read_with_its_line_end_still_lets_clients_in(tiny_run):
    """A key from a file or a secret keeps its trailing newline ($FIMTUNE_API_KEY); no client can send
    one in a header (HTTP strips it), so the key is taken without the whitespace around it. A key of
    only whitespace is refused rather than read as no key at all."""
    from fimtune.errors import FimtuneError

    with running(make_app(tiny_run, api_key="sekrit\n")) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/info", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert c.get("/info", headers={"Authorization": "Bearer nope"}).status_code == 401
    with pytest.raises(FimtuneError, match="api-key"):
        make_app(tiny_run, api_key=" \n")


def test_a_port_in_use_is_refused_before_the_model_loads(monkeypatch):
    """Loading a model (and compiling its CUDA graphs) takes minutes: a taken port must fail first,
    saying so; so do a port out of range and --threads 0."""
    import socket

    from fimtune.cli import build_parser
    from fimtune.errors import FimtuneError
    from fimtune.serve import app, engine

    monkeypatch.setattr(engine, "load_engine", lambda *a, **k: pytest.fail("the model loaded"))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        ns = build_parser().parse_args(["serve", "embedded", "--port", str(port)])
        with pytest.raises(FimtuneError, match=f"127.0.0.1:{port} is in use .*--port"):
            app.main(ns)
    for flags, said in ((["--port", "70000"], "--port 70000: a port is 0-65535"), (["--threads", "0"], "--threads")):
        with pytest.raises(FimtuneError, match=said):
            app.main(build_parser().parse_args(["serve", "embedded", *flags]))


def test_the_address_said_is_the_port_taken_and_an_ipv6_host_is_bracketed():
    """`--port 0` takes any free port (as the port error says): the address printed is that port's
    (it said `:0`), and an IPv6 host is in brackets, as a URL needs (`http://::1:8080` is none)."""
    from fimtune.errors import FimtuneError
    from fimtune.serve.app import bind_socket, server_url

    for host in ("127.0.0.1", "::1"):
        try:
            sock = bind_socket(host, 0)
        except FimtuneError:  # a machine without IPv6
            continue
        with sock:
            url = urlparse(server_url(sock, host))
            assert url.hostname == host and url.port == sock.getsockname()[1] != 0


def test_pickled_weights_are_refused(tmp_path, tiny_run):
    import shutil

    from fimtune.errors import FimtuneError
    from fimtune.serve.engine import parse_adapters

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_run / "adapter", pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(FimtuneError, match="only pickled weights"):
        parse_adapters([f"p={pickled}"])
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "adapter")
    shutil.copytree(pickled, run / "adapter")
    with pytest.raises(FimtuneError, match="only pickled weights"):
        make_app(run)
    with pytest.raises(FimtuneError, match="NAME=PATH"):
        parse_adapters(["no-equals-sign"])
    with pytest.raises(FimtuneError, match="not base or default"):
        parse_adapters([f"base={tiny_run}"])


def test_limits_past_a_models_learned_positions_are_lowered_to_fit(tmp_path, tiny_tokenizer, caplog):
    """A GPT-BigCode of 256 learned positions served with room for 1,000 prompt tokens: the prompt's
    room is lowered to 256 - max_new_tokens at start-up, so a long prompt is trimmed to fit (its
    forward would fail past the positions: a 500, on a GPU a device-side assert)."""
    from tests import tiny

    from fimtune.errors import FimtuneError
    from fimtune.serve.app import create_app
    from fimtune.serve.engine import Limits, load_engine

    base = tiny.save_model_folder(tiny.gpt_bigcode(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "bigcode")
    limits = Limits(**{**TEST_LIMITS, "max_input_tokens": 1000, "max_new_tokens": 64})
    with caplog.at_level("WARNING"):
        engine, prompter, mode = load_engine(str(base), [], limits, "auto")
    assert engine.limits.max_input_tokens == 256 - 64 and "lowered from 1000 to 192" in caplog.text
    body = {"input_prefix": "x = 1\n" * 300, "input_suffix": "\n", "n_predict": 64, "temperature": 0}
    with running(create_app(engine, prompter, mode)) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/infill", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["tokens_evaluated"] <= 192
    with pytest.raises(FimtuneError, match="no room for a prompt"):
        load_engine(str(base), [], Limits(**{**TEST_LIMITS, "max_new_tokens": 250}), "auto")
    # with the engine in a process of its own, the server's handlers learn the lowered room from it
    from serve_helpers import make_process_app

    app = make_process_app(base, max_input_tokens=1000, max_new_tokens=64)
    try:
        assert app.state.service.limits.max_input_tokens == 192
        with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/infill", json=body)
        assert r.status_code == 200 and r.json()["tokens_evaluated"] <= 192, r.text
    finally:
        app.state.service.engine.stop()


def test_a_run_folder_named_base_is_refused(tmp_path, tiny_run):
    """A run's base model is served as `base`: a run folder of that name would be that name too,
    and its requests (the default model's) were answered by the base, its adapter unused."""
    import shutil

    from fimtune.errors import FimtuneError

    run = tmp_path / "base"
    shutil.copytree(tiny_run, run)
    with pytest.raises(FimtuneError, match="'base', is the served name of its base model"):
        make_app(run)


def test_adapters_of_another_base_or_vocabulary_are_refused(tmp_path, tiny_run, tiny_tokenizer):
    """An extra adapter loads wherever its weights' shapes fit: one trained on another base (a run
    says which), with another vocabulary (other token ids), or with layers this model lacks was
    served as if it were this model's."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from serve_helpers import save_adapter
    from tests import tiny

    from fimtune.errors import FimtuneError

    other_base = tiny.save_model_folder(tiny.llama(len(tiny_tokenizer), seed=7), tiny_tokenizer, tmp_path / "b2")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tiny_run, elsewhere)
    config = elsewhere / "config.yaml"
    config.write_text(config.read_text().replace(str(tiny_run.parent / "base"), str(other_base)))
    with pytest.raises(FimtuneError, match=f"trained on {other_base}, but the served base is"):
        make_app(tiny_run, [f"x={elsewhere}"])

    vocab = tmp_path / "vocab"
    shutil.copytree(tiny_run, vocab)
    tiny_tokenizer.add_tokens(["<extra>"])
    tiny_tokenizer.save_pretrained(vocab / "tokenizer")
    with pytest.raises(FimtuneError, match="another vocabulary"):
        make_app(tiny_run, [f"x={vocab}"])

    deeper = tiny.llama(len(tiny_tokenizer) - 1)
    deeper.config.num_hidden_layers = 3
    deeper = type(deeper)(deeper.config)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(deeper, cfg).save_pretrained(tmp_path / "deeper")
    for target in (tiny_run, tiny_run.parent / "base"):  # onto a run's PEFT model, or a plain one
        with pytest.raises(FimtuneError, match="does not fit this model"):
            make_app(target, [f"x={tmp_path / 'deeper'}"])

    fine = save_adapter(tiny_run.parent / "base", tmp_path / "fine", seed=3)
    app = make_app(tiny_run.parent / "base", [f"x={fine}", f"y={tiny_run}"])
    assert list(app.state.service.engine.models) == [str(tiny_run.parent / "base"), "x", "y"]


def test_adapters_that_trained_biases_are_served_alone(tmp_path, tiny_tokenizer):
    """`lora.bias=all|lora_only` trains the base layers' own biases, which every served model shares:
    an extra adapter with them replaced the run's and the base's biases as it loaded (both answered
    otherwise than when served alone), and a run's `base` kept its trained biases. Such an adapter
    is refused beside others; a run with them is served without `base`."""
    from tests import tiny

    from fimtune.errors import FimtuneError

    base = tiny.save_model_folder(tiny.gpt_bigcode(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "base")

    def run(name: str, bias: str):
        return tiny.save_run(
            tmp_path / name, base, tiny_tokenizer, tiny.lora_with_trained_biases(base, bias, len(name))
        )

    plain, biased = run("plain", "none"), run("biased", "all")
    for target, extra in ((plain, biased), (biased, plain), (base, biased)):
        with pytest.raises(FimtuneError, match=r"trained biases \(lora.bias=all\)"):
            make_app(target, [f"x={extra}"])
    assert list(make_app(biased).state.service.engine.models) == ["biased"]  # no `base`


def test_a_run_served_from_its_own_folder_takes_the_folders_name(tiny_run, monkeypatch):
    """`fimtune serve .` in a run folder: the model is named after the folder (it was named '', so
    `/v1/models` listed an empty id and a client naming the run got a 404)."""
    from pathlib import Path

    monkeypatch.chdir(tiny_run)
    app = make_app(Path("."))
    try:
        assert list(app.state.service.engine.models) == [tiny_run.name, "base"]
    finally:
        app.state.service.engine.stop()


def test_infill_lowers_n_predict_to_the_limit_as_llama_cpp_does(client):
    """llama.cpp's server lowers an n_predict above its own to it; llama.vim and llama.vscode ask 128
    by default, which was a 422 (and no suggestion) from a server of a lower limit."""
    body = {"input_prefix": "x = ", "n_predict": 10**12, "temperature": 0}
    r = client.post("/infill", json=body)
    assert r.status_code == 200, r.text
    limit = TEST_LIMITS["max_new_tokens"]
    assert r.json()["tokens_predicted"] <= limit
    assert r.json()["stop_type"] != "limit" or r.json()["tokens_predicted"] == limit


def test_a_switch_that_fails_while_folding_leaves_no_model_answering_for_another(tiny_run, other_adapter):
    """Folding `other` in failed (out of memory, say) after the run's adapter was taken out: the engine
    still named the run as folded in, so the next request for the run was answered by `other`, unfolded."""
    app = make_app(tiny_run, [f"other={other_adapter}"])
    engine = app.state.service.engine
    run = engine.default_model
    body = {"prompt": "def f(x):\n    ", "suffix": "\n", "max_tokens": 8, "temperature": 0}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        alone = {
            m: c.post("/v1/completions", json={**body, "model": m}).json()["choices"][0]["text"] for m in (run, "other")
        }
        assert alone[run] != alone["other"]  # the two models tell apart here
        assert c.post("/v1/completions", json={**body, "model": run}).status_code == 200  # the run folded in
        merge = engine.model.merge_adapter

        def failing(*args, **kwargs):
            engine.model.merge_adapter = merge  # once
            raise RuntimeError("CUDA out of memory")

        engine.model.merge_adapter = failing
        assert c.post("/v1/completions", json={**body, "model": "other"}).status_code == 500
        again = c.post("/v1/completions", json={**body, "model": run}).json()["choices"][0]["text"]
        assert again == alone[run]
        assert c.post("/v1/completions", json={**body, "model": "other"}).json()["choices"][0]["text"] == alone["other"]
