"""From `data.*` config to the splits training and evaluation read.

data.path (a `fimtune data build` folder) | data.hf (a Hub dataset id)
  -> DatasetDict(train, validation) with a text column
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fimtune.config import DataConfig, RunConfig
from fimtune.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")


def check_source(cfg: DataConfig) -> None:
    """Exactly one of `path`, `hf`."""
    if bool(cfg.path) == bool(cfg.hf):
        raise DataError("set exactly one of data.path (a `fimtune data build` folder) or data.hf (a Hub dataset id)")


def check_folder(path: Path) -> None:
    """``path`` is a dataset folder (what can be told without reading it: before a model loads)."""
    if not (path / "dataset_dict.json").is_file():
        from fimtune.corpus.files import is_run_folder

        if is_run_folder(path):
            raise DataError(f"'{path}' is a run folder written by `fimtune train`, not a dataset folder")
        if path.is_dir() and any(path.iterdir()):  # the user's code itself, not a build of it
            out = f"data/{path.resolve().name or 'mine'}"
            raise DataError(
                f"'{path}' is not a dataset folder: build one from the code in it with "
                f"`fimtune data build {path} --out {out}` and use {out}"
            )
        raise DataError(f"'{path}' is not a dataset folder: build one with `fimtune data build SOURCE --out {path}`")


def load_splits(cfg: DataConfig, seed: int = 0) -> Any:
    """The train and validation splits named by ``cfg`` (exactly one of `path`, `hf`)."""
    check_source(cfg)
    if cfg.path and (cfg.validation_size is not None or cfg.split_mode != "random"):
        log.warning(
            "data.validation_size and data.split_mode apply to data.hf sources: '%s' keeps the validation "
            "split it was built with (`fimtune data build --validation-size N` sets it)",
            cfg.path,
        )
    splits = _from_disk(Path(cfg.path)) if cfg.path else _from_hub(cfg, seed)
    for name in SPLITS:
        if cfg.text_column not in splits[name].column_names:
            raise DataError(
                f"split '{name}' has no column '{cfg.text_column}' (columns: {', '.join(splits[name].column_names)}); "
                "set data.text_column"
            )
        feature = splits[name].features[cfg.text_column]
        if getattr(feature, "dtype", None) not in ("string", "large_string", "null"):
            raise DataError(
                f"split '{name}': column '{cfg.text_column}' holds {feature}, not text; set data.text_column "
                f"to a column of strings (columns: {', '.join(splits[name].column_names)})"
            )
    if len(splits["train"]) == 0:
        raise DataError("the training split is empty: add sources or lower the validation share")
    return splits


def _from_disk(path: Path) -> Any:
    import datasets

    check_folder(path)
    try:
        names = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"'{path}/dataset_dict.json' does not list the splits ({e!r}): build the folder again"
        ) from None
    missing = [s for s in SPLITS if s not in names]
    if missing:
        raise DataError(f"dataset '{path}' lacks the split(s) {', '.join(missing)}")
    dd = datasets.DatasetDict({name: _load_split(path / name) for name in names})
    return dd.with_format(None)  # rows as Python values, whatever format the folder was saved with


def _load_split(folder: Path) -> Any:
    """One split of a `save_to_disk` folder. A split of no rows saved without ``num_shards`` has no
    data file, which `datasets.load_from_disk` cannot read (an IndexError): an empty dataset of its
    features instead."""
    import datasets

    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if state.get("_data_files"):
        return datasets.Dataset.load_from_disk(str(folder))
    features = datasets.DatasetInfo.from_directory(str(folder)).features
    return datasets.Dataset.from_dict({name: [] for name in features}, features=features)


def _from_hub(cfg: DataConfig, seed: int) -> Any:
    import datasets

    from fimtune.hub import hub_reachable

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline and not hub_reachable():
        raise DataError(
            f"dataset '{cfg.hf}' needs the Hugging Face Hub, which is not reachable: build a local dataset with "
            "`fimtune data build` (folders, packages, parquet/jsonl) and set data.path, or set HF_HUB_OFFLINE=1 "
            "to use a cached copy"
        )
    try:
        ds = datasets.load_dataset(cfg.hf, split="train")
    except Exception as e:  # datasets raises many types (missing cache, gated, bad id)
        raise DataError(f"could not load dataset '{cfg.hf}': {e}") from None
    n_val = cfg.validation_size if cfg.validation_size is not None else max(1, len(ds) // 10)
    if n_val >= len(ds):
        raise DataError(f"data.validation_size={n_val} leaves no training rows ({len(ds)} rows in '{cfg.hf}')")
    if cfg.split_mode == "head":  # the recipe: the first rows are validation, the rest shuffled
        val, train = ds.select(range(n_val)), ds.select(range(n_val, len(ds))).shuffle(seed=seed)
    else:
        parts = ds.train_test_split(test_size=n_val, seed=seed)
        train, val = parts["train"], parts["test"]
    return datasets.DatasetDict(train=train, validation=val)


class Batches:
    """Training batches: ``batch_size`` packed rows stacked, forever; resumable like the rows."""

    def __init__(self, rows: Any, batch_size: int) -> None:
        self.rows, self.batch_size = rows, batch_size

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, Any]:
        from fimtune.packing import stack_rows

        return stack_rows([next(self.rows) for _ in range(self.batch_size)])

    def state_dict(self) -> dict[str, int]:
        return self.rows.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.rows.load_state_dict(state)

    def split_size(self) -> dict[str, Any]:
        return self.rows.split_size()


def eval_batches(rows: Any, batch_size: int) -> Iterator[dict[str, Any]]:
    """Evaluation rows in batches of up to ``batch_size``, once."""
    from fimtune.packing import stack_rows

    buf = []
    for row in rows:
        buf.append(row)
        if len(buf) == batch_size:
            yield stack_rows(buf)
            buf = []
    if buf:
        yield stack_rows(buf)


def training_rows(cfg: RunConfig, tokenizer: Any, fim_tokens: Any, accelerator: Any) -> tuple[Any, Any, int]:
    """(training batches, a function giving a fresh pass of validation batches, training rows per epoch).

    The main process tokenizes first (filling the on-disk cache), the others then read it.
    """
    from fimtune.packing import documents, eval_rows, train_rows
    from fimtune.tokens import document_separator_id

    splits = load_splits(cfg.data, cfg.seed)
    sep = document_separator_id(tokenizer)
    rank, world = accelerator.process_index, accelerator.num_processes
    with accelerator.main_process_first():
        progress = accelerator.is_main_process
        train_docs = documents(splits["train"], tokenizer, cfg, cfg.data.text_column, progress=progress)
        val_docs = documents(splits["validation"], tokenizer, cfg, cfg.data.text_column, progress=progress)
    rows = train_rows(train_docs, cfg, fim_tokens, sep, rank, world)
    n_rows = rows.rows_per_epoch() * world
    val = eval_rows(val_docs, cfg, fim_tokens, sep, rank, world) if len(splits["validation"]) else None
    if val is None and accelerator.is_main_process:
        log.warning(
            "the validation split is empty: no validation loss will be logged; build the data with "
            "validation files (`fimtune data build`: a validation share, or more than one repository "
            "with --split-by repo)"
        )
    if val is not None and val.stats.rows == 0 and accelerator.is_main_process:
        log.warning(
            "the validation split's %d documents (%s tokens) pack into no row of %d tokens: no validation "
            "loss will be logged; add validation files or lower packing.seq_length",
            len(splits["validation"]),
            f"{val.stats.tokens:,}",
            cfg.packing.seq_length,
        )
    if val is not None and val.stats.rows and cfg.train.eval_batches == 0 and accelerator.is_main_process:
        log.warning("train.eval_batches is 0: no validation loss will be logged (null: the whole split)")
    bs = cfg.train.batch_size

    def make_eval() -> Iterator[dict[str, Any]]:
        return eval_batches(val, bs) if val is not None else iter(())

    return Batches(rows, bs), make_eval, n_rows
