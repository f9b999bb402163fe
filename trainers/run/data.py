"""Text in, token shards out: sources, tokenizers, a deterministic split, a disk cache.

`prepare_data` runs once in the driver (so bad input fails before any worker starts; `dtlab prepare` runs
it ahead of a study) and writes the token shards of `shards.py` into a cache folder named by a key computed
from what determines the data, without reading the corpus: the source (hub name, configuration, revision
and split, or the local files' paths, sizes and modification times, or this Python's builtin text), the
text field and how documents are read, the tokenizer (its own key, or the hash of a hub tokenizer's
`tokenizer.json`), `block_size`, the limits and the split rule. A second call with the same spec opens
that folder and reads nothing else; workers `load_prepared` it, memory-mapped.

Preparation streams: documents are read in chunks (`datasets` with `streaming=True`, for hub datasets and
local files alike), tokenized in batches with the fast tokenizer's batch encoding (in `data.num_proc`
processes, in order) and written to the shard files as they come, so memory does not grow with the corpus.
Rows hold documents joined by an end-of-text token; labels are the rows themselves and the model shifts
them, exactly once. Each document goes wholly to training or validation by a hash of its text.
`orchestrate/prepare_ray.py` has the documents tokenized by Ray Data across a cluster instead (`Tokenized`)
and writes them through the same `_write`: the same shards.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dtlab.trainers.run.shards import ShardWriter, open_rows, token_dtype
from dtlab.trainers.spec import DataSpec, SpecError

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
LOCAL_BUILDERS = {".txt": "text", ".md": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                  ".parquet": "parquet"}
FORMAT = 3  # of the prepared folder (part of the key): 3 = token shards (2 was train.npy/val.npy)
SPLIT_RULE = "sha256 of each document's UTF-8 text < val_fraction; a running text or too few documents: by position"
PIECE_CHARS = 1 << 20  # a longer text is tokenized in pieces, cut where the tokenizer splits anyway
BATCH_DOCS, BATCH_CHARS = 512, 1 << 20  # documents (or characters) per tokenization batch
BPE_TRAIN_CHARS = 100_000_000  # a tokenizer trained here learns from the corpus's first characters, up to this
PROGRESS_SECONDS = 60.0  # a line about a long preparation's progress, this often


def cache_root(spec: DataSpec) -> Path:
    return Path(spec.cache_dir or os.environ.get("DTLAB_CACHE") or Path.home() / ".cache" / "dtlab")


# ---- documents ---------------------------------------------------------------------------------
def builtin_documents(max_bytes: int) -> list[str]:
    """Real English and technical text every Python installation carries: the documentation
    topics of `pydoc_data` (the language reference behind `help()`), then standard-library
    sources, sorted by path, up to `max_bytes`. Paragraphs that an earlier document already had
    are dropped: the topics repeat whole passages, which would put validation text in training."""
    docs: list[str] = []
    seen: set[str] = set()
    try:
        from pydoc_data.topics import topics

        docs.extend(_new_paragraphs(topics[k], seen) for k in sorted(topics))
    except ImportError:  # some distributions package the docs separately
        pass
    root = Path(sysconfig.get_paths()["stdlib"])
    size = sum(len(d) for d in docs)
    for path in sorted(root.rglob("*.py")):
        if size >= max_bytes:
            break
        if {"site-packages", "dist-packages"} & set(path.parts):
            continue
        try:
            text = _new_paragraphs(path.read_text(encoding="utf-8"), seen)
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(text)
        size += len(text)
    return [d for d in docs if d.strip()]


def _new_paragraphs(text: str, seen: set[str], min_chars: int = 80) -> str:
    """`text` without the paragraphs (of `min_chars` or more) already in `seen`, which it extends."""
    keep = []
    for para in text.split("\n\n"):
        key = para.strip()
        if len(key) >= min_chars:
            if key in seen:
                continue
            seen.add(key)
        keep.append(para)
    return "\n\n".join(keep)


def _local_files(source: str) -> list[Path]:
    """The files of a local source, sorted; empty text files left out. Reads no content."""
    path = Path(source).expanduser()
    if not path.exists():
        raise SpecError(f"data.source={source!r}: no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [p for p in files if p.suffix.lower() in LOCAL_BUILDERS]
    if not files:
        raise SpecError(f"data.source={source!r}: no {sorted(LOCAL_BUILDERS)} files there")
    kinds = {LOCAL_BUILDERS[p.suffix.lower()] for p in files}
    if len(kinds) > 1:
        raise SpecError(f"data.source={source!r}: mixes file kinds {sorted(kinds)}; use one kind per source")
    if kinds != {"parquet"}:  # what `datasets` would fail on with a vague message
        files = [f for f in files if f.stat().st_size > 0] or _empty(files)
    return files


def _empty(files: list[Path]) -> list[Path]:
    raise SpecError(f"data.source: {', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''} "
                    f"{'is' if len(files) == 1 else 'are all'} empty")


def _check_utf8(path: Path, chunk: int = 1 << 24) -> None:
    """`path` is UTF-8 text, read in chunks (the error names the byte)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:
                raise SpecError(f"data.source: {path} is not UTF-8 text (byte {offset - pending + err.start}: "
                                f"{err.reason})") from None
            if not data:
                return
            offset += len(data)


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists() or \
        Path(source).suffix.lower() in LOCAL_BUILDERS


