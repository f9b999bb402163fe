"""Token shards on disk: what `data.prepare_data` writes and training memory-maps.

A prepared folder holds, per split (`train`, `val`):
- `{split}-NNNNN.bin`: the split's packed token stream, raw little-endian `uint16` (a vocabulary of at most
  65,536 tokens) or `uint32`; every shard is a whole number of rows of `block_size` tokens (row r of the
  split is tokens [r * block_size, (r + 1) * block_size) of the concatenated shards), the last one may be
  shorter; the stream's remainder (less than one row) is dropped;
- `{split}.docs`: the index, raw `int64`: the offset in that split's stream where each document starts
  (a document cut by the end of the stream is listed; offsets past the kept rows are not);
- and one `meta.json`, the manifest: the cache key and its inputs, the tokenizer, the dtype, the shards
  with their token counts, documents, train/validation tokens and rows, how the split was made, and the
  time the preparation took.

Written as they come (`ShardWriter`), so memory does not grow with the corpus; read back memory-mapped
(`open_rows`): one shard is a plain `np.memmap` of shape [rows, block_size], several a `Rows` over them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

SHARD_TOKENS = 1 << 28  # tokens per shard file at most (512 MiB of uint16), rounded down to whole rows
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:05d}.bin"


class ShardWriter:
    """Appends one split's token stream to shard files of whole rows, and its document starts to the
    index; `close` drops the remainder past the last whole row (or keeps `keep` tokens)."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, block_size: int,
                 shard_tokens: int | None = None) -> None:
        self.folder, self.split, self.dtype, self.block = folder, split, np.dtype(dtype), block_size
        self.shard_tokens = max(1, (shard_tokens or SHARD_TOKENS) // block_size) * block_size
        self.sizes: list[int] = []  # tokens in each shard file so far
        self.total = 0
        self._file: Any = None
        self._docs = open(folder / f"{split}.docs", "wb")  # noqa: SIM115 - closed in close()

    def write(self, tokens: np.ndarray, doc_starts: np.ndarray | None = None) -> None:
        """Append `tokens`; `doc_starts` are offsets into `tokens` where documents begin."""
        if doc_starts is not None and len(doc_starts):
            self._docs.write((np.asarray(doc_starts, dtype=np.int64) + self.total).tobytes())
        tokens = np.asarray(tokens).astype(self.dtype, copy=False)
        pos = 0
        while pos < len(tokens):
            if self._file is None or self.sizes[-1] == self.shard_tokens:
                self._next_shard()
            take = min(len(tokens) - pos, self.shard_tokens - self.sizes[-1])
            self._file.write(tokens[pos:pos + take].tobytes())
            self.sizes[-1] += take
            self.total += take
            pos += take

    def _next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = open(self.folder / shard_name(self.split, len(self.sizes)), "wb")  # noqa: SIM115
        self.sizes.append(0)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of what was written (flushed first)."""
        if self._file is not None:
            self._file.flush()
        out, offset = [], 0
        for i, n in enumerate(self.sizes):
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:
                mm = np.memmap(self.folder / shard_name(self.split, i), dtype=self.dtype, mode="r", shape=(n,))
                out.append(np.array(mm[lo - offset:hi - offset]))
                del mm
            offset += n
        return np.concatenate(out) if out else np.zeros(0, self.dtype)

    def close(self, keep: int | None = None) -> list[dict[str, Any]]:
        """Finish: keep the first `keep` tokens (default: all whole rows), rounded down to whole rows;
        the shard files and their token counts."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._docs.close()
        keep = self.total if keep is None else min(keep, self.total)
        keep -= keep % self.block
        shards, offset = [], 0
        for i, n in enumerate(self.sizes):
            path = self.folder / shard_name(self.split, i)
            mine = max(0, min(n, keep - offset))
            if mine == 0:
                path.unlink()
            else:
                if mine < n:
                    os.truncate(path, mine * self.dtype.itemsize)
                shards.append({"file": path.name, "tokens": mine, "rows": mine // self.block})
            offset += n
        docs = self.folder / f"{self.split}.docs"
        starts = np.fromfile(docs, dtype=np.int64)
        if len(starts) and starts[-1] >= keep:
            starts[starts < keep].tofile(docs)
        self.total = keep
        return shards


class Rows:
    """Read-only rows [n, block_size] over several memory-mapped shards: `len`, `shape`, `dtype`, and
    indexing by an integer, a slice or an array of integers (what the loop and evaluation use)."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), int(parts[0].shape[1]))
        self.dtype = parts[0].dtype
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            i = int(idx) + (len(self) if idx < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {idx} out of range for {len(self)} rows")
            s = int(np.searchsorted(self.starts, i, side="right")) - 1
            return np.asarray(self.parts[s][i - self.starts[s]])
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(len(self)))
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = np.where(idx < 0, idx + len(self), idx).astype(np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        out = np.empty((len(idx), self.shape[1]), dtype=self.dtype)
        which = np.searchsorted(self.starts, idx, side="right") - 1
        for s in np.unique(which):
            mask = which == s
            out[mask] = self.parts[s][idx[mask] - self.starts[s]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        rows = np.concatenate([np.asarray(p) for p in self.parts])
        return rows if dtype is None else rows.astype(dtype)

    def max(self) -> int:
        return max(int(p.max()) for p in self.parts)


def open_rows(folder: Path, shards: list[dict[str, Any]], dtype: str, block_size: int) -> np.ndarray | Rows:
    """A split's rows, memory-mapped: a plain array for one shard, `Rows` over several."""
    parts = [np.memmap(folder / s["file"], dtype=np.dtype(dtype), mode="r", shape=(s["rows"], block_size))
             for s in shards]
    if not parts:
        return np.zeros((0, block_size), dtype=np.dtype(dtype))
    return parts[0] if len(parts) == 1 else Rows(parts)
