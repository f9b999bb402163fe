"""Data: the embedded corpus, local files, tokenizers, the split and packing."""

import json
import re

import numpy as np
import pytest

from dtlab.trainers.run.data import EOT, builtin_documents, prepare_data, train_bpe
from dtlab.trainers.spec import DataSpec, SpecError


def test_builtin_corpus_is_real_text_of_a_few_megabytes():
    docs = builtin_documents(4_000_000)
    size = sum(map(len, docs))
    assert size >= 3_000_000, size
    text = "".join(docs[:50])
    assert "the" in text and "def " in text  # English documentation and Python sources


def test_prepare_builtin_packs_rows_and_splits_deterministically():
    spec = DataSpec(vocab_size=512, block_size=64, max_bytes=300_000)
    a = prepare_data(spec)
    b = prepare_data(spec)
    assert a.path == b.path  # cached
    assert a.train.shape[1] == 64 and a.val.shape[1] == 64 and len(a.val) > 0
    assert a.train.dtype == np.uint16 and int(a.train.max()) < 512  # a vocabulary of <= 65,536: uint16 shards
    assert a.vocab_size == 512 and a.meta["eot_id"] == 0
    assert np.array_equal(np.asarray(a.train), np.asarray(b.train))
    # a different block size re-packs the same stream
    c = prepare_data(DataSpec(vocab_size=512, block_size=32, max_bytes=300_000))
    assert np.array_equal(np.asarray(c.train).reshape(-1)[:640], np.asarray(a.train).reshape(-1)[:640])


def _decode_rows(prep, rows) -> list[str]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(prep.meta["tokenizer_file"])
    return [tok.decode(list(map(int, r)), skip_special_tokens=False) for r in np.asarray(rows)]


def test_split_is_by_document_and_disjoint(tmp_path):
    """Every document lies wholly in train or wholly in validation, and no validation row's text
    occurs in the training rows (a corpus of unique documents, so any overlap is the split's)."""
    rng = np.random.default_rng(0)
    words = ["route", "token", "block", "depth", "gate", "prior", "surprise", "layer", "capacity", "mix"]
    docs = [" ".join(f"{w}{i}" for w in rng.choice(words, 60)) for i in range(400)]  # every word names its doc
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    spec = DataSpec(source=str(tmp_path / "c.jsonl"), vocab_size=300, block_size=32, cache_dir=str(tmp_path / "c"))
    prep = prepare_data(spec)
    assert prep.meta["split"].startswith("by document")
    train_text, val_rows = "".join(_decode_rows(prep, prep.train)), _decode_rows(prep, prep.val)
    val_text = "".join(val_rows)
    assert len(val_rows) > 0 and len(prep.train) > 5 * len(val_rows)
    for row in val_rows:
        assert row not in train_text, f"validation row found in training rows: {row[:80]!r}"
    # packing drops the stream's remainder, which may cut its last word: that word is not counted
    ids_train, ids_val = (set(re.findall(r"[a-z]+(\d+)", t.rsplit(" ", 1)[0])) for t in (train_text, val_text))
    assert not ids_train & ids_val, f"documents in both splits: {sorted(ids_train & ids_val)[:5]}"
    assert 0 < len(ids_val) < 0.15 * len(docs) and len(ids_train) > 0.8 * len(docs)  # val_fraction 0.05


def test_builtin_corpus_drops_repeated_passages():
    """The pydoc topics repeat whole paragraphs; kept, they would put validation text in training."""
    docs = builtin_documents(600_000)
    paragraphs = [p.strip() for d in docs for p in d.split("\n\n") if len(p.strip()) >= 80]
    assert len(paragraphs) == len(set(paragraphs))


def test_one_text_file_splits_into_contiguous_spans(tmp_path):
    """A local .txt is one running text by default (datasets' sample_by=document): no end-of-text
    token per line, and validation is the end of the text, not random lines out of context."""
    lines = [f"Line {i}: the router sends token {i % 7} through block {i % 5} of the model." for i in range(400)]
    path = tmp_path / "book.txt"
    path.write_text("\n".join(lines) + "\n")
    prep = prepare_data(DataSpec(source=str(path), vocab_size=300, block_size=32, cache_dir=str(tmp_path / "c")))
    assert prep.meta["documents"] == 1 and "one running text" in prep.meta["split"]
    assert "a document per document" in prep.meta["source"]
    val = "".join(_decode_rows(prep, prep.val))
    text = path.read_text()
    assert val in text + EOT and text.index(val[:60]) > 0.85 * len(text)  # the end of the book
    assert int((np.asarray(prep.train) == prep.meta["eot_id"]).sum()) == 0  # lines were not made documents
    # sample_by=line on several files: each line is a document, split by document
    (tmp_path / "more").mkdir()
    for part in range(2):
        (tmp_path / "more" / f"p{part}.txt").write_text("\n".join(lines[part::2]))
    by_line = prepare_data(DataSpec(source=str(tmp_path / "more"), sample_by="line", vocab_size=300,
                                    block_size=32, cache_dir=str(tmp_path / "c")))
    assert by_line.meta["documents"] == 400 and by_line.meta["split"].startswith("by document")
    # rows that are lines of one text (as WikiText's are): contiguous joins them, no end-of-text between
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": line + "\n"}) for line in lines))
    joined = prepare_data(DataSpec(source=str(tmp_path / "rows.jsonl"), contiguous=True, vocab_size=300,
                                   block_size=32, cache_dir=str(tmp_path / "c")))
    assert joined.meta["documents"] == 1 and "one running text" in joined.meta["split"]
    assert "".join(_decode_rows(joined, joined.val)) in text + EOT
    with pytest.raises(SpecError, match=r"data.sample_by='line' applies to text files"):
        (tmp_path / "d.jsonl").write_text(json.dumps({"text": "x " * 50}) + "\n")
        prepare_data(DataSpec(source=str(tmp_path / "d.jsonl"), sample_by="line", cache_dir=str(tmp_path / "c")))