@dataclass
class Source:
    """What a spec reads, known without reading it: the key's inputs, where in words, how to read."""

    identity: dict[str, Any]
    where: str
    one_text: bool  # a single running text (one local text file): split into contiguous spans
    files: list[Path] = field(default_factory=list)
    builder: str | None = None


def resolve_source(spec: DataSpec) -> Source:
    """The source of `spec.source`, checked, from the file system's metadata only."""
    if spec.source == "builtin":
        return Source({"source": "builtin", "python": sys.version, "stdlib": sysconfig.get_paths()["stdlib"]},
                      "builtin: pydoc_data topics + stdlib sources", False)
    if _looks_local(spec.source):
        files = _local_files(spec.source)
        builder = LOCAL_BUILDERS[files[0].suffix.lower()]
        if spec.sample_by != "document" and builder != "text":
            raise SpecError(f"data.sample_by={spec.sample_by!r} applies to text files; {spec.source!r} holds "
                            f"{builder} files, whose rows are the documents")
        where = f"local {builder}: {', '.join(map(str, files))}" + (
            f" (a {spec.sample_by} per document)" if builder == "text" else "")
        stats = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        return Source({"source": "local", "builder": builder, "files": stats}, where,
                      builder == "text" and len(files) == 1, files, builder)
    if spec.sample_by != "document":
        raise SpecError(f"data.sample_by={spec.sample_by!r} applies to local text files; the rows of a hub "
                        "dataset are its documents (data.contiguous: true joins them into one text)")
    where = f"hub: {spec.source}" + (f" ({spec.name})" if spec.name else "") + f", split {spec.split}" + (
        f", revision {spec.revision}" if spec.revision else "")
    return Source({"source": spec.source, "name": spec.name, "revision": spec.revision, "split": spec.split},
                  where, False)


def read_parts(spec: DataSpec, src: Source) -> list[dict[str, int]]:
    """The source as parts that can be read apart (by Ray Data's read tasks, on any node), in order:
    `_source_texts` of each part, one after another, are `_source_texts` of the whole. Builtin text is
    one part; local parquet a part per row group; local json/text files a part per file; a hub
    dataset a part per shard of its `datasets` stream (its data files). Reads no documents (a
    parquet file's footer, a hub dataset's list of files)."""
    if spec.source == "builtin":
        return [{}]
    if src.builder == "parquet":
        import pyarrow.parquet as pq

        return [{"file": i, "row_group": g} for i, f in enumerate(src.files)
                for g in range(pq.ParquetFile(f).metadata.num_row_groups)]
    if src.builder is not None:
        return [{"file": i} for i in range(len(src.files))]
    import datasets

    try:
        n = datasets.load_dataset(spec.source, spec.name, split=spec.split, revision=spec.revision,
                                  streaming=True).num_shards
    except Exception as err:
        raise SpecError(f"data.source={spec.source!r}: could not load ({type(err).__name__}: {err})") from err
    return [{"shard": i, "of": n} for i in range(n)]


