"""The training loop end to end on tiny GPTBigCode and Llama models, on real files."""

import itertools
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fimtune import checkpoint
from fimtune.config import load_run_config
from fimtune.dataset import training_rows
from fimtune.errors import FimtuneError
from fimtune.train import forward_logits
from tests import tiny
from tests.runs import metrics, model_dir, quiet_fit, run_config


@pytest.mark.parametrize("family", ["gpt_bigcode", "llama"])
def test_loss_falls_and_only_adapter_trains(tmp_path, tiny_tokenizer, repetitive_data, token_cache, family):
    base = model_dir(tmp_path, tiny_tokenizer, family)
    run = quiet_fit(run_config(tmp_path, base, repetitive_data))
    rec = metrics(run)
    losses = [r["loss"] for r in rec if "loss" in r]
    vals = [r["val_loss"] for r in rec if "val_loss" in r]
    # A random tiny model with LoRA alone cannot go far, but it must learn the corpus's token statistics.
    assert sum(losses[-10:]) / 10 < sum(losses[:3]) / 3 - 0.2
    assert vals[-1] < vals[0] - 0.3
    # The run folder holds everything needed to reload it.
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "tokenizer/tokenizer.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "state/trainer_state.json",
        "state/training_state.pt",
    ):
        assert (run / name).exists(), name
    from safetensors.torch import load_file

    keys = load_file(str(run / "adapter" / "adapter_model.safetensors")).keys()
    assert keys and all("lora_" in k for k in keys)


