"""Model loading, FIM token rows and LoRA attachment on tiny GPTBigCode and Llama models."""

import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from fimtune.config import LoraConfig, ModelConfig
from fimtune.errors import FimtuneError
from fimtune.model import (
    add_token_rows,
    attach_lora,
    count_parameters,
    load_base_model,
    plan,
    quantization_config,
    resolve_dtype,
    resolve_target_modules,
)
from tests import tiny


def test_seed_recipe_trainable_parameters_offline():
    # 694,272 x r for StarCoderBase-1B with c_proj, c_attn, c_fc (q_attn matches nothing).
    with pytest.warns(UserWarning, match="q_attn matches no module"):
        p = plan(
            ModelConfig(name_or_path="bigcode/starcoderbase-1b"),
            LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["c_proj", "c_attn", "q_attn", "c_fc", "c_proj"]),
        )
    assert p.trainable == 2_777_088
    assert p.model_type == "gpt_bigcode"


def test_default_targets_by_family():
    assert resolve_target_modules(tiny.llama(64), None) == "all-linear"
    with pytest.warns(UserWarning, match="q_attn"):
        assert resolve_target_modules(tiny.gpt_bigcode(64), None) == ["c_proj", "c_attn", "c_fc"]


def test_targets_that_match_nothing_are_an_error_naming_the_modules():
    with pytest.raises(FimtuneError, match="matches no module.*q_proj"):
        resolve_target_modules(tiny.llama(64), ["c_attn", "nope"])


def test_targets_may_name_a_module_by_its_path_as_peft_matches_them():
    """`attn.c_proj` is GPTBigCode's attention projection alone (`c_proj` is the MLP's too): PEFT
    matches a name's end after a dot, and so does the check (it refused or dropped them)."""
    model = tiny.gpt_bigcode(64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_target_modules(model, ["attn.c_proj", "c_attn"]) == ["attn.c_proj", "c_attn"]
    peft_model = attach_lora(model, LoraConfig(target_modules=["attn.c_proj"]), [])
    adapted = {n.rsplit(".", 1)[0] for n, _ in peft_model.named_modules() if n.endswith("lora_A")}
    assert adapted == {f"base_model.model.transformer.h.{i}.attn.c_proj" for i in range(2)}
    with pytest.raises(FimtuneError, match="matches no module"):
        resolve_target_modules(model, ["mlp.c_attn", "h.c_fc"])
    with pytest.raises(FimtuneError, match="drop transformer.wte"):
        resolve_target_modules(model, ["c_attn", "transformer.wte"])


def test_a_target_lora_cannot_adapt_is_a_clear_error():
    """The norms are among the modules an unmatched name's message lists; PEFT refuses them with a
    ValueError, which must reach the command line as one line naming the setting."""
    with pytest.raises(FimtuneError, match="lora.target_modules=q_proj,input_layernorm: .*not supported"):
        attach_lora(tiny.llama(64), LoraConfig(target_modules=["q_proj", "input_layernorm"]), [])


def test_lora_on_tied_embeddings_is_refused_naming_the_module():
    """Merged, LoRA on a tied embedding would change both (one matrix): refused when the run is set
    up (and in `--dry-run`'s plan); untied, lm_head may train; all-linear leaves a tied head alone."""
    for make, target in [(tiny.gpt_bigcode, "lm_head"), (lambda v: tiny.llama(v, tie=True), "embed_tokens")]:
        with pytest.raises(
            FimtuneError, match=f"lora.target_modules=.*{target}.*drop {target} from lora.target_modules"
        ):
            attach_lora(make(68), LoraConfig(target_modules=["q_proj", "c_attn", target]), [64, 65])
    assert resolve_target_modules(tiny.llama(64), ["q_proj", "lm_head"]) == ["q_proj", "lm_head"]
    peft_model = attach_lora(tiny.llama(68, tie=True), LoraConfig(target_modules=None), [64, 65])
    assert "lm_head" not in peft_model.peft_config["default"].target_modules


@pytest.mark.parametrize("make", [tiny.gpt_bigcode, tiny.llama], ids=["gpt_bigcode", "llama"])
def test_only_lora_and_new_token_rows_train(make):
    model = make(64)
    model.resize_token_embeddings(68)
    new_ids = [64, 65, 66, 67]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = attach_lora(model, LoraConfig(r=2, alpha=4, dropout=0.0), new_ids)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "trainable_tokens" in n or "modules_to_save" in n for n in names)
    trainable, total = count_parameters(peft_model)
    assert 0 < trainable < total