def _source_texts(spec: DataSpec, src: Source, part: dict[str, int] | None = None) -> Iterator[str]:
    """The texts of the source (or of one of its `read_parts`), in order, streamed."""
    if spec.source == "builtin":
        yield from builtin_documents(spec.max_bytes)
        return
    files = src.files if part is None or "file" not in part else [src.files[part["file"]]]
    if src.builder == "parquet":
        yield from _parquet_texts(spec, files, None if part is None else part["row_group"])
        return
    import datasets

    datasets.disable_progress_bars()  # a quiet terminal; errors are said in one line
    if src.builder is not None:
        if src.builder != "parquet":
            for f in files:
                _check_utf8(f)
        options = {"sample_by": spec.sample_by} if src.builder == "text" else {}
        load = lambda: datasets.load_dataset(src.builder, data_files=[str(f) for f in files], split="train",
                                             streaming=True, **options)
    else:
        def load() -> Any:
            ds = datasets.load_dataset(spec.source, spec.name, split=spec.split, revision=spec.revision,
                                       streaming=True)
            return ds if part is None else ds.shard(part["of"], part["shard"])
    batches = None
    try:
        ds = load()
        columns = ds.column_names
        if columns is not None and spec.text_field in columns and len(columns) > 1:
            ds = ds.select_columns([spec.text_field])  # nothing else is decoded
        batches = iter(ds.iter(batch_size=256))
        first = next(batches, None)
    except SpecError:
        raise
    except Exception as err:  # network, unknown name, unreadable file: say which source
        raise SpecError(f"data.source={spec.source!r}: could not load ({type(err).__name__}: {err})") from err
    if first is not None and spec.text_field not in first or first is None and columns is not None \
            and spec.text_field not in columns:
        have = list(first) if first is not None else columns
        batches.close()
        raise SpecError(f"data.text_field={spec.text_field!r}: not a column of {spec.source!r} (columns: {have})")
    batch = first
    try:
        while batch is not None:
            for text in batch[spec.text_field]:
                if isinstance(text, str):
                    yield text
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as err:
                raise SpecError(f"data.source={spec.source!r}: could not read ({type(err).__name__}: {err})") \
                    from err
    finally:
        # a stream stopped early (by a budget) must be closed and collected here: left to the interpreter's
        # exit, pyarrow's threads of a parquet stream abort it (`terminate called without an active
        # exception`, in 3 of 7 runs with pyarrow 25; apache/arrow#45214, which `datasets` works around
        # for pyarrow <= 24 only); closed and collected, none of 12 runs did (tests/trainers/test_prepare.py)
        batches.close()
        import gc

        gc.collect()


def _parquet_texts(spec: DataSpec, files: list[Path], row_group: int | None = None) -> Iterator[str]:
    """Local parquet files (or one row group of one) a batch of rows at a time, the text column only
    (pyarrow's file reader: a `datasets` stream of parquet left unfinished can abort or hang the interpreter's
    exit, apache/arrow#45214)."""
    import pyarrow.parquet as pq

    for path in files:
        try:
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
        except Exception as err:
            raise SpecError(f"data.source={spec.source!r}: could not load {path} ({type(err).__name__}: "
                            f"{err})") from err
        if spec.text_field not in names:
            raise SpecError(f"data.text_field={spec.text_field!r}: not a column of {spec.source!r} (columns: {names})")
        try:
            groups = None if row_group is None else [row_group]
            for batch in pf.iter_batches(batch_size=256, columns=[spec.text_field], row_groups=groups):
                yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))
        except SpecError:
            raise
        except Exception as err:
            raise SpecError(f"data.source={spec.source!r}: could not read {path} ({type(err).__name__}: "
                            f"{err})") from err


@dataclass
class Tally:
    """What the reader saw: documents, characters, whether any held text."""

    documents: int = 0
    characters: int = 0
    any_text: bool = False


