"""Completions at a cursor after indentation: the prompt with the typed spaces, or from the line's start.

    .venv/bin/python benchmarks/cursor_indent.py --run .demo/run --data .demo/data      # SmolLM2-135M demo run
    .venv/bin/python benchmarks/cursor_indent.py --run runs/mine --data data/mine --holes 300 --json out.json

Places: ``--holes`` lines of held-out files (the data's validation split) that are indented and
hold code (at least 4 non-blank characters), drawn with ``--seed``. The cursor is after the
line's indentation (what an editor gives after Enter): the prefix is the file up to and with the
indentation, the expected middle the rest of the line. Windows of lines around it as
`fimtune eval` cuts them; greedy, single-line, ``--max-new-tokens``; the run's prompt layout.

Arms, in one process on the same places:

- before: the answer as fimtune gave it until this benchmark (the model's text after the typed
  indentation);
- after: `fimtune.generate.complete_batch` as it is (the same prompt; the one space the model
  writes before its code goes, `indent_cut`);
- line start: the hole at the line's start, as fimtune's training (`fim.spans: line`) and
  evaluation cut them (the model writes the indentation too);
- line start, shaped: that prompt, its answer less the typed indentation (or, indented otherwise,
  less its own), what llama.vim does on its side.

Each arm's line is what the editor then shows: the typed indentation + the answer's first line
(line start: the model's first line). Counted: the line exactly; its code whatever the
indentation; answers that add whitespace after the typed indentation (line start: indented
otherwise than the file); empty lines; and the mean edit similarity (difflib) to the file's line.
"""

from __future__ import annotations

import argparse
import difflib
import json
import platform
import random
import sys
import time
from pathlib import Path

PREFIX_LINES, SUFFIX_LINES = 16, 8  # context lines around the cursor (CPU-sized prompts)
MIN_CODE_CHARS = 4
BATCH = 8
ARMS = ("before", "after", "line start", "line start, shaped")


def places(files: list, n: int, seed: int) -> list[tuple[str, str, str, str]]:
    """(prefix up to the line's start, typed indentation, the line's code, suffix) of ``n`` lines."""
    from fimtune.evaluate.holes import window_prefix, window_suffix
    from fimtune.generate import INDENT_CHARS

    found = []
    for f in files:
        at = 0
        for line in f.text.split("\n"):
            code = line.lstrip(INDENT_CHARS).rstrip("\r")
            indent = line[: len(line) - len(line.lstrip(INDENT_CHARS))]
            if indent and len("".join(code.split())) >= MIN_CODE_CHARS:
                tail = f.text[at + len(indent) + len(code) :]
                found.append(
                    (window_prefix(f.text[:at], PREFIX_LINES), indent, code, window_suffix(tail, SUFFIX_LINES))
                )
            at += len(line) + 1
    random.Random(seed).shuffle(found)
    return found[:n]


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def first_line(text: str) -> str:
    return text.split("\n")[0].rstrip("\r")


