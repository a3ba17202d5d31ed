"""`fimtune merge`: a plain transformers model with the logits of base + adapter."""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fimtune.cli import main
from fimtune.model import load_run
from tests.runs import ROOT, model_dir, quiet_fit, run_config


@pytest.mark.parametrize(("family", "fim_in_vocab"), [("gpt_bigcode", False), ("llama", True)])
def test_merged_model_matches_base_plus_adapter(
    tmp_path, tiny_tokenizer, tiny_tokenizer_without_fim, repetitive_data, token_cache, family, fim_in_vocab
):
    tok = tiny_tokenizer if fim_in_vocab else tiny_tokenizer_without_fim
    base = model_dir(tmp_path, tok, family)
    run = quiet_fit(run_config(tmp_path, base, repetitive_data, "run", "train.max_steps=5", "train.eval_every=0"))
    old_umask = os.umask(0o022)
    try:
        assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    finally:
        os.umask(old_umask)
    # safetensors writes 0600: the weights are readable as the rest is (a model shared by a team)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "merged").iterdir()} == {0o644}

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

    # Merged in fp32, saved in the run's model.dtype (auto: the base's dtype) unless --dtype says.
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("dtype: auto", "dtype: fp16"))
    base_config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**base_config, "dtype": "bfloat16"}))  # as a bf16 base states
    weights = merged.state_dict()
    for dtype, argv in [(torch.float16, []), (torch.bfloat16, ["--dtype", "auto"])]:
        assert main(["merge", str(run), "--out", str(tmp_path / str(dtype)), *argv]) == 0
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / str(dtype)).state_dict()
        assert all(torch.equal(w, weights[n].to(dtype)) for n, w in saved.items()), dtype
    (base / "config.json").write_text(json.dumps({k: v for k, v in base_config.items() if k != "dtype"}))
    from fimtune.merge import saved_dtype

    assert saved_dtype("auto", str(base)) == torch.float32  # a base that states none


