"""Packing: the vectorized join equals per-document FIM, conservation, position ids, resume, eval."""

from __future__ import annotations

import numpy as np
import pytest

from fimtune import packing
from fimtune.config import RunConfig
from fimtune.errors import FimtuneError
from fimtune.fim import FimTokens, permute, token_line_starts, unpermute
from fimtune.packing import (
    Documents,
    EvalRows,
    PackSpec,
    TrainRows,
    is_conserved,
    line_cut_points,
    pack_epoch,
    pack_spec,
    stack_rows,
)

T = FimTokens(prefix=1, middle=2, suffix=3, pad=4)
SEP = 0
SEQ = 32
NEWLINE_ID = 7  # in these synthetic documents, token 7 holds a newline


def synthetic_docs(n: int = 120, seed: int = 0, max_len: int = 60) -> Documents:
    """Documents of ids 5..99 (never a FIM id or the separator), empty and 1-token ones included."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([[0, 1, 3, 0], rng.integers(0, max_len, size=n - 4)])
    tokens = rng.integers(5, 100, size=int(lengths.sum())).astype(np.int32)
    mask = np.zeros(100, dtype=bool)
    mask[NEWLINE_ID] = True
    return Documents(tokens, np.concatenate([[0], np.cumsum(lengths)]), newline_mask=mask)


def doc_list(docs: Documents) -> list[list[int]]:
    return [docs.tokens[a:b].tolist() for a, b in zip(docs.offsets[:-1], docs.offsets[1:], strict=True)]


def spec(**kw) -> PackSpec:
    return PackSpec(**{"tokens": T, "separator": SEP, "seq_length": SEQ, **kw})


@pytest.mark.parametrize("spans", ["uniform", "line"])
def test_join_equals_permute_of_each_document_then_separator(spans):
    docs = synthetic_docs()
    points = line_cut_points(docs.tokens, docs.offsets, docs.newline_mask) if spans == "line" else None
    ep = pack_epoch(docs, spec(spans=spans), epoch=3, points=points)
    rng = np.random.default_rng([0, 3, packing.FIM_STREAM])  # the epoch's FIM generator
    expected = []
    for doc in doc_list(docs):
        cut_points = token_line_starts(np.array(doc, dtype=np.int64), docs.newline_mask) if spans == "line" else None
        expected += permute(doc, rng, T, 0.5, 0.5, cut_points=cut_points) + [SEP]
    assert ep.ids.tolist() == expected


def test_line_cut_points_match_per_document_ones():
    docs = synthetic_docs()
    points, first, count = line_cut_points(docs.tokens, docs.offsets, docs.newline_mask)
    for d, doc in enumerate(doc_list(docs)):
        own = token_line_starts(np.array(doc, dtype=np.int64), docs.newline_mask) + docs.offsets[d]
        assert points[first[d] : first[d] + count[d]].tolist() == own.tolist()


def test_conservation():
    docs = synthetic_docs(300)
    ep = pack_epoch(docs, spec(), epoch=0)
    s = ep.stats
    assert is_conserved(ep.ids, ep.rows, ep.tail)
    assert s.tail == len(ep.tail) == s.tokens - s.rows * SEQ and 0 <= s.tail < SEQ
    expected = np.bincount(docs.tokens, minlength=100)  # documents + 3 FIM tokens per FIM'd one + separators
    expected[[T.prefix, T.suffix, T.middle]] += s.fim
    expected[SEP] += s.documents
    assert np.array_equal(np.bincount(np.concatenate([ep.rows.ravel(), ep.tail]), minlength=100), expected)
    assert not is_conserved(ep.ids, ep.rows, ep.tail[:-1]) or s.tail == 0


def test_rows_are_the_stream_cut_in_order_then_shuffled():
    docs = synthetic_docs()
    plain = pack_epoch(docs, spec(shuffle=False), 0)
    shuffled = pack_epoch(docs, spec(shuffle=True), 0)
    assert [plain.row(k)["input_ids"].tolist() for k in range(len(plain))] == plain.rows.tolist()
    served = [shuffled.row(k)["input_ids"].tolist() for k in range(len(shuffled))]
    assert served != plain.rows.tolist() and sorted(served) == sorted(plain.rows.tolist())


def test_seed_exact_rows_hold_ids_and_labels_only():
    ep = pack_epoch(synthetic_docs(), spec(boundary_aware=False), 0)
    row = ep.row(0)
    assert set(row) == {"input_ids", "labels"}
    assert row["input_ids"].dtype == np.int64 and row["input_ids"].shape == (SEQ,)
    assert np.array_equal(row["labels"], row["input_ids"]) and row["labels"] is not row["input_ids"]


def test_position_ids_restart_at_every_document_and_row_start():
    ep = pack_epoch(synthetic_docs(), spec(), 0)
    for k in range(len(ep)):
        row = ep.row(k)
        ids, pos = row["input_ids"].tolist(), row["position_ids"].tolist()
        expected = [0]
        for i in range(1, SEQ):  # a document starts right after a separator
            expected.append(0 if ids[i - 1] == SEP else expected[-1] + 1)
        assert pos == expected


def test_epochs_redraw_fim_and_reshuffle():
    docs = synthetic_docs()
    e0, e1 = pack_epoch(docs, spec(), 0), pack_epoch(docs, spec(), 1)
    assert e0.ids.tolist() != e1.ids.tolist()
    assert pack_epoch(docs, spec(), 1).ids.tolist() == e1.ids.tolist()
    assert pack_epoch(docs, spec(seed=1), 0).ids.tolist() != e0.ids.tolist()


def take(rows, n):
    return [next(rows) for _ in range(n)]


def same_rows(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("stop_at", [0, 5, "end_of_epoch", "after_boundary"])
def test_resume_equals_uninterrupted_iteration(stop_at):
    docs = synthetic_docs()
    per_epoch = TrainRows(docs, spec()).rows_per_epoch(0)
    k = {"end_of_epoch": per_epoch, "after_boundary": per_epoch + 3}.get(stop_at, stop_at)
    reference = take(TrainRows(docs, spec()), k + 2 * per_epoch)  # into the third epoch
    first = TrainRows(docs, spec())
    take(first, k)
    state = first.state_dict()
    resumed = TrainRows(docs, spec())
    resumed.load_state_dict(dict(state))
    assert same_rows(take(resumed, 2 * per_epoch), reference[k:])
    assert resumed.epoch > state["epoch"]  # the resumed run crossed an epoch boundary


def test_training_runs_forever_and_counts_epochs():
    rows = TrainRows(synthetic_docs(), spec())
    n = rows.rows_per_epoch(0)
    take(rows, n)
    assert rows.state_dict() == {"epoch": 0, "offset": n}
    next(rows)
    assert rows.state_dict() == {"epoch": 1, "offset": 1}


def test_processes_share_an_epoch_without_overlap():
    docs = synthetic_docs()
    r0, r1 = TrainRows(docs, spec(), rank=0, world_size=2), TrainRows(docs, spec(), rank=1, world_size=2)
    n = r0.rows_per_epoch(0)
    a, b = take(r0, n), take(r1, n)
    ep = pack_epoch(docs, spec(), 0)
    assert [r["input_ids"].tolist() for r in a] == [ep.row(2 * k)["input_ids"].tolist() for k in range(n)]
    assert [r["input_ids"].tolist() for r in b] == [ep.row(2 * k + 1)["input_ids"].tolist() for k in range(n)]


def test_eval_iterates_once_per_loop():
    rows = EvalRows(synthetic_docs(), spec(shuffle=False))
    first, second = list(rows), list(rows)
    assert len(first) == len(rows) == rows.stats.rows > 0
    assert same_rows(first, second)
    assert [r["input_ids"].tolist() for r in first] == rows.packed.rows.tolist()


def test_too_few_rows_is_a_clear_error():
    docs = Documents(np.arange(5, 15, dtype=np.int32), np.array([0, 10]))
    with pytest.raises(FimtuneError, match="seq_length"):
        next(TrainRows(docs, spec()))
    assert list(EvalRows(docs, spec())) == []


def test_an_epoch_that_packs_into_no_row_is_skipped_not_an_error():
    """FIM adds 3 tokens to each document it cuts, so a split near one row packs into one row in
    some epochs and none in others: those are skipped, the run goes on (epoch 5 of this seed)."""
    lengths = np.full(10, 5)
    docs = Documents(np.full(int(lengths.sum()), 9, np.int32), np.concatenate([[0], np.cumsum(lengths)]))
    seq2 = PackSpec(tokens=T, separator=SEP, seq_length=70, seed=2)
    rows_by_epoch = [len(pack_epoch(docs, seq2, e)) for e in range(20)]
    assert rows_by_epoch[0] == 1 and 0 in rows_by_epoch[1:8] and max(rows_by_epoch) == 1
    rows, epochs = TrainRows(docs, seq2), []
    for _ in range(8):
        next(rows)
        epochs.append(rows.epoch)
    assert epochs == [e for e in range(20) if rows_by_epoch[e]][:8]


@pytest.mark.parametrize("line_end_rate", [0.0, 1.0])
def test_char_unit_packs_whole_texts(tiny_tokenizer, line_end_rate):
    from fimtune.tokenization import encode_flat

    texts = ["def f(x):\n    return x * 2\n", "", "class A:\n    pass\n", "print('héllo')\n"] * 10
    ids, lengths = encode_flat(tiny_tokenizer, texts)
    docs = Documents(ids, np.concatenate([[0], np.cumsum(lengths)]), texts=texts)
    docs.encode = lambda t, continued: encode_flat(tiny_tokenizer, t, continued)
    ep = pack_epoch(docs, spec(unit="char", spans="line", shuffle=False, line_end_rate=line_end_rate), 0)
    assert 0 < ep.stats.fim < ep.stats.documents
    bounds = np.append(ep.doc_starts, len(ep.ids))
    for d, text in enumerate(texts):
        joined = ep.ids[bounds[d] : bounds[d + 1]].tolist()
        assert joined[-1] == SEP
        assert tiny_tokenizer.decode(unpermute(joined[:-1], T)) == text
    # every text's lines end in a newline: so does each middle, unless line_end_rate left it to the suffix
    ep = pack_epoch(docs, spec(unit="char", spans="line", shuffle=False, line_end_rate=line_end_rate,
                               fim_rate=1.0, spm_rate=0.0), 0)  # fmt: skip
    bounds, middles = np.append(ep.doc_starts, len(ep.ids)), []
    for d in range(len(texts)):
        joined = ep.ids[bounds[d] : bounds[d + 1] - 1].tolist()  # PSM: [P] prefix [S] suffix [M] middle
        middles.append(tiny_tokenizer.decode(joined[joined.index(T.middle) + 1 :]))
    whole = [m.endswith("\n") for m in middles if m]
    assert len(whole) > 5 and all(whole) == (line_end_rate == 0) and any(whole) == (line_end_rate == 0)


def test_builders_read_the_run_config():
    cfg = RunConfig()
    cfg.packing.seq_length, cfg.packing.mode, cfg.fim.spm_rate, cfg.seed = 16, "seed_exact", 1.0, 3
    s = pack_spec(cfg, T, SEP)
    assert (s.seq_length, s.boundary_aware, s.spm_rate, s.seed, s.shuffle) == (16, False, 1.0, 3, True)
    assert pack_spec(cfg, T, SEP, shuffle=False).shuffle is False


def test_stack_rows():
    ep = pack_epoch(synthetic_docs(), spec(), 0)
    batch = stack_rows([ep.row(0), ep.row(1)])
    assert {k: v.shape for k, v in batch.items()} == {k: (2, SEQ) for k in ("input_ids", "labels", "position_ids")}


@pytest.mark.parametrize("unit", ["token", "char"])
def test_an_empty_split_packs_to_nothing(unit):
    docs = Documents(
        np.zeros(0, np.int32), np.zeros(1, np.int64), texts=[], encode=lambda t, continued: (np.zeros(0), np.zeros(0))
    )
    ep = pack_epoch(docs, spec(unit=unit), 0)
    assert (ep.stats.documents, ep.stats.tokens, ep.stats.rows, len(ep.tail)) == (0, 0, 0, 0)
    assert list(EvalRows(docs, spec(unit=unit))) == []


@pytest.mark.parametrize("max_tokens", [1, 4, 7, 60])
def test_split_documents_cuts_near_equal_pieces(max_tokens):
    docs = synthetic_docs()
    pieces = packing.split_documents(docs.offsets, max_tokens)
    assert pieces[0] == 0 and pieces[-1] == docs.offsets[-1]
    lengths = np.diff(pieces)
    assert (lengths >= 0).all() and (lengths <= max_tokens).all()
    assert set(docs.offsets.tolist()) <= set(pieces.tolist())  # every document boundary is a piece boundary
    k = 0  # the first piece of the current document
    for a, b in zip(docs.offsets[:-1], docs.offsets[1:], strict=True):
        n = max(1, -(-(b - a) // max_tokens))  # as few pieces as fit (an empty document: one empty piece)
        inside = lengths[k : k + n]
        assert pieces[k] == a and inside.sum() == b - a
        assert inside.max() - inside.min() <= 1  # near-equal, no stub at the end
        k += n
    assert k == len(lengths)
    with pytest.raises(FimtuneError, match="piece_tokens"):
        packing.split_documents(docs.offsets, 0)


def test_pieces_are_fimmed_as_documents_of_their_own(tiny_tokenizer, token_cache):
    from datasets import Dataset

    texts = ["".join(f"line {i} of file {f}\n" for i in range(40)) for f in range(6)]
    cfg = RunConfig()
    cfg.fim.fim_rate, cfg.fim.piece_tokens, cfg.packing.seq_length = 1.0, 50, 64
    docs = packing.documents(Dataset.from_dict({"content": texts}), tiny_tokenizer, cfg, progress=False)
    whole = packing.documents(Dataset.from_dict({"content": texts}), tiny_tokenizer, RunConfig(), progress=False)
    assert np.array_equal(docs.tokens, whole.tokens)
    assert len(docs.offsets) > len(whole.offsets) and np.diff(docs.offsets).max() <= 50
    ep = pack_epoch(docs, pack_spec(cfg, T, SEP, shuffle=False), 0)
    assert ep.stats.documents == ep.stats.fim == len(docs.offsets) - 1
    # The char unit cuts pieces of whole lines and re-tokenizes them; FIM then works on their texts.
    cfg.fim.unit, cfg.fim.spans = "char", "line"
    chars = packing.documents(Dataset.from_dict({"content": texts}), tiny_tokenizer, cfg, progress=False)
    assert "".join(chars.texts) == "".join(texts) and len(chars.texts) > len(texts)
    assert all(t.endswith("\n") for t in chars.texts)
    per_token = whole.chars / len(whole.tokens)
    assert max(len(t) for t in chars.texts) <= 50 * per_token + 1
    assert chars.offsets[-1] == len(chars.tokens) and len(chars.offsets) == len(chars.texts) + 1
    ep = pack_epoch(chars, pack_spec(cfg, T, SEP, shuffle=False), 0)
    assert ep.stats.documents == ep.stats.fim == len(chars.texts)


@pytest.mark.parametrize("prepend", ["normalizer", "metaspace"])
def test_char_unit_parts_of_a_sentencepiece_style_tokenizer_get_no_dummy_prefix(prepend):
    """Llama-style tokenizers put a "▁" before each text they encode. A FIM'd document's prefix starts
    it, so it gets one, as the whole document does; its middle and suffix go on from text before
    them, so they get none: the parts' pieces, put back in order, spell the whole document's."""
    from fimtune.tokenization import encode_flat
    from fimtune.tokens import ensure_fim_tokens
    from tests.conftest import train_sentencepiece_style_tokenizer

    tokenizer = train_sentencepiece_style_tokenizer(prepend)
    tokens, _ = ensure_fim_tokens(tokenizer)
    texts = ["def add(a, b):\n    return a + b\n", "x = 1\nif x:\n    print('é')\n", "class A:\n    pass\n"] * 20
    ids, lengths = encode_flat(tokenizer, texts)
    docs = Documents(ids, np.concatenate([[0], np.cumsum(lengths)]), texts=texts)
    docs.encode = lambda t, continued: encode_flat(tokenizer, t, continued)
    ep = pack_epoch(docs, spec(unit="char", fim_rate=1.0, spm_rate=0.5, shuffle=False, tokens=tokens), 0)
    assert ep.stats.fim == len(texts) and 0 < ep.stats.spm < len(texts)
    bounds = np.append(ep.doc_starts, len(ep.ids))

    def pieces(token_ids):
        return "".join(tokenizer.convert_ids_to_tokens([int(i) for i in token_ids]))

    for d in range(len(texts)):
        whole = ids[int(docs.offsets[d]) : int(docs.offsets[d + 1])]
        parts = unpermute(ep.ids[bounds[d] : bounds[d + 1] - 1].tolist(), tokens)
        assert pieces(parts) == pieces(whole), (d, tokenizer.convert_ids_to_tokens(parts))


@pytest.mark.parametrize("fim_rate", [0.0, 1.0])
def test_char_unit_pieces_after_the_first_get_no_dummy_prefix(fim_rate, token_cache):
    """Char-unit pieces of a text after its first go on from the text before them: a Llama-style
    tokenizer puts no "▁" before them (nor before a FIM'd one's first part), so the pieces, put back
    in order, spell the whole text's tokens, as token-unit pieces do."""
    from datasets import Dataset

    from fimtune.tokens import document_separator_id, ensure_fim_tokens
    from tests.conftest import train_sentencepiece_style_tokenizer

    tokenizer = train_sentencepiece_style_tokenizer()
    tokens, _ = ensure_fim_tokens(tokenizer)
    sep = document_separator_id(tokenizer)
    texts = ["def f(a):\n" + "".join(f"    x{i} = a + {i}\n" for i in range(30))] * 2
    cfg = RunConfig()
    cfg.fim.unit, cfg.fim.spans, cfg.fim.piece_tokens, cfg.fim.fim_rate = "char", "line", 40, fim_rate
    docs = packing.documents(Dataset.from_dict({"content": texts}), tokenizer, cfg, progress=False)
    assert len(docs.texts) > len(texts)
    ep = pack_epoch(docs, pack_spec(cfg, tokens, sep, shuffle=False), 0)
    assert ep.stats.fim == (len(docs.texts) if fim_rate else 0)
    bounds = np.append(ep.doc_starts, len(ep.ids))
    pieces = [unpermute(ep.ids[a : b - 1].tolist(), tokens) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    whole = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    spelled = "".join(tokenizer.convert_ids_to_tokens([i for piece in pieces for i in piece]))
    assert spelled == "".join(tokenizer.convert_ids_to_tokens(whole)) * len(texts)


def test_texts_are_encoded_a_block_at_a_time(tiny_tokenizer):
    """`fim.unit: char` pieces re-tokenize the whole split: the tokenizer's encodings (tens of bytes
    a token) are made a block of texts at a time, not for the whole corpus at once."""
    from fimtune.tokenization import encode_flat

    batches = []

    def encode(texts, continued):
        batches.append(len(texts))
        return encode_flat(tiny_tokenizer, texts, continued)

    texts = [f"x{i} = {i}\n" * (1 + i % 3) for i in range(3000)]
    continued = np.arange(len(texts)) % 3 == 1
    ids, lengths = packing.encode_texts(encode, texts, continued)
    assert max(batches) < len(texts) // 2
    assert max(batches) <= packing.ENCODE_BLOCK_TEXTS
    one_by_one = [encode_flat(tiny_tokenizer, [t], bool(c))[0].tolist() for t, c in zip(texts, continued, strict=True)]
    assert lengths.tolist() == [len(x) for x in one_by_one]
    assert ids.tolist() == [i for x in one_by_one for i in x]


def test_a_rows_position_ids_look_up_the_document_starts_inside_it():
    """A row's position ids come from the document starts inside the row, looked up in the sorted
    starts (over millions of documents a scan of all of them cost milliseconds a row): the same ids
    as the scan, starts on the row's first and last tokens and just past it included."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        seq_length = int(rng.integers(1, 12))
        doc_starts = np.unique(rng.integers(0, 60, int(rng.integers(1, 30))))
        row_start = int(rng.integers(0, 50))
        inside = doc_starts[(doc_starts > row_start) & (doc_starts < row_start + seq_length)] - row_start
        want, pos = [], 0
        for t in range(seq_length):
            pos = 0 if t == 0 or t in inside else pos + 1
            want.append(pos)
        assert packing.position_ids(doc_starts, row_start, seq_length).tolist() == want