def score(lines: list[str], truth: list[tuple[str, str]]) -> dict[str, float]:
    """Counts over the editor's lines against the file's (indentation, code)."""
    from fimtune.generate import INDENT_CHARS

    def lead(s: str) -> str:
        return s[: len(s) - len(s.lstrip(INDENT_CHARS))]

    out = {"exact": 0, "code_exact": 0, "indent_off": 0, "empty": 0, "edit_sim": 0.0}
    for line, (indent, code) in zip(lines, truth, strict=True):
        out["exact"] += line == indent + code
        out["code_exact"] += line.strip() == code.strip()
        out["empty"] += not line.strip()
        out["indent_off"] += bool(line.strip()) and lead(line) != indent
        out["edit_sim"] += difflib.SequenceMatcher(None, line, indent + code).ratio() / len(lines)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run folder (or a model with FIM tokens)")
    ap.add_argument("--data", required=True, help="a `fimtune data build` folder (its validation split)")
    ap.add_argument("--holes", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--mode", default="auto", choices=["auto", "psm", "spm"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the figures and every answer here")
    args = ap.parse_args()

    import datasets
    import torch

    from fimtune.evaluate.infill import held_out_files
    from fimtune.generate import (
        INDENT_CHARS,
        FimPrompter,
        GenerationParams,
        complete_batch,
        complete_prompts,
        indent_cut,
        merge_adapter,
        prompt_mode,
    )
    from fimtune.model import is_run_dir, load_for_inference

    torch.set_num_threads(args.threads)
    split = datasets.load_from_disk(args.data)["validation"]
    chosen = places(held_out_files(split, "content"), args.holes, args.seed)
    loaded = load_for_inference(args.run, torch.device("cpu"))
    merge_adapter(loaded.model)
    mode = prompt_mode(args.mode, Path(args.run) if is_run_dir(args.run) else None, args.run)
    params = GenerationParams(max_new_tokens=args.max_new_tokens, single_line=True, mode=mode)  # type: ignore[arg-type]
    prompter = FimPrompter(loaded.tokenizer)
    typed = [(head + indent, suffix) for head, indent, _, suffix in chosen]
    at_start = [(head, suffix) for head, _, _, suffix in chosen]

    def batched(run) -> tuple[list[str], float]:
        began, texts = time.perf_counter(), []
        for lo in range(0, len(chosen), BATCH):
            texts += [c.text for c in run(slice(lo, lo + BATCH))]
        return texts, time.perf_counter() - began

    prompts = [prompter.build(p, s, mode, params.max_input_tokens) for p, s in typed]  # the same in both
    answers, seconds = {}, {}
    answers["before"], seconds["before"] = batched(
        lambda c: complete_prompts(loaded.model, prompter, prompts[c], params)
    )
    answers["after"], seconds["after"] = batched(lambda c: complete_batch(loaded.model, prompter, typed[c], params))
    answers["line start"], seconds["line start"] = batched(
        lambda c: complete_batch(loaded.model, prompter, at_start[c], params)
    )
    answers["line start, shaped"] = [
        t[len(i) :] if t.startswith(i) else t.lstrip(INDENT_CHARS)
        for t, (_, i, _, _) in zip(answers["line start"], chosen, strict=True)
    ]
    # the fix's own check: the answers before, less the one space before their code
    same = sum(a == b[indent_cut(b) :] for a, b in zip(answers["after"], answers["before"], strict=True))
    truth = [(indent, code) for _, indent, code, _ in chosen]
    lines = {
        arm: [
            first_line(t) if arm == "line start" else indent + first_line(t)
            for t, (indent, _) in zip(texts, truth, strict=True)
        ]
        for arm, texts in answers.items()
    }
    figures = {arm: score(lines[arm], truth) for arm in ARMS}
    n = len(chosen)
    print(f"{args.run}: {n} cursors after indentation, {mode}, greedy, single-line, {args.max_new_tokens} new tokens")
    print(f"{cpu_name()}, {args.threads} thread(s); seconds per arm: { {k: round(v, 1) for k, v in seconds.items()} }")
    print(f"after: the answers before less the one space before their code: {same}/{n}")
    print("| arm | exact line | code exact | extra/other indentation | empty | edit similarity |")
    print("|---|---|---|---|---|---|")
    for arm in ARMS:
        f = figures[arm]
        print(
            f"| {arm} | {f['exact']}/{n} | {f['code_exact']}/{n} | {f['indent_off']}/{n} | {f['empty']}/{n} "
            f"| {f['edit_sim']:.3f} |"
        )
    if args.json:
        samples = [
            {"indent": i, "code": c, **{arm: answers[arm][k] for arm in ARMS}} for k, (_, i, c, _) in enumerate(chosen)
        ]
        out = {"run": args.run, "mode": mode, "holes": n, "figures": figures, "seconds": seconds, "samples": samples}
        Path(args.json).write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
