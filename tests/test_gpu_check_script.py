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
