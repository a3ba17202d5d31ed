"""Throughput of the token stages: tokenization (cold cache) and FIM + packing of cached tokens.

    .venv/bin/fimtune data build --package transformers --out /tmp/tfcorpus --no-near-dedup --overwrite
    .venv/bin/python benchmarks/token_stages.py /tmp/tfcorpus          # both stages, embedded tokenizer
    .venv/bin/python benchmarks/token_stages.py /tmp/tfcorpus --model bigcode/starcoderbase-1b

Targets (the data path must never slow a GPU training at 100k tokens/s): tokenization
>= 0.5M tokens/s per core, FIM + packing >= 5M tokens/s.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

TOKENIZE_TARGET_PER_CORE = 0.5e6
FIM_PACK_TARGET = 5e6
EPOCHS = 3


def _setup(dataset_dir: Path, model: str) -> tuple[Any, Any, Any, Any]:
    from fimtune.config import RunConfig
    from fimtune.hub import load_tokenizer
    from fimtune.preview import load_split
    from fimtune.tokens import ensure_fim_tokens

    tokenizer = copy.deepcopy(load_tokenizer(model))
    fim_tokens, _ = ensure_fim_tokens(tokenizer)  # as training does: the cache key includes added tokens
    return load_split(Path(dataset_dir), "train"), tokenizer, fim_tokens, RunConfig()


def _cores() -> int:
    threads = os.environ.get("RAYON_NUM_THREADS") or os.environ.get("RAYON_RS_NUM_CPUS")
    if os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("false", "0"):
        return 1
    return int(threads) if threads else len(os.sched_getaffinity(0))


def bench_tokenize(dataset_dir: Path | str, model: str = "embedded") -> dict[str, Any]:
    """Tokenize the train split into a fresh cache: tokens/s, per core (the Rust side uses every core)."""
    from fimtune.tokenization import tokenize_split

    ds, tokenizer, _, _ = _setup(Path(dataset_dir), model)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        split = tokenize_split(ds, tokenizer, progress=False, cache_dir=Path(cache))
        seconds = time.perf_counter() - t0
    cores = _cores()
    return {
        "stage": "tokenize",
        "documents": split.n_docs,
        "tokens": split.n_tokens,
        "chars_per_token": round(split.chars_per_token, 3),
        "seconds": round(seconds, 3),
        "cores": cores,
        "tokens_per_s": round(split.n_tokens / seconds),
        "tokens_per_s_per_core": round(split.n_tokens / seconds / cores),
        "target_per_core": TOKENIZE_TARGET_PER_CORE,
    }


def bench_fim_pack(dataset_dir: Path | str, model: str = "embedded", **fim: Any) -> dict[str, Any]:
    """FIM + packing of cached tokens (default config: token unit, boundary-aware, 2048), then serving rows."""
    from fimtune.packing import TrainRows, documents, pack_spec
    from fimtune.tokens import document_separator_id

    ds, tokenizer, fim_tokens, cfg = _setup(Path(dataset_dir), model)
    for key, value in fim.items():
        setattr(cfg.fim, key, value)
    docs = documents(ds, tokenizer, cfg, progress=False)  # cached after the first run
    rows = TrainRows(docs, pack_spec(cfg, fim_tokens, document_separator_id(tokenizer)))
    packed, epoch_seconds = [], []
    for epoch in range(EPOCHS):
        t0 = time.perf_counter()
        packed.append(rows.packed(epoch))
        epoch_seconds.append(time.perf_counter() - t0)
    pack_seconds = sum(epoch_seconds)
    tokens = sum(p.stats.tokens for p in packed)
    rows.load_state_dict({"epoch": EPOCHS - 1, "offset": 0})  # serve the epoch packed last
    t0 = time.perf_counter()
    served = sum(len(next(rows)["input_ids"]) for _ in range(rows.rows_per_epoch()))
    serve_seconds = time.perf_counter() - t0
    return {
        "stage": f"fim+pack (unit {cfg.fim.unit}, spans {cfg.fim.spans}, {cfg.packing.mode})",
        "documents": packed[0].stats.documents,
        "tokens_per_epoch": packed[0].stats.tokens,
        "epochs": EPOCHS,
        "seconds": round(pack_seconds, 3),
        "tokens_per_s": round(tokens / pack_seconds),  # all epochs' tokens over their time
        "epoch_tokens_per_s": [round(p.stats.tokens / t) for p, t in zip(packed, epoch_seconds, strict=True)],
        "rows_served_tokens_per_s": round(served / serve_seconds),
        "target": FIM_PACK_TARGET,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="a `fimtune data build` folder (e.g. the transformers source corpus)")
    parser.add_argument("--model", default="embedded")
    ns = parser.parse_args()
    results = [
        bench_tokenize(ns.dataset, ns.model),
        bench_fim_pack(ns.dataset, ns.model),
        bench_fim_pack(ns.dataset, ns.model, spans="line"),
        bench_fim_pack(ns.dataset, ns.model, unit="char"),
    ]
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
