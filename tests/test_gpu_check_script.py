"""The GPU check script is valid bash, and what it calls exists: test files, benchmark flags."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def commands() -> list[str]:
    """The script's command lines, continuation lines joined."""
    return [line.strip() for line in SCRIPT.read_text().replace("\\\n", " ").splitlines()]


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_the_tests_it_runs_exist():
    text = SCRIPT.read_text()
    paths = set(re.findall(r"\btests/[\w/]+\.py\b", text))
    assert {"tests/test_train.py", "tests/serve/test_static.py"} <= paths
    for path in paths:
        assert (ROOT / path).is_file(), path
    selected = re.findall(r"\b(tests/[\w/]+\.py)::(\w+)", text)
    assert selected
    for path, name in selected:
        assert f"def {name}(" in (ROOT / path).read_text(), f"{path}::{name}"


def test_every_flag_it_passes_a_benchmark_exists():
    for script in ("train_throughput.py", "latency.py"):
        line = next(c for c in commands() if f"{script} " in c)
        flags = set(re.findall(r"(?<=\s)--[a-z][a-z-]*", line.split(script, 1)[1]))
        assert flags
        help_text = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / script), "--help"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT / "benchmarks",
        ).stdout
        for flag in flags:
            assert flag in help_text, f"{script} has no {flag}"
    train = next(c for c in commands() if "train_throughput.py " in c)
    variants = re.search(r"--variants (\S+)", train).group(1)
    profiled = re.search(r"--profile-variants (\S+)", train).group(1)
    assert set(profiled.split(",")) <= set(variants.split(","))  # a profile of a variant that runs
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from train_throughput import ALL
    finally:
        sys.path.pop(0)
    assert set(variants.split(",")) <= set(ALL)


STUB_PYTHON = """#!/usr/bin/env bash
echo "python3 $*" >> "$STUB_LOG"
case "$1 $2" in
  "-m pip") [ "${STUB_PIP_RC:-0}" = 0 ] && mkdir -p "$GPU_CHECK_SITE/flash_attn"; exit "${STUB_PIP_RC:-0}";;
  "-m pytest") echo "1 passed"; exit 0;;
esac
if [ "$1" = -c ] && [[ $2 == *tarfile* ]]; then exit "${STUB_TAR_RC:-0}"; fi
exit 0
"""


def run_with_stubs(tmp_path: Path, **env: str) -> tuple[str, Path, Path]:
    """The script over a checkout holding carried folders, with a `python3` that only logs its
    calls (pip and the unpacking fail as ``env`` asks): (the calls, $OUT, the install folder)."""
    repo, bin_, out, site = tmp_path / "repo", tmp_path / "bin", tmp_path / "out", tmp_path / "site"
    for name in (".whl/a-1-py3-none-any.whl", ".whl-fa4/flash_attn_4-1-py3-none-any.whl"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).touch()
    for name in (".whl-fa4/x-runtime.tar.xz", ".whl-fa4-ir/x-ir.tar.xz"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).touch()
    (repo / "benchmarks").mkdir()
    bin_.mkdir()
    (bin_ / "python3").write_text(STUB_PYTHON)
    (bin_ / "python3").chmod(0o755)
    log = tmp_path / "calls.log"
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "OUT": str(out), "GPU_CHECK_SITE": str(site), "STUB_LOG": str(log), **env}
    subprocess.run(["bash", str(SCRIPT), "540"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    return log.read_text(), out, site


def test_a_failed_install_or_unpack_ends_no_step_after_it(tmp_path):
    for fails in ({"STUB_PIP_RC": "1"}, {"STUB_TAR_RC": "1"}):
        calls, out, site = run_with_stubs(tmp_path / next(iter(fails)), **fails)
        assert "-m pytest" in calls and "train_throughput.py" in calls and "latency.py" in calls, fails
        assert {"gpu-tests.log", "train.log", "latency.log"} <= {p.name for p in out.iterdir()}
        assert not (site / "flash_attn").exists()  # FlashAttention-4 half unpacked is left out
    calls, _, site = run_with_stubs(tmp_path / "ok")
    assert calls.count("extractall") == 2 and (site / "flash_attn").is_dir()
