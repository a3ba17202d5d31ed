"""Eval's generation against the server's decoder, on a run's held-out infill holes (figures go to RESULTS.md).

    .venv/bin/python benchmarks/eval_generation.py RUN                 # 30 holes, tuned, 3 repeats
    .venv/bin/python benchmarks/eval_generation.py RUN --holes 60 --repeats 5 --variant base

The holes are `fimtune eval`'s (:func:`fimtune.evaluate.holes.draw_holes` on the run's validation
split, its seed), with its limits per kind (greedy, `MAX_NEW_TOKENS`, `MAX_INPUT_TOKENS`, single-line
for line holes, block holes ended by :func:`~fimtune.evaluate.syntax.left_block`), in the run's
infill layout. Three ways generate them, interleaved in each repeat:

(A) ``generate``: :func:`fimtune.evaluate.variants.generate`, eval's path (`model.generate` on
    left-padded batches of ``--batch-size``, sorted by length, rows dropped as they finish);
(B) ``decoder batch``: :class:`fimtune.serve.decoding.Decoder` on the same batches (no drafts);
(C) ``decoder one``: the Decoder one hole at a time (prompt-lookup drafts, greedy).

The Decoder has no ``done(text)`` predicate: a row's ``should_stop`` asks ``left_block`` of its
new text, as eval's ``TextStop`` does. Texts are compared with (A)'s; for each that differs, the
first differing token is found and the tuned model's logits there, from one unpadded forward of
the prompt and the tokens both agree on, tell a float-level tie (the two tokens' logits within
``TIE`` of each other) from a real difference.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

TIE = 1e-3  # logits this close: which token wins depends on summation order (padding, batch width)
WAYS = ("generate", "decoder batch", "decoder one")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a run folder (its validation split gives the holes)")
    p.add_argument("--holes", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16, help="eval's --batch-size (default 16)")
    p.add_argument("--variant", choices=("tuned", "base"), default="tuned")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the figures and each hole's texts here")
    return p.parse_args(argv)


def kind_params(kind: str, mode: str) -> tuple[Any, Any]:
    """Eval's params and ``done`` for holes of ``kind`` (as :func:`fimtune.evaluate.infill.complete_holes`)."""
    from fimtune.evaluate.infill import MAX_INPUT_TOKENS, MAX_NEW_TOKENS
    from fimtune.evaluate.syntax import left_block
    from fimtune.generate import GenerationParams

    params = GenerationParams(
        max_new_tokens=MAX_NEW_TOKENS[kind], single_line=kind == "line", mode=mode, max_input_tokens=MAX_INPUT_TOKENS
    )
    return params, left_block if kind == "block" else None


def with_ids(run: Any, *args: Any) -> Any:
    """``run(*args)`` with eval's completions carrying their new token ids (``.ids``)."""
    import fimtune.generate as g

    original = g._completion

    def completion(prompter: Any, new: list[int], *args: Any, **kwargs: Any) -> Any:
        c = original(prompter, new, *args, **kwargs)
        c.ids = list(new)
        return c

    g._completion = completion
    try:
        return run(*args)
    finally:
        g._completion = original


def decoder_rows(decoder: Any, prompts: list[list[int]], params: Any, done: Any, one: bool, size: int) -> list[Any]:
    """The Decoder's completions of ``prompts`` (each with ``.ids``): one at a time, or in batches of ``size``."""
    from fimtune.serve.decoding import Row

    def row(prompt: list[int]) -> tuple[Row, list[int]]:
        ids: list[int] = []
        text = decoder.prompter.tokenizer

        def stop() -> bool:  # what eval's TextStop asks of a row's new text
            return done is not None and bool(ids) and done(text.decode(ids, skip_special_tokens=False))

        return Row(prompt, params, on_token=lambda t, piece, end: ids.append(t), should_stop=stop), ids

    step = 1 if one else size
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    result: list[Any] = [None] * len(prompts)
    for lo in range(0, len(order), step):
        chunk = order[lo : lo + step]
        made = [row(prompts[i]) for i in chunk]
        for i, c, (_, ids) in zip(chunk, decoder.run([r for r, _ in made]), made, strict=True):
            c.ids = ids
            result[i] = c
    return result