@pytest.mark.parametrize("family", ["gpt_bigcode", "llama"])
def test_added_fim_tokens_train_and_reload_with_plain_peft(
    tmp_path, tiny_tokenizer_without_fim, repetitive_data, token_cache, family
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = model_dir(tmp_path, tiny_tokenizer_without_fim, family)
    run = quiet_fit(run_config(tmp_path, base, repetitive_data, "run", "train.max_steps=6"))
    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    assert len(tok) == len(tiny_tokenizer_without_fim) + 4
    assert tok.convert_tokens_to_ids("<fim_middle>") >= len(tiny_tokenizer_without_fim)

    def tuned():
        model = AutoModelForCausalLM.from_pretrained(base)
        model.resize_token_embeddings(len(tok))
        return PeftModel.from_pretrained(model, run / "adapter").eval()

    ids = torch.tensor([tok.encode("<fim_prefix>def f(x):<fim_suffix>\n<fim_middle>    return")])
    with torch.no_grad():
        torch.testing.assert_close(tuned()(ids).logits, tuned()(ids).logits, rtol=0, atol=0)
    # The reloaded model reproduces the validation loss the trained model reported.
    final = [r["val_loss"] for r in metrics(run) if "val_loss" in r][-1]
    assert validation_loss(tuned(), tok, load_run_config(run / "config.yaml")) == pytest.approx(final, rel=1e-5)


def validation_loss(model, tokenizer, cfg) -> float:
    from accelerate import Accelerator

    from fimtune.tokens import ensure_fim_tokens
    from fimtune.train import summed_loss

    fim_tokens, added = ensure_fim_tokens(tokenizer)
    assert added == []  # the saved tokenizer already holds the FIM tokens
    _, make_eval, _ = training_rows(cfg, tokenizer, fim_tokens, Accelerator(cpu=True))
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in make_eval():
            loss, n = summed_loss(model, {k: torch.as_tensor(v) for k, v in batch.items()})
            total, count = total + loss.item(), count + n
    return total / count


def test_resume_is_exact(tmp_path, tiny_tokenizer, repetitive_data, token_cache):
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    extra = ("train.max_steps=12", "train.save_every=0", "train.eval_every=4", "lora.dropout=0.1")
    whole = quiet_fit(run_config(tmp_path, base, repetitive_data, "whole", *extra))
    parted_cfg = run_config(tmp_path, base, repetitive_data, "parted", *extra)
    quiet_fit(parted_cfg, stop_after=6)
    quiet_fit(parted_cfg, resume=True)

    def by_step(run, key):
        return {r["step"]: r[key] for r in metrics(run) if key in r}

    assert by_step(whole, "loss") == by_step(tmp_path / "parted", "loss")
    assert by_step(whole, "val_loss") == by_step(tmp_path / "parted", "val_loss")
    from safetensors.torch import load_file

    wa = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "parted" / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_stop_after_says_where_the_run_stopped_and_how_to_continue(
    tmp_path, tiny_tokenizer, repetitive_data, token_cache, capsys
):
    """A run stopped on purpose says so (step, checkpoint, --resume), not only what a finished run says."""
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    cfg = run_config(tmp_path, base, repetitive_data, "run", "train.max_steps=6", "train.eval_every=0")
    quiet_fit(cfg, stop_after=3)
    out = capsys.readouterr().out
    assert "stopped after step 3 of 6 (--stop-after), checkpoint step-000003" in out and "--resume continues" in out
    quiet_fit(cfg, resume=True)
    assert "stopped" not in capsys.readouterr().out


def test_resume_says_which_checkpoint_and_step_it_continues_from(
    tmp_path, tiny_tokenizer, repetitive_data, token_cache, capsys
):
    """A resumed run names its checkpoint and step (one without `state/trainer_state.json` is passed
    over for the one before: the step said is the step trained from); a finished run says so."""
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    cfg = run_config(tmp_path, base, repetitive_data, "run", "train.max_steps=6", "train.save_every=2")
    quiet_fit(cfg, stop_after=4)
    (tmp_path / "run" / "checkpoints" / "step-000004" / "state" / "trainer_state.json").unlink()
    capsys.readouterr()
    quiet_fit(cfg, resume=True)
    assert "resuming from checkpoint step-000002 (step 2 of 6)" in capsys.readouterr().out
    quiet_fit(cfg, resume=True)
    assert "resuming from checkpoint step-000006 (step 6 of 6): the run has ended" in capsys.readouterr().out


def test_the_plan_says_which_steps_a_resumed_or_stopped_call_runs(
    tmp_path, tiny_tokenizer, repetitive_data, token_cache, capsys
):
    """`--resume` and `--stop-after` run part of the run: the plan said the whole run's steps, and
    estimated their time. A --stop-after at or before the checkpoint, and changed settings, are
    refused before any model loads (`--dry-run` too)."""
    from fimtune.cli import main
    from fimtune.train import describe_plan

    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    cfg = run_config(tmp_path, base, repetitive_data, "run", "train.max_steps=6", "train.save_every=2")
    assert "steps            6 (1,536 tokens)\n" in describe_plan(cfg)
    assert "schedule         cosine, learning rate 0.02 after 2 warmup steps\n" in describe_plan(cfg)
    long_warmup = run_config(tmp_path, base, repetitive_data, "run", "train.max_steps=6", "train.warmup_steps=6")
    epochs = run_config(tmp_path, base, repetitive_data, "run", "train.max_steps=null", "train.num_epochs=2")
    assert "steps " not in describe_plan(epochs)  # a folder without `data build`'s stats: not known
    (repetitive_data / "stats.json").write_text('{"splits": {"train": {"files": 40, "bytes": 35000}}}')
    assert "steps            about 79 (20,224 tokens); train.num_epochs=2 of about 10,000 tokens" in describe_plan(
        epochs
    )
    assert "after 6 warmup steps (not fewer than the steps: the rate never reaches it)" in describe_plan(long_warmup)
    assert "; this call runs steps 1-4 (--stop-after 4)\n" in describe_plan(cfg, 0, 4)
    quiet_fit(cfg, stop_after=4)
    args = ["train", "--config", str(tmp_path / "run" / "config.yaml"), "--resume"]
    capsys.readouterr()
    assert main([*args, "--dry-run"]) == 0
    assert "; this call runs steps 5-6 (--resume from step 4)\n" in capsys.readouterr().out
    assert main([*args, "--stop-after", "5", "--dry-run"]) == 0
    assert "this call runs steps 5-5 (--resume from step 4, --stop-after 5)" in capsys.readouterr().out
    assert main([*args, "--stop-after", "4"]) == 2
    assert "--stop-after 4: the run is at step 4 already" in capsys.readouterr().err
    assert main([*args, "train.learning_rate=1e-3", "--dry-run"]) == 2  # told now, not once the model loaded
    assert "--resume: these settings differ from the run's" in capsys.readouterr().err
    assert "none left (its checkpoint is at step 6)" in describe_plan(cfg, 6)


def test_resume_refuses_settings_that_change_the_run(tmp_path, tiny_tokenizer, repetitive_data, token_cache, caplog):
    """A resumed run's optimizer and schedule keep some old settings (the learning rate in the
    optimizer's state) and take others midway (the schedule's length): a change of the run itself is
    refused, naming it, and config.yaml stays; when to log, evaluate and save may change, and so may
    `train.num_epochs` while `train.max_steps` sets the length."""
    from dataclasses import replace

    from fimtune.train import check_resumed_config

    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    extra = ("train.max_steps=8", "train.save_every=0", "train.eval_every=4")
    quiet_fit(run_config(tmp_path, base, repetitive_data, "run", *extra), stop_after=4)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    for change in ("train.learning_rate=1e-3", "train.max_steps=16", "lora.r=4", "packing.seq_length=32", "seed=1",
                   "train.max_steps=null"):  # fmt: skip
        key = change.split("=")[0]
        with pytest.raises(FimtuneError, match=rf"--resume: these settings differ .*{key}: "):
            quiet_fit(run_config(tmp_path, base, repetitive_data, "run", *extra, change), resume=True)
        assert (tmp_path / "run" / "config.yaml").read_text() == saved
    # train.compile's default turns hashed dropout on and off with it: that may change too
    again = run_config(
        tmp_path, base, repetitive_data, "run", *extra, "train.log_every=2", "train.hashed_dropout=false"
    )
    with pytest.raises(FimtuneError, match="--stop-after 3: the run is at step 4 already"):
        quiet_fit(again, resume=True, stop_after=3)
    epochs = run_config(tmp_path, base, repetitive_data, "run", *extra, "train.num_epochs=3")  # max_steps rules
    check_resumed_config(epochs, tmp_path / "run")
    with pytest.raises(FimtuneError, match="train.num_epochs: "):  # epochs would rule: the run's length changes
        check_resumed_config(replace(epochs, train=replace(epochs.train, max_steps=None)), tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="fimtune.train"):
        run = quiet_fit(again, resume=True, stop_after=20)  # past the end: the run ends, validated
    assert "--stop-after 20: the run's last step is 8; it runs to its end" in caplog.text
    assert max(r["step"] for r in metrics(run) if "loss" in r) == 8
    assert [r["step"] for r in metrics(run) if "val_loss" in r][-1] == 8


def test_resume_refuses_another_number_of_processes(tmp_path, tiny_tokenizer, repetitive_data, token_cache, capsys):
    """Each process's place in its share of the rows is saved: on another number of processes the
    same place is other rows (run 2 x 2 rows, resumed on 1 x 4, repeated and skipped data)."""
    import json

    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    cfg = run_config(tmp_path, base, repetitive_data, "procs", "train.max_steps=4", "train.save_every=0")
    quiet_fit(cfg, stop_after=2)
    meta_file = checkpoint.latest_checkpoint(tmp_path / "procs") / "state" / "trainer_state.json"
    meta = json.loads(meta_file.read_text())
    assert meta["processes"] == 1
    meta_file.write_text(json.dumps({**meta, "processes": 2}))  # as a two-process run writes it
    with pytest.raises(FimtuneError, match="written by 2 process.*this run has 1"):
        quiet_fit(cfg, resume=True)
    # refused before the model loads (minutes for a 1B model), as the plan prints: `--dry-run` too
    from fimtune.cli import main

    config = tmp_path / "procs" / "config.yaml"
    assert main(["train", "--config", str(config), "--resume", "--dry-run"]) == 2
    assert "written by 2 process(es) and this run has 1" in capsys.readouterr().err


def test_resume_refuses_a_training_split_rebuilt_at_the_same_path(
    tmp_path, tiny_tokenizer, repetitive_data, token_cache
):
    """The checkpoint's place in the rows is a place in its data: `fimtune data build` run again into the
    same data.path (another file added) would resume it into other rows, silently."""
    import shutil

    from tests.conftest import corpus_texts, write_dataset_dir

    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    cfg = run_config(tmp_path, base, repetitive_data, "rebuilt", "train.max_steps=4", "train.save_every=0")
    quiet_fit(cfg, stop_after=2)
    texts = corpus_texts(12, lines_per_doc=12)[:10]
    shutil.rmtree(repetitive_data)
    write_dataset_dir(repetitive_data, texts * 4 + texts[:1], texts[:3])
    with pytest.raises(FimtuneError, match=r"training split of 40 documents .* now holds 41 .*new output_dir"):
        quiet_fit(cfg, resume=True)


def test_resume_refuses_a_training_split_edited_to_the_same_size(
    tmp_path, tiny_tokenizer, repetitive_data, token_cache
):
    """Files edited or put in another order keep the split's documents and tokens: its content is
    checked too, else the resumed run trains on other rows than the uninterrupted one, silently."""
    import shutil

    from tests.conftest import corpus_texts, write_dataset_dir

    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    cfg = run_config(tmp_path, base, repetitive_data, "edited", "train.max_steps=4", "train.save_every=0")
    quiet_fit(cfg, stop_after=2)
    texts = corpus_texts(12, lines_per_doc=12)[:10]
    shutil.rmtree(repetitive_data)
    write_dataset_dir(repetitive_data, (texts * 4)[::-1], texts[:3])  # the same files, another order
    with pytest.raises(FimtuneError, match=r"training split of 40 documents .* other content.*new output_dir"):
        quiet_fit(cfg, resume=True)


def test_rows_longer_than_the_models_positions(tmp_path, tiny_tokenizer, repetitive_data, token_cache, caplog):
    """GPT-BigCode's 256 learned positions: rows of 512 are refused before anything else (an index
    past them is a device-side assert on a GPU); Llama's rotary positions run past its stated
    context, with a warning."""
    from fimtune.train import make_accelerator, setup

    for family, refused in (("gpt_bigcode", True), ("llama", False)):
        base = model_dir(tmp_path, tiny_tokenizer, family)
        cfg = run_config(tmp_path, base, repetitive_data, f"long-{family}", "packing.seq_length=512")
        caplog.clear()
        if refused:
            with pytest.raises(FimtuneError, match="packing.seq_length=512 is longer than the model's 256 learned"):
                setup(cfg, make_accelerator(cfg))
        else:
            with caplog.at_level(logging.WARNING):
                setup(cfg, make_accelerator(cfg))
            assert "past the model's stated context of 256" in caplog.text


def test_a_run_trained_with_relative_paths_loads_from_any_folder(
    tmp_path, tiny_tokenizer, repetitive_data, token_cache, monkeypatch
):
    from fimtune.config import load_run_config as load
    from fimtune.model import load_run

    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    monkeypatch.chdir(tmp_path)
    rel = [f"model.name_or_path={base.name}", f"data.path={repetitive_data.relative_to(tmp_path)}"]
    cfg = run_config(tmp_path, base, repetitive_data, "rel", "train.max_steps=2", *rel, "output_dir=rel")
    assert cfg.model.name_or_path == base.name and cfg.output_dir == "rel"
    quiet_fit(cfg, stop_after=1)
    saved = load(tmp_path / "rel" / "config.yaml")
    assert (saved.model.name_or_path, saved.data.path) == (str(base), str(repetitive_data))
    quiet_fit(cfg, resume=True)  # the same relative settings resume it
    monkeypatch.chdir(tmp_path.parent)
    assert load_run(tmp_path / "rel", torch.device("cpu")).model is not None


def test_resume_without_a_checkpoint_says_the_run_starts_over(
    tmp_path, tiny_tokenizer, repetitive_data, token_cache, caplog
):
    """`--resume` of a run stopped before its first checkpoint (or of a mistyped output_dir) trains
    from step 0, and says so."""
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    with caplog.at_level("WARNING", logger="fimtune"):
        run = quiet_fit(run_config(tmp_path, base, repetitive_data, "new", "train.max_steps=2"), resume=True)
    assert f"--resume: '{run}' holds no checkpoint yet: the run starts at step 0" in caplog.text
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2]