def test_merge_refuses_non_run_and_non_empty_out(tmp_path, capsys):
    assert main(["merge", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_merge_keeps_the_run_and_its_base_and_replaces_an_old_merge_only_when_done(
    tmp_path, tiny_tokenizer_without_fim, repetitive_data, token_cache, capsys, monkeypatch
):
    """--out never deletes what the merge reads (the run, a folder holding it, its base model); a
    file, a link or a folder of the run is refused by name. A run trained with an attention this
    machine lacks merges (on the CPU, with transformers' default), and the merged model stops
    where fimtune's completions stop. With --overwrite, an interrupt before the new folder is in
    place leaves the old one whole. A run with LoRA on the tied head is refused, nothing written."""
    import yaml
    from safetensors.torch import load_file, save_file

    from fimtune.generate import FimPrompter, mergeable
    from fimtune.merge import merge_run

    base = model_dir(tmp_path, tiny_tokenizer_without_fim, "gpt_bigcode")
    run = quiet_fit(run_config(tmp_path, base, repetitive_data, "run", "train.max_steps=2", "train.eval_every=0"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["attn_implementation"] = "flash_attention_2"  # trained on a GPU with flash-attn ...
    config["model"]["quantization"] = "4bit"  # ... as QLoRA: completions here load the base unquantized
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    before = sorted(p.name for p in run.iterdir())
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "link").symlink_to(run)
    refusals = {
        str(run): "holds the run folder",
        str(tmp_path): "holds the run folder",
        str(base): "holds the run's base model",
        str(run / "checkpoints"): "a folder of the run",
        str(tmp_path / "a-file"): "is a file",
        str(tmp_path / "link"): "symbolic link",
    }
    assert main(["complete", str(run), "--prefix", "def f(x):", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    for out, message in refusals.items():
        assert main(["merge", str(run), "--out", out, "--overwrite"]) == 2, out
        assert message in capsys.readouterr().err, out
    assert sorted(p.name for p in run.iterdir()) == before and (base / "config.json").is_file()
    legacy = tmp_path / "legacy"  # LoRA on the tied head, as runs could train before fimtune refused it
    shutil.copytree(run, legacy, ignore=shutil.ignore_patterns("checkpoints"))
    adapter_config = legacy / "adapter" / "adapter_config.json"
    values = json.loads(adapter_config.read_text())
    adapter_config.write_text(json.dumps({**values, "target_modules": [*values["target_modules"], "lm_head"]}))
    weights = load_file(legacy / "adapter" / "adapter_model.safetensors")
    head = load_run(run, torch.device("cpu")).model.get_base_model().lm_head.weight
    weights["base_model.model.lm_head.lora_A.weight"] = torch.randn(values["r"], head.shape[1])
    weights["base_model.model.lm_head.lora_B.weight"] = torch.randn(head.shape[0], values["r"])
    save_file(weights, legacy / "adapter" / "adapter_model.safetensors")
    assert main(["merge", str(legacy), "--out", str(tmp_path / "new" / "merged")]) == 2
    assert "has LoRA on lm_head" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert not mergeable(load_run(legacy, torch.device("cpu")).model)  # `complete` leaves it unmerged
    early = tmp_path / "early"  # a run stopped before its first checkpoint: no adapter
    early.mkdir()
    (early / "config.yaml").write_text((run / "config.yaml").read_text())
    assert main(["complete", str(early), "--prefix", "def f(x):", "--max-new-tokens", "2"]) == 2
    assert "has no adapter" in capsys.readouterr().err

    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    prompter = FimPrompter(AutoTokenizer.from_pretrained(out))
    assert merged.generation_config.eos_token_id == prompter.end_ids
    # plain `generate` goes as far as `fimtune complete` does (not transformers' default of 20 tokens)
    assert main(["complete", str(out), "--prefix", "def f(x):\n    ", "--suffix", "\n    return x\n"]) == 0
    new_tokens = int(re.search(r"(\d+) new tokens", capsys.readouterr().err).group(1))
    ids = torch.tensor([prompter.build("def f(x):\n    ", "\n    return x\n")])
    assert merged.generate(ids, attention_mask=torch.ones_like(ids)).shape[1] - ids.shape[1] == new_tokens
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    rename = type(out).rename

    def interrupted(self, target):
        if self.name.endswith(".tmp"):  # the new folder, about to take the old one's place
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(type(out), "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge_run(run, out, overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")) == []


def test_a_full_disk_while_merging_is_told_and_leaves_the_old_merge(
    tmp_path, tiny_tokenizer, repetitive_data, token_cache
):
    """A write that fails (a full disk, here a file size limit) is one clean error naming --out; no
    temporary folder is left and an old merged model stays whole."""
    base = model_dir(tmp_path, tiny_tokenizer, "gpt_bigcode")
    run = quiet_fit(run_config(tmp_path, base, repetitive_data, "run", "train.max_steps=2", "train.eval_every=0"))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an old merge that --overwrite would replace

    def fill_disk():  # files may grow to 100 kB, then writes fail with EFBIG like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    cmd = [sys.executable, "-m", "fimtune", "merge", str(run), "--out", str(out), "--overwrite"]
    # no bytecode written: Python would leave .pyc files cut at the limit, which later imports fail on
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, preexec_fn=fill_disk)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"error: could not write the merged model to '{out}'" in res.stderr and "Traceback" not in res.stderr
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")) == []


# the process sends itself SIGTERM (`timeout`, `docker stop`, a job's time limit) once the folder is written
TERMINATED_MIDWAY = """
import os, signal, sys
import fimtune.model
from fimtune.cli import main
written = fimtune.model.write_json
def write_then_terminate(*args, **kwargs):
    written(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
fimtune.model.write_json = write_then_terminate
sys.exit(main(sys.argv[1:]))
"""


def test_a_terminated_merge_leaves_no_temporary_folder_and_the_old_merge(
    tmp_path, tiny_tokenizer, repetitive_data, token_cache
):
    """SIGTERM midway ends the merge as Ctrl-C does: the temporary folder goes and an old merge stays."""
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    run = quiet_fit(run_config(tmp_path, base, repetitive_data, "run", "train.max_steps=2", "train.eval_every=0"))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an old merge that --overwrite would replace
    cmd = [sys.executable, "-c", TERMINATED_MIDWAY, "merge", str(run), "--out", str(out), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 143 and "terminated" in res.stderr, res.stderr[-2000:]
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")) == []


def test_a_merged_run_completes_as_the_run_does(tmp_path, tiny_tokenizer, repetitive_data, token_cache, capsys):
    """A run that trained on SPM examples completes with SPM prompts (`--mode auto`); its merged folder
    gave PSM prompts, and so other text for the same hole, from `complete` and `serve` alike."""
    from fimtune.serve.engine import Limits, load_engine

    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    run = quiet_fit(run_config(tmp_path, base, repetitive_data, "run", "train.max_steps=5", "train.eval_every=0"))
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    hole = ["--prefix", "def f(x):\n    y = ", "--suffix", "\n    return y\n", "--max-new-tokens", "8"]
    capsys.readouterr()
    texts = {}
    for target, mode in [(run, "auto"), (tmp_path / "merged", "auto"), (tmp_path / "merged", "psm")]:
        assert main(["complete", str(target), *hole, "--mode", mode]) == 0
        texts[target.name, mode] = capsys.readouterr().out
    assert texts["merged", "psm"] != texts["run", "auto"]  # the layouts give other text here
    assert texts["merged", "auto"] == texts["run", "auto"]
    assert load_engine(str(tmp_path / "merged"), [], Limits(), "auto")[2] == "spm"
    (tmp_path / "merged" / "fimtune.json").write_text("{cut", encoding="utf-8")
    assert main(["complete", str(tmp_path / "merged"), *hole]) == 2
    assert "fimtune.json' (" in capsys.readouterr().err