def budgeted_texts(spec: DataSpec, src: Source, tally: Tally) -> Iterator[str]:
    """The source's texts cut to `max_bytes` characters (the last one cut short)."""
    budget = spec.max_bytes
    for text in _source_texts(spec, src):
        if budget <= 0:
            return
        text = text[:budget]
        budget -= len(text)
        tally.documents += 1
        tally.characters += len(text)
        tally.any_text = tally.any_text or has_text(text)
        yield text


def has_text(text: str) -> bool:
    return bool(text) and not text.isspace()


# ---- pieces: long texts tokenized a piece at a time ----------------------------------------------------
def _safe_cut(text: str, lo: int, hi: int) -> int:
    """A position in [lo, hi) just after a newline where the tokenizers' pre-tokenization (GPT-2's and
    Qwen's patterns) splits anyway: a visible character on both sides of the newline, or one space and
    then a visible character after it; so the pieces tokenize as the whole does. -1 if there is none."""
    i = text.find("\n", max(lo - 1, 0), hi)
    while i != -1 and i + 2 < len(text):
        before, after, then = text[i - 1] if i else "\n", text[i + 1], text[i + 2]
        if not before.isspace() and _visible(after) or after == " " and _visible(then):
            return i + 1
        i = text.find("\n", i + 1, hi)
    return -1


def _visible(ch: str) -> bool:
    return not ch.isspace() and not unicodedata.combining(ch)


def pieces(text: str, size: int | None = None) -> list[str]:
    """`text` in pieces of about `size` characters (PIECE_CHARS) or more, cut only at safe places."""
    size = size or PIECE_CHARS
    out, start = [], 0
    while len(text) - start > 2 * size:
        cut = _safe_cut(text, start + size, start + 2 * size)
        if cut == -1:
            cut = _safe_cut(text, start + 2 * size, len(text))
        if cut == -1:
            break
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def running_text(texts: Iterable[str], size: int | None = None) -> Iterator[str]:
    """Texts joined into one running text (each ending in a newline), yielded in pieces cut at safe
    places, as `pieces` would cut the joined text."""
    size = size or PIECE_CHARS
    buf: list[str] = []
    held = 0
    for text in texts:
        buf.append(text if text.endswith("\n") else text + "\n")
        held += len(buf[-1])
        if held > 4 * size:
            joined = "".join(buf)
            parts = pieces(joined, size)
            yield from parts[:-1]
            buf, held = [parts[-1]], len(parts[-1])
    if buf:
        yield from pieces("".join(buf), size)


# ---- the documents to tokenize ------------------------------------------------------------------------
Doc = tuple[list[str], bool]  # a document's pieces, and whether an end-of-text token follows it


def documents(spec: DataSpec, src: Source, tally: Tally) -> Iterator[Doc]:
    texts = budgeted_texts(spec, src, tally)
    if spec.contiguous and not src.one_text:  # rows that are pieces of one text (WikiText's lines)
        last = None
        for piece in running_text(texts):
            if last is not None:
                yield [last], False
            last = piece
        if last is not None:
            yield [last], True
        return
    yield from map(doc_of, texts)


def doc_of(text: str) -> Doc:
    """A document (not part of a running text): its pieces, then an end-of-text token."""
    return (pieces(text) if len(text) > 2 * PIECE_CHARS else [text]), True


def batches(docs: Iterator[Doc]) -> Iterator[list[Doc]]:
    batch: list[Doc] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += sum(map(len, doc[0]))
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# ---- tokenizers ----------------------------------------------------------------------------------
class Tokenizer:
    """One interface over a locally trained `tokenizers` BPE and a Hugging Face tokenizer."""

    def __init__(self, backend: Any, hf: bool, name: str) -> None:
        self.backend, self.hf, self.name = backend, hf, name

    @property
    def vocab_size(self) -> int:
        return len(self.backend) if self.hf else self.backend.get_vocab_size()

    @property
    def eot_id(self) -> int:
        if self.hf:
            tok = self.backend
            for cand in (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id):
                if cand is not None:
                    return int(cand)
            raise SpecError(f"data.tokenizer={self.name!r} has no end-of-text, padding or start token")
        return self.backend.token_to_id(EOT)

    @property
    def fast(self) -> Any:
        """The `tokenizers.Tokenizer` that does the work (a Hugging Face tokenizer's backend)."""
        return self.backend.backend_tokenizer if self.hf else self.backend

    def to_str(self) -> str:
        """The tokenizer as `tokenizer.json` text: what worker processes rebuild it from, and what its hash
        (part of the data's cache key) is of."""
        return self.fast.to_str()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.hf:
            return self.backend(texts, add_special_tokens=False)["input_ids"]
        return [e.ids for e in self.backend.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids)


