"""Typed config: YAML + overrides, errors that name the key, help from field docstrings."""

from pathlib import Path

import pytest

from fimtune.config import (
    CorpusConfig,
    RunConfig,
    describe,
    field_docs,
    load_config,
    load_run_config,
    save_config,
)
from fimtune.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_defaults_and_overrides():
    cfg = load_run_config(None, ["train.max_steps=7", "lora.r=16", "fim.spm_rate=0.25", "output_dir=x/y"])
    assert (cfg.train.max_steps, cfg.lora.r, cfg.fim.spm_rate, cfg.output_dir) == (7, 16, 0.25, "x/y")
    assert cfg.packing.seq_length == RunConfig().packing.seq_length


def test_text_overrides_keep_their_text():
    """YAML read `output_dir=1.10` as 1.1, `=010` as 8 (octal) and a date as a date (an error)."""
    for text in ("1.10", "010", "2024-06-01", "yes", "1_000"):
        cfg = load_run_config(None, [f"output_dir={text}", f"data.hf={text}"])
        assert (cfg.output_dir, cfg.data.hf) == (text, text)
    cfg = load_run_config(None, ["data.hf=null", "model.attn_implementation=~", "output_dir='a b'"])
    assert (cfg.data.hf, cfg.model.attn_implementation, cfg.output_dir) == (None, None, "a b")


def test_text_overrides_are_not_read_as_yaml_structures():
    """A text key's value was cut at ` #` (a YAML comment) without a word, and one with `: ` or a
    leading `- ` refused as a mapping or a list ("must be a string; got {...}")."""
    for text in ("runs/try #2", "code/v2: fixed", "- draft", "[x]"):
        cfg = load_run_config(None, [f"output_dir={text}", f"data.path={text}", f"model.name_or_path={text}"])
        assert (cfg.output_dir, cfg.data.path, cfg.model.name_or_path) == (text, text, text)


def test_integers_with_leading_zeros_are_decimal(tmp_path):
    """YAML 1.1 read `max_steps: 010` as octal 8, in a file and in an override, without a word."""
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_steps: 010\n  save_every: 0050\nlora:\n  r: 08\n")
    with pytest.raises(ConfigError, match="'lora.r' must be an integer; got '08'"):  # as before: not octal
        load_run_config(p)
    cfg = load_run_config(p, ["lora.r=016", "train.eval_every=0_20"])
    assert (cfg.train.max_steps, cfg.train.save_every, cfg.lora.r, cfg.train.eval_every) == (10, 50, 16, 20)
    assert load_run_config(None, ["lora={r: 010}"]).lora.r == 10


def test_list_and_optional_overrides():
    cfg = load_run_config(None, ["lora.target_modules=q_proj,v_proj", "train.max_steps=null"])
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.max_steps is None


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("lora.rank=8", "did you mean 'lora.r'"),
        ("trian.max_steps=3", "did you mean 'train'"),
        ("train.max_step=3", "did you mean 'train.max_steps'"),
        ("train.max_steps=abc", "must be an integer"),
        ("fim.unit=word", "must be one of token, char"),
        ("train.gradient_checkpointing=maybe", "must be true or false"),
        ("lora=3", "is a section"),
        ("max_steps", "key=value"),
        ("train.max_steps.x=1", "'train.max_steps' is not a section"),  # was a TypeError traceback
        ("model.attn_implementation=flash", "must be one of sdpa, eager"),  # was transformers' traceback
        ("lora.target_modules=[q_proj, v_proj", "must be a list"),  # was ['[q_proj', 'v_proj']
        ("lora.target_modules=q_proj,v_proj]", "must be a list"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("'", "'")):
        load_run_config(None, [override])


@pytest.mark.parametrize(
    "override",
    [
        "train.log_every=0",  # a ZeroDivisionError after the first step
        "train.batch_size=0",
        "train.gradient_accumulation_steps=0",
        "packing.seq_length=0",
        "lora.r=0",
        "lora.dropout=1.5",
        "train.learning_rate=-1",
        "train.learning_rate=.nan",
        "seed=-1",
        "train.max_grad_norm=-1",  # a negative clip factor: gradient ascent, exit 0
        "train.max_steps=0",  # was a whole epoch
        "train.max_steps=-3",  # was no step and no adapter, exit 0
        "fim.fim_rate=1.5",
        "fim.line_end_rate=-0.5",
        "data.validation_size=0",
    ],
)
def test_numbers_out_of_range_name_the_key(override, tmp_path):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"config key '{key}' must be"):
        load_run_config(None, [override])
    p = tmp_path / "c.yaml"
    section, _, name = key.rpartition(".")
    value = override.split("=")[1]
    p.write_text(f"{section}:\n  {name}: {value}\n" if section else f"{name}: {value}\n")
    with pytest.raises(ConfigError, match=f"{p}: config key '{key}' must be"):
        load_run_config(p)