def test_fim_tokens_the_tokenizer_has_past_the_models_rows_get_rows_that_train(tiny_tokenizer_without_fim, caplog):
    """CodeLlama-34b's tokenizer holds its FIM tokens past the model's 32,000 rows: nothing is added,
    yet the model needs rows for them, and they must train."""
    from fimtune.tokens import FAMILIES, ensure_fim_tokens

    tokenizer = tiny_tokenizer_without_fim
    rows = len(tokenizer)
    names = FAMILIES[-1].names()  # CodeLlama's
    tokenizer.add_special_tokens({"extra_special_tokens": names}, replace_extra_special_tokens=False)
    fim, added = ensure_fim_tokens(tokenizer)
    assert added == [] and min(fim.prefix, fim.middle, fim.suffix) >= rows
    model = tiny.llama(rows)
    logging.Logger.warning_once.cache_clear()  # transformers' notices show once a process
    new_ids = add_token_rows(model, tokenizer, added, fim)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert "mean_resizing" not in caplog.text  # transformers' notice names no choice of the user's
    assert {fim.prefix, fim.middle, fim.suffix} <= set(new_ids) and min(new_ids) >= rows
    model(torch.tensor([[fim.prefix, 5, fim.suffix, 6, fim.middle]]))  # was an IndexError
    assert add_token_rows(tiny.llama(len(tokenizer)), tokenizer, [], fim) == []  # rows there: none to train


@pytest.mark.parametrize("tie", [True, False])
def test_resized_rows_start_at_the_mean_the_same_at_every_load(tiny_tokenizer_without_fim, tie):
    """transformers' mean-resizing draws the new rows around the mean, unseeded when a run loads:
    a run's base (adapter disabled: `eval`, `complete --compare-base`) moved between loads."""
    from fimtune.tokens import ensure_fim_tokens

    tokenizer = tiny_tokenizer_without_fim
    known = len(tokenizer)
    _, added = ensure_fim_tokens(tokenizer)
    loads = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = tiny.llama(known, tie=tie)
        assert add_token_rows(model, tokenizer, added) == list(range(known, known + 4))
        loads.append(model)
    for a, b in zip(loads[0].parameters(), loads[1].parameters(), strict=True):
        assert torch.equal(a, b)
    for embedding in (loads[0].get_input_embeddings(), loads[0].get_output_embeddings()):
        mean = embedding.weight[:known].mean(0)
        assert all(torch.equal(embedding.weight[i], mean) for i in range(known, known + 4))


@pytest.mark.parametrize("tie", [True, False])
def test_added_tokens_on_a_models_padding_rows_start_at_the_mean(tiny_tokenizer_without_fim, tie):
    """Embeddings padded past the tokenizer (Pythia, Phi-2): the added FIM tokens take rows that
    were never trained; they start where resized rows do, at the known rows' mean."""
    from fimtune.tokens import ensure_fim_tokens

    tokenizer = tiny_tokenizer_without_fim
    known = len(tokenizer)
    model = tiny.llama(known + 8, tie=tie)
    _, added = ensure_fim_tokens(tokenizer)
    new_ids = add_token_rows(model, tokenizer, added)
    assert len(new_ids) == 4 and max(new_ids) < known + 8  # no resize: the padding rows hold them
    for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
        mean = embedding.weight[:known].mean(0)
        assert all(torch.allclose(embedding.weight[i], mean) for i in new_ids)
        assert not torch.allclose(embedding.weight[known + 6], mean)  # rows no token uses stay