def test_tokenizer_round_trips_and_is_cached(tmp_path):
    docs = ["def f(x):\n    return x + 1\n", "The quick brown fox jumps over the lazy dog."] * 50
    tok, path = train_bpe(docs, 300, tmp_path, "fp")
    again, path2 = train_bpe(docs, 300, tmp_path, "fp")
    assert path == path2 and path.is_file()
    text = "The lazy fox returns x + 1. Ünïcode ✓"
    ids = tok.encode_batch([text])[0]
    assert tok.decode(ids) == text  # byte-level: anything round-trips
    assert tok.backend.token_to_id(EOT) == tok.eot_id


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_files(tmp_path, kind):
    texts = [f"Document number {i} talks about routing tokens through blocks. " * 20 for i in range(60)]
    path = tmp_path / f"corpus.{kind}"
    if kind == "txt":
        path.write_text("\n".join(texts))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    else:
        import pandas as pd

        pd.DataFrame({"body": texts}).to_parquet(path)
    field = "text" if kind == "txt" else "body"
    prep = prepare_data(DataSpec(source=str(path), text_field=field, vocab_size=300, block_size=32,
                                 cache_dir=str(tmp_path / "cache")))
    assert len(prep.train) > 10 and prep.meta["source"].startswith("local")


def test_local_hf_tokenizer(tmp_path):
    from transformers import PreTrainedTokenizerFast

    docs = ["alpha beta gamma delta " * 30] * 20
    tok, tok_file = train_bpe(docs, 280, tmp_path, "x")
    PreTrainedTokenizerFast(tokenizer_file=str(tok_file), eos_token=EOT).save_pretrained(tmp_path / "tok")
    (tmp_path / "c.txt").write_text("\n".join(docs))
    prep = prepare_data(DataSpec(source=str(tmp_path / "c.txt"), tokenizer=str(tmp_path / "tok"), block_size=16,
                                 cache_dir=str(tmp_path / "cache")))
    assert prep.meta["tokenizer"] == str(tmp_path / "tok") and prep.vocab_size == tok.vocab_size


def test_bad_data_is_a_clear_error(tmp_path):
    with pytest.raises(SpecError, match="no such file or directory"):
        prepare_data(DataSpec(source=str(tmp_path / "nope.txt")))
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    with pytest.raises(SpecError, match="the corpus is empty"):
        prepare_data(DataSpec(source=str(tmp_path / "empty.txt"), cache_dir=str(tmp_path / "c")))
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(SpecError, match="data.text_field='text': not a column"):
        prepare_data(DataSpec(source=str(tmp_path / "d.jsonl"), cache_dir=str(tmp_path / "c")))
    (tmp_path / "short.txt").write_text("a few words only")
    with pytest.raises(SpecError, match="too small for data.block_size"):
        prepare_data(DataSpec(source=str(tmp_path / "short.txt"), vocab_size=260, block_size=512,
                              cache_dir=str(tmp_path / "c")))
    with pytest.raises(SpecError, match="data.tokenizer='./no/such/tokenizer'"):
        prepare_data(DataSpec(tokenizer="./no/such/tokenizer", max_bytes=10_000, cache_dir=str(tmp_path / "c")))


@pytest.mark.parametrize("kind", ["builtin", "non-ascii"])
def test_manifest_has_the_validation_bytes_and_tokens_for_bits_per_byte(tmp_path, kind, monkeypatch):
    """meta.json (which run.json copies under "data") holds the validation split's tokens and the UTF-8
    bytes of the text they stand for (end-of-text tokens none): bits per byte = loss * val_tokens /
    (val_bytes * ln 2). The bytes are those of decoding the kept validation rows; per-document decoding
    (the way for a tokenizer that is not byte-level) gives the same count."""
    from tokenizers import Tokenizer

    from dtlab.trainers.run import data as D

    if kind == "builtin":
        spec = DataSpec(vocab_size=512, block_size=64, max_bytes=300_000, cache_dir=str(tmp_path / "c"))
    else:
        words = ["naïve", "café", "東京", "Grüße", "emoji 🙂", "plain", "text", "über"]
        rng = np.random.default_rng(0)
        docs = [" ".join(rng.choice(words, 50)) + f" {i}." for i in range(300)]
        (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        spec = DataSpec(source=str(tmp_path / "c.jsonl"), vocab_size=300, block_size=32, cache_dir=str(tmp_path / "c"))
    prep = prepare_data(spec)
    meta = prep.meta
    tok = Tokenizer.from_file(meta["tokenizer_file"])
    text = tok.decode(np.asarray(prep.val).ravel().tolist(), skip_special_tokens=True)
    assert meta["split"].startswith("by document") and meta["val_tokens"] == prep.val.size > 0
    assert meta["val_bytes"] == len(text.encode("utf-8")) > 0
    if kind == "non-ascii":
        assert len(text.encode("utf-8")) > len(text)  # bytes, not characters, are counted
    monkeypatch.setattr(D, "token_bytes", lambda tok: None)
    by_document = D.split_bytes(D.Tokenizer(tok, False, "x"), prep.path, "val", meta["shards"]["val"],
                                np.dtype(meta["dtype"]))
    assert by_document == meta["val_bytes"]
