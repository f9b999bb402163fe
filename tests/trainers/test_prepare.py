"""Data at scale: the cache key (no corpus read), token shards, streaming against the in-memory path,
parallel preparation, bounded memory, `dtlab prepare`, epochs made visible, the GPU specs' budgets."""

import hashlib
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dtlab.trainers.run import data as D
from dtlab.trainers.run.data import EOT, builtin_documents, data_key, prepare_data
from dtlab.trainers.spec import DataSpec, SpecError, load_spec

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("route token block depth gate prior surprise layer capacity mix the a of to and in model router "
         "threshold causal predict update expert skip compute budget").split()


def _corpus(n_docs: int, seed: int = 0, words: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"{w}{i % 97}" for w in rng.choice(WORDS, words)) + f". Document {i}." for i in range(n_docs)]


def _jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


# ---- the non-streaming reference: every document in memory, tokenized whole, split and packed -------------
def _reference(spec: DataSpec, prep) -> tuple[np.ndarray, np.ndarray]:
    """What the data were before shards (every document held, one tokenizer call per document)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(prep.meta["tokenizer_file"])
    if spec.source == "builtin":
        docs, one_text = builtin_documents(spec.max_bytes), False
    else:
        import datasets

        files = D._local_files(spec.source)
        builder = D.LOCAL_BUILDERS[files[0].suffix]
        opts = {"sample_by": spec.sample_by} if builder == "text" else {}
        docs = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                     **opts)[spec.text_field]
        one_text = builder == "text" and len(files) == 1
    out, budget = [], spec.max_bytes
    for d in docs:
        if budget <= 0:
            break
        out.append(d[:budget])
        budget -= len(out[-1])
    if spec.contiguous and not one_text:
        out, one_text = ["".join(d if d.endswith("\n") else d + "\n" for d in out)], True
    eot = tok.token_to_id(EOT)

    def stream(docs):
        return np.array([i for d in docs for i in tok.encode(d).ids + [eot]], dtype=np.int64)

    def pack(s):
        return s[: len(s) // spec.block_size * spec.block_size].reshape(-1, spec.block_size)

    if not one_text:
        is_val = [int.from_bytes(hashlib.sha256(d.encode()).digest()[:8], "big") / 2**64 < spec.val_fraction
                  for d in out]
        train = pack(stream([d for d, v in zip(out, is_val, strict=True) if not v]))
        val = pack(stream([d for d, v in zip(out, is_val, strict=True) if v]))
        if len(train) >= 2 and len(val) >= 1:
            return train, val
    s = stream(out)
    n_val = max(spec.block_size, int(len(s) * spec.val_fraction))
    return pack(s[:-n_val]), pack(s[-n_val:])


@pytest.mark.parametrize("kind", ["builtin", "jsonl", "parquet", "lines", "one_text", "contiguous"])
def test_streamed_shards_equal_the_in_memory_path(tmp_path, kind, monkeypatch):
    """Streamed, batched, written as it comes, in several shards: the same rows as holding every document
    in memory and tokenizing each whole (which is what the data were before shards)."""
    docs = _corpus(300)
    cache = str(tmp_path / "cache")
    if kind == "builtin":
        spec = DataSpec(vocab_size=512, block_size=64, max_bytes=300_000, cache_dir=cache)
    elif kind == "jsonl":
        spec = DataSpec(source=str(_jsonl(tmp_path / "c.jsonl", docs)), vocab_size=300, block_size=32,
                        max_bytes=60_000, cache_dir=cache)
    elif kind == "parquet":
        import pandas as pd

        pd.DataFrame({"body": docs, "n": range(len(docs))}).to_parquet(tmp_path / "c.parquet", row_group_size=50)
        spec = DataSpec(source=str(tmp_path / "c.parquet"), text_field="body", vocab_size=300, block_size=32,
                        cache_dir=cache)
    elif kind == "lines":
        (tmp_path / "d").mkdir()
        for part in range(2):
            (tmp_path / "d" / f"p{part}.txt").write_text("\n".join(docs[part::2]))
        spec = DataSpec(source=str(tmp_path / "d"), sample_by="line", vocab_size=300, block_size=32, cache_dir=cache)
    elif kind == "one_text":
        (tmp_path / "book.txt").write_text("\n".join(docs))
        spec = DataSpec(source=str(tmp_path / "book.txt"), vocab_size=300, block_size=32, cache_dir=cache)
    else:  # rows of one running text, tokenized in pieces cut where the tokenizer splits anyway
        monkeypatch.setattr(D, "PIECE_CHARS", 2_000)
        spec = DataSpec(source=str(_jsonl(tmp_path / "rows.jsonl", [d + "\n" for d in docs])), contiguous=True,
                        vocab_size=300, block_size=32, cache_dir=cache)
    monkeypatch.setattr("dtlab.trainers.run.shards.SHARD_TOKENS", 64 * 40)  # several shards a split
    prep = prepare_data(spec)
    train, val = _reference(spec, prep)
    assert len(prep.meta["shards"]["train"]) > 1
    assert np.array_equal(np.asarray(prep.train), train) and np.array_equal(np.asarray(prep.val), val)
    idx = np.array([0, len(train) - 1, 3, len(train) // 2, 3])  # the loop's and evaluation's reads
    assert np.array_equal(prep.train[idx], train[idx]) and np.array_equal(prep.train[2:9], train[2:9])
    assert prep.train.shape == train.shape and prep.meta["train_tokens"] == train.size


def test_second_prepare_reads_no_corpus(tmp_path, monkeypatch):
    """The key comes from the spec and the files' sizes and times: a second prepare (a trial, a worker,
    another variant) opens the shards without reading a document; a changed file is prepared anew."""
    path = _jsonl(tmp_path / "c.jsonl", _corpus(200))
    spec = DataSpec(source=str(path), vocab_size=300, block_size=32, cache_dir=str(tmp_path / "cache"))
    first = prepare_data(spec)
    reads = []
    real = D._source_texts
    monkeypatch.setattr(D, "_source_texts", lambda *a: reads.append(a) or real(*a))
    monkeypatch.setattr(D, "_check_utf8", lambda *a: reads.append(a))
    again = prepare_data(spec)
    assert again.path == first.path and not reads
    assert np.array_equal(np.asarray(again.train), np.asarray(first.train))
    assert data_key(spec).key == first.path.name == first.meta["key"]
    assert data_key(spec.model_copy(update={"num_proc": 4})).key == first.path.name  # not part of the key
    for change in ({"block_size": 16}, {"max_tokens": 5_000}, {"val_fraction": 0.1}, {"vocab_size": 320}):
        assert data_key(spec.model_copy(update=change)).key != first.path.name, change
    _jsonl(path, _corpus(201))  # the file changed: its size and time with it
    changed = prepare_data(spec)
    assert changed.path != first.path and len(reads) >= 1


def test_one_and_two_processes_write_identical_shards(tmp_path, monkeypatch):
    path = _jsonl(tmp_path / "c.jsonl", _corpus(1500))
    monkeypatch.setattr(D, "BATCH_DOCS", 64)  # many batches in flight
    monkeypatch.setattr("dtlab.trainers.run.shards.SHARD_TOKENS", 32 * 500)
    spec = DataSpec(source=str(path), vocab_size=300, block_size=32)
    one = prepare_data(spec.model_copy(update={"cache_dir": str(tmp_path / "one")}))
    two = prepare_data(spec.model_copy(update={"cache_dir": str(tmp_path / "two"), "num_proc": 2}))
    assert one.path.name == two.path.name and two.meta["workers"] == 2
    assert one.meta["shards"] == two.meta["shards"] and one.meta["split"].startswith("by document")
    files = sorted(f.name for f in one.path.iterdir() if f.name != "meta.json")
    assert files == sorted(f.name for f in two.path.iterdir() if f.name != "meta.json") and len(files) > 4
    for name in files:
        assert (one.path / name).read_bytes() == (two.path / name).read_bytes(), name


def test_max_tokens_stops_the_stream_and_the_index_marks_documents(tmp_path):
    docs = _corpus(400)
    path = _jsonl(tmp_path / "c.jsonl", docs)
    full = prepare_data(DataSpec(source=str(path), vocab_size=300, block_size=32, cache_dir=str(tmp_path / "c")))
    cut = prepare_data(DataSpec(source=str(path), vocab_size=300, block_size=32, max_tokens=9_000,
                                cache_dir=str(tmp_path / "c")))
    assert cut.meta["tokens"] == 9_000 < full.meta["tokens"]
    assert cut.meta["documents"] < full.meta["documents"]
    assert cut.meta["train_tokens"] + cut.meta["val_tokens"] <= 9_000
    n = cut.meta["train_tokens"]  # the first documents of the training stream are the same ones
    assert np.array_equal(np.asarray(cut.train).ravel(), np.asarray(full.train).ravel()[:n])
    starts = np.fromfile(full.path / "train.docs", dtype=np.int64)
    flat = np.asarray(full.train).ravel()
    eot = full.meta["eot_id"]
    assert starts[0] == 0 and np.all(np.diff(starts) > 0)
    assert np.all(flat[starts[1:] - 1] == eot)  # each document starts after the end-of-text of the one before


def test_prepare_refuses_bad_input_in_one_line(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine text\n" * 100 + b"\xff\xfe broken")
    with pytest.raises(SpecError, match=r"bad.txt is not UTF-8 text \(byte 1000: invalid start byte\)"):
        prepare_data(DataSpec(source=str(tmp_path / "bad.txt"), cache_dir=str(tmp_path / "c")))
    with pytest.raises(SpecError, match="data.max_tokens"):
        from dtlab.trainers.spec import spec_from_dict

        spec_from_dict({"name": "x", "data": {"max_tokens": 0}})


def _dtlab(*args: str, env_cache: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "DTLAB_CACHE": str(env_cache)}
    return subprocess.run([sys.executable, "-m", "dtlab.trainers", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_prepare_command(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", _corpus(300))
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: s\ndata:\n  source: {path}\n  vocab_size: 300\n  block_size: 32\n")
    first = _dtlab("prepare", str(spec), "--out", str(tmp_path / "shared"), "--workers", "2", env_cache=tmp_path / "x")
    assert first.returncode == 0, first.stderr
    out = first.stdout
    assert "tokens from 300 documents" in out and "tokens/s with 2 process(es)" in out and "uint16" in out
    folder = Path(out.split("shards: ")[1].split()[0])
    assert folder.parent == (tmp_path / "shared" / "data").resolve() and (folder / "meta.json").is_file()
    again = _dtlab("prepare", str(spec), "--out", str(tmp_path / "shared"), env_cache=tmp_path / "x")
    assert again.returncode == 0 and "already prepared" in again.stdout and str(folder) in again.stdout
    # training finds them where data.cache_dir says
    assert prepare_data(load_spec(spec, [f"data.cache_dir={tmp_path / 'shared'}"]).data).path == folder
    for bad, says in ((["data.source=/no/such"], "no such file or directory"),
                      (["--out", str(spec)], "is a file, not a data directory"),
                      (["data.max_tokens=-3"], "data.max_tokens")):
        res = _dtlab("prepare", str(spec), *bad, env_cache=tmp_path / "x")
        assert res.returncode == 2 and says in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


# ---- bounded memory --------------------------------------------------------------------------------
MEASURE = textwrap.dedent("""
    import json, resource, sys, tracemalloc
    from dtlab.trainers.run.data import prepare_data
    from dtlab.trainers.spec import DataSpec
    tracemalloc.start()
    prep = prepare_data(DataSpec(source=sys.argv[1], tokenizer=sys.argv[2], block_size=256, max_bytes=2**40,
                                 cache_dir=sys.argv[3]))
    peak = tracemalloc.get_traced_memory()[1]
    print(json.dumps({"tokens": prep.meta["tokens"], "traced": peak,
                      "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""")


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """Preparing 4x the tokens (about 2M and 8M, local parquet) takes less than 1.5x the peak memory: the
    resident set of the whole process and the Python heap with the arrays (tracemalloc); a list of Python
    ints would take 4x (36 bytes a token: 290 MB at 8M)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import PreTrainedTokenizerFast

    tok, tok_file = D.train_bpe([" ".join(_corpus(200))], 2000, tmp_path, "mem")
    PreTrainedTokenizerFast(tokenizer_file=str(tok_file), eos_token=EOT).save_pretrained(tmp_path / "tok")
    rng = np.random.default_rng(0)
    vocab = np.array([f"{w}{i % 97}" for i in range(97) for w in WORDS[:8]])
    facts = {}
    for name, docs in (("small", 2_500), ("large", 10_000)):
        path = tmp_path / f"{name}.parquet"
        writer = None
        for _ in range(docs // 500):  # written in parts: the corpus is never in memory here either
            texts = [" ".join(rng.choice(vocab, 400)) for _ in range(500)]
            table = pa.table({"text": texts})
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table, row_group_size=500)
        writer.close()
        res = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(tmp_path / "tok"), str(tmp_path / name)],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        facts[name] = json.loads(res.stdout.strip().splitlines()[-1])
    small, large = facts["small"], facts["large"]
    print(facts)
    assert 3.5 < large["tokens"] / small["tokens"] < 4.5 and small["tokens"] > 1_800_000
    assert large["rss"] < 1.5 * small["rss"], facts
    assert large["traced"] < 1.5 * small["traced"], facts


# ---- epochs ------------------------------------------------------------------------------------------
def test_a_run_that_repeats_its_data_says_so_and_records_the_epoch(tmp_path, caplog):
    from dtlab.trainers.orchestrate.runner import run_training
    from dtlab.trainers.spec import spec_from_dict
    from tests.trainers.conftest import tiny_spec

    spec = spec_from_dict(tiny_spec(model={"type": "standard"}, data={"max_bytes": 20_000},
                                    training={"max_steps": 40, "eval_every": 40, "log_every": 5}))
    caplog.set_level(logging.INFO, logger="dtlab")
    run_training(spec, tmp_path / "run")
    rows = len(prepare_data(spec.data).train)
    per_epoch = rows // 4
    said = [r.getMessage() for r in caplog.records if "epochs (the data repeats)" in r.getMessage()]
    assert len(said) == 1 and f"{40 / per_epoch:.1f} epochs" in said[0], said
    assert f"over {rows * 64 / 1000:.1f}k training tokens" in said[0], said
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["epoch"] for r in train] == [(r["step"] - 1) // per_epoch for r in train]
    assert train[-1]["epoch"] >= 1
    info = json.loads((tmp_path / "run" / "run.json").read_text())["training"]
    assert info["epochs"] == pytest.approx(40 / per_epoch)


def test_a_run_within_its_data_says_nothing_about_epochs(tmp_path, caplog):
    from dtlab.trainers.orchestrate.runner import say_repeats
    from dtlab.trainers.spec import spec_from_dict
    from tests.trainers.conftest import tiny_spec

    spec = spec_from_dict(tiny_spec())
    caplog.set_level(logging.INFO, logger="dtlab")
    say_repeats(spec, prepare_data(spec.data), 1)
    assert not [r for r in caplog.records if "epochs" in r.getMessage()]


# ---- the shipped GPU specs ------------------------------------------------------------------------------
GPU_SPECS = sorted(p for p in (ROOT / "experiments").glob("*.yaml") if "device: cuda" in p.read_text())


@pytest.mark.parametrize("path", GPU_SPECS, ids=lambda p: p.name)
def test_gpu_specs_do_not_repeat_their_data(path):
    """Planned from the spec alone (no download): every trial's tokens fit the training share of
    data.max_tokens, and max_bytes (at 8 characters a token, more than English text takes) never cuts first."""
    spec = load_spec(path)
    data, training = spec.data, spec.training
    assert data.source != "builtin" and not D._looks_local(data.source), "a hub corpus, streamed"
    assert data.max_tokens, f"{path.name}: data.max_tokens sets the token budget"
    per_step = training.batch_size * training.grad_accum_steps * spec.resources.num_workers * data.block_size
    planned = training.max_steps * per_step
    training_tokens = data.max_tokens * (1 - data.val_fraction) * 0.98  # the hash split and packing: a margin
    assert planned <= training_tokens, f"{path.name}: {planned:,} tokens planned, about {training_tokens:,.0f} there"
    assert data.max_bytes >= 8 * data.max_tokens, f"{path.name}: max_bytes would stop the stream first"


def test_the_gpu_spec_checks_above_have_specs_to_check():
    assert {p.name for p in GPU_SPECS} >= {"sweep_gpu.yaml", "sweep_multigpu.yaml"}


# ---- per node: the first local rank prepares, the others wait ------------------------------------------
NODE_RANK = textwrap.dedent("""
    import json, logging, sys
    from dtlab.trainers.run import data as D
    real = D._source_texts
    def counted(*args, **kwargs):
        with open(sys.argv[2], "a") as f:
            f.write("read\\n")
        return real(*args, **kwargs)
    D._source_texts = counted
    log = logging.getLogger("dtlab")
    log.addHandler(logging.StreamHandler(sys.stderr)); log.setLevel(logging.INFO)
    from dtlab.trainers.orchestrate.ray_train import node_data
    print(node_data(json.loads(open(sys.argv[1]).read()), poll_s=0.1))
""")


def test_on_a_node_without_the_drivers_data_local_rank_0_prepares_and_the_others_wait(tmp_path):
    """Two workers of a node that cannot see the driver's folder: local rank 1, started first, does not
    prepare (it would win the cache's lock) but waits; local rank 0 reads the corpus; both open its folder."""
    import os
    import time

    from dtlab.trainers.spec import spec_from_dict

    path = _jsonl(tmp_path / "c.jsonl", _corpus(300))
    data = {"source": str(path), "vocab_size": 300, "block_size": 32, "cache_dir": str(tmp_path / "node-cache")}
    spec = spec_from_dict({"name": "n", "data": data})
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data_dir": str(tmp_path / "driver-only" / data_key(spec.data).key),
                                  "spec": spec.model_dump(mode="json")}))
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    err1 = tmp_path / "rank1.err"
    with open(err1, "w") as e1:
        rank1 = subprocess.Popen([sys.executable, "-c", NODE_RANK, str(config), str(tmp_path / "reads1")],
                                 stdout=subprocess.PIPE, stderr=e1, text=True, env={**env, "LOCAL_RANK": "1"})
        deadline = time.time() + 120
        while "waiting for local rank 0" not in err1.read_text() and rank1.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert "waiting for local rank 0" in err1.read_text(), err1.read_text()
        time.sleep(1.0)  # rank 1 keeps waiting: nothing is prepared while rank 0 has not started
        assert rank1.poll() is None and not (tmp_path / "node-cache" / "data").exists()
        rank0 = subprocess.run([sys.executable, "-c", NODE_RANK, str(config), str(tmp_path / "reads0")],
                               capture_output=True, text=True, env={**env, "LOCAL_RANK": "0"}, timeout=300)
        assert rank0.returncode == 0, rank0.stderr
        out1, _ = rank1.communicate(timeout=60)
    assert rank1.returncode == 0, err1.read_text()
    folder = Path(rank0.stdout.strip().splitlines()[-1])
    assert Path(out1.strip().splitlines()[-1]) == folder and (folder / "meta.json").is_file()
    assert folder.parent == tmp_path / "node-cache" / "data"
    assert (tmp_path / "reads0").is_file() and not (tmp_path / "reads1").exists()  # only rank 0 read the corpus


