"""The README cannot rot: its config reference is generated, its quickstart runs."""

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fimtune.config import reference_markdown

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_config_reference_is_generated_from_the_dataclasses():
    block = README.split("<!-- config-reference:start -->\n")[1].split("<!-- config-reference:end -->")[0]
    assert block == reference_markdown(), "regenerate it: fimtune config --markdown"


def quickstart_commands() -> list[list[str]]:
    block = README.split("## Quickstart")[1].split("```bash\n")[1].split("```")[0]
    return [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("fimtune ")]


# Tiny settings appended to each quickstart command (the command itself comes from the README).
TINY = {
    "train": [
        "model.name_or_path={base}",
        "train.max_steps=3",
        "packing.seq_length=64",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.save_every=0",
        "train.mixed_precision=no",
    ],
    "eval": ["--limit", "1", "--holes", "3", "--batch-size", "2"],
    "complete": ["--max-new-tokens", "4"],
    "data": ["--quiet"],
}


@pytest.mark.slow
def test_quickstart_runs(tmp_path, tiny_tokenizer):
    from tests import tiny

    base = tiny.save_model_folder(tiny.llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "base")
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the commands run from a checkout's root
    commands = quickstart_commands()
    assert [c[0] for c in commands] == ["data", "data", "train", "eval", "complete", "merge", "serve"]
    for args in commands:
        extra = [a.format(base=base) for a in TINY.get(args[0], [])]
        if args[:2] == ["data", "inspect"]:
            extra = []
        if args[0] == "serve":
            serve_and_ask(tmp_path, args)
            continue
        res = subprocess.run(
            [sys.executable, "-m", "fimtune", *args, *extra], cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert res.returncode == 0, f"fimtune {' '.join(args)}\n{res.stderr[-3000:]}"
    assert (tmp_path / "runs/peft/adapter/adapter_model.safetensors").is_file()
    assert (tmp_path / "runs/peft/eval/report.json").is_file()
    assert (tmp_path / "merged/peft/config.json").is_file()


def serve_and_ask(tmp_path: Path, args: list[str]) -> None:
    """Start the README's serve command on a free port (`--port 0`: the one it took is in the line it
    prints), ask /health and /infill, stop it."""
    import httpx

    args = [a if a != "8080" else "0" for a in args]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fimtune", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url, _ = served_url(proc)
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        r = httpx.post(
            f"{url}/infill",
            json={"input_prefix": "def add(a, b):\n", "input_suffix": "", "n_predict": 4},
            timeout=60,
        )
        assert r.status_code == 200 and "content" in r.json()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def served_url(proc: subprocess.Popen) -> tuple[str, str]:
    """The address `fimtune serve` says it serves on (with `--port 0`, the port it took), and its line
    saying so (its first)."""
    said = proc.stdout.readline()
    found = re.search(r" on (http://\S+)$", said.strip())
    assert found and not found[1].endswith(":0"), said + proc.stderr.read()[-3000:]
    return found[1], said


def test_quickstart_block_is_found():
    assert len(quickstart_commands()) == 7
    assert re.search(r"^make demo", README, re.M) and re.search(r"^make test", README, re.M)


def test_the_continue_config_names_a_model_the_serve_command_serves():
    """Continue sends its `model`; the server answers 404 for a name it does not serve (the run
    folder's name, `base`, or an `--adapter` name)."""
    section = README.split("### 4. Serve")[1]
    serve = next(line for line in section.splitlines() if line.startswith("fimtune serve runs/"))
    served = {Path(shlex.split(serve)[2]).name, "base"}
    config = README.split("**Continue**")[1].split("```yaml\n")[1].split("```")[0]
    model = re.search(r"^\s+model: (\S+)$", config, re.M)
    assert model is not None and model.group(1) in served, (model, served)
    from fimtune.serve.engine import Limits

    max_tokens = re.search(r"^\s+maxTokens: (\d+)$", config, re.M)  # Continue's default, 4096, is a 422
    assert max_tokens is not None and int(max_tokens.group(1)) <= Limits().max_new_tokens