def train_bpe(docs: Iterable[str], vocab_size: int, cache: Path, fingerprint: str) -> tuple[Tokenizer, Path]:
    """A byte-level BPE trained on `docs`, cached on disk by `fingerprint` (what determines `docs`) and
    vocabulary size."""
    import tokenizers

    path = cache / "tokenizers" / f"bpe-{vocab_size}-{fingerprint[:16]}.json"
    if not path.is_file():
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                                 initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(docs, trainer=trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tok.save(str(tmp))
        os.replace(tmp, path)
    return Tokenizer(tokenizers.Tokenizer.from_file(str(path)), False, f"bpe-{vocab_size} (trained here)"), path


def load_hf_tokenizer(name: str) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        return Tokenizer(AutoTokenizer.from_pretrained(name), True, name)
    except Exception as err:
        raise SpecError(f"data.tokenizer={name!r}: could not load ({type(err).__name__}: {err})") from err


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def bpe_inputs(spec: DataSpec, src: Source) -> dict[str, Any]:
    """What a tokenizer trained here depends on: the text it learns from, and its vocabulary size."""
    return {"corpus": src.identity, "text_field": spec.text_field, "sample_by": spec.sample_by,
            "contiguous": spec.contiguous, "chars": min(spec.max_bytes, BPE_TRAIN_CHARS),
            "vocab_size": spec.vocab_size, "bpe": 1}


def _train_text(spec: DataSpec, src: Source) -> Iterator[str]:
    """The text a tokenizer trained here learns from: the corpus's first BPE_TRAIN_CHARS characters (all of
    it up to max_bytes when that is smaller), in the pieces it is tokenized in."""
    budget = BPE_TRAIN_CHARS
    for doc, _ in documents(spec, src, Tally()):
        for piece in doc:
            if budget <= 0:
                return
            yield piece[:budget]
            budget -= len(piece)


@dataclass
class Key:
    key: str
    inputs: dict[str, Any]
    src: Source
    tokenizer: Tokenizer | None  # loaded when it took loading to know its hash (a Hugging Face one)


def data_key(spec: DataSpec) -> Key:
    """The cache key of the prepared data, from what determines them; reads no corpus."""
    src = resolve_source(spec)
    tok = None
    if spec.tokenizer:
        tok = load_hf_tokenizer(spec.tokenizer)
        tok_id: dict[str, Any] = {"name": spec.tokenizer, "sha256": hashlib.sha256(tok.to_str().encode()).hexdigest(),
                                  "eot_id": tok.eot_id}
    else:
        tok_id = {"trained": _digest(bpe_inputs(spec, src))[:16], "vocab_size": spec.vocab_size}
    inputs = {"format": FORMAT, "corpus": src.identity, "text_field": spec.text_field, "sample_by": spec.sample_by,
              "contiguous": spec.contiguous, "tokenizer": tok_id, "block_size": spec.block_size,
              "max_bytes": spec.max_bytes, "max_tokens": spec.max_tokens, "val_fraction": spec.val_fraction,
              "split_rule": SPLIT_RULE}
    return Key(_digest(inputs)[:20], inputs, src, tok)


def tokenizer_for(spec: DataSpec, key: Key) -> tuple[Tokenizer, Path | None]:
    """The tokenizer, and its cached file when it was trained here."""
    if key.tokenizer is not None:
        return key.tokenizer, None
    return train_bpe(_train_text(spec, key.src), spec.vocab_size, cache_root(spec), key.inputs["tokenizer"]["trained"])


# ---- tokenizing a batch (in this process or a worker's) ---------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_json: str, eot: int, val_fraction: float, own_threads: bool) -> None:
    if not own_threads:  # one process, one core: the workers are the parallelism
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import tokenizers

    _WORKER.update(tok=tokenizers.Tokenizer.from_str(tokenizer_json), eot=eot, val=val_fraction)


def _is_val(doc_pieces: list[str], fraction: float) -> bool:
    h = hashlib.sha256()
    for p in doc_pieces:
        h.update(p.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest()[:8], "big") / 2**64 < fraction


def tokenize_batch(batch: list[Doc]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens of the batch's documents in order, each followed by the end-of-text token where it has one;
    tokens per document; whether each document is a validation document)."""
    tok, eot = _WORKER["tok"], _WORKER["eot"]
    texts = [p for doc, _ in batch for p in doc]
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    lengths = np.zeros(len(batch), dtype=np.int64)
    out: list[int] = []
    k = 0
    for i, (doc, has_eot) in enumerate(batch):
        start = len(out)
        for _ in doc:
            out.extend(ids[k])
            k += 1
        if has_eot:
            out.append(eot)
        lengths[i] = len(out) - start
    is_val = np.array([_is_val(doc, _WORKER["val"]) for doc, _ in batch], dtype=bool)
    return np.asarray(out, dtype=np.uint32), lengths, is_val


def ordered_map(batches: Iterator[list[Doc]], num_proc: int, initargs: tuple[Any, ...]
                ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`tokenize_batch` over `batches`, in order: here (num_proc 1), or in `num_proc` worker processes with
    at most two batches each in flight (memory stays bounded however fast the corpus is read)."""
    if num_proc <= 1:
        _init_worker(*initargs, True)
        yield from map(tokenize_batch, batches)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(num_proc, _init_worker, (*initargs, False)) as pool:
        pending: deque[Any] = deque()
        for batch in batches:
            pending.append(pool.apply_async(tokenize_batch, (batch,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---- preparing: stream, split, write ---------------------------------------------------------------------
@dataclass
class Prepared:
    path: Path
    train: Any  # [rows, block_size] token ids, memory-mapped (np.memmap, or shards.Rows over several shards)
    val: Any
    meta: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])


def _progress(spec: DataSpec, tokens: int, started: float, said: list[float]) -> None:
    now = time.perf_counter()
    if now - said[0] >= PROGRESS_SECONDS:
        said[0] = now
        of = f" of {spec.max_tokens:,}" if spec.max_tokens else ""
        log.info(f"preparing data: {tokens:,}{of} tokens, {tokens / (now - started):,.0f} tokens/s")


Results = Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]  # what `tokenize_batch` returns, batch by batch
# tokenized documents of the source in order, from (spec, source, tokenizer, tally): the reader's `Tally` kept
Tokenized = Callable[[DataSpec, "Source", "Tokenizer", Tally], Results]


def local_tokenized(num_proc: int) -> Tokenized:
    """Documents read here and tokenized in `num_proc` processes (`ordered_map`)."""
    def run(spec: DataSpec, src: Source, tok: Tokenizer, tally: Tally) -> Results:
        return ordered_map(batches(documents(spec, src, tally)), num_proc, (tok.to_str(), tok.eot_id,
                                                                             spec.val_fraction))
    return run


def _write(spec: DataSpec, src: Source, tok: Tokenizer, folder: Path, position: bool, tokenized: Tokenized
           ) -> tuple[dict[str, Any], Tally]:
    """Stream the corpus into `folder`'s shards: by document, or (`position`) as one stream whose last
    `val_fraction` of tokens is validation; the shards and facts, and what the reader saw."""
    dtype, block = token_dtype(tok.vocab_size), spec.block_size
    train, val = ShardWriter(folder, "train", dtype, block), ShardWriter(folder, "val", dtype, block)
    tally, total, started, said = Tally(), 0, time.perf_counter(), [time.perf_counter()]
    kept_docs = 0
    results = tokenized(spec, src, tok, tally)
    for tokens, lengths, is_val in results:
        if spec.max_tokens is not None and total + len(tokens) >= spec.max_tokens:
            keep = spec.max_tokens - total
            ends = np.cumsum(lengths)
            n = int(np.searchsorted(ends, keep, side="left")) + 1 if keep else 0
            tokens, lengths, is_val = tokens[:keep], lengths[:n].copy(), is_val[:n]
            if n:
                lengths[-1] -= ends[n - 1] - keep
        if position:
            train.write(tokens, np.cumsum(lengths) - lengths)
        else:
            mask = np.repeat(is_val, lengths)
            for writer, mine, tokens_mine in ((train, lengths[~is_val], tokens[~mask]),
                                              (val, lengths[is_val], tokens[mask])):
                writer.write(tokens_mine, np.cumsum(mine) - mine)
        total += len(tokens)
        kept_docs += len(lengths)
        _progress(spec, total, started, said)
        if spec.max_tokens is not None and total >= spec.max_tokens:
            break
    results.close()  # stops the workers (a budget reached); the documents read ahead are not used
    if not tally.any_text:
        train.close(), val.close()
        raise SpecError(f"data.source={spec.source!r}: the corpus is empty (no text in {src.where})")
    if position:
        n = train.total
        n_val = max(block, int(n * spec.val_fraction))
        if n - n_val >= block:
            val.write(train.read(n - n_val, n), np.zeros(1, dtype=np.int64))
        why = "one running text" if src.one_text or spec.contiguous else "too few documents to split by document"
        split = f"by position (the last tokens of the stream are validation): {why}"
        facts = {"train_shards": train.close(max(0, n - n_val)), "val_shards": val.close(), "split": split}
    else:
        facts = {"train_shards": train.close(), "val_shards": val.close(), "split": "by document (sha256 of the text)"}
    facts.update(documents=kept_docs, tokens=total, seconds=time.perf_counter() - started)
    return facts, tally


def token_bytes(tok: Tokenizer) -> np.ndarray | None:
    """The UTF-8 bytes each token id stands for (a special token: none), for a byte-level tokenizer
    (GPT-2's, Qwen's, one trained here: each character of a vocabulary entry is one byte); None for
    another kind."""
    import tokenizers

    fast = tok.fast
    if not isinstance(fast.decoder, tokenizers.decoders.ByteLevel):
        return None
    table = np.zeros(max(tok.vocab_size, fast.get_vocab_size(with_added_tokens=True)), dtype=np.int64)
    for piece, i in fast.get_vocab(with_added_tokens=False).items():
        table[i] = len(piece)
    for i, added in fast.get_added_tokens_decoder().items():
        table[i] = 0 if added.special else len(added.content.encode("utf-8"))
    return table


def split_bytes(tok: Tokenizer, folder: Path, split: str, shards: list[dict[str, Any]], dtype: np.dtype,
                chunk: int = 1 << 24) -> int:
    """The UTF-8 bytes of the text a split's kept tokens stand for, end-of-text tokens not counted (what
    bits per byte divide by): exact for a byte-level tokenizer; for another kind, each document's tokens
    decoded (a character cut by the end of the kept rows or a shard boundary may count a few bytes)."""
    table = token_bytes(tok)
    total = 0
    starts = np.fromfile(folder / f"{split}.docs", dtype=np.int64) if table is None else None
    offset = 0
    for s in shards:
        stream = np.memmap(folder / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
        if table is not None:
            for lo in range(0, len(stream), chunk):
                total += int(table[np.asarray(stream[lo:lo + chunk])].sum())
        else:
            assert starts is not None
            cuts = np.unique(np.concatenate([[0, len(stream)], starts[(starts > offset) &
                                                                    (starts < offset + len(stream))] - offset]))
            for a in range(0, len(cuts) - 1, 1024):
                spans = [np.asarray(stream[lo:hi]).tolist() for lo, hi in zip(cuts[a:a + 1024], cuts[a + 1:a + 1025],
                                                                             strict=False)]
                total += sum(len(t.encode("utf-8")) for t in tok.fast.decode_batch(spans, skip_special_tokens=True))
        offset += len(stream)
        del stream
    return total


def _rows(shards: list[dict[str, Any]]) -> int:
    return sum(s["rows"] for s in shards)


def build(spec: DataSpec, key: Key, folder: Path, num_proc: int, tokenized: Tokenized | None = None,
          engine: str | None = None) -> None:
    """Prepare the data of `key` into `folder` (a fresh directory): documents tokenized in `num_proc`
    processes here, or by `tokenized` (Ray Data; `engine` says how) when the split is by document."""
    started = time.perf_counter()
    tok, tok_file = tokenizer_for(spec, key)
    if tok.vocab_size >= 2**32:
        raise SpecError(f"data.tokenizer: vocabulary of {tok.vocab_size} does not fit 32-bit token ids")
    position = key.src.one_text or spec.contiguous  # one running text: read and cut here, in order
    here = local_tokenized(num_proc)
    if position or tokenized is None:
        tokenized, engine = here, None
    facts, tally = _write(spec, key.src, tok, folder, position, tokenized)
    if not position and (_rows(facts["train_shards"]) < 2 or _rows(facts["val_shards"]) < 1):
        for f in folder.iterdir():  # too few documents to split by document: by position instead
            f.unlink()
        facts, tally = _write(spec, key.src, tok, folder, True, here)
        engine = None
    train_rows, val_rows = _rows(facts["train_shards"]), _rows(facts["val_shards"])
    if train_rows < 1 or val_rows < 1:
        raise SpecError(f"data.source={spec.source!r}: the corpus is too small for data.block_size="
                        f"{spec.block_size} ({tally.characters} characters)")
    seconds = time.perf_counter() - started
    meta = {"format": FORMAT, "key": key.key, "inputs": key.inputs, "source": key.src.where,
            "documents": facts["documents"], "characters": tally.characters, "tokens": facts["tokens"],
            "tokenizer": tok.name, "tokenizer_file": str(tok_file) if tok_file else None,
            "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "dtype": token_dtype(tok.vocab_size).name,
            "block_size": spec.block_size, "train_rows": train_rows, "val_rows": val_rows,
            "train_tokens": train_rows * spec.block_size, "val_tokens": val_rows * spec.block_size,
            "split": facts["split"], "shards": {"train": facts["train_shards"], "val": facts["val_shards"]},
            "val_bytes": split_bytes(tok, folder, "val", facts["val_shards"], token_dtype(tok.vocab_size)),
            "workers": num_proc, "engine": engine or f"{num_proc} process(es) here", "seconds": round(seconds, 3),
            "tokens_per_s": round(facts["tokens"] / max(facts["seconds"], 1e-9), 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (one preparation of a key at a time on a shared cache; the others
    wait, then find it prepared)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepared_folder(spec: DataSpec, key: Key | None = None) -> Path:
    return cache_root(spec) / "data" / (key or data_key(spec)).key


def prepare_data(spec: DataSpec, num_proc: int | None = None, tokenized: Tokenized | None = None,
                 engine: str | None = None) -> Prepared:
    """The prepared data of `spec`: opened from the cache when its key is there (nothing else is read),
    else streamed, tokenized (in `num_proc` processes, default `spec.num_proc`; or by `tokenized`,
    which `orchestrate.prepare_ray` gives), split and written."""
    key = data_key(spec)
    folder = prepared_folder(spec, key)
    if (folder / "meta.json").is_file():
        return load_prepared(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.parent / f".{key.key}.lock"):
        if (folder / "meta.json").is_file():  # another process prepared it while this one waited
            return load_prepared(folder)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key.key}-"))
        try:
            build(spec, key, tmp, num_proc or spec.num_proc, tokenized, engine)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_prepared(folder)


def load_prepared(folder: str | Path) -> Prepared:
    """A prepared folder, memory-mapped: token shards (format 3), or an older `train.npy`/`val.npy` pair."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("format", 2) < 3:
        return Prepared(folder, np.load(folder / "train.npy", mmap_mode="r"),
                        np.load(folder / "val.npy", mmap_mode="r"), meta)
    rows = {split: open_rows(folder, meta["shards"][split], meta["dtype"], meta["block_size"])
            for split in ("train", "val")}
    return Prepared(folder, rows["train"], rows["val"], meta)