@pytest.mark.parametrize(
    ("override", "meant"),
    [
        ("learning_rate=1e-4", "train.learning_rate"),  # was "did you mean 'packing'?"
        ("dtype=bf16", "model.dtype"),  # was 'data'
        ("max_steps=10", "train.max_steps"),  # was the list of sections
        ("r=4", "lora.r"),  # was 'lora'
        ("train.MAX_STEPS=10", "train.max_steps"),
    ],
)
def test_a_field_given_outside_its_section_names_its_full_key(override, meant, tmp_path):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^unknown config key '{key}' \(did you mean '{meant}'\?\)$"):
        load_run_config(None, [override])
    if "." not in key:  # in a flat file too, as TrainingArguments are written
        p = tmp_path / "c.yaml"
        p.write_text(override.replace("=", ": ") + "\n")
        with pytest.raises(ConfigError, match=rf"^{p}: unknown config key '{key}' \(did you mean '{meant}'\?\)$"):
            load_run_config(p)


def test_an_empty_output_dir_or_model_is_refused(tmp_path):
    """`output_dir=$RUN` with RUN unset trained into the working folder (the error for a folder not
    empty said to pass --resume, which then wrote the run there, over the folder's own config.yaml)."""
    for key in ("output_dir", "model.name_or_path"):
        for value in ("", " ", "''"):
            with pytest.raises(ConfigError, match=f"^config key '{key}' is empty: give it a value"):
                load_run_config(None, [f"{key}={value}"])
    p = tmp_path / "c.yaml"
    p.write_text("output_dir: ''\n")
    with pytest.raises(ConfigError, match=f"^{p}: config key 'output_dir' is empty"):
        load_run_config(p)


