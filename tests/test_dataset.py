"""Loading a run's data: a `fimtune data build` folder read as its rows, its columns checked."""

import logging

import pytest

from fimtune.config import load_run_config
from fimtune.dataset import load_splits, training_rows
from fimtune.errors import DataError
from tests.conftest import corpus_texts, write_dataset_dir


def data_config(path, *overrides):
    return load_run_config(None, [f"data.path={path}", "packing.seq_length=64", *overrides]).data


def test_a_folder_saved_with_a_format_gives_its_rows_as_text(tmp_path):
    import datasets

    path = write_dataset_dir(tmp_path / "data", corpus_texts(6), corpus_texts(3))
    datasets.load_from_disk(str(path)).with_format("arrow").save_to_disk(str(tmp_path / "arrow"))
    splits = load_splits(data_config(tmp_path / "arrow"))
    assert splits["train"][0]["content"] == corpus_texts(6)[0]


def test_a_text_column_of_other_values_is_named(tmp_path):
    path = write_dataset_dir(tmp_path / "data", corpus_texts(6), corpus_texts(3))
    with pytest.raises(
        DataError, match=r"split 'train': column 'size' holds Value\('int64'\), not text; set data.text_column"
    ):
        load_splits(data_config(path, "data.text_column=size"))


def test_split_settings_for_the_hub_with_a_folder_are_told(tmp_path, caplog):
    path = write_dataset_dir(tmp_path / "data", corpus_texts(6), corpus_texts(3))
    with caplog.at_level(logging.WARNING, logger="fimtune.dataset"):
        splits = load_splits(data_config(path, "data.validation_size=1"))
    assert len(splits["validation"]) == 3
    assert "data.validation_size and data.split_mode apply to data.hf sources" in caplog.text


def test_an_empty_validation_split_is_told(tmp_path, tiny_tokenizer, token_cache, caplog):
    import datasets
    from accelerate import Accelerator

    from fimtune.tokens import ensure_fim_tokens

    text = datasets.Features({"content": datasets.Value("string")})
    splits = {"train": corpus_texts(8), "validation": []}
    datasets.DatasetDict(
        {k: datasets.Dataset.from_dict({"content": v}, features=text) for k, v in splits.items()}
    ).save_to_disk(
        str(tmp_path / "data"), num_shards={"train": 1, "validation": 1}
    )  # as `fimtune data build` writes a split it holds nothing back for
    cfg = load_run_config(None, [f"data.path={tmp_path / 'data'}", "packing.seq_length=64"])
    with caplog.at_level(logging.WARNING, logger="fimtune.dataset"):
        _, make_eval, _ = training_rows(
            cfg, tiny_tokenizer, ensure_fim_tokens(tiny_tokenizer)[0], Accelerator(cpu=True)
        )
    assert next(make_eval(), None) is None
    assert "the validation split is empty: no validation loss will be logged" in caplog.text


def test_an_empty_split_saved_without_a_data_file_is_read_as_empty(tmp_path, caplog):
    """`save_to_disk` writes no data file for a split of no rows, and `datasets.load_from_disk`
    then fails on the folder with an IndexError: a folder made outside `fimtune data build` with
    an empty validation split was a traceback."""
    path = write_dataset_dir(tmp_path / "data", corpus_texts(6), [])
    assert not list((path / "validation").glob("*.arrow"))  # the folder as datasets writes it
    splits = load_splits(data_config(path))
    assert len(splits["train"]) == 6 and splits["train"][0]["content"] == corpus_texts(6)[0]
    assert len(splits["validation"]) == 0 and "content" in splits["validation"].column_names
    (path / "dataset_dict.json").write_text('{"splits": ', encoding="utf-8")  # cut short
    with pytest.raises(DataError, match="dataset_dict.json' does not list the splits"):
        load_splits(data_config(path))


def test_a_folder_of_source_files_as_data_path_is_told_to_be_built_elsewhere(tmp_path):
    """data.path pointing at the user's code (not a built dataset) suggested `--out` that very folder,
    which `data build` refuses (it exists) and which would put the dataset among the sources."""
    from pathlib import Path

    from fimtune.dataset import check_folder

    code = tmp_path / "code"
    code.mkdir()
    (code / "a.py").write_text("x = 1\n")
    with pytest.raises(DataError) as e:
        check_folder(code)
    assert f"build one from the code in it with `fimtune data build {code} --out data/code` and use data/code" in str(
        e.value
    )
    (code / "config.yaml").write_text("name: a project's own\n")  # still the user's code
    with pytest.raises(DataError, match="build one from the code in it"):
        check_folder(code)
    (code / "checkpoints").mkdir()
    with pytest.raises(DataError, match="is a run folder written by `fimtune train`, not a dataset folder"):
        check_folder(code)
    with pytest.raises(DataError, match="build one with `fimtune data build SOURCE --out .*missing`"):
        check_folder(Path(tmp_path / "missing"))
