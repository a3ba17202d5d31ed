"""Notebooks: code cells only, the recipe's drop rule, markdown as comments, malformed ones counted."""

import json
import os

import pytest
from corpus_helpers import code, notebook, write

from fimtune.config import CorpusConfig
from fimtune.corpus import files
from fimtune.corpus.notebooks import MalformedNotebook, keep_code_cell, notebook_to_code
from fimtune.corpus.sources import Source, iter_documents


def scan(root, **fields) -> tuple[list, files.Tally]:
    """The documents of folder ``root`` (config from keyword fields), and its tally."""
    source = Source("folder", str(root), root.name, str(root))
    return list(iter_documents(source, CorpusConfig(**fields))), source.tally


CELLS = [
    ("markdown", "# Training\nWe fine-tune."),
    ("code", "!pip install peft"),
    ("code", "%%capture\nimport noisy"),
    ("code", "import torch\nmodel = torch.nn.Linear(2, 2)"),
    ("raw", "raw text"),
    ("code", "   "),
    ("code", "print(model)"),
]


def test_code_cells_only_shell_and_capture_dropped():
    content, language = notebook_to_code(notebook(CELLS))
    assert content == "import torch\nmodel = torch.nn.Linear(2, 2)\n\nprint(model)\n"
    assert language == "python"


def test_markdown_kept_as_comments_with_the_flag():
    content, _ = notebook_to_code(notebook(CELLS), keep_markdown=True)
    assert content.startswith("# # Training\n# We fine-tune.\n\nimport torch\n")
    assert "!pip" not in content and "raw text" not in content


def test_kernel_language_and_its_comment_marker():
    content, language = notebook_to_code(notebook([("markdown", "Notes"), ("code", "val x = 1")], "Scala"), True)
    assert language == "scala" and content == "// Notes\n\nval x = 1\n"


def test_cpp_kernel_names_its_standard():
    # xeus-cling's kernelspec says "C++17" (its language_info says "c++")
    content, language = notebook_to_code(notebook([("markdown", "Notes"), ("code", "int x = 1;")], "C++17"), True)
    assert language == "cpp" and content == "// Notes\n\nint x = 1;\n"


@pytest.mark.parametrize(
    "kernel,marker", [("swift", "//"), ("groovy", "//"), ("php", "//"), ("octave", "%"), ("matlab", "%")]
)
def test_markdown_comment_marker_of_other_kernels(kernel, marker):
    content, language = notebook_to_code(notebook([("markdown", "Notes"), ("code", "x = 1")], kernel), True)
    assert language == kernel and content == f"{marker} Notes\n\nx = 1\n"


def test_source_as_plain_string():
    nb = json.dumps({"cells": [{"cell_type": "code", "source": "x = 1"}]})
    assert notebook_to_code(nb) == ("x = 1\n", "python")


@pytest.mark.parametrize(
    "raw",
    ["{not json", "[]", json.dumps({"cells": "x"}), json.dumps({"cells": [1]}), json.dumps({"cells": [{"source": 3}]})],
)
def test_malformed(raw):
    with pytest.raises(MalformedNotebook):
        notebook_to_code(raw)


def test_recipe_rule():
    assert not keep_code_cell("!nvidia-smi")
    assert not keep_code_cell("x = 1\n%%capture")
    assert keep_code_cell("x = 1  # !not a shell cell")


def test_notebooks_in_a_folder(tmp_path):
    write(tmp_path, "good.ipynb", notebook([("code", code("nb"))]))
    write(tmp_path, "broken.ipynb", '{"cells": [')
    write(tmp_path, "shell_only.ipynb", notebook([("code", "!ls"), ("markdown", "hi")]))
    source = Source("folder", str(tmp_path), "nbs", str(tmp_path))
    docs = list(iter_documents(source, CorpusConfig()))
    assert [(d.file_path, d.language) for d in docs] == [("good.ipynb", "python")]
    assert docs[0].content == code("nb")
    assert source.tally.skipped_files == {"malformed_notebook": 1, "empty": 1}


