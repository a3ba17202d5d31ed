"""The worked examples in the corpus modules' docstrings are tests too."""

import doctest
import importlib

import pytest

MODULES = ["languages", "filters", "notebooks", "files", "sources", "dedup", "split", "stats"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"fimtune.corpus.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