def test_an_overrides_error_does_not_blame_the_file(tmp_path):
    """`--config FILE train.batch_size=0` said FILE had the bad value: the user looks there in vain."""
    seed = Path(__file__).parents[1] / "configs" / "seed-starcoderbase-1b.yaml"
    for override, fragment in [
        ("train.batch_size=0", "config key 'train.batch_size' must be at least 1; got 0"),
        ("train.max_steps=abc", "config key 'train.max_steps' must be an integer; got 'abc'"),
        ("fim={fim_rate: 2}", "config key 'fim.fim_rate' must be from 0 to 1; got 2.0"),
        ("model.attn_implementation=flash", "config key 'model.attn_implementation' must be one of"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_run_config(seed, [override])
        assert str(e.value).startswith(fragment), str(e.value)
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  batch_size: 0\n")  # the file's own error still names it, overrides or not
    with pytest.raises(ConfigError, match=f"^{p}: config key 'train.batch_size' must be at least 1"):
        load_run_config(p, ["train.max_steps=3"])


def test_none_as_python_writes_it_is_null_where_a_key_takes_null(tmp_path):
    """`data.hf=None` named a Hub dataset "None", `lora.target_modules=None` a module "None", and
    `train.max_steps=None` was not an integer: each means null where the key takes one."""
    cfg = load_run_config(None, ["data.hf=None", "lora.target_modules=None", "train.max_steps=None"])
    assert (cfg.data.hf, cfg.lora.target_modules, cfg.train.max_steps) == (None, None, None)
    with pytest.raises(ConfigError, match="model.quantization"):  # a key without null keeps its own choices
        load_run_config(None, ["model.quantization=None"])
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  hf: None\n")  # in a file too
    assert load_run_config(p).data.hf is None


def test_a_section_override_keeps_the_files_other_keys():
    """`lora={r: 8}` over the seed preset reset its alpha, dropout and targets to the defaults."""
    seed = Path(__file__).parents[1] / "configs" / "seed-starcoderbase-1b.yaml"
    cfg = load_run_config(seed, ["lora={r: 8, alpha: 16}"])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 16, 0.1)
    assert cfg.lora.target_modules == load_run_config(seed).lora.target_modules


def test_line_end_cuts_need_character_cuts_at_line_starts():
    with pytest.raises(
        ConfigError, match=r"'fim.line_end_rate'.*fim.unit=char and fim.spans=line \(got unit 'token', spans 'line'\)"
    ):
        load_run_config(None, ["fim.line_end_rate=0.5", "fim.spans=line"])
    cfg = load_run_config(None, ["fim.line_end_rate=0.5", "fim.spans=line", "fim.unit=char"])
    assert cfg.fim.line_end_rate == 0.5


def test_numbers_at_their_edges_load():
    edges = ["train.max_steps=null", "train.eval_every=0", "train.save_every=0", "train.max_grad_norm=0"]
    cfg = load_run_config(None, [*edges, "lora.dropout=0", "train.learning_rate=0", "seed=4294967295"])
    assert cfg.train.max_steps is None and cfg.seed == 2**32 - 1


def test_yaml_unknown_key_names_file_and_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  learning_rte: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(p)
    assert str(p) in str(e.value) and "train.learning_rate" in str(e.value)


def test_yaml_key_given_twice_is_an_error(tmp_path):
    """YAML keeps the last of two equal keys: `lora:` twice would lose the first section's values."""
    p = tmp_path / "dup.yaml"
    p.write_text("lora:\n  r: 4\nlora:\n  alpha: 3\n")
    with pytest.raises(ConfigError, match="the key 'lora' is given twice"):
        load_run_config(p)
    p.write_text("lora:\n  r: 4\n  r: 16\n")
    with pytest.raises(ConfigError, match="the key 'r' is given twice"):
        load_run_config(p)
    assert load_run_config(None, ["model.attn_implementation=kernels-community/flash-attn"]).model
    seed = Path(__file__).parents[1] / "configs" / "seed-starcoderbase-1b.yaml"  # sets train.max_steps
    with pytest.raises(ConfigError, match="'train.max_steps' is not a section"):  # was a TypeError
        load_run_config(seed, ["train.max_steps.x=1"])


def test_yaml_section_not_a_mapping_with_an_override(tmp_path):
    """`lora: 3` in the file and `lora.r=4` on the command line was a TypeError traceback."""
    p = tmp_path / "c.yaml"
    p.write_text("lora: 3\n")
    with pytest.raises(ConfigError, match="config key 'lora' is a section: give a mapping, not 3"):
        load_run_config(p, ["lora.r=4"])
    p.write_text("lora:\n")  # an empty section, its keys commented out, takes overrides
    assert load_run_config(p, ["lora.r=4"]).lora.r == 4


def test_yaml_empty_section_loads_as_its_defaults(tmp_path):
    """A section whose keys are all commented out was refused ('give a mapping, not None') unless an
    override named one of its keys."""
    p = tmp_path / "c.yaml"
    p.write_text("lora:\n  # r: 4\ntrain:\n  max_steps: 5\n")
    cfg = load_run_config(p)
    assert (cfg.lora, cfg.train.max_steps) == (RunConfig().lora, 5)
    with pytest.raises(ConfigError, match="config key 'lora' is a section: give a mapping, not None"):
        load_run_config(None, ["lora=null"])  # an override still gives a mapping or a key


def test_yaml_merge_keys_and_odd_keys(tmp_path):
    """The duplicate-key check refused YAML's merge key (`<<: *anchor`) and crashed (TypeError) on a
    list or mapping as a key."""
    p = tmp_path / "c.yaml"
    p.write_text("lora: &lora\n  r: 4\n  alpha: 8\ntrain:\n  <<: {max_steps: 3, batch_size: 2}\n  max_steps: 5\n")
    cfg = load_run_config(p)
    assert (cfg.lora.r, cfg.train.max_steps, cfg.train.batch_size) == (4, 5, 2)
    p.write_text("train:\n  [max_steps, batch_size]: 3\n")
    with pytest.raises(ConfigError, match=f"(?s)config file '{p}' is not valid YAML: .*unhashable key"):
        load_run_config(p)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("lora:\n  r: 4\nlora:\n  alpha: 8\n", "line 3, column 1: the key 'lora' is given twice"),
        ("train:\n\tmax_steps: 4\n", "line 2, column 1: found character '\\t' that cannot start any token"),
        ("train: {max_steps: 10\n", "line 2, column 1: expected ',' or '}'"),
        ("output_dir: a: b\n", "line 1, column 14: mapping values are not allowed here"),
        ('output_dir: "\x01"\n', "character 14: unacceptable character #x0001"),
    ],
)
def test_yaml_syntax_error_is_one_line_at_its_line_and_column(tmp_path, text, where):
    """PyYAML's message spanned 4-7 lines, each place given as `in "<byte string>"`, not the file."""
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_run_config(p)
    assert str(e.value).startswith(f"config file '{p}' is not valid YAML: {where}"), str(e.value)
    assert "\n" not in str(e.value) and "byte string" not in str(e.value)