def test_resume_into_a_folder_with_its_own_config_yaml_is_refused(tmp_path):
    """`--resume` with output_dir at a project folder (one holding its own config.yaml, no run's)
    trained from step 0 into it, writing the resolved config over the project's config.yaml."""
    from fimtune.train import prepare_run_dir

    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("# mine\ntrain:\n  max_steps: 5\n")
    (project / "notes.md").write_text("notes\n")
    with pytest.raises(FimtuneError, match=f"--resume: '{project}' holds no checkpoint to resume from"):
        prepare_run_dir(project, resume=True)
    run = tmp_path / "run"  # a run stopped before its first checkpoint: its config and tokenizer
    (run / "tokenizer").mkdir(parents=True)
    (run / "config.yaml").write_text("output_dir: run\n")
    (run / "tokenizer" / "tokenizer_config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    assert prepare_run_dir(run, resume=True) is False  # starts over
    assert prepare_run_dir(tmp_path / "new", resume=True) is False


def test_a_data_path_that_is_no_dataset_is_refused_before_the_model_loads(tmp_path, tiny_tokenizer, monkeypatch):
    """Loading a 1B model takes a minute or more: a mistyped data.path must fail first."""
    from fimtune import model as model_module
    from fimtune.errors import DataError

    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    monkeypatch.setattr(model_module, "load_base_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(DataError, match="'.*no-such-data' is not a dataset folder: build one with `fimtune data build"):
        quiet_fit(run_config(tmp_path, base, tmp_path / "no-such-data"))
    assert not (tmp_path / "run").exists()


def test_new_run_refuses_a_non_empty_folder(tmp_path, tiny_tokenizer, repetitive_data, token_cache):
    from fimtune.errors import FimtuneError

    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("keep me")
    with pytest.raises(FimtuneError, match="--resume"):
        quiet_fit(run_config(tmp_path, base, repetitive_data))
    with pytest.raises(FimtuneError, match="no checkpoint"):
        quiet_fit(run_config(tmp_path, base, repetitive_data), resume=True)
    assert (tmp_path / "run" / "x").read_text() == "keep me"


def test_a_validation_split_too_small_for_one_row_or_no_batches_is_told(
    tmp_path, tiny_tokenizer, repetitive_data, caplog
):
    from accelerate import Accelerator

    from fimtune.tokens import ensure_fim_tokens

    base = model_dir(tmp_path, tiny_tokenizer, "gpt_bigcode")
    fim_tokens, _ = ensure_fim_tokens(tiny_tokenizer)
    for length, told in ((64, False), (2048, True)):  # 3 validation files of ~150 tokens
        caplog.clear()
        cfg = run_config(tmp_path, base, repetitive_data, f"small-{length}", f"packing.seq_length={length}")
        with caplog.at_level(logging.WARNING):
            _, make_eval, _ = training_rows(cfg, tiny_tokenizer, fim_tokens, Accelerator(cpu=True))
        assert (next(make_eval(), None) is None) == told
        assert ("no validation loss will be logged" in caplog.text) == told
    caplog.clear()
    cfg = run_config(tmp_path, base, repetitive_data, "none", "packing.seq_length=64", "train.eval_batches=0")
    with caplog.at_level(logging.WARNING):
        training_rows(cfg, tiny_tokenizer, fim_tokens, Accelerator(cpu=True))
    assert "train.eval_batches is 0: no validation loss will be logged" in caplog.text  # said, not silent


@pytest.fixture
def flash_attention_2_on_the_cpu(monkeypatch):
    """transformers' FlashAttention-2 path with its two CUDA kernels (dense causal, and causal per
    packed document) replaced by SDPA references: what reaches which kernel is transformers' own."""
    import transformers.modeling_flash_attention_utils as fa

    def dense(q, k, v, dropout_p=0.0, softmax_scale=None, causal=True, **_):  # (B, T, H, D)
        k, v = (x.repeat_interleave(q.shape[2] // x.shape[2], 2) for x in (k, v))
        out = F.scaled_dot_product_attention(
            *(x.transpose(1, 2) for x in (q, k, v)), is_causal=True, scale=softmax_scale
        )
        return out.transpose(1, 2)

    def per_document(q, k, v, cu_seqlens_q=None, max_seqlen_q=None, softmax_scale=None, **_):  # (tokens, H, D)
        bounds = cu_seqlens_q.tolist()
        pieces = [
            dense(*(x[None, a:b] for x in (q, k, v)), softmax_scale=softmax_scale)[0]
            for a, b in itertools.pairwise(bounds)
        ]
        return torch.cat(pieces)

    def kernels(*args, **kwargs):
        return (dense, per_document, None, fa._pad_input, fa._unpad_input), (
            fa._lazy_define_process_function(per_document),
            None,
        )

    monkeypatch.setattr(fa, "lazy_import_flash_attention", kernels)


@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
@pytest.mark.parametrize("family", ["gpt_bigcode", "llama"])
def test_packed_attention_stays_inside_documents(tiny_tokenizer, family, attn, request):
    """With restarting position ids, a token's logits ignore other documents in the row, in rows of
    two (FlashAttention-2: transformers' dispatch, the kernels references on the CPU)."""
    make = {"gpt_bigcode": tiny.gpt_bigcode, "llama": tiny.llama}[family]
    model = make(len(tiny_tokenizer))
    model.set_attn_implementation("sdpa")
    g = torch.Generator().manual_seed(0)
    doc_a = torch.randint(5, 500, (10,), generator=g)
    doc_b1, doc_b2 = torch.randint(5, 500, (6,), generator=g), torch.randint(5, 500, (6,), generator=g)
    pos = torch.cat([torch.arange(6), torch.arange(10)])[None].expand(2, -1)
    with torch.no_grad():
        alone = model(input_ids=doc_a[None]).logits[0]
        crossing = model(input_ids=torch.cat([doc_b2, doc_a])[None]).logits[0, 6:]
        if attn != "sdpa":
            request.getfixturevalue("flash_attention_2_on_the_cpu")
            model.config._attn_implementation = attn  # set_attn_implementation wants the package
        rows = torch.stack([torch.cat([doc_b1, doc_a]), torch.cat([doc_b2, doc_a])])
        l1, l2 = forward_logits(model, {"input_ids": rows, "position_ids": pos})[:, 6:]
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    torch.testing.assert_close(l1, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(crossing, alone, atol=1e-3)  # without position ids, attention crosses


def test_dry_run_prints_the_seed_plan_offline():
    res = subprocess.run(
        [sys.executable, "-m", "fimtune", "train", "--config", "configs/seed-starcoderbase-1b.yaml", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert res.returncode == 0, res.stderr
    assert "2,777,088" in res.stdout and "tokens per step  8,192" in res.stdout
    assert "q_attn matches no module" in res.stderr


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_tokenizer, repetitive_data, token_cache):
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    extra = ("train.max_steps=4", "train.eval_every=0", "lora.dropout=0.0")
    plain = quiet_fit(run_config(tmp_path, base, repetitive_data, "plain", *extra))
    ckpt = quiet_fit(run_config(tmp_path, base, repetitive_data, "ckpt", *extra, "train.gradient_checkpointing=true"))
    a = [r["loss"] for r in metrics(plain) if "loss" in r]
    b = [r["loss"] for r in metrics(ckpt) if "loss" in r]
    assert len(a) == 4 and a == pytest.approx(b, rel=1e-4)


def test_checkpointed_blocks_skip_the_first_blocks_input_gradient(tiny_tokenizer):
    """Non-reentrant checkpointing: the embeddings' output asks for no gradient (the first block's
    input gradient would go nowhere), and the LoRA gradients are those of the model without it."""
    from accelerate.utils import DistributedType

    from fimtune.config import load_run_config
    from fimtune.train import prepare_model
    from tests.test_engines import accelerator

    ids = torch.randint(5, len(tiny_tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    grads = {}
    for checkpointing in (False, True):
        cfg = load_run_config(
            None,
            [
                "model.name_or_path=x",
                "train.compile=false",
                "lora.dropout=0.0",
                f"train.gradient_checkpointing={checkpointing}",
            ],
        )
        model, _ = prepare_model(tiny.llama(len(tiny_tokenizer)), cfg, accelerator(DistributedType.NO, 1), [])
        model.train()
        asked = []
        model.get_input_embeddings().register_forward_hook(
            lambda m, i, out, asked=asked: asked.append(out.requires_grad)
        )
        model(input_ids=ids, labels=ids).loss.backward()
        assert asked == [False]
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) == 2 * 7 * 2  # A and B, 7 modules, 2 layers
    for name, grad in grads[False].items():
        assert grad.abs().sum() > 0 or "lora_A" in name  # B starts at zero, so A's first gradient is zero
        torch.testing.assert_close(grads[True][name], grad, msg=name)


def test_fp8_base_trains_near_the_plain_run_and_saves_a_plain_adapter(
    tmp_path, tiny_tokenizer, repetitive_data, token_cache, caplog
):
    """`train.fp8_base`: the frozen products round to FP8 (here through the CPU's `_scaled_mm`), so the
    losses move a little from the plain run's, not far; the adapter holds LoRA's tensors only."""
    from safetensors.torch import load_file

    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    extra = ("train.max_steps=6", "train.eval_every=0", "lora.dropout=0.0")
    plain = quiet_fit(run_config(tmp_path, base, repetitive_data, "plain", *extra))
    with caplog.at_level(logging.INFO, logger="fimtune.train"):
        fp8 = quiet_fit(run_config(tmp_path, base, repetitive_data, "fp8", *extra, "train.fp8_base=true"))
    assert "the frozen base's products in FP8, scaled a row at a time (14 layers)" in caplog.text
    a = [r["loss"] for r in metrics(plain) if "loss" in r]
    b = [r["loss"] for r in metrics(fp8) if "loss" in r]
    assert len(a) == len(b) == 6 and a != b and b == pytest.approx(a, rel=0.05)
    keys = lambda run: load_file(str(run / "adapter" / "adapter_model.safetensors")).keys()  # noqa: E731
    assert keys(fp8) == keys(plain)


def test_resume_may_turn_fp8_base_on(tmp_path, tiny_tokenizer, repetitive_data, token_cache):
    """`train.fp8_base` is how the frozen products are computed (their precision), not the run itself:
    a run resumes with it turned on, as it may with another `train.mixed_precision`."""
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    extra = ("train.max_steps=4", "train.save_every=0", "train.eval_every=0", "lora.dropout=0.0")
    quiet_fit(run_config(tmp_path, base, repetitive_data, "run", *extra), stop_after=2)
    run = quiet_fit(run_config(tmp_path, base, repetitive_data, "run", *extra, "train.fp8_base=true"), resume=True)
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2, 3, 4]


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path, tiny_tokenizer, repetitive_data, token_cache):
    """Loss normalised by the label tokens of the whole step: 2 x 2 rows == 1 x 4 rows."""
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    extra = ("train.max_steps=3", "train.eval_every=0", "lora.dropout=0.0")
    big = quiet_fit(run_config(tmp_path, base, repetitive_data, "big", *extra))
    acc = quiet_fit(
        run_config(
            tmp_path, base, repetitive_data, "acc", *extra, "train.batch_size=2", "train.gradient_accumulation_steps=2"
        )
    )
    a = [r["loss"] for r in metrics(big) if "loss" in r]
    b = [r["loss"] for r in metrics(acc) if "loss" in r]
    assert a == pytest.approx(b, rel=1e-5)


def test_under_cuda_graphs_accumulated_gradients_are_added_into_the_parameters_own(
    tmp_path, tiny_tokenizer, repetitive_data, token_cache
):
    """With `train.cuda_graphs` and micro-batches, each trainable parameter keeps one gradient
    tensor of its own, zeroed after each step and added into by each micro-batch's backward pass
    (a gradient taken from a CUDA graph's output would be written over by the next micro-batch's
    replay); the steps' losses and weights are those of gradients set anew each step."""
    import dataclasses

    from fimtune.train import make_accelerator, setup, train_step

    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    extra = ("train.batch_size=2", "train.gradient_accumulation_steps=2", "lora.dropout=0.0", "train.eval_every=0")
    runs = {}
    for graphs in (False, True):
        cfg = run_config(tmp_path, base, repetitive_data, f"graphs-{graphs}", *extra)
        s = setup(cfg, make_accelerator(cfg))  # compiles nothing on a CPU: the loop is what is tested
        s = dataclasses.replace(s, cuda_graphs=graphs)
        s.model.train()
        params = [p for g in s.optimizer.param_groups for p in g["params"]]
        losses, storages = [], []
        for step in range(3):
            losses.append(train_step(s, cfg.train, tmp_path, step)()[0])
            storages.append([None if p.grad is None else p.grad.data_ptr() for p in params])
        runs[graphs] = losses, storages, [p.detach().clone() for p in params]
        if graphs:
            assert all(p.grad is not None and not p.grad.any() for p in params)  # zeroed, kept
            assert storages[0] == storages[1] == storages[2]
        else:
            assert all(p.grad is None for p in params)
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(runs[True][2], runs[False][2], strict=True))


def test_each_step_is_logged_in_order_though_its_loss_is_read_a_step_later(
    tmp_path, tiny_tokenizer, repetitive_data, token_cache
):
    """The loop reads a step's loss once the next step is queued: the log keeps step order, with the
    validation of step k after step k's line, and a save or a stop reads the loss first."""
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    extra = ("train.max_steps=7", "train.eval_every=3", "train.save_every=0", "train.log_every=2")
    run = quiet_fit(run_config(tmp_path, base, repetitive_data, "order", *extra), stop_after=5)
    events = [("loss" if "loss" in r else "val", r["step"]) for r in metrics(run)]
    assert events == [("val", 0), ("loss", 2), ("val", 3), ("loss", 4)]  # stopped after step 5: no line for it
    run = quiet_fit(run_config(tmp_path, base, repetitive_data, "order", *extra), resume=True)
    events = [("loss" if "loss" in r else "val", r["step"]) for r in metrics(run)]
    assert events == [
        ("val", 0),
        ("loss", 2),
        ("val", 3),
        ("loss", 4),
        ("loss", 6),
        ("val", 6),
        ("loss", 7),
        ("val", 7),
    ]
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in metrics(run) if "loss" in r)
    # Each step's time is its own, also next to a save or a validation (a step read at once after
    # another was read used to count as taking no time at all, the next one as taking two steps).
    extra = ("train.max_steps=6", "train.eval_every=3", "train.save_every=2", "train.log_every=1")
    timed = metrics(quiet_fit(run_config(tmp_path, base, repetitive_data, "timed", *extra)))
    speeds = [r["tokens_per_s"] for r in timed if "loss" in r]
    assert len(speeds) == 6 and max(speeds) < 10 * min(speeds), speeds


@pytest.mark.parametrize("tokenizer", ["tiny_tokenizer", "tiny_tokenizer_without_fim"])
def test_clipping_takes_every_trainable_parameter_and_no_frozen_one(
    tmp_path, repetitive_data, token_cache, request, tokenizer
):
    """The step clips the optimizer's parameters (no walk over the frozen model): they must be
    exactly the trainable ones, or the norm would be off; with a tokenizer that lacks the FIM
    tokens, the rows training adds for them are among them."""
    from fimtune.train import _clipped_parameters, make_accelerator, setup

    base = model_dir(tmp_path, request.getfixturevalue(tokenizer), "gpt_bigcode")
    cfg = run_config(tmp_path, base, repetitive_data, "clip")
    s = setup(cfg, make_accelerator(cfg))
    clipped = _clipped_parameters(s)
    trainable = {name: p for name, p in s.model.named_parameters() if p.requires_grad}
    assert isinstance(clipped, list) and len(clipped) == len(trainable) > 0
    assert {id(p) for p in clipped} == {id(p) for p in trainable.values()}
    assert len(trainable) < len(list(s.model.parameters()))
    beside_lora = [name for name in trainable if "lora_" not in name]
    assert bool(beside_lora) == (tokenizer == "tiny_tokenizer_without_fim"), beside_lora


@pytest.mark.gpu
@pytest.mark.parametrize("max_grad_norm", ["1.0", "0"])
def test_a_training_step_never_waits_for_the_gpu(tmp_path, tiny_tokenizer, repetitive_data, token_cache, max_grad_norm):
    """Under CUDA's sync debug mode any host read of a device value in the step raises (also with
    clipping off, whose gradient norm of 0 is made on the device)."""
    from fimtune.train import make_accelerator, setup, train_step

    base = model_dir(tmp_path, tiny_tokenizer, "gpt_bigcode")
    extra = ("train.mixed_precision=bf16", "train.max_steps=8", f"train.max_grad_norm={max_grad_norm}")
    cfg = run_config(tmp_path, base, repetitive_data, "sync", *extra)
    s = setup(cfg, make_accelerator(cfg))
    s.model.train()
    train_step(s, cfg.train, tmp_path, 0)()  # compiles; allocations settle
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        queued = [train_step(s, cfg.train, tmp_path, step) for step in range(1, 4)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(0 < q()[0] < 20 for q in queued)


@pytest.mark.gpu
def test_label_tokens_of_several_processes_are_summed_on_the_gpu_without_a_wait():
    """A step's label tokens over several processes: counted on the host, summed on the device,
    made there with no copy that waits for the step queued before."""
    from types import SimpleNamespace

    from fimtune.train import _global_label_tokens

    acc = SimpleNamespace(num_processes=2, device=torch.device("cuda"), reduce=lambda t, _: t * 2)
    rows = [{"labels": [[7, 1, -100, 3]]}, {"labels": [[7, -100, -100, 5]]}]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        summed = _global_label_tokens(acc, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert summed.device.type == "cuda" and int(summed) == 2 * 3  # the first token of a row has no label


def test_validation_batches_all_have_the_first_ones_rows_and_the_same_loss(tmp_path, tiny_tokenizer, repetitive_data):
    """A short last validation batch is filled with copies of its last row without labels: compiled
    blocks never see another shape (torch.compile would compile them again for any number of rows,
    the training step's too), and the loss and its label tokens are those of the rows one by one."""
    from fimtune.train import make_accelerator, setup, validate

    base = model_dir(tmp_path, tiny_tokenizer, "gpt_bigcode")
    results = {}
    for rows in (1, 3):
        cfg = run_config(tmp_path, base, repetitive_data, f"val-{rows}", f"train.batch_size={rows}")
        s = setup(cfg, make_accelerator(cfg))
        shapes: list[tuple[int, ...]] = []
        s.model.register_forward_pre_hook(
            lambda m, a, kw, seen=shapes: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True
        )
        results[rows] = validate(s, None)
        if rows == 3:
            assert sum(len(b["labels"]) for b in s.make_eval_rows()) % 3  # a short last batch to fill
            assert len(shapes) > 1 and set(shapes) == {shapes[0]} and shapes[0][0] == 3
    assert results[3]["val_tokens"] == results[1]["val_tokens"]
    assert results[3]["val_loss"] == pytest.approx(results[1]["val_loss"], rel=1e-5)


@pytest.mark.gpu
def test_validation_reads_the_gpu_at_its_end_not_at_each_batch(tmp_path, tiny_tokenizer, repetitive_data, token_cache):
    """Validation's host waits for the GPU do not grow with its batches (CUDA's sync debug mode
    warns at each), and its loss is the same whichever way it is read."""
    import warnings

    from fimtune.train import make_accelerator, setup, validate

    base = model_dir(tmp_path, tiny_tokenizer, "gpt_bigcode")
    cfg = run_config(tmp_path, base, repetitive_data, "val-sync", "train.mixed_precision=bf16")
    s = setup(cfg, make_accelerator(cfg))
    validate(s, 3)  # compiles

    def waits(batches: int) -> tuple[int, dict]:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = validate(s, batches)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught), result

    (one, first), (three, all_three) = waits(1), waits(3)
    assert three == one
    assert 0 < first["val_tokens"] < all_three["val_tokens"]


def fit_losses(tmp_path: Path, base: Path, data: Path, name: str, *extra: str) -> list[float]:
    """A fresh compile's run: its training and validation losses, in the order logged."""
    torch._dynamo.reset()
    run = quiet_fit(run_config(tmp_path, base, data, name, *extra))
    return [r[k] for r in metrics(run) for k in ("loss", "val_loss") if k in r]


def no_dropout_model(tmp_path: Path, tokenizer) -> Path:
    """The tiny GPT-BigCode without its dropouts: two runs give the same steps."""
    model = tiny.gpt_bigcode(len(tokenizer))
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
    return tiny.save_model_folder(model, tokenizer, tmp_path / "base-no-dropout")


@pytest.mark.gpu
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_blocks_replayed_as_cuda_graphs_train_as_the_compiled_blocks(
    tmp_path, tiny_tokenizer, repetitive_data, token_cache, micro_batches
):
    """`train.cuda_graphs`: the steps' losses and gradient norms as without CUDA graphs, read after
    later steps replayed the graphs (and validation ran between), and no graph skipped; also with
    two micro-batches a step, whose second replays the graphs over the first's outputs; and (FP8
    GPUs) with the frozen products in FP8, near them."""
    from torch._dynamo.utils import counters

    base = no_dropout_model(tmp_path, tiny_tokenizer)
    extra = ("train.mixed_precision=bf16", "train.max_steps=6", "train.eval_every=3", "lora.dropout=0.0")
    extra += (f"train.batch_size={4 // micro_batches}", f"train.gradient_accumulation_steps={micro_batches}")

    def run(name: str, *more: str) -> tuple[list[float], list[float]]:
        losses = fit_losses(tmp_path, base, repetitive_data, name, *extra, *more)
        return losses, [r["grad_norm"] for r in metrics(tmp_path / name) if "grad_norm" in r]

    plain, plain_norms = run("plain")
    skips = counters["inductor"]["cudagraph_skips"]
    graphed, graphed_norms = run("graphs", "train.cuda_graphs=true")
    assert counters["inductor"]["cudagraph_skips"] == skips
    assert graphed == pytest.approx(plain, rel=1e-2)
    assert len(graphed_norms) == 6 and graphed_norms == pytest.approx(plain_norms, rel=2e-2)
    if torch.cuda.get_device_capability() >= (8, 9):  # with the frozen products in FP8 (run 10's fastest)
        fp8, fp8_norms = run("graphs-fp8", "train.cuda_graphs=true", "train.fp8_base=true")
        assert counters["inductor"]["cudagraph_skips"] == skips
        assert fp8 == pytest.approx(plain, rel=0.05) and fp8_norms == pytest.approx(plain_norms, rel=0.1)
    torch._dynamo.reset()


@pytest.mark.slow
def test_the_cuda_graphs_option_marks_each_step_pads_the_bounds_and_trains_as_without(
    tmp_path, tiny_tokenizer, repetitive_data, token_cache, monkeypatch
):
    """On a CPU (compiled blocks, no graphs there): each training step and validation batch is
    marked as a new step, the documents' bounds come padded with empty documents, and the losses
    are the eager run's."""
    from fimtune import fast

    base = no_dropout_model(tmp_path, tiny_tokenizer)
    extra = ("model.attn_implementation=varlen", "train.max_steps=4", "train.eval_every=2", "lora.dropout=0.0")
    extra += ("train.eval_batches=2",)
    marks, bounds = [], []
    mark, pad = torch.compiler.cudagraph_mark_step_begin, fast.padded_bounds
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1) or mark())
    monkeypatch.setattr(fast, "padded_bounds", lambda cu: bounds.append((cu.numel(), len(pad(cu)))) or pad(cu))

    def losses(name: str, *more: str) -> list[float]:
        return fit_losses(tmp_path, base, repetitive_data, name, *extra, *more)

    eager = losses("eager")
    assert not marks and not bounds
    graphed = losses("graphs", "train.cuda_graphs=true", "train.compile=true")
    torch._dynamo.reset()
    validations = len(graphed) - 4
    assert graphed == pytest.approx(eager, rel=1e-4) and validations >= 2
    assert len(marks) == 4 + 2 * validations  # 4 steps, each validation's 2 batches
    assert bounds and all(padded >= n and padded & (padded - 1) == 0 for n, padded in bounds)
    assert any(padded > n for n, padded in bounds)  # some batch had empty documents added


def test_cuda_graphs_are_refused_where_blocks_cannot_replay_them(tmp_path, tiny_tokenizer, repetitive_data):
    from fimtune.errors import FimtuneError

    base = model_dir(tmp_path, tiny_tokenizer, "gpt_bigcode")
    for more, why in [
        (("train.compile=false",), "compiled blocks"),
        (("train.compile=true", "train.gradient_checkpointing=true"), "checkpointed blocks"),
    ]:
        cfg = run_config(tmp_path, base, repetitive_data, "refused", "train.cuda_graphs=true", *more)
        with pytest.raises(FimtuneError, match=f"train.cuda_graphs: .*{why}"):
            quiet_fit(cfg)
        assert not (tmp_path / "refused").exists()  # the run folder it made is gone with it


@pytest.mark.gpu
def test_batches_go_to_the_gpu_from_host_lists_and_tensors_and_stay_there_if_already_on_it():
    from fimtune.train import _to_device

    cuda = torch.device("cuda")
    batch = {
        "input_ids": [[1, 2, 3]],
        "labels": torch.tensor([[1, 2, 3]]),
        "position_ids": torch.arange(3)[None].to(cuda),
    }
    moved = _to_device(batch, cuda)
    torch.cuda.synchronize()
    assert all(t.is_cuda for t in moved.values()) and moved["input_ids"].tolist() == [[1, 2, 3]]
    assert moved["position_ids"] is batch["position_ids"]


@pytest.mark.gpu
def test_qlora_trains_on_cuda(tmp_path, tiny_tokenizer, repetitive_data, token_cache):
    pytest.importorskip("bitsandbytes")
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    run = quiet_fit(run_config(tmp_path, base, repetitive_data, "q", "model.quantization=4bit", "train.max_steps=3"))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics(run) if "loss" in r)


@pytest.mark.gpu
def test_fp8_base_and_checkpointing_train_on_cuda(tmp_path, tiny_tokenizer, repetitive_data, token_cache):
    """bf16 on the GPU (blocks uncompiled, for time): FP8 products near the plain run's losses and
    gradient norms where the GPU has FP8 units (uncompiled and without graphs, unlike the graphs'
    test, whose FP8 arm gave ~0.6x the norms in run 11); checkpointed blocks without the first
    block's input gradient, the same losses."""
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    extra = ("train.max_steps=4", "train.eval_every=0", "lora.dropout=0.0", "train.mixed_precision=bf16")
    extra += ("train.compile=false",)

    def losses(name: str, *more: str) -> tuple[list[float], list[float]]:
        rows = metrics(quiet_fit(run_config(tmp_path, base, repetitive_data, name, *extra, *more)))
        return [r["loss"] for r in rows if "loss" in r], [r["grad_norm"] for r in rows if "grad_norm" in r]

    plain, plain_norms = losses("plain")
    assert losses("ckpt", "train.gradient_checkpointing=true")[0] == pytest.approx(plain, rel=1e-2)
    if torch.cuda.get_device_capability() >= (8, 9):
        fp8, fp8_norms = losses("fp8", "train.fp8_base=true")
        assert fp8 == pytest.approx(plain, rel=0.05)
        assert len(fp8_norms) == 4 and fp8_norms == pytest.approx(plain_norms, rel=0.1)


@pytest.mark.slow
def test_embedded_model_learns_an_installed_package(tmp_path):
    """SmolLM2 (the embedded default) on a corpus built from installed source: validation loss falls."""
    from fimtune.cli import main

    assert main(["data", "build", "--package", "pathspec", "--out", str(tmp_path / "data"), "--quiet"]) == 0
    cfg = load_run_config(
        Path(__file__).parents[1] / "configs" / "smollm2-demo.yaml",
        [
            f"data.path={tmp_path / 'data'}",
            f"output_dir={tmp_path / 'run'}",
            "packing.seq_length=256",
            "train.max_steps=12",
            "train.eval_every=12",
            "train.eval_batches=3",
            "train.save_every=0",
        ],
    )
    run = quiet_fit(cfg)
    vals = [r["val_loss"] for r in metrics(run) if "val_loss" in r]
    assert len(vals) >= 2 and vals[-1] < vals[0]


def test_optimizer_groups_leave_out_empty_ones(tiny_tokenizer):
    from fimtune.config import LoraConfig
    from fimtune.model import attach_lora
    from fimtune.train import param_groups

    model = attach_lora(tiny.llama(len(tiny_tokenizer)), LoraConfig(r=4, alpha=8, dropout=0.0), [])
    groups = param_groups(model, 0.1)  # LoRA alone: matrices only, so no group without decay
    assert [g["weight_decay"] for g in groups] == [0.1] and groups[0]["params"]
    model.base_model.model.model.norm.weight.requires_grad_(True)
    assert [len(g["params"]) for g in param_groups(model, 0.1)] == [len(groups[0]["params"]), 1]


def test_checkpoint_with_an_empty_group_still_loads():
    """A checkpoint written when `param_groups` still returned an empty no-decay group."""
    from transformers import get_scheduler

    from fimtune.train import drop_empty_groups

    def optimizer_and_schedule(groups):
        opt = torch.optim.AdamW(groups, lr=1e-2)
        return opt, get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=10)

    w = torch.nn.Parameter(torch.ones(3, 3))
    old_opt, old_sched = optimizer_and_schedule(
        [{"params": [w], "weight_decay": 0.1}, {"params": [], "weight_decay": 0}]
    )
    for _ in range(3):
        w.grad = torch.full_like(w, 0.5)
        old_opt.step()
        old_sched.step()
    opt_state, sched_state = old_opt.state_dict(), old_sched.state_dict()
    drop_empty_groups(opt_state, sched_state)
    new_opt, new_sched = optimizer_and_schedule([{"params": [w], "weight_decay": 0.1}])
    new_opt.load_state_dict(opt_state)
    new_sched.load_state_dict(sched_state)
    new_sched.step()
    old_sched.step()
    assert new_sched.get_last_lr() == old_sched.get_last_lr()[:1]
    assert torch.equal(new_opt.state[w]["exp_avg"], old_opt.state[w]["exp_avg"])


def test_resume_refuses_a_differently_split_optimizer_state(tmp_path):
    from fimtune.errors import FimtuneError
    from fimtune.train import check_same_sharding

    split = {"optimizer_sharding": "DeepSpeed ZeRO-2", "world_size": 2}
    check_same_sharding(tmp_path, {}, None, 4)  # whole state: any number of DDP processes
    check_same_sharding(tmp_path, split, "DeepSpeed ZeRO-2", 2)
    with pytest.raises(FimtuneError, match="DeepSpeed ZeRO-2 on 2 process.*DeepSpeed ZeRO-2 on 4 process"):
        check_same_sharding(tmp_path, split, "DeepSpeed ZeRO-2", 4)
    with pytest.raises(FimtuneError, match="under one process or DDP .* under FSDP on 2"):
        check_same_sharding(tmp_path, {}, "FSDP", 2)
    with pytest.raises(FimtuneError, match="number of processes it was trained with"):
        check_same_sharding(tmp_path, split, None, 1)


def test_an_adapter_without_weights_is_refused(tmp_path):
    from safetensors.torch import save_file

    from fimtune.errors import FimtuneError
    from fimtune.train import check_not_empty

    model = torch.nn.Linear(2, 2)
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(FimtuneError, match="without weights"):
        check_not_empty(tmp_path / "empty.safetensors", model)
    model.requires_grad_(False)
    check_not_empty(tmp_path / "empty.safetensors", model)  # nothing trains: nothing to save
    save_file({"w": torch.zeros(1)}, str(tmp_path / "full.safetensors"))
    check_not_empty(tmp_path / "full.safetensors", torch.nn.Linear(2, 2))


def test_resume_refuses_an_adapter_that_does_not_fit(tmp_path, tiny_tokenizer, repetitive_data, token_cache):
    """PEFT loads the weights whose names match and ignores the rest: a resume must not start half-fresh."""
    from safetensors.torch import load_file, save_file

    from fimtune.errors import FimtuneError

    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    cfg = run_config(tmp_path, base, repetitive_data, "run", "train.max_steps=2", "train.eval_every=0")
    quiet_fit(cfg, stop_after=1)
    path = tmp_path / "run" / "adapter" / "adapter_model.safetensors"
    weights = load_file(str(path))
    save_file({k.replace("layers.", "blocks."): v for k, v in weights.items()}, str(path))
    with pytest.raises(FimtuneError, match=f"{len(weights)} of its {len(weights)} weights match no parameter"):
        quiet_fit(cfg, resume=True)


def test_a_log_line_has_the_mean_loss_of_its_steps_and_the_rate_its_last_step_used(
    tmp_path, tiny_tokenizer, repetitive_data, token_cache
):
    """As transformers' Trainer logs them: the loss is the mean over the steps since the last line
    (not the last step's alone), and the learning rate is the one the step used (the first step of
    a warm-up uses 0), also across a resume between two lines."""
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    extra = ("train.max_steps=6", "train.eval_every=0", "train.save_every=0", "train.warmup_steps=3")

    def lines(name: str, *more: str, **kw) -> dict[int, dict]:
        run = quiet_fit(run_config(tmp_path, base, repetitive_data, name, *extra, *more), **kw)
        return {r["step"]: r for r in metrics(run) if "loss" in r}

    each = lines("each", "train.log_every=1")
    assert each[1]["lr"] == 0.0 and 0 < each[2]["lr"] < each[3]["lr"]
    lr = float(run_config(tmp_path, base, repetitive_data).train.learning_rate)
    assert each[4]["lr"] == pytest.approx(lr)  # the warm-up's end: step 4 is the first at the full rate
    by3 = lines("by3", "train.log_every=3")
    assert sorted(by3) == [3, 6]
    for end in (3, 6):
        assert by3[end]["loss"] == pytest.approx(sum(each[k]["loss"] for k in range(end - 2, end + 1)) / 3, rel=1e-6)
        assert by3[end]["lr"] == each[end]["lr"]
    lines("parted", "train.log_every=3", stop_after=4)
    parted = lines("parted", "train.log_every=3", resume=True)
    assert parted[6]["loss"] == pytest.approx(by3[6]["loss"], rel=1e-6)  # steps 5-6 after the resume, 4 before


def with_cpu_scaler(make, init_scale: float):
    """``make`` (fimtune's make_accelerator) whose accelerator has a loss scaler, as accelerate's has
    under fp16 (a CPU has none): the gradients are unscaled before they are clipped."""

    def made(cfg):
        acc = make(cfg)
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        acc.unscale_gradients = lambda optimizer=None: [acc.scaler.unscale_(o.optimizer) for o in acc._optimizers]
        return acc

    return made


def test_fp16_steps_the_loss_scaler_skips_are_not_a_divergence(
    tmp_path, tiny_tokenizer, repetitive_data, token_cache, monkeypatch
):
    """Under fp16 accelerate's loss scaler skips a step whose scaled gradients overflow and lowers its
    scale (routine in a run's first steps): the run goes on, the skipped steps log no gradient norm
    and the schedule waits for a step that is taken. (A CPU has no fp16 scaler: one is put on the
    accelerator, as accelerate's is under fp16, and the first two steps' gradients overflow.)"""
    from fimtune import train as train_module

    setup = train_module.setup

    def overflowing(cfg, acc):
        s = setup(cfg, acc)
        backwards = []
        first = next(p for p in s.model.parameters() if p.requires_grad)
        first.register_hook(lambda g: g * float("inf") if len(backwards.append(1) or backwards) <= 2 else g)
        return s

    monkeypatch.setattr(train_module, "make_accelerator", with_cpu_scaler(train_module.make_accelerator, 2.0**16))
    monkeypatch.setattr(train_module, "setup", overflowing)
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    extra = ("train.max_steps=6", "train.eval_every=0", "train.log_every=1", "train.warmup_steps=2")
    run = quiet_fit(run_config(tmp_path, base, repetitive_data, "fp16", *extra))
    rows = [r for r in metrics(run) if "loss" in r]
    assert len(rows) == 6 and [r["step"] for r in rows if "grad_norm" not in r] == [1, 2], rows
    assert all(math.isfinite(r["grad_norm"]) for r in rows[2:])
    assert [r["lr"] for r in rows[:4]] == [0.0, 0.0, 0.0, rows[3]["lr"]] and rows[3]["lr"] > 0  # the warm-up waited


def test_fp16_loss_scale_is_resumed(tmp_path, tiny_tokenizer, repetitive_data, token_cache, monkeypatch):
    """The loss scaler's scale is part of the run: resumed at its initial scale, the steps after a
    resume overflow again and are skipped where the uninterrupted run took them. (Gradients rounded
    to fp16's range, on a CPU scaler starting high, overflow in the first steps.)"""
    from fimtune import train as train_module

    setup = train_module.setup

    def fp16_gradients(cfg, acc):
        s = setup(cfg, acc)
        for p in s.model.parameters():
            if p.requires_grad:
                p.register_hook(lambda g: g.half().to(g.dtype))
        return s

    monkeypatch.setattr(train_module, "make_accelerator", with_cpu_scaler(train_module.make_accelerator, 2.0**24))
    monkeypatch.setattr(train_module, "setup", fp16_gradients)
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    extra = ("train.max_steps=8", "train.eval_every=0", "train.log_every=1", "train.save_every=0")

    def steps(run):
        return {r["step"]: (r["loss"], r.get("grad_norm"), r["lr"]) for r in metrics(run) if "loss" in r}

    whole = steps(quiet_fit(run_config(tmp_path, base, repetitive_data, "whole", *extra)))
    assert whole[1][1] is None and whole[6][1] is not None  # skipped at first, taken later
    parted = run_config(tmp_path, base, repetitive_data, "parted", *extra)
    quiet_fit(parted, stop_after=5)
    assert steps(quiet_fit(parted, resume=True)) == whole


def test_a_warmup_as_long_as_the_run_is_warned(caplog):
    """30 warm-up steps in a 10-step run: the learning rate never reaches its peak; said, not refused
    (short smoke runs keep a preset's warm-up)."""
    from fimtune.train import make_optimizer

    model = tiny.llama(64)
    for warmup, steps, warned in ((30, 10, True), (10, 10, True), (3, 10, False)):
        cfg = load_run_config(None, [f"train.warmup_steps={warmup}"])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fimtune.train"):
            make_optimizer(model, cfg, torch.device("cpu"), steps)
        assert ("never reaches train.learning_rate" in caplog.text) == warned, (warmup, steps)


def test_epochs_that_max_steps_overrides_are_warned(tmp_path, tiny_tokenizer, repetitive_data, token_cache, caplog):
    """`train.max_steps` (100 by default) decides a run's length over `train.num_epochs`: epochs given
    beside it are said to be ignored, not silently dropped."""
    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    extra = ("train.max_steps=2", "train.eval_every=0", "train.num_epochs=3")
    with caplog.at_level(logging.WARNING, logger="fimtune.train"):
        run = quiet_fit(run_config(tmp_path, base, repetitive_data, "run", *extra))
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2]
    assert "train.num_epochs=3 is ignored" in caplog.text