def test_qlora_on_cpu_is_a_clear_error():
    """The error names the override to pass as the command line takes it (`model.quantization=none`)."""
    with pytest.raises(FimtuneError, match="needs a CUDA GPU.* pass model.quantization=none$"):
        quantization_config("4bit", torch.device("cpu"))


def test_dtype_resolution_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_local_folder_model_loads(tmp_path, tiny_tokenizer):
    model = tiny.llama(len(tiny_tokenizer))
    tiny.save_model_folder(model, tiny_tokenizer, tmp_path / "m")
    loaded = load_base_model(ModelConfig(name_or_path=str(tmp_path / "m")), torch.device("cpu"))
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_default_attention_is_sdpa_where_the_model_has_it_else_eager(tmp_path, tiny_tokenizer):
    """GPT-Neo (BLOOM, MPT, ...) has no SDPA: named, transformers refuses it; the default must load
    it with eager attention, as transformers' own default does."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    cfg = GPTNeoConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    tiny.save_model_folder(GPTNeoForCausalLM(cfg), tiny_tokenizer, tmp_path / "neo")
    neo = load_base_model(ModelConfig(name_or_path=str(tmp_path / "neo")), torch.device("cpu"))
    assert neo.config._attn_implementation == "eager"
    tiny.save_model_folder(tiny.llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "llama")
    llama = load_base_model(ModelConfig(name_or_path=str(tmp_path / "llama")), torch.device("cpu"))
    assert llama.config._attn_implementation == "sdpa"


def test_a_model_folder_with_pickled_weights_only_is_refused(tmp_path, tiny_tokenizer):
    model = tiny.llama(len(tiny_tokenizer))
    folder = tiny.save_model_folder(model, tiny_tokenizer, tmp_path / "m")
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # as older checkpoints ship
    (folder / "model.safetensors").unlink()
    with pytest.raises(FimtuneError, match="only pickled weights .*pytorch_model.bin.*safetensors only"):
        load_base_model(ModelConfig(name_or_path=str(tmp_path / "m")), torch.device("cpu"))


def test_missing_model_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FimtuneError, match="no config.json"):
        load_base_model(ModelConfig(name_or_path=str(tmp_path / "empty")), torch.device("cpu"))
    with pytest.raises(FimtuneError, match="does not exist"):
        load_base_model(ModelConfig(name_or_path=str(tmp_path / "x.gguf")), torch.device("cpu"))


def test_a_model_folder_without_a_tokenizer_is_a_one_line_error(tmp_path):
    """A folder with config.json and weights but no tokenizer files was transformers' many-line
    message about slow tokenizers and sentencepiece."""
    from fimtune.hub import load_tokenizer

    tiny.llama(100).save_pretrained(tmp_path / "m")
    with pytest.raises(
        FimtuneError, match=r"'.*m' holds no tokenizer \(tokenizer.json.*save the model's tokenizer"
    ) as e:
        load_tokenizer(str(tmp_path / "m"))
    assert "\n" not in str(e.value)


def test_a_folder_of_gguf_files_or_an_adapter_given_as_the_model_says_what_to_pass(tmp_path):
    from fimtune.hub import resolve_model

    (tmp_path / "gguf").mkdir()
    for name in ("m-Q8_0.gguf", "m-Q4_K_M.gguf"):
        (tmp_path / "gguf" / name).write_bytes(b"GGUF")
    with pytest.raises(FimtuneError, match=r"pass one of its GGUF files: .*m-Q4_K_M\.gguf, .*m-Q8_0\.gguf"):
        resolve_model(str(tmp_path / "gguf"))
    (tmp_path / "gguf" / "config.json").write_text("{}")  # a GGUF release with its config beside the files
    with pytest.raises(FimtuneError, match=r"has a config.json but no weights .*pass one of its GGUF files: "):
        resolve_model(str(tmp_path / "gguf"))
    (tmp_path / "gguf" / "model.safetensors").write_bytes(b"")
    assert resolve_model(str(tmp_path / "gguf")).gguf_file is None  # weights: a transformers folder
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text("{}")
    for folder in ("run", "run/adapter"):
        with pytest.raises(FimtuneError, match="LoRA adapter, not a model: .*the run folder.*fimtune merge"):
            resolve_model(str(tmp_path / folder))


def test_unreachable_hub_id_fails_fast(monkeypatch):
    import time

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t = time.perf_counter()
    with pytest.raises(FimtuneError, match="local copy|hf download"):
        load_base_model(ModelConfig(name_or_path="nobody/no-such-model"), torch.device("cpu"))
    assert time.perf_counter() - t < 20


def test_behind_a_proxy_the_hub_is_reachable_when_the_proxy_is(monkeypatch):
    """Where only a proxy reaches out (HTTPS_PROXY, which huggingface_hub uses), the probe asks the
    proxy: it tried the Hub directly and called it unreachable; NO_PROXY hosts are tried directly."""
    import socket

    from fimtune.hub import hub_reachable

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with socket.create_server(("127.0.0.1", 0)) as proxy:
        assert not hub_reachable(timeout=1)
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        assert hub_reachable(timeout=1)
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        assert not hub_reachable(timeout=1)


@pytest.mark.slow
def test_embedded_model_loads_from_gguf():
    model = load_base_model(ModelConfig(name_or_path="embedded"), torch.device("cpu"))
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    assert model.dtype == torch.float32


def test_a_run_loads_for_completions_off_a_gpu_whatever_attention_and_quantization_it_trained_with():
    """Off a CUDA GPU a QLoRA run's base loads unquantized and FlashAttention gives way to the
    default attention (bitsandbytes and flash-attn need a GPU); on a GPU the run's settings stand."""
    from fimtune.model import inference_model_config

    trained = ModelConfig(quantization="4bit", attn_implementation="flash_attention_2")
    here = inference_model_config(trained, torch.device("cpu"))
    assert (here.quantization, here.attn_implementation) == ("none", None)
    assert inference_model_config(trained, torch.device("cuda")) == trained
    varlen = ModelConfig(attn_implementation="varlen")
    assert inference_model_config(varlen, torch.device("cpu")) == varlen