def complete_all(way: str, holes: list[Any], model: Any, decoder: Any, mode: str, batch_size: int) -> list[Any]:
    """Every hole's completion (with ``.ids``) the ``way`` gives, kind by kind as eval goes."""
    from fimtune.evaluate.holes import KINDS
    from fimtune.evaluate.variants import fit_params, generate

    prompter, out = decoder.prompter, [None] * len(holes)
    for kind in KINDS:
        idx = [i for i, h in enumerate(holes) if h.kind == kind]
        if not idx:
            continue
        params, done = kind_params(kind, mode)
        windows = [holes[i].window() for i in idx]
        if way == "generate":
            made = with_ids(generate, model, prompter, windows, params, batch_size, None, done)
        else:
            fitted = fit_params(model, params)
            prompts = [prompter.build(p, s, mode, fitted.max_input_tokens) for p, s in windows]
            made = decoder_rows(decoder, prompts, fitted, done, way == "decoder one", batch_size)
        for i, c in zip(idx, made, strict=True):
            out[i] = c
    return out


def first_difference(prompt: list[int], a: list[int], b: list[int], ends: set[int], model: Any) -> dict[str, Any]:
    """Where the new tokens ``a`` and ``b`` first differ, and the unpadded model's logits there."""
    import torch

    a = a[: next((i + 1 for i, t in enumerate(a) if t in ends), len(a))]
    b = b[: next((i + 1 for i, t in enumerate(b) if t in ends), len(b))]
    j = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if j is None:
        return {"token": min(len(a), len(b)), "same_tokens": True}
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + a[:j]])).logits[0, -1].float()
    top2 = logits.topk(2)
    return {
        "token": j,
        "same_tokens": False,
        "a_logit_minus_b": round(float(logits[a[j]] - logits[b[j]]), 6),
        "top2_margin": round(float(top2.values[0] - top2.values[1]), 6),
        "argmax": "a" if int(top2.indices[0]) == a[j] else "b" if int(top2.indices[0]) == b[j] else "other",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from fimtune.dataset import load_splits
    from fimtune.evaluate.holes import draw_holes
    from fimtune.evaluate.infill import held_out_files
    from fimtune.evaluate.run import infill_mode, load
    from fimtune.evaluate.variants import fit_params, variant
    from fimtune.serve.decoding import Decoder

    ctx = load(args.run)
    torch.set_num_threads(args.threads)
    cfg, model, prompter = ctx["cfg"], ctx["model"], ctx["prompter"]
    files = held_out_files(load_splits(cfg.data, cfg.seed)["validation"], cfg.data.text_column)
    holes = draw_holes(files, args.holes, cfg.seed)
    mode = infill_mode(cfg)
    ends = set(prompter.end_ids)
    times: dict[str, list[float]] = {w: [] for w in WAYS}
    texts: dict[str, list[Any]] = {}
    with variant(model, args.variant):
        model.eval()
        decoder = Decoder(model, prompter)
        for repeat in range(args.repeats):
            for way in WAYS:
                began = time.perf_counter()
                out = complete_all(way, holes, model, decoder, mode, args.batch_size)
                times[way].append(time.perf_counter() - began)
                if repeat == 0:
                    texts[way] = out
                elif [c.text for c in out] != [c.text for c in texts[way]]:
                    print(f"warning: {way}'s texts changed in repeat {repeat + 1}", file=sys.stderr)
                print(f"repeat {repeat + 1} {way}: {times[way][-1]:.1f} s", file=sys.stderr, flush=True)
        rows, details = [], []
        for way in WAYS:
            same = sum(a.text == b.text for a, b in zip(texts["generate"], texts[way], strict=True))
            med = statistics.median(times[way])
            rows.append((way, med / len(holes), same, statistics.median(times["generate"]) / med))
        for i, h in enumerate(holes):
            a = texts["generate"][i]
            record = {"kind": h.kind, "generate": a.text}
            for way in WAYS[1:]:
                b = texts[way][i]
                record[way] = b.text
                if b.text != a.text:
                    fitted = fit_params(model, kind_params(h.kind, mode)[0])
                    prompt = prompter.build(*h.window(), mode, fitted.max_input_tokens)
                    record[f"{way} difference"] = first_difference(prompt, a.ids, b.ids, ends, model)
            details.append(record)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s); {len(holes)} holes ({mode}), {args.variant}, batch {args.batch_size}, "
          f"medians of {args.repeats}")  # fmt: skip
    print("| way | s per hole | identical texts | speed-up |\n|---|---|---|---|")
    for way, per, same, up in rows:
        print(f"| {way} | {per:.3f} | {same}/{len(holes)} | {up:.2f}x |")
    for i, d in enumerate(details):
        for way in WAYS[1:]:
            if f"{way} difference" in d:
                print(f"hole {i} ({d['kind']}), {way}: {d[f'{way} difference']}")
                print(f"    A: {d['generate']!r}\n    B: {d[way]!r}")
    if args.json:
        args.json.write_text(json.dumps({"times": times, "holes": details}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
