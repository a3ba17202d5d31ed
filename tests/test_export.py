"""`fimtune export`: one GGUF file that transformers loads back with the merged model's logits, and
that carries the FIM token ids llama.cpp's /infill reads. (llama.cpp itself is not run here.)"""

import os
import resource
import signal
import subprocess
import sys

import torch
from gguf import GGUFReader, Keys, TokenType
from transformers import AutoModelForCausalLM, AutoTokenizer

from fimtune.cli import main
from fimtune.export import permute_rows
from fimtune.merge import merged_model
from tests import tiny
from tests.conftest import train_sentencepiece_style_tokenizer
from tests.runs import ROOT, model_dir, quiet_fit, run_config

CODE = "<fim_prefix>def add(a, b):\n    return a + b  # 123 é<fim_suffix>\n<fim_middle>x = 'y'\n<|endoftext|>"
# (max |logit difference| allowed, relative weight error allowed) per --dtype, on logits of about +-5
TOLERANCE = {"f32": (1e-4, 1e-6), "f16": (2e-2, 1e-3), "bf16": (0.1, 4e-3), "q8_0": (0.5, 1e-2)}


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents() if key in reader.fields else None


def load_gguf(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_an_exported_run_loads_back_with_the_merged_logits_and_its_fim_tokens(
    tmp_path, tiny_tokenizer_without_fim, repetitive_data, token_cache
):
    """A Llama run whose tokenizer got the FIM tokens added: each --dtype loads back in transformers
    with the merged model's logits (f32 within float rounding) and the run's token ids; the FIM ids
    are under llama.cpp's keys, the added tokens CONTROL, and an untied head is written."""
    base = model_dir(tmp_path, tiny_tokenizer_without_fim, "llama")
    run = quiet_fit(run_config(tmp_path, base, repetitive_data, "run", "train.max_steps=3", "train.eval_every=0"))
    merged, tokenizer = merged_model(run)
    ids = torch.tensor([tokenizer.encode(CODE)])
    with torch.no_grad():
        expected = merged(ids).logits
    weights = merged.state_dict()
    for dtype, (logit_tol, weight_tol) in TOLERANCE.items():
        out = tmp_path / "gguf" / f"mine-{dtype}.gguf"
        assert main(["export", str(run), "--out", str(out), "--dtype", dtype, "--quiet"]) == 0
        model = load_gguf(out)
        with torch.no_grad():
            diff = (model(ids).logits - expected).abs().max().item()
        assert diff <= logit_tol, (dtype, diff)
        for name, w in model.state_dict().items():  # q/k un-permuted by transformers: the same matrices
            error = ((w - weights[name]).norm() / weights[name].norm()).item()
            assert error <= weight_tol, (dtype, name, error)
    assert not model.config.tie_word_embeddings

    gguf_tok = AutoTokenizer.from_pretrained(out.parent, gguf_file="mine-f32.gguf")
    assert gguf_tok.encode(CODE) == tokenizer.encode(CODE)
    assert len(gguf_tok) == len(tokenizer) == len(tiny_tokenizer_without_fim) + 4
    reader = GGUFReader(out.parent / "mine-f32.gguf")
    vocab = tokenizer.get_vocab()
    fim = {"fim_pre": "<fim_prefix>", "fim_suf": "<fim_suffix>", "fim_mid": "<fim_middle>", "fim_pad": "<fim_pad>"}
    for key, name in fim.items():
        assert field(reader, f"tokenizer.ggml.{key}_token_id") == vocab[name], key
    assert field(reader, Keys.Tokenizer.PREFIX_ID) == vocab["<fim_prefix>"]  # the older key too
    assert field(reader, Keys.Tokenizer.EOT_ID) == vocab["<|endoftext|>"]  # the end of a middle
    types = field(reader, Keys.Tokenizer.TOKEN_TYPE)
    assert {types[vocab[name]] for name in [*fim.values(), "<|endoftext|>"]} == {TokenType.CONTROL}
    assert types[vocab["def"]] == TokenType.NORMAL
    assert field(reader, Keys.Tokenizer.PRE) == "gpt-2" and field(reader, Keys.Tokenizer.MODEL) == "gpt2"
    assert field(reader, "llama.vocab_size") == len(tokenizer)
    assert field(reader, "llama.attention.head_count_kv") == 2
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" in tensors and tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    q8 = {t.name: t.tensor_type.name for t in GGUFReader(out.parent / "mine-q8_0.gguf").tensors}
    assert q8["blk.0.attn_q.weight"] == "Q8_0" and q8["output_norm.weight"] == "F32"


def test_tied_embeddings_are_written_once_and_a_model_folder_exports(tmp_path, tiny_tokenizer):
    """A tied model (SmolLM2 is one) has no output.weight in the file, and loads back tied; a plain
    model folder (as `fimtune merge` writes) exports as a run does."""
    folder = tiny.save_model_folder(tiny.llama(len(tiny_tokenizer), tie=True), tiny_tokenizer, tmp_path / "merged")
    out = tmp_path / "tied.gguf"
    assert main(["export", str(folder), "--out", str(out), "--dtype", "f32", "--quiet"]) == 0
    assert "output.weight" not in {t.name for t in GGUFReader(out).tensors}
    model, expected = load_gguf(out), AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.tie_word_embeddings
    ids = torch.tensor([tiny_tokenizer.encode(CODE)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected(ids).logits, rtol=1e-4, atol=1e-4)
    assert field(GGUFReader(out), "tokenizer.ggml.fim_mid_token_id") == 2  # StarCoder's own ids, reused


def test_permuted_rows_are_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(24, 5).numpy()
    undo = LlamaTensorProcessor({"num_attention_heads": 6, "num_key_value_heads": 3})
    assert (undo.process(permute_rows(w, 6), "blk.0.attn_q.weight").weights == w).all()
    assert (undo.process(permute_rows(w, 3), "blk.0.attn_k.weight").weights == w).all()


def test_other_architectures_and_sentencepiece_tokenizers_are_refused_before_loading(tmp_path, tiny_tokenizer, capsys):
    """A GPTBigCode model is refused by name with what to do instead, before its weights are read
    (here there are none); so is a SentencePiece-style tokenizer. Nothing is written."""
    bigcode = tiny.save_model_folder(tiny.gpt_bigcode(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "bigcode")
    (bigcode / "model.safetensors").unlink()
    out = tmp_path / "out.gguf"
    assert main(["export", str(bigcode), "--out", str(tmp_path / "new" / "out.gguf")]) == 2
    err = capsys.readouterr().err
    assert "gpt_bigcode" in err and "convert_hf_to_gguf.py" in err and "fimtune merge" in err
    assert not (tmp_path / "new").exists()  # --out's folder is made only to write the file
    sp = train_sentencepiece_style_tokenizer()
    llama2 = tiny.save_model_folder(tiny.llama(len(sp)), sp, tmp_path / "llama2")
    assert main(["export", str(llama2), "--out", str(out)]) == 2
    assert "SentencePiece" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(out)]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.gguf*"))


def test_an_existing_out_is_kept_without_overwrite(tmp_path, tiny_tokenizer, capsys):
    folder = tiny.save_model_folder(tiny.llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "merged")
    out = tmp_path / "mine.gguf"
    out.write_bytes(b"an older export")
    assert main(["export", str(folder), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"an older export"
    assert main(["export", str(folder), "--out", str(tmp_path / "mine.bin")]) == 2
    assert "must name a .gguf file" in capsys.readouterr().err
    assert main(["export", str(folder), "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert out.read_bytes()[:4] == b"GGUF" and sorted(p.name for p in tmp_path.iterdir()) == ["merged", "mine.gguf"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user writes: mkstemp's were 0600


def test_a_failed_write_leaves_no_file(tmp_path, tiny_tokenizer):
    """A write that fails midway (a full disk, here a file size limit) is one clean error, and
    leaves neither the .gguf nor its temporary file."""
    folder = tiny.save_model_folder(tiny.llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "merged")
    out = tmp_path / "mine.gguf"

    def fill_disk():  # files may grow to 20 kB (the metadata fits, the weights do not), then EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    cmd = [sys.executable, "-m", "fimtune", "export", str(folder), "--out", str(out), "--dtype", "f32", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, preexec_fn=fill_disk)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"error: could not write '{out}'" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


# the process sends itself SIGTERM (`timeout`, `docker stop`, a job's time limit) once the header is written
TERMINATED_MIDWAY = """
import os, signal, sys
import gguf
from fimtune.cli import main
written = gguf.GGUFWriter.write_kv_data_to_file
def write_then_terminate(self):
    written(self)
    os.kill(os.getpid(), signal.SIGTERM)
gguf.GGUFWriter.write_kv_data_to_file = write_then_terminate
sys.exit(main(sys.argv[1:]))
"""


def test_a_terminated_export_leaves_no_file(tmp_path, tiny_tokenizer):
    """SIGTERM midway ends the export as Ctrl-C does: neither the .gguf nor its temporary file is left."""
    folder = tiny.save_model_folder(tiny.llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "merged")
    cmd = [sys.executable, "-c", TERMINATED_MIDWAY, "export", str(folder), "--out", str(tmp_path / "mine.gguf")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 143 and "terminated" in res.stderr, res.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_run_on_a_gguf_base_keeps_the_base_tokenizer_metadata(
    tmp_path, tiny_tokenizer_without_fim, repetitive_data, token_cache
):
    """A run on a GGUF base (as on the embedded default): the file copies the base's tokenizer
    metadata (its `pre` here is `smollm`, not the default) and appends the FIM tokens the run added."""
    from tokenizers import pre_tokenizers

    tok = tiny_tokenizer_without_fim
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    folder = tiny.save_model_folder(tiny.llama(len(tok), tie=True), tok, tmp_path / "base-folder")
    base = tmp_path / "base.gguf"
    assert main(["export", str(folder), "--out", str(base), "--dtype", "f32", "--quiet"]) == 0
    base_reader = GGUFReader(base)
    assert field(base_reader, Keys.Tokenizer.PRE) == "smollm" and field(base_reader, Keys.Tokenizer.FIM_PRE_ID) is None
    run = quiet_fit(run_config(tmp_path, base, repetitive_data, "run", "train.max_steps=2", "train.eval_every=0"))
    assert main(["export", str(run), "--out", str(base), "--overwrite"]) == 2  # the base the run needs
    assert GGUFReader(base).fields.keys() == base_reader.fields.keys()
    out = tmp_path / "run.gguf"
    assert main(["export", str(run), "--out", str(out), "--quiet"]) == 0  # f16, the default
    reader = GGUFReader(out)
    assert field(reader, Keys.Tokenizer.PRE) == "smollm"
    tokens = field(reader, Keys.Tokenizer.LIST)
    added = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
    assert tokens == field(base_reader, Keys.Tokenizer.LIST) + added
    assert field(reader, Keys.Tokenizer.MERGES) == field(base_reader, Keys.Tokenizer.MERGES)
    assert field(reader, Keys.Tokenizer.FIM_SUF_ID) == tokens.index("<fim_suffix>")
    merged, tokenizer = merged_model(run)
    ids = torch.tensor([tokenizer.encode(CODE)])
    with torch.no_grad():
        diff = (load_gguf(out)(ids).logits - merged(ids).logits).abs().max().item()
    assert diff <= TOLERANCE["f16"][0]
