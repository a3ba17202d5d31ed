"""Helpers of the evaluation tests (a uniquely named module: `conftest` names clash across test folders)."""

from __future__ import annotations

import inspect
import json.decoder
import shlex
import string
import textwrap


def whole_files() -> list[str]:
    """Real, complete Python files (so they parse and hold function bodies and if/for blocks)."""
    return [inspect.getsource(m) for m in (textwrap, shlex, string, json.decoder)]