# ---- a hub stream stopped by a budget exits cleanly ------------------------------------------------------
STOPPED_STREAM = textwrap.dedent("""
    import itertools, sys
    from dtlab.trainers.run import data as D
    from dtlab.trainers.spec import DataSpec
    spec = DataSpec(source=sys.argv[1])
    src = D.Source({"source": sys.argv[1]}, "test", False, [], None)  # a hub source: `datasets`' parquet stream
    texts = D._source_texts(spec, src)
    n = sum(1 for _ in itertools.islice(texts, 3000))
    texts.close()  # what a budget does: `_write` closes the results, and so the reader
    print(n, flush=True)
""")


@pytest.mark.slow
def test_a_parquet_stream_stopped_early_exits_cleanly(tmp_path):
    """The hub path (`datasets`' streaming parquet, here on local files through the same code) stopped
    after a few thousand of its 80,000 rows: the process exits with 0. Without closing and collecting
    the stream, pyarrow 25's threads aborted the exit (`terminate called without an active exception`,
    exit 134) in 3 of 7 runs here, and with `IterableDataset.take` instead in 1 of 3 (apache/arrow#45214)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    vocab = np.array([f"w{i}" for i in range(500)])
    for name in ("a", "b"):
        writer = None
        for _ in range(20):
            table = pa.table({"text": [" ".join(rng.choice(vocab, 300)) for _ in range(2000)]})
            writer = writer or pq.ParquetWriter(tmp_path / f"{name}.parquet", table.schema)
            writer.write_table(table, row_group_size=500)
        writer.close()
    for _ in range(4):
        res = subprocess.run([sys.executable, "-c", STOPPED_STREAM, str(tmp_path)], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0 and "terminate called" not in res.stderr, (res.returncode, res.stderr[-500:])
        assert res.stdout.split() == ["3000"]  # stopped early: 3,000 of 80,000 rows read


def test_read_parts_of_a_hub_stream_are_its_shards_in_order(tmp_path):
    """What Ray Data's read tasks read of a hub dataset (`read_parts`: a shard of the `datasets` stream
    each, here on local parquet files through the hub's code path): one after another, the whole stream."""
    import pandas as pd

    docs = _corpus(90)
    for i in range(3):
        pd.DataFrame({"text": docs[i * 30:(i + 1) * 30]}).to_parquet(tmp_path / f"p{i}.parquet")
    spec = DataSpec(source=str(tmp_path))
    src = D.Source({"source": str(tmp_path)}, "test", False, [], None)  # no local builder: the hub branch
    parts = D.read_parts(spec, src)
    assert parts == [{"shard": i, "of": 3} for i in range(3)]
    assert [t for p in parts for t in D._source_texts(spec, src, p)] == list(D._source_texts(spec, src)) == docs