def test_an_interrupted_gguf_dequantization_leaves_nothing_in_the_cache(tmp_path, tiny_tokenizer, monkeypatch):
    """The dequantized copy is written under a temporary name: an interrupt (here, while the
    tokenizer is saved) leaves no half-written folder behind, and the next load writes it whole."""
    import transformers

    from fimtune import model as model_module
    from fimtune.hub import ModelSource

    monkeypatch.setenv("FIMTUNE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny.gpt_bigcode(len(tiny_tokenizer))
    )

    def interrupted(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_module, "load_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model_module.materialize_gguf(ModelSource(str(tmp_path), "m.gguf"))
    assert list((tmp_path / "cache" / "models").iterdir()) == []
    monkeypatch.setattr(model_module, "load_tokenizer", lambda _: tiny_tokenizer)
    out = model_module.materialize_gguf(ModelSource(str(tmp_path), "m.gguf"))
    assert (out / "config.json").is_file() and [p.name for p in out.parent.iterdir()] == [out.name]
    # Another process writing the same copy (in another container, with this process's id) keeps its folder.
    shutil.rmtree(out)
    theirs = out.with_name(f"{out.name}.tmp{os.getpid()}")
    theirs.mkdir()
    (theirs / "config.json").write_text("{}")
    assert model_module.materialize_gguf(ModelSource(str(tmp_path), "m.gguf")) == out
    assert (out / "model.safetensors").is_file() and (theirs / "config.json").read_text() == "{}"


@pytest.mark.parametrize("size", [100, 2_000_000])
def test_a_gguf_file_cut_short_is_a_clear_error(tmp_path, monkeypatch, size):
    """A GGUF file cut short (an interrupted download) was a `struct.error` or a reshape's ValueError
    from deep in the GGUF reader: now one message naming the file and what to do."""
    from fimtune.hub import embedded_gguf, load_tokenizer
    from fimtune.model import model_config

    monkeypatch.setenv("FIMTUNE_CACHE", str(tmp_path / "cache"))
    cut = tmp_path / "cut.gguf"
    with embedded_gguf().open("rb") as f:
        cut.write_bytes(f.read(size))
    expected = rf"could not read GGUF file '{re.escape(str(cut))}' .*cut short .*download it again"
    with pytest.raises(FimtuneError, match=expected):
        load_tokenizer(str(cut))
    with pytest.raises(FimtuneError, match=expected):
        load_base_model(ModelConfig(name_or_path=str(cut)), torch.device("cpu"))
    with pytest.raises(FimtuneError, match=expected):  # `train --dry-run`'s plan reads it too
        model_config(str(cut))


def test_a_gguf_config_is_read_once_a_process_and_handed_out_as_a_copy():
    """The GGUF reader parses the whole vocabulary to reach the config (4 s for the embedded SmolLM2),
    and `train --dry-run` asked twice a call: once a process now, each caller its own copy."""
    from fimtune import model as model_module

    first = model_module.model_config("embedded")
    hits = model_module._gguf_config.cache_info().hits
    first.vocab_size = 1
    again = model_module.model_config("embedded")
    assert model_module._gguf_config.cache_info().hits == hits + 1 and again.vocab_size == 49152


def test_a_dequantized_gguf_copy_damaged_since_is_written_again_or_named(tmp_path, tiny_tokenizer, monkeypatch):
    """A file of the cached copy deleted since (a cleanup) counted as cached while config.json stood:
    a missing model.safetensors was an error naming a folder the user never gave, a missing config.json
    a ValueError (`Unrecognized model`). Such a copy is written again; a file of it cut short is named
    with the fix."""
    import transformers

    from fimtune import model as model_module

    monkeypatch.setenv("FIMTUNE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    load = transformers.AutoModelForCausalLM.from_pretrained
    model = tiny.gpt_bigcode(len(tiny_tokenizer))

    def from_pretrained(*args, **kwargs):  # the GGUF file stands in for the tiny model; its copy loads for real
        return model if kwargs.get("gguf_file") else load(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(model_module, "load_tokenizer", lambda _: tiny_tokenizer)
    cfg = ModelConfig(name_or_path=str(tmp_path / "m.gguf"))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        expected = load_base_model(cfg, torch.device("cpu"))(ids).logits
        [copy] = (tmp_path / "cache" / "models").iterdir()
        for name in ("model.safetensors", "config.json"):
            (copy / name).unlink()
            torch.testing.assert_close(load_base_model(cfg, torch.device("cpu"))(ids).logits, expected)
            assert [p.name for p in copy.parent.iterdir()] == [copy.name] and (copy / name).is_file()
    (copy / "config.json").write_text("{")
    with pytest.raises(FimtuneError, match=r"dequantized copy .* is damaged .*delete that folder"):
        load_base_model(cfg, torch.device("cpu"))


def test_the_dequantized_gguf_copy_is_readable_as_the_umask_allows(tmp_path, tiny_tokenizer, monkeypatch):
    """A cache shared by a team (one FIMTUNE_CACHE, several users): the copy was a folder of mode 0700
    (`tempfile.mkdtemp`'s) holding a model.safetensors of 0600 (safetensors'), so another user's
    load failed on it with a PermissionError; the token cache's entries follow the umask already."""
    import transformers

    from fimtune import model as model_module
    from fimtune.hub import ModelSource

    monkeypatch.setenv("FIMTUNE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny.gpt_bigcode(len(tiny_tokenizer))
    )
    monkeypatch.setattr(model_module, "load_tokenizer", lambda _: tiny_tokenizer)
    killed = tmp_path / "cache" / "models" / ".m-0123456789abcdef.0123456789abcdef"  # a killed writer's, a day old
    killed.mkdir(parents=True)
    os.utime(killed, (0, 0))
    old = os.umask(0o022)
    try:
        out = model_module.materialize_gguf(ModelSource(str(tmp_path), "m.gguf"))
    finally:
        os.umask(old)
    assert not killed.exists()  # a whole model's size, which nothing reads
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"],
        0o644,
    )


def test_the_gguf_cache_shares_the_token_caches_folder_with_a_tilde_in_fimtune_cache(tmp_path, monkeypatch):
    """FIMTUNE_CACHE=~/c (quoted, or from a unit file) put dequantized models in ./~/c, beside each
    working folder, while the token cache went to ~/c."""
    import fimtune.model as model_module
    from fimtune.tokenization import cache_root

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FIMTUNE_CACHE", "~/c")
    assert model_module.cache_home() == cache_root().parent == tmp_path / "c"  # the folder GGUF copies go to


def test_a_cache_folder_that_cannot_be_written_is_a_clear_error_naming_the_gguf(tmp_path, tiny_tokenizer, monkeypatch):
    """A read-only or full cache ($FIMTUNE_CACHE) was a traceback from deep in save_pretrained."""
    import transformers

    from fimtune import model as model_module
    from fimtune.hub import ModelSource

    (tmp_path / "cache").write_text("a file, not a folder")
    monkeypatch.setenv("FIMTUNE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny.gpt_bigcode(len(tiny_tokenizer))
    )
    monkeypatch.setattr(model_module, "load_tokenizer", lambda _: tiny_tokenizer)
    with pytest.raises(FimtuneError, match=r"m\.gguf.*set FIMTUNE_CACHE to a writable folder"):
        model_module.materialize_gguf(ModelSource(str(tmp_path), "m.gguf"))


@pytest.mark.parametrize("tie", [True, False])
def test_a_run_whose_fim_tokens_took_padding_rows_reloads_as_trained(tmp_path, tiny_tokenizer_without_fim, tie):
    """Added FIM tokens that took a model's padding rows start at the known rows' mean in training: the
    reloaded run's base (adapter disabled: `fimtune eval`'s base loss) reads them there too, not at the
    padding rows' untrained values, and the tuned model is the trained one."""
    from fimtune.config import load_run_config, save_config
    from fimtune.model import load_run
    from fimtune.tokens import ensure_fim_tokens

    base = tiny.save_model_folder(
        tiny.llama(len(tiny_tokenizer_without_fim) + 8, tie=tie), tiny_tokenizer_without_fim, tmp_path / "base"
    )
    tokenizer = tiny_tokenizer_without_fim
    fim, added = ensure_fim_tokens(tokenizer)
    model = load_base_model(ModelConfig(name_or_path=str(base)), torch.device("cpu"))
    trained = attach_lora(model, LoraConfig(r=2, alpha=4, dropout=0.0), add_token_rows(model, tokenizer, added))
    with torch.no_grad():  # stands in for training: every trainable weight moves
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    run = tmp_path / "run"
    trained.save_pretrained(run / "adapter", save_embedding_layers=False)
    tokenizer.save_pretrained(run / "tokenizer")
    save_config(load_run_config(None, [f"model.name_or_path={base}"]), run / "config.yaml")
    ids = torch.tensor([[fim.prefix, 5, 6, fim.suffix, 7, fim.middle, 8]])
    loaded = load_run(run, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, trained.eval()(ids).logits, rtol=0, atol=1e-6)
        with loaded.model.disable_adapter(), trained.disable_adapter():
            torch.testing.assert_close(loaded.model(ids).logits, trained(ids).logits, rtol=0, atol=1e-6)


def test_a_run_of_a_model_with_its_own_fim_tokens_reloads_without_its_bases_tokenizer(
    tmp_path, tiny_tokenizer, monkeypatch
):
    """FIM tokens of the model's own (StarCoder's, ids 1-4) were never added: reloading its run
    does not read the base's tokenizer again to find out, padding rows or not."""
    import fimtune.model as model_module

    base = tiny.save_model_folder(tiny.llama(len(tiny_tokenizer) + 8), tiny_tokenizer, tmp_path / "base")
    tiny.save_run(tmp_path / "run", base, tiny_tokenizer, _lora(base))
    monkeypatch.setattr(model_module, "_added_fim_tokens", lambda _: pytest.fail("the base's tokenizer was read"))
    model_module.load_run(tmp_path / "run", torch.device("cpu"))


def test_damaged_weights_of_a_model_folder_or_a_run_are_a_clear_error(tmp_path, tiny_tokenizer):
    """A safetensors file cut short (a full disk, an interrupted copy) was a SafetensorError traceback
    from deep in transformers or PEFT: now one message naming the folder and the fix."""
    from fimtune.model import load_run

    base = tiny.save_model_folder(tiny.llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "base")
    tiny.save_run(tmp_path / "run", base, tiny_tokenizer, _lora(base))
    adapter = tmp_path / "run" / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    with pytest.raises(FimtuneError, match=r"weights in '.*adapter' are damaged .*copy or download it again"):
        load_run(tmp_path / "run", torch.device("cpu"))
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(FimtuneError, match=r"weights in '.*base' are damaged \(SafetensorError"):
        load_base_model(ModelConfig(name_or_path=str(base)), torch.device("cpu"))


def test_the_dequantized_gguf_copy_is_written_again_for_another_transformers_version(
    tmp_path, tiny_tokenizer, monkeypatch
):
    """The copy's config.json is in the format of the transformers that wrote it: one written by 5.x
    (`rope_parameters`), read by 4.x in another environment sharing the cache, loaded SmolLM2 with
    rope_theta 10,000 instead of 100,000 (other logits, silently)."""
    import importlib

    import transformers

    from fimtune import model as model_module
    from fimtune.hub import ModelSource

    monkeypatch.setenv("FIMTUNE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny.gpt_bigcode(len(tiny_tokenizer))
    )
    monkeypatch.setattr(model_module, "load_tokenizer", lambda _: tiny_tokenizer)
    src = ModelSource(str(tmp_path), "m.gguf")
    first = model_module.materialize_gguf(src)
    assert model_module.materialize_gguf(src) == first
    # (saving a model puts a new transformers module in sys.modules: patch the one imported now)
    monkeypatch.setattr(importlib.import_module("transformers"), "__version__", "4.57.1")
    other = model_module.materialize_gguf(src)
    assert other != first and (other / "config.json").is_file() and (first / "config.json").is_file()


def test_a_runs_moved_base_is_named_as_the_runs_config_names_it(tmp_path, tiny_tokenizer):
    """The user names the run, not its base: the error says the path comes from the run's config.yaml."""
    from fimtune.model import load_run

    moved = tmp_path / "gone" / "base"
    tiny.save_run(tmp_path / "run", moved, tiny_tokenizer)
    with pytest.raises(FimtuneError, match=r"(?s)'.*gone/base' is neither.*model.name_or_path` in .*run/config.yaml"):
        load_run(tmp_path / "run", torch.device("cpu"))


def test_a_runs_adapter_that_does_not_fit_its_base_is_one_error(tmp_path, tiny_tokenizer):
    """Another model put where the run's base was: PEFT's long traceback (modules not found) is one line."""
    from fimtune.model import load_run

    base = tiny.save_model_folder(tiny.llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "base")
    other = tiny.save_model_folder(tiny.gpt_bigcode(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "other")
    tiny.save_run(tmp_path / "run", other, tiny_tokenizer, _lora(base))
    with pytest.raises(FimtuneError, match=r"adapter does not fit its base model '.*other' .*not found") as err:
        load_run(tmp_path / "run", torch.device("cpu"))
    assert "\n" not in str(err.value) and len(str(err.value)) < 600


def test_a_runs_adapter_with_weights_its_base_lacks_or_lacking_some_is_refused(tmp_path, tiny_tokenizer):
    """PEFT loads the weights that match by name and leaves the rest: an adapter trained on a deeper
    model, or a file missing some weights, loaded as a partly tuned model without a word (eval, merge,
    complete and export on it)."""
    import peft
    from safetensors.torch import load_file, save_file

    from fimtune.model import load_run

    base = tiny.save_model_folder(tiny.llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "base")
    deeper = tiny.llama(len(tiny_tokenizer))
    deeper.config.num_hidden_layers = 3
    deeper = type(deeper)(deeper.config)
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    tiny.save_run(tmp_path / "deep", base, tiny_tokenizer, peft.get_peft_model(deeper, cfg))
    with pytest.raises(FimtuneError, match=r"adapter does not fit its base .*4 weights without a place.*layers\.2\."):
        load_run(tmp_path / "deep", torch.device("cpu"))

    tiny.save_run(tmp_path / "run", base, tiny_tokenizer, _lora(base))
    assert load_run(tmp_path / "run", torch.device("cpu")).model  # whole: loads
    weights = tmp_path / "run" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, weights)
    with pytest.raises(FimtuneError, match="1 weights without a place or a value"):
        load_run(tmp_path / "run", torch.device("cpu"))


def test_a_run_saving_while_it_loads_gives_one_checkpoints_adapter_and_names_it(tmp_path, tiny_tokenizer, monkeypatch):
    """A run still training moves its `adapter` link on at each save: `load_run` read the link three
    times (biases, PEFT's config, its weights), so a save meanwhile loaded another checkpoint's weights
    than the one the eval's report named. The link is resolved once, and the load says which it is."""
    import peft
    from safetensors.torch import load_file

    from fimtune import model as model_module
    from fimtune.evaluate.run import adapter_checkpoint

    base = tiny.save_model_folder(tiny.llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "base")
    run = tiny.save_run(tmp_path / "run", base, tiny_tokenizer)
    steps = [run / "checkpoints" / f"step-00000{i}" / "adapter" for i in (1, 2)]
    for seed, folder in enumerate(steps):
        torch.manual_seed(seed)
        cfg = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
        peft.get_peft_model(tiny.llama(len(tiny_tokenizer)), cfg).save_pretrained(folder)
    (run / "adapter").symlink_to(steps[0].relative_to(run))
    attach = model_module.attach_adapter

    def saved_meanwhile(model, folder, name="default"):  # the run saves step 2 while step 1 loads
        (run / "adapter").unlink()
        (run / "adapter").symlink_to(steps[1].relative_to(run))
        return attach(model, folder, name)

    monkeypatch.setattr(model_module, "attach_adapter", saved_meanwhile)
    loaded = model_module.load_run(run, torch.device("cpu"))
    first = load_file(steps[0] / "adapter_model.safetensors")
    key = next(k for k in first if "lora_A" in k)
    loaded_a = dict(loaded.model.named_parameters())[key.replace("lora_A.weight", "lora_A.default.weight")]
    assert torch.equal(loaded_a, first[key]) and loaded.adapter == steps[0].resolve()
    assert adapter_checkpoint(run, loaded.adapter) == "step-000001"


def test_a_runs_missing_or_damaged_tokenizer_is_one_error_saying_how_to_write_it_again(tmp_path, tiny_tokenizer):
    """A run's `tokenizer/` folder missing went to the Hub as an id (a minute of retries offline);
    cut short, it was a JSON traceback. Each is one line naming the folder and the way back."""
    from fimtune.model import load_run

    base = tiny.save_model_folder(tiny.llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "base")
    tiny.save_run(tmp_path / "run", base, tiny_tokenizer, _lora(base))
    folder = tmp_path / "run" / "tokenizer"
    data = (folder / "tokenizer.json").read_bytes()
    (folder / "tokenizer.json").write_bytes(data[: len(data) // 2])
    with pytest.raises(FimtuneError, match=r"tokenizer in '.*run/tokenizer' is damaged .*--resume` writes it again"):
        load_run(tmp_path / "run", torch.device("cpu"))
    shutil.rmtree(folder)
    with pytest.raises(FimtuneError, match=r"has no tokenizer folder .*--resume` writes it again"):
        load_run(tmp_path / "run", torch.device("cpu"))


def _lora(base: Path):
    """An untrained LoRA (r=2) on the model folder ``base``."""
    model = load_base_model(ModelConfig(name_or_path=str(base)), torch.device("cpu"))
    return attach_lora(model, LoraConfig(r=2, alpha=4, dropout=0.0), [])
