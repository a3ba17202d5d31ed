"""Every module's docstring examples run, those of modules added later too."""

import doctest
import importlib
import pkgutil

import pytest

import fimtune

MODULES = sorted(m.name for m in pkgutil.walk_packages(fimtune.__path__, "fimtune.") if m.name != "fimtune.__main__")


def test_the_modules_are_found():
    assert {"fimtune.fim", "fimtune.serve.shapes", "fimtune.corpus.dedup", "fimtune.evaluate.stats"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, name
