"""`fimtune eval`: the tuned model against its base (the same model, adapters disabled), on the same data.

Tasks, each a module with one ``evaluate(...)`` entry point returning a plain dict:

    loss.py       held-out loss per token, left-to-right / PSM / SPM, with perplexity
    infill.py     holes cut in held-out files (line, block, span), greedy FIM completions,
                  exact match, edit similarity, share of filled files that parse
    humaneval.py  the 164 HumanEval problems, pass@k, code run by sandbox.py only

Beside them: holes.py and syntax.py (hole cutting, tree-sitter, truncation), stats.py
(intervals, pass@k), variants.py (base / tuned switching, batched generation),
report.py (report.json, report.md, PNG plots, the printed table) and run.py (the command).
"""
