"""The CLI shell: help without torch, one-line user errors with exit code 2, --debug."""

import os
import resource
import signal
import subprocess
import sys

import pytest

from fimtune.cli import main
from fimtune.errors import FimtuneError


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fimtune", *args], capture_output=True, text=True, timeout=120)


def test_help_does_not_import_torch():
    code = "import sys; from fimtune.cli import main\ntry:\n main(['--help'])\nexcept SystemExit: pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "usage: fimtune" in out and out.strip().endswith("NO-TORCH")


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_a_group_without_its_subcommand_prints_its_help_and_exit_2(capsys):
    """`fimtune data` alone is a usage error as `fimtune` alone is (it exited 0, so a script's
    `fimtune data $STEP` with an empty STEP passed)."""
    assert main(["data"]) == 2
    assert "SUBCOMMAND" in capsys.readouterr().out


def test_config_lists_fields_with_help(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "train.learning_rate" in out and "Peak learning rate" in out


def test_config_resolves_overrides(capsys):
    assert main(["config", "lora.r=32"]) == 0
    assert "r: 32" in capsys.readouterr().out


def test_user_error_is_one_line_and_exit_2():
    res = run_cli("config", "lora.rank=3")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["error: unknown config key 'lora.rank' (did you mean 'lora.r'?)"]


def test_debug_shows_traceback():
    res = run_cli("config", "lora.rank=3", "--debug")
    assert res.returncode != 0 and "Traceback" in res.stderr and "ConfigError" in res.stderr


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "fimtune" in capsys.readouterr().out


def test_overrides_may_follow_options(capsys):
    assert main(["config", "--debug", "lora.r=32", "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "r: 32" in out and "max_steps: 3" in out


def test_output_to_a_reader_that_left_ends_quietly():
    """`fimtune config | head`: the reader closes the pipe; no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "fimtune", "config"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before it writes a byte
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == "", err


def test_inspect_refuses_a_negative_sample_count(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path), "--n", "-1"]) == 2  # it printed no sample, silently
    assert capsys.readouterr().err == "error: --n must be 0 (the summary alone) or more (got -1)\n"


@pytest.mark.parametrize("command", ["eval", "merge"])
def test_a_run_stopped_before_its_first_checkpoint_is_told_so(tmp_path, capsys, command):
    """eval and merge named a run folder that has its config.yaml but no adapter yet (stopped, or still
    training, before its first checkpoint) "not a run folder (config.yaml ... missing)", as complete
    and serve do not."""
    run = tmp_path / "run"
    run.mkdir()
    assert main(["config", f"output_dir={run}"]) == 0
    (run / "config.yaml").write_text(capsys.readouterr().out)
    assert main([command, str(run), *(["--out", str(tmp_path / "merged")] if command == "merge" else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: run folder '{run}' has no adapter") and "--resume" in err, err


def test_stop_after_no_step_is_refused_before_anything_loads(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--stop-after", "0", f"output_dir={out}"]) == 2
    assert capsys.readouterr().err == "error: --stop-after must be a step, 1 or more (got 0)\n" and not out.exists()


def test_a_full_disk_is_one_error_line_and_leaves_no_output(tmp_path):
    """A write that fails for want of room (here a file size limit: EFBIG, as ENOSPC for a full
    disk) is told in one line, exit code 2, no traceback; the corpus folder is not made."""

    def size_limit():  # files may grow to 20 kB; writes past it fail instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "fimtune", "data", "build", "--package", "pathspec", "--out", str(out), "--quiet"]
    # no bytecode written: Python would leave .pyc files cut at the limit, which later imports fail on
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, preexec_fn=size_limit)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: a write failed: [Errno 27] File too large;")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize(
    "command, shown",
    [
        (["eval"], ["infill holes cut in held-out files (default: 200)", "(default: 16)"]),
        (["complete"], ["(default: 128)", "0: greedy (default: 0.0)", "(default: auto)"]),
        (["serve"], ["port to listen on (default: 8080)", "(default: loopback only)"]),
        (["data", "build"], ["(default: content)", "(default: 0.85)"]),
    ],
)
def test_each_commands_help_gives_the_defaults(capsys, command, shown):
    """Options with a default say it, once; none says `None`, an empty list or argparse's own marker,
    and a plain switch (`--single-line`) says nothing of being off."""
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # the help's lines joined, as wrapped
    assert all(s in out for s in shown), out
    assert not any(bad in out for bad in ("default: None", "SUPPRESS", "(default: [])", "stop at the first newline ("))
    assert out.count("(default: loopback only)") <= 1


def test_unknown_option_is_an_argparse_error():
    res = run_cli("config", "--no-such-flag")
    assert res.returncode == 2 and "unrecognized arguments: --no-such-flag" in res.stderr


@pytest.mark.parametrize(
    "args,usage,hint",
    [
        (["data", "build", "--pakage", "peft", "--out", "x"], "fimtune data build", "(did you mean --package?)"),
        (
            ["train", "--max-steps", "3"],
            "fimtune train",
            "(config fields are key=value overrides: train.max_steps=...)",
        ),
        (["eval", "run", "--hole", "3", "--x"], "fimtune eval", "unrecognized arguments: --x"),
    ],
)
def test_unknown_option_shows_its_commands_usage_and_the_likely_meaning(capsys, args, usage, hint):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"usage: {usage} ") and hint in err


def test_dry_run_and_config_refuse_what_a_run_would(capsys):
    """`--dry-run` refuses what the run itself refuses after loading its model (two data sources,
    quantization without a CUDA GPU, CUDA graphs of checkpointed or uncompiled blocks); `fimtune
    config` checks the numbers' ranges as a run does."""
    demo = ["train", "--config", "configs/smollm2-demo.yaml"]
    assert main([*demo, "data.hf=smangrul/hf-stack-v1", "--dry-run"]) == 2  # data.path is set too
    assert "set exactly one of data.path" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main([*demo, "model.quantization=4bit", "--dry-run"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
        assert main([*demo, "train.mixed_precision=auto", "--dry-run"]) == 0
        assert "mixed precision no (auto)," in capsys.readouterr().out  # what Accelerate gets here
    graphs = ("train.cuda_graphs=true", "train.compile=true")
    assert main([*demo, *graphs, "train.gradient_checkpointing=true", "--dry-run"]) == 2
    assert "train.cuda_graphs: checkpointed blocks" in capsys.readouterr().err
    assert main([*demo, "train.cuda_graphs=true", "train.compile=false", "--dry-run"]) == 2
    assert "train.cuda_graphs: the graphs are the compiled blocks'" in capsys.readouterr().err
    assert main([*demo, "--dry-run"]) == 0
    capsys.readouterr()
    assert main([*demo, "data.path=no/such/folder", "--dry-run"]) == 0  # the plan still prints
    assert "warning: 'no/such/folder' is not a dataset folder: build one with" in capsys.readouterr().err
    assert main(["config", "lora.r=0"]) == 2 and "'lora.r' must be at least 1" in capsys.readouterr().err


def test_accelerate_launch_cpu_that_started_one_process_of_several_is_said(
    tmp_path, tiny_tokenizer, tiny_dataset_dir, monkeypatch, capsys
):
    """`accelerate launch --cpu --num_processes 2` starts one process (Accelerate 1.x runs several CPU
    processes only under mpirun), which trained alone with half the global batch, its plan's `cpu x1`
    the only hint. It is said, with the command that starts them."""
    from tests.runs import model_dir

    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    demo = ["train", f"model.name_or_path={base}", f"data.path={tiny_dataset_dir}", f"output_dir={tmp_path / 'run'}"]
    demo += ["train.batch_size=2", "packing.seq_length=512", "--dry-run"]
    for name in ("WORLD_SIZE", "RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # what `accelerate launch --cpu` sets
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert main(demo) == 0
    assert "--cpu" not in capsys.readouterr().err  # --cpu and one process: as asked
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # ... and this with --num_processes 2
    assert main(demo) == 0
    err = capsys.readouterr().err
    assert "`accelerate launch --cpu` started this process alone" in err and "cpu-2proc.yaml" in err
    monkeypatch.setenv("WORLD_SIZE", "2")  # under mpirun (--mpirun_hostfile), or torchrun: several
    monkeypatch.setenv("RANK", "0")
    assert main(demo) == 0
    assert "--cpu" not in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("PMI_SIZE", "2")  # Intel MPI's and MPICH's: the plan counts those processes too
    assert main(demo) == 0
    out = capsys.readouterr()
    assert "--cpu" not in out.err and "device           cpu x2," in out.out and "(2 x 1 x 2 x 512)" in out.out


def test_dry_run_refuses_rows_past_learned_positions(tmp_path, tiny_tokenizer, tiny_dataset_dir, capsys):
    """A GPT-BigCode model's rows longer than its learned positions were refused only once the run
    had loaded the model (minutes for StarCoderBase-1B); `--dry-run` printed the plan and exit 0."""
    from tests.runs import model_dir

    base = model_dir(tmp_path, tiny_tokenizer, "gpt_bigcode")  # 256 positions
    args = ["train", f"model.name_or_path={base}", f"data.path={tiny_dataset_dir}", f"output_dir={tmp_path / 'r'}"]
    assert main([*args, "packing.seq_length=512", "--dry-run"]) == 2
    assert "packing.seq_length=512 is longer than the model's 256 learned positions" in capsys.readouterr().err
    assert main([*args, "packing.seq_length=256", "--dry-run"]) == 0


def test_an_output_dir_that_is_a_file_is_one_error_line(tmp_path, tiny_dataset_dir, capsys):
    """output_dir naming a file, or a folder under one, was a NotADirectoryError traceback (exit 1)."""
    from fimtune.train import prepare_run_dir

    note = tmp_path / "notes.txt"
    note.write_text("mine\n")
    assert main(["train", f"output_dir={note}", f"data.path={tiny_dataset_dir}"]) == 2
    assert (
        capsys.readouterr().err
        == f"error: output_dir '{note}': '{note}' is a file, not a folder: pass output_dir=NEW_DIR\n"
    )
    for resume in (False, True):
        with pytest.raises(FimtuneError, match=f"output_dir '{note / 'run'}': '{note}' is a file, not a folder"):
            prepare_run_dir(note / "run", resume)
    assert note.read_text() == "mine\n"


def test_data_build_out_under_a_file_is_one_error_line_before_the_build(tmp_path, capsys):
    """`--out` under a file was a FileExistsError traceback (exit 1), once the whole build was done."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("def f(x):\n    return x + 1\n")
    note = tmp_path / "notes.txt"
    note.write_text("mine\n")
    assert main(["data", "build", str(tmp_path / "src"), "--out", str(note / "data"), "--quiet"]) == 2
    assert capsys.readouterr().err == f"error: --out '{note / 'data'}': '{note}' is a file, not a folder\n"


def test_data_build_config_file_errors_name_the_file(tmp_path, capsys):
    """A typo in `data build --config FILE` named the key but not the file."""
    p = tmp_path / "corpus.yaml"
    p.write_text("near_dedup_treshold: 0.9\n")
    assert main(["data", "build", str(tmp_path), "--out", str(tmp_path / "out"), "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {p}: unknown config key 'near_dedup_treshold'"), err
    assert "did you mean 'near_dedup_threshold'" in err


def test_complete_on_a_run_lays_out_the_prompt_as_the_server_does(
    tmp_path, tiny_tokenizer, repetitive_data, token_cache, capsys
):
    """`fimtune complete RUN` and `fimtune serve RUN` give the same greedy text for the same hole: both
    default to SPM for a run that trained on SPM examples (fim.spm_rate > 0), PSM otherwise."""
    from fimtune.serve.engine import prompt_mode
    from tests.runs import model_dir, quiet_fit, run_config

    base = model_dir(tmp_path, tiny_tokenizer, "llama")
    run = quiet_fit(run_config(tmp_path, base, repetitive_data, "run", "train.max_steps=5", "train.eval_every=0"))
    hole = ["--prefix", "def f(x):\n    y = ", "--suffix", "\n    return y\n", "--max-new-tokens", "8"]
    capsys.readouterr()
    texts = {}
    for mode in ["default", "psm", "spm"]:
        assert main(["complete", str(run), *hole, *([] if mode == "default" else ["--mode", mode])]) == 0
        texts[mode] = capsys.readouterr().out
    assert texts["psm"] != texts["spm"]  # the layouts give other text here
    assert texts["default"] == texts[prompt_mode("auto", run)] == texts["spm"]


def test_fimtune_notes_reach_the_terminal(capsys):
    """fimtune's INFO notes (the fast paths a run takes, a GGUF model dequantized once) were never
    shown: Python shows only warnings of a logger nobody configured. Once, however many commands run."""
    import logging

    assert main(["config", "lora.r=4"]) == 0 and main(["config", "lora.r=4"]) == 0
    capsys.readouterr()
    logging.getLogger("fimtune.train").info("LoRA inputs stay in the autocast dtype (2 layers)")
    assert capsys.readouterr().err == "LoRA inputs stay in the autocast dtype (2 layers)\n"
