"""The tests' one reader of a run's JSON-lines records (`metrics.jsonl`, or any `.jsonl` file).

Built on the project's own reader (`dtlab.analysis.rundir.read_jsonl`), but strict: `read_jsonl`
skips what does not parse (so that a report can say so), while a test that checks a run's records
must fail on such a line. By default every line must be a JSON object with a `step` (no blank lines,
no cut line, valid UTF-8), and the file must exist; `cut_end_ok=True` leaves out a last line cut in
the middle (a writer still writing it, for a test that polls a running run), and nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dtlab.analysis.rundir import METRICS, read_jsonl


def metrics_path(where: str | os.PathLike) -> Path:
    """`where` itself when it names a `.jsonl` file, else the run directory's `metrics.jsonl`."""
    path = Path(where)
    return path if path.suffix == ".jsonl" else path / METRICS


def records(where: str | os.PathLike, kind: str | None = None, *, drop: Iterable[str] = (),
            cut_end_ok: bool = False) -> list[dict[str, Any]]:
    """The records of a run directory (or of a `.jsonl` file), in file order.

    kind: only the records whose `kind` is this ("train", "eval", "diverged"); a record without a
    `kind` is then an error. drop: keys left out of every record (volatile ones: `tokens_per_s`...).
    cut_end_ok: leave out a last line cut in the middle; any other line that does not parse still fails.
    """
    path = metrics_path(where)
    assert path.is_file(), f"{path}: no such file"
    got = read_jsonl(path)
    bad = got.bad_lines[:-1] if cut_end_ok and got.cut_at_end else got.bad_lines
    if bad:
        lines = path.read_text(errors="replace").splitlines()
        raise AssertionError(f"{path}: lines {bad} are not JSON objects with a step: "
                             + "; ".join(repr(lines[i - 1][:200]) for i in bad[:3] if i <= len(lines)))
    blank = got.n_lines - len(got.records) - len(got.bad_lines)  # read_jsonl skips them silently
    assert not blank, f"{path}: {blank} blank lines"
    if not cut_end_ok:  # read_jsonl reads bytes that are not UTF-8 as replacement characters
        path.read_bytes().decode("utf-8")
    out = got.records
    if kind is not None:
        out = [r for r in out if r["kind"] == kind]
    drop = set(drop)
    if drop:
        out = [{k: v for k, v in r.items() if k not in drop} for r in out]
    return out


def evals(where: str | os.PathLike, **kw: Any) -> list[dict[str, Any]]:
    """The evaluation records (`kind: eval`) of a run directory or `.jsonl` file; `records`' options."""
    return records(where, "eval", **kw)
