"""Data: the embedded corpus, local files, tokenizers, the split and packing."""

import json

import numpy as np
import pytest

from dtlab.trainers.data import EOT, builtin_documents, load_documents, prepare_data, train_bpe
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
    assert a.train.dtype == np.int32 and int(a.train.max()) < 512
    assert a.vocab_size == 512 and a.meta["eot_id"] == 0
    assert np.array_equal(np.asarray(a.train), np.asarray(b.train))
    # a different block size re-packs the same stream
    c = prepare_data(DataSpec(vocab_size=512, block_size=32, max_bytes=300_000))
    assert np.array_equal(np.asarray(c.train).reshape(-1)[:640], np.asarray(a.train).reshape(-1)[:640])


def test_split_is_by_document_and_disjoint():
    spec = DataSpec(vocab_size=512, block_size=64, max_bytes=300_000)
    prep = prepare_data(spec)
    assert prep.meta["split"].startswith("by document")
    docs, _ = load_documents(spec)
    from dtlab.trainers.data import _is_val

    val_docs = [d for d in docs if _is_val(d, spec.val_fraction)]
    assert 0 < len(val_docs) < len(docs)


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