def test_kernel_language_is_named_as_the_suffixes_name_it(tmp_path):
    """A .NET kernel says `C#`, a xeus-cling one `C++`: the notebook's code is `csharp`/`cpp`, as
    `.cs`/`.cpp` files are, and `--languages` names either way select both."""
    program = "class Prog { static void Main() { System.Console.WriteLine(1); } }\n"
    sums = "var total = new[] { 1, 2, 3 }.Sum();\nConsole.WriteLine(total);"
    write(tmp_path, "calc.ipynb", notebook([("markdown", "Compute a total"), ("code", sums)], "C#"))
    write(tmp_path, "Prog.cs", program)
    write(tmp_path, "vec.ipynb", notebook([("code", "std::vector<int> v{1, 2, 3};")], "C++"))
    source = Source("folder", str(tmp_path), "nbs", str(tmp_path))
    docs = list(iter_documents(source, CorpusConfig(notebook_markdown=True)))
    assert [(d.file_path, d.language) for d in docs] == [
        ("Prog.cs", "csharp"),
        ("calc.ipynb", "csharp"),
        ("vec.ipynb", "cpp"),
    ]
    assert docs[1].content == f"// Compute a total\n\n{sums}\n"
    for selected in (["csharp"], ["C#"]):
        source = Source("folder", str(tmp_path), "nbs", str(tmp_path))
        docs = list(iter_documents(source, CorpusConfig(languages=selected)))
        assert [d.file_path for d in docs] == ["Prog.cs", "calc.ipynb"], selected
        assert source.tally.skipped_files == {"language_not_selected": 1}


def test_size_limit_is_for_a_notebooks_code_not_its_saved_outputs(tmp_path):
    """A saved plot (base64 in the JSON) may make the .ipynb far larger than its code: the limit is
    for the code, and the raw read stops at NOTEBOOK_RAW_SIZE_FACTOR times it."""
    limit = 10_000
    plot = {"output_type": "display_data", "data": {"image/png": "iVBORw0KGgo" * 3_000}}  # 33 KB
    with_plot = json.loads(notebook([("code", code("plot"))]))
    with_plot["cells"][0]["outputs"] = [plot]
    write(tmp_path, "a/plot.ipynb", json.dumps(with_plot))
    write(tmp_path, "a/long_code.ipynb", notebook([("code", code("long", lines=150))]))  # 12 KB of code
    write(tmp_path, "a/long.py", code("long", lines=150))
    assert os.path.getsize(tmp_path / "a/plot.ipynb") > 3 * limit > len(code("plot"))
    docs, tally = scan(tmp_path / "a", max_file_size=limit)
    assert [(d.file_path, d.content) for d in docs] == [("plot.ipynb", code("plot"))]
    assert tally.skipped_files == {"too_large": 2}  # long_code.ipynb, long.py
    assert tally.bytes_read == sum(os.path.getsize(tmp_path / f"a/{n}") for n in ("plot.ipynb", "long_code.ipynb"))

    huge = json.loads(notebook([("code", code("huge"))]))
    huge["cells"][0]["outputs"] = [plot] * (files.NOTEBOOK_RAW_SIZE_FACTOR * limit // 33_000 + 1)
    write(tmp_path, "b/huge_outputs.ipynb", json.dumps(huge))
    write(tmp_path, "b/ok.py", code("ok"))
    assert os.path.getsize(tmp_path / "b/huge_outputs.ipynb") > files.NOTEBOOK_RAW_SIZE_FACTOR * limit
    docs, tally = scan(tmp_path / "b", max_file_size=limit)
    assert [d.file_path for d in docs] == ["ok.py"] and tally.skipped_files == {"too_large": 1}
    assert tally.bytes_read == len(code("ok"))  # the huge notebook is never read


def test_nbformat_3_worksheets_keep_their_code_cells():
    """IPython 1-2 saved nbformat 3: cells inside `worksheets`, a code cell's text in `input`."""
    nb = {
        "nbformat": 3,
        "metadata": {"name": ""},
        "worksheets": [
            {
                "cells": [
                    {"cell_type": "markdown", "source": ["# Fit\n", "a line"]},
                    {"cell_type": "code", "language": "python", "input": ["import numpy as np\n", "x = np.ones(3)"]},
                    {"cell_type": "code", "language": "python", "input": "!ls"},
                ]
            }
        ],
    }
    assert notebook_to_code(json.dumps(nb)) == ("import numpy as np\nx = np.ones(3)\n", "python")
    assert notebook_to_code(json.dumps(nb), keep_markdown=True)[0].startswith("# # Fit\n# a line\n\nimport numpy")
