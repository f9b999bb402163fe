"""The run directory's format: its file names, JSONL records, status, and the one atomic write.

Pure Python (no torch, no pandas, no Ray): the training loop, `dtlab run`, sweeps, the terminal display
and `analysis` all read and write run directories through these functions. It sits in `analysis`, the
lower layer, so that training and analysis share it and analysis imports nothing of `trainers`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"


@dataclass
class Jsonl:
    """The records of a JSON-lines file, and the (1-based) lines that did not parse."""

    records: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)
    n_lines: int = 0

    @property
    def cut_at_end(self) -> bool:
        """Only the last line is bad: a writer that crashed in the middle of it."""
        return self.bad_lines == [self.n_lines]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind", "train") == kind]


def read_jsonl(path: str | os.PathLike) -> Jsonl:
    """Every line that is a JSON object with a `step`; lines that are not are counted, not raised."""
    out = Jsonl()
    path = Path(path)
    if not path.is_file():
        return out
    lines = path.read_text(errors="replace").splitlines()
    out.n_lines = len(lines)
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            out.bad_lines.append(i)
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.records.append(rec)
        else:
            out.bad_lines.append(i)
    return out


def rewrite_jsonl(path: str | os.PathLike, keep: Callable[[dict[str, Any]], bool],
                  append: Sequence[dict[str, Any]] = ()) -> None:
    """Keep only the records `keep` accepts (lines that do not parse go), then `append`, replacing the
    file at once."""
    path = Path(path)
    kept = [r for r in read_jsonl(path).records if keep(r)] + list(append)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `path` whole or not at all (a crash or a full disk leaves the old file): a hidden
    temporary file beside it, renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def reached_last_step(run_dir: str | os.PathLike) -> bool:
    """A run whose last evaluation says it reached its last step."""
    evals = read_jsonl(Path(run_dir) / METRICS).of_kind("eval")
    return bool(evals and evals[-1].get("done"))


STATUS = "status.json"
DIVERGED = "diverged.json"  # written by the loop when a loss or gradient norm is not finite


def diverged_reason(run_dir: str | os.PathLike) -> str | None:
    """Why the run in `run_dir` stopped diverged, or None."""
    try:
        return json.loads((Path(run_dir) / DIVERGED).read_text()).get("reason", "diverged")
    except (OSError, ValueError, AttributeError):
        return None



def write_status(run_dir: str | os.PathLike, state: str, **extra: Any) -> None:
    """What the driver last knew of a run (`running` with its process, or how it ended), for
    `dtlab ls`. A run directory that does not exist yet gets none."""
    import platform
    import time

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    record = {"state": state, "pid": os.getpid(), "host": platform.node(), "time": time.time(), **extra}
    write_atomic(run_dir / STATUS, json.dumps(record))


def read_status(run_dir: str | os.PathLike) -> dict[str, Any]:
    try:
        status = json.loads((Path(run_dir) / STATUS).read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


class JsonlWriter:
    """Appends one record per line, flushed at once (a crash loses at most the line being written)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.file = Path(path).open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
