"""Text in, packed token rows out: sources, tokenizers, a deterministic split, a disk cache.

`prepare_data` runs once in the driver (so bad input fails before any worker starts) and
writes `train.npy` / `val.npy` ([rows, block_size] int32) with `meta.json` into a cache folder
keyed by everything that determines them; workers `load_prepared` that folder.
Rows hold documents joined by an end-of-text token; labels are the rows themselves and the
model shifts them, exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dtlab.trainers.spec import DataSpec, SpecError

EOT = "<|endoftext|>"
LOCAL_BUILDERS = {".txt": "text", ".md": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                  ".parquet": "parquet"}


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
        for f in files:
            _check_utf8(f)
    return files


def _empty(files: list[Path]) -> list[Path]:
    raise SpecError(f"data.source: {', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''} "
                    f"{'is' if len(files) == 1 else 'are all'} empty")


def _check_utf8(path: Path) -> None:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"data.source: {path} is not UTF-8 text (byte {err.start}: {err.reason})") from None


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists() or \
        Path(source).suffix.lower() in LOCAL_BUILDERS


@dataclass
class Corpus:
    docs: list[str]
    where: str  # where the documents came from, in words
    one_text: bool = False  # a single running text (one local text file): split it into contiguous spans


def load_documents(spec: DataSpec) -> Corpus:
    """The documents of `spec.source`, cut to `max_bytes` of text."""
    if spec.source == "builtin":
        corpus = Corpus(builtin_documents(spec.max_bytes), "builtin: pydoc_data topics + stdlib sources")
    else:
        corpus = _dataset_documents(spec)
    budget, out = spec.max_bytes, []
    for d in corpus.docs:
        if budget <= 0:
            break
        out.append(d[:budget])
        budget -= len(out[-1])
    if not any(d.strip() for d in out):
        raise SpecError(f"data.source={spec.source!r}: the corpus is empty (no text in {corpus.where})")
    if spec.contiguous and not corpus.one_text:  # rows that are pieces of one text (WikiText's lines)
        joined = "".join(d if d.endswith("\n") else d + "\n" for d in out)
        return Corpus([joined], corpus.where + ", rows joined into one running text", True)
    return Corpus(out, corpus.where, corpus.one_text)


def _dataset_documents(spec: DataSpec) -> Corpus:
    """Documents through Hugging Face `datasets`: local text/jsonl/parquet files or a hub dataset."""
    import datasets

    datasets.disable_progress_bars()  # a quiet terminal; errors are said in one line
    if _looks_local(spec.source):
        files = _local_files(spec.source)
        builder = LOCAL_BUILDERS[files[0].suffix.lower()]
        if spec.sample_by != "document" and builder != "text":
            raise SpecError(f"data.sample_by={spec.sample_by!r} applies to text files; {spec.source!r} holds "
                            f"{builder} files, whose rows are the documents")
        options = {"sample_by": spec.sample_by} if builder == "text" else {}
        where = f"local {builder}: {', '.join(map(str, files))}" + (
            f" (a {spec.sample_by} per document)" if builder == "text" else "")
        corpus = Corpus([], where, builder == "text" and len(files) == 1)
        load = lambda: datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **options)
    else:
        if spec.sample_by != "document":
            raise SpecError(f"data.sample_by={spec.sample_by!r} applies to local text files; the rows of a hub "
                            "dataset are its documents (data.contiguous: true joins them into one text)")
        corpus = Corpus([], f"hub: {spec.source}" + (f" ({spec.name})" if spec.name else "") + f", split {spec.split}")
        load = lambda: datasets.load_dataset(spec.source, spec.name, split=spec.split)
    try:
        ds = load()
    except Exception as err:  # network, unknown name, unreadable file: say which source
        raise SpecError(f"data.source={spec.source!r}: could not load ({type(err).__name__}: {err})") from err
    if spec.text_field not in ds.column_names:
        raise SpecError(f"data.text_field={spec.text_field!r}: not a column of {spec.source!r} "
                        f"(columns: {ds.column_names})")
    size = 0
    for text in ds[spec.text_field]:
        if size >= spec.max_bytes:
            break
        if isinstance(text, str):
            corpus.docs.append(text)
            size += len(text)
    return corpus


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

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.hf:
            return self.backend(texts, add_special_tokens=False)["input_ids"]
        return [e.ids for e in self.backend.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids)


def _fingerprint(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.encode("utf-8", "surrogatepass")).digest())
    return h.hexdigest()


def train_bpe(docs: list[str], vocab_size: int, cache: Path, fingerprint: str) -> tuple[Tokenizer, Path]:
    """A byte-level BPE trained on `docs`, cached on disk by corpus and vocabulary size."""
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


def tokenizer_for(spec: DataSpec, docs: list[str], fingerprint: str) -> tuple[Tokenizer, Path | None]:
    """The tokenizer, and its cached file when it was trained here."""
    if spec.tokenizer:
        return load_hf_tokenizer(spec.tokenizer), None
    return train_bpe(docs, spec.vocab_size, cache_root(spec), fingerprint)


# ---- split and pack --------------------------------------------------------------------------------
def _is_val(doc: str, fraction: float) -> bool:
    digest = hashlib.sha256(doc.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _stream(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    eot = tok.eot_id
    out: list[int] = []
    for start in range(0, len(docs), 512):
        for ids in tok.encode_batch(docs[start:start + 512]):
            out.extend(ids)
            out.append(eot)
    return np.asarray(out, dtype=np.int64)


def pack(stream: np.ndarray, block_size: int) -> np.ndarray:
    n = len(stream) // block_size
    return stream[: n * block_size].reshape(n, block_size).astype(np.int32)


@dataclass
class Prepared:
    path: Path
    train: np.ndarray
    val: np.ndarray
    meta: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])


def split_and_pack(tok: Tokenizer, corpus: Corpus, spec: DataSpec) -> tuple[np.ndarray, np.ndarray, str]:
    """(train rows, validation rows, how they were split). By document (a hash of its text, so the
    split does not depend on order); a single running text, or too few documents to split that way,
    by position: the last `val_fraction` of the token stream is the validation span."""
    docs = corpus.docs
    if not corpus.one_text:
        val_docs = [d for d in docs if _is_val(d, spec.val_fraction)]
        train_docs = [d for d in docs if not _is_val(d, spec.val_fraction)]
        train, val = pack(_stream(tok, train_docs), spec.block_size), pack(_stream(tok, val_docs), spec.block_size)
        if len(train) >= 2 and len(val) >= 1:
            return train, val, "by document (sha256 of the text)"
    stream = _stream(tok, docs)
    n_val = max(spec.block_size, int(len(stream) * spec.val_fraction))
    why = "one running text" if corpus.one_text else "too few documents to split by document"
    return (pack(stream[:-n_val], spec.block_size), pack(stream[-n_val:], spec.block_size),
            f"by position (the last tokens of the stream are validation): {why}")


def prepare_data(spec: DataSpec) -> Prepared:
    """Load, tokenize, split and pack; cached by everything that determines the result."""
    corpus = load_documents(spec)
    fingerprint = _fingerprint(corpus.docs)
    key_src = json.dumps({"fp": fingerprint, "tok": spec.tokenizer, "vocab": spec.vocab_size, "one": corpus.one_text,
                          "block": spec.block_size, "val": spec.val_fraction, "v": 2}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    folder = cache_root(spec) / "data" / key
    if (folder / "meta.json").is_file():
        return load_prepared(folder)
    tok, tok_file = tokenizer_for(spec, corpus.docs, fingerprint)
    if tok.vocab_size >= 2**31:
        raise SpecError(f"data.tokenizer: vocabulary of {tok.vocab_size} does not fit int32 token ids")
    train, val, split = split_and_pack(tok, corpus, spec)
    if len(train) < 1 or len(val) < 1:
        raise SpecError(f"data.source={spec.source!r}: the corpus is too small for data.block_size="
                        f"{spec.block_size} ({sum(map(len, corpus.docs))} characters)")
    meta = {"source": corpus.where, "documents": len(corpus.docs), "characters": sum(map(len, corpus.docs)),
            "fingerprint": fingerprint, "tokenizer": tok.name, "tokenizer_file": str(tok_file) if tok_file else None,
            "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
            "block_size": spec.block_size, "train_rows": len(train), "val_rows": len(val),
            "train_tokens": int(train.size), "val_tokens": int(val.size), "split": split}
    return _store(folder, key, train, val, meta)


def _store(folder: Path, key: str, train: np.ndarray, val: np.ndarray, meta: dict[str, Any]) -> Prepared:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}-"))
    np.save(tmp / "train.npy", train)
    np.save(tmp / "val.npy", val)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process made it first: theirs is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return load_prepared(folder)


def load_prepared(folder: str | Path) -> Prepared:
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    return Prepared(folder, np.load(folder / "train.npy", mmap_mode="r"), np.load(folder / "val.npy", mmap_mode="r"),
                    meta)