def test_yaml_not_a_mapping_and_missing(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")


def test_yaml_not_utf8_or_a_folder_names_the_file(tmp_path):
    """A Latin-1 file was a UnicodeDecodeError traceback; a UTF-16 one (PowerShell's `>`) too."""
    p = tmp_path / "c.yaml"
    p.write_bytes("output_dir: runs/café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"config file '{p}' is not UTF-8 text .*save it as UTF-8"):
        load_run_config(p)
    p.write_text("output_dir: runs/café\n", encoding="utf-16")  # with its byte-order mark
    assert load_run_config(p).output_dir == "runs/café"
    with pytest.raises(ConfigError, match=f"config file '{tmp_path}' is not a file"):
        load_run_config(tmp_path)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_run_config(path)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_run_config(tmp_path / "resolved.yaml") == cfg


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"seed-starcoderbase-1b.yaml", "starcoderbase-1b.yaml", "qlora-starcoderbase-1b.yaml"} <= names


def test_fast_preset_is_the_recipe_on_the_fast_path():
    seed = load_run_config(Path(__file__).parents[1] / "configs" / "seed-starcoderbase-1b.yaml")
    fast = load_run_config(Path(__file__).parents[1] / "configs" / "starcoderbase-1b.yaml")
    assert (fast.model.dtype, fast.model.attn_implementation) == ("bf16", "varlen")
    assert (fast.train.compile, fast.train.loss_chunk_tokens, fast.train.mixed_precision) == (True, 4096, "bf16")
    assert fast.train.activation_memory == 1.0  # as the benchmark's (c): 14.98 GiB, under the 16 GiB target
    assert (fast.train.hashed_dropout, seed.train.hashed_dropout) == (True, False)
    assert fast.train.attention_kernel == "auto"
    assert fast.packing.mode == "boundary_aware"
    for section in ("fim", "data"):
        assert getattr(fast, section) == getattr(seed, section), section
    assert (fast.lora.r, fast.lora.alpha, fast.lora.dropout) == (seed.lora.r, seed.lora.alpha, seed.lora.dropout)
    same = ("max_steps", "batch_size", "learning_rate", "lr_scheduler", "warmup_steps", "weight_decay")
    assert all(getattr(fast.train, k) == getattr(seed.train, k) for k in same)


def test_seed_preset_is_the_model_card():
    cfg = load_run_config(Path(__file__).parents[1] / "configs" / "seed-starcoderbase-1b.yaml")
    assert cfg.model.name_or_path == "bigcode/starcoderbase-1b" and cfg.model.dtype == "fp32"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (4, 8, 0.1)
    assert set(cfg.lora.target_modules) == {"c_proj", "c_attn", "q_attn", "c_fc"}
    assert (cfg.fim.fim_rate, cfg.fim.spm_rate, cfg.packing.seq_length) == (0.5, 0.5, 2048)
    t = cfg.train
    assert (t.max_steps, t.batch_size, t.learning_rate, t.warmup_steps, t.weight_decay) == (100, 4, 5e-4, 30, 0.01)
    assert t.lr_scheduler == "cosine"
    assert (cfg.data.hf, cfg.data.text_column, cfg.data.validation_size) == ("smangrul/hf-stack-v1", "content", 4000)
    # the recipe's own step, on a GPU too (where fimtune's defaults compile and chunk the loss)
    assert (t.compile, t.loss_chunk_tokens, t.hashed_dropout, cfg.model.attn_implementation) == (
        False,
        0,
        False,
        "sdpa",
    )
    assert (t.mixed_precision, t.gradient_checkpointing, cfg.packing.mode) == ("no", True, "seed_exact")


def test_every_field_has_help():
    for key, _tp, _default, doc in describe(RunConfig):
        assert doc, f"{key} has no docstring"
    assert all(field_docs(CorpusConfig).values())
    assert set(field_docs(CorpusConfig)) == {f for f in CorpusConfig.__dataclass_fields__}


def test_load_config_generic_dataclass(tmp_path):
    p = tmp_path / "corpus.yaml"
    p.write_text("near_dedup_threshold: 0.9\nsplit_by: repo\n")
    cfg = load_config(CorpusConfig, p)
    assert (cfg.near_dedup_threshold, cfg.split_by) == (0.9, "repo")


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 2 and cfg.distributed_type is not None


def test_bare_no_is_the_string_not_false():
    assert load_run_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_a_preset_is_named_from_any_folder(tmp_path, monkeypatch):
    """`--config seed-starcoderbase-1b` is configs/seed-starcoderbase-1b.yaml wherever the command runs
    (a project's own folder); a missing file's error lists the presets; a file here of that name wins."""
    from fimtune.config import PRESETS, preset_names

    seed = load_run_config(PRESETS / "seed-starcoderbase-1b.yaml")
    monkeypatch.chdir(tmp_path)
    assert load_run_config("seed-starcoderbase-1b") == seed == load_run_config("seed-starcoderbase-1b.yaml")
    assert {"seed-starcoderbase-1b", "smollm2-demo", "qlora-starcoderbase-1b"} <= set(preset_names())
    with pytest.raises(ConfigError, match=r"config file 'seed-starcoder' does not exist; presets: .*smollm2-demo"):
        load_run_config("seed-starcoder")
    (tmp_path / "smollm2-demo.yaml").write_text("train:\n  max_steps: 3\n")
    assert load_run_config("smollm2-demo.yaml").train.max_steps == 3  # the file here, not the preset
