"""Token shards prepared by a Ray cluster (`dtlab prepare SPEC --ray`).

Ray Data reads the source's parts (`data.read_parts`: a parquet row group, a local file, a shard of a hub
dataset's stream) in read tasks on any node, tokenizes their documents in `map_batches` with actors that
hold the tokenizer (`data.tokenize_batch`, the function worker processes run), and hands the tokenized
batches back in order (`preserve_order`). This driver cuts the stream at `max_bytes` and `max_tokens` and
writes the shards into the output (a folder every node sees, for training) through the same `data._write`
as a preparation in one process: the same rows, the same document-hash split, byte for byte
(tests/trainers/test_prepare_ray.py). What crosses to the driver is the token ids (2 or 4 bytes a token),
not the text; the tokenizing, what takes the time, is the cluster's.

A running text (one local text file, `data.contiguous`) is cut in order and is prepared in one process
here; so is a corpus too small to split by document.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np

from dtlab.trainers.run import data as D
from dtlab.trainers.spec import DataSpec

log = logging.getLogger(__name__)

READ_CPUS = 0.5  # a read task's CPUs (reading parquet is about 100x faster than tokenizing it)
TOKENIZE_CPUS = 1.0  # a tokenizing actor's CPUs (not READ_CPUS: equal ones would fuse reading into tokenizing)


def prepare_with_ray(spec: DataSpec, actors: int | None = None) -> D.Prepared:
    """`data.prepare_data` with the documents tokenized by Ray Data on the cluster this process is part
    of (`RAY_ADDRESS`, or a local instance started here): `actors` tokenizing actors (default: as many as
    the cluster's CPUs hold, less the reading). The same cache key, lock and folder as any preparation."""
    import ray

    from dtlab.trainers.orchestrate.ray_train import init_ray

    if not ray.is_initialized():
        init_ray()
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    n = actors or max(1, int((cpus - READ_CPUS) // TOKENIZE_CPUS))
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    engine = f"Ray Data: {n} tokenizing actor(s) on a cluster of {nodes} node(s), {cpus:g} CPUs"
    return D.prepare_data(spec, tokenized=partial(ray_tokenized, actors=n), engine=engine)


def _read(batch: dict[str, np.ndarray], spec: DataSpec, src: D.Source) -> Iterator[dict[str, np.ndarray]]:
    """A read task: the texts of each part in the batch, in `data.batches`-sized blocks, each text with
    its part and position there (so the driver can read back the one text `max_bytes` cuts)."""
    for raw in batch["part"]:
        part = json.loads(raw)
        texts: list[str] = []
        chars, index = 0, 0
        for text in D._source_texts(spec, src, part):
            texts.append(text)
            chars += len(text)
            if len(texts) >= D.BATCH_DOCS or chars >= D.BATCH_CHARS:
                yield _block(texts, raw, index)
                index += len(texts)
                texts, chars = [], 0
        if texts:
            yield _block(texts, raw, index)


def _block(texts: list[str], part: str, first: int) -> dict[str, np.ndarray]:
    n = len(texts)
    return {"text": np.array(texts, dtype=object), "part": np.array([part] * n, dtype=object),
            "index": np.arange(first, first + n, dtype=np.int64)}


class _Tokenize:
    """A tokenizing actor: the tokenizer rebuilt once from its JSON, one batch of texts in, one row out
    (the batch's tokens, per-document lengths, validation flags, characters, whether each held text)."""

    def __init__(self, tokenizer_json: str, eot: int, val_fraction: float) -> None:
        D._init_worker(tokenizer_json, eot, val_fraction, False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        tokens, lengths, is_val = D.tokenize_batch([D.doc_of(t) for t in texts])
        return {"tokens": _one(tokens), "lengths": _one(lengths), "is_val": _one(is_val),
                "chars": _one(np.array([len(t) for t in texts], dtype=np.int64)),
                "has_text": _one(np.array([D.has_text(t) for t in texts], dtype=bool)),
                "part": np.array([json.dumps([str(p) for p in batch["part"]])], dtype=object),
                "index": _one(np.asarray(batch["index"], dtype=np.int64))}


def _one(a: np.ndarray) -> np.ndarray:
    return np.array([np.ascontiguousarray(a).tobytes()], dtype=object)


def ray_tokenized(spec: DataSpec, src: D.Source, tok: D.Tokenizer, tally: D.Tally, actors: int = 1) -> D.Results:
    """`data.Tokenized` by Ray Data: the source's documents tokenized on the cluster, in order, cut at
    `max_bytes` here exactly as `data.budgeted_texts` cuts them (the last one re-read and re-tokenized)."""
    import ray

    parts = D.read_parts(spec, src)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True  # blocks come back in the order of the parts
    ctx.enable_progress_bars = False
    rows = None
    try:
        ds = ray.data.from_items([{"part": json.dumps(p)} for p in parts], override_num_blocks=len(parts))
        # reading asks for other CPUs than tokenizing, so Ray Data does not fuse the two: the parts are
        # read by tasks, and their blocks tokenized by any actor (not each part by one)
        ds = ds.map_batches(_read, batch_size=1, fn_kwargs={"spec": spec, "src": src}, num_cpus=READ_CPUS)
        ds = ds.map_batches(_Tokenize, batch_size=None, batch_format="numpy", num_cpus=TOKENIZE_CPUS,
                            fn_constructor_args=(tok.to_str(), tok.eot_id, spec.val_fraction),
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors))
        rows = iter(ds.iter_rows())
        yield from _budgeted(spec, src, tok, tally, rows)
    finally:
        if rows is not None and hasattr(rows, "close"):
            rows.close()
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def _budgeted(spec: DataSpec, src: D.Source, tok: D.Tokenizer, tally: D.Tally, rows: Any) -> D.Results:
    """The tokenized batches up to `max_bytes` characters: a document is kept while characters remain
    before it, and the one the budget ends in is cut to what remains and tokenized again, here."""
    used = 0
    for row in rows:
        tokens = np.frombuffer(row["tokens"], dtype=np.uint32)
        lengths = np.frombuffer(row["lengths"], dtype=np.int64)
        is_val = np.frombuffer(row["is_val"], dtype=bool)
        chars = np.frombuffer(row["chars"], dtype=np.int64)
        text_in = np.frombuffer(row["has_text"], dtype=bool)
        before = used + np.cumsum(chars) - chars
        n = int(np.sum(before < spec.max_bytes))  # the documents with characters left before them
        if n == 0:  # the budget was spent exactly by the batches before: nothing of this one is kept
            return
        if n == len(chars) and used + chars.sum() <= spec.max_bytes:
            used += int(chars.sum())
            tally.documents += n
            tally.characters += int(chars.sum())
            tally.any_text = tally.any_text or bool(text_in.any())
            yield tokens.copy(), lengths.copy(), is_val.copy()
            continue
        # the budget ends in document n - 1 (or right before document n): the first n - 1 whole, then it, cut
        whole = n - 1 if before[n - 1] + chars[n - 1] > spec.max_bytes else n
        keep = int(lengths[:whole].sum())
        out = [(tokens[:keep], lengths[:whole], is_val[:whole])]
        tally.documents += whole
        tally.characters += int(chars[:whole].sum())
        tally.any_text = tally.any_text or bool(text_in[:whole].any())
        if whole < n:
            room = spec.max_bytes - int(before[n - 1])
            part = json.loads(json.loads(row["part"])[n - 1])
            index = int(np.frombuffer(row["index"], dtype=np.int64)[n - 1])
            texts = D._source_texts(spec, src, part)
            try:
                text = next(itertools.islice(texts, index, None))[:room]
            finally:
                texts.close()  # a stream stopped early is closed, not left to the interpreter's exit
            D._init_worker(tok.to_str(), tok.eot_id, spec.val_fraction, True)
            out.append(D.tokenize_batch([D.doc_of(text)]))
            tally.documents += 1
            tally.characters += len(text)
            tally.any_text = tally.any_text or D.has_text(text)
        yield (np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out]),
               np.concatenate([o[2] for o in out]))
        return
