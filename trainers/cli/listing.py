"""`dtlab ls [DIR]`: the runs, experiments and sweeps under a directory, with how each stands.

Read from the directories' own files (no Ray, no torch): `metrics.jsonl` (steps, losses),
`run.json` (total steps), `status.json` (what the driver last knew: running with its process, or
how it ended), `experiment.json` and `sweep.json` (which directories group runs).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from dtlab.analysis.rundir import METRICS, STATUS, diverged_reason, read_jsonl, read_status

STATES = ("running", "finished", "stopped", "interrupted", "failed", "diverged")


@dataclass
class Row:
    path: str
    kind: str  # run, trial, experiment, sweep
    status: str
    steps: str
    best: float | None
    age: float  # seconds since the last write
    depth: int = 0
    note: str = ""  # what is wrong with its records, shown beside the status


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_row(run_dir: Path, root: Path, kind: str = "run", depth: int = 0) -> Row:
    read = read_jsonl(run_dir / METRICS)
    records = read.records
    evals = [r for r in records if r.get("kind") == "eval"]
    trains = [r for r in records if r.get("kind", "train") == "train"]
    step = max((int(r.get("step") or 0) for r in records), default=0)
    total = _total(run_dir)
    headline = [r.get("val_loss_causal", r.get("val_loss")) for r in evals]  # older records: top-k in val_loss
    losses = [v for v in headline if isinstance(v, (int, float)) and math.isfinite(v)]
    said = status(run_dir, evals, trains)
    note = ""  # as the report says it: the row's numbers come from the lines that could be read
    if read.bad_lines and not read.cut_at_end:
        note = f"{len(read.bad_lines)} of {read.n_lines} records unreadable"
    elif read.cut_at_end and said != "running":  # a running run's last line may be being written
        note = "its last record cut"
    return Row(_rel(run_dir, root), kind, said, f"{step}/{total or '?'}",
               min(losses) if losses else None, _age(run_dir), depth, note)


def status(run_dir: Path, evals: list[dict], trains: list[dict]) -> str:
    """finished, diverged (a non-finite loss), running (its driver is alive), or how it ended."""
    if diverged_reason(run_dir) or any(isinstance(r.get(k), float) and not math.isfinite(r[k])
                                       for r in trains + evals for k in ("loss", "val_loss")):
        return "diverged"
    st = read_status(run_dir)
    state = st.get("state")
    if state == "running":
        if st.get("host") == platform.node() and isinstance(st.get("pid"), int) and not _alive(st["pid"]):
            return "finished" if evals and evals[-1].get("done") else "failed"  # gone without a word
        return "running"  # (a finished run resumed to more steps too)
    if evals and evals[-1].get("done"):
        return "finished"
    if state in STATES:
        return state
    return "stopped" if evals else "failed"


def _total(run_dir: Path) -> int | None:
    try:
        total = (json.loads((run_dir / "run.json").read_text()).get("training") or {}).get("total_steps")
    except (OSError, ValueError, AttributeError):
        return None
    return total if isinstance(total, int) else None


def _age(path: Path) -> float:
    times = [p.stat().st_mtime for p in (path / METRICS, path / "status.json", path) if p.exists()]
    return time.time() - max(times) if times else math.nan


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return str(path)


def _set_aside(path: Path, root: Path) -> bool:
    """Below `root`, a directory that `--force` moved aside (NAME.old-TIME), or inside one; or inside
    a run's checkpoints (a storage bundle being reported holds a copy of the records)."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        parts = path.parts
    return any(".old-" in p for p in parts) or "checkpoints" in parts


def group_row(group: Path, runs: list[Row], root: Path, kind: str) -> Row:
    counts = {s: sum(r.status == s for r in runs) for s in STATES}
    said = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no runs yet"
    best = min((r.best for r in runs if r.best is not None), default=None)
    ages = [r.age for r in runs if math.isfinite(r.age)] or [_age(group)]
    return Row(_rel(group, root), kind, said, f"{len(runs)} {'trials' if kind == 'sweep' else 'runs'}", best,
               min(ages))


GROUP_FILES = ("experiment.json", "sweep.json")
# any of them makes a run directory (one that failed at step 0 has no records)
RUN_FILES = (METRICS, "run.json", STATUS)


def run_dirs(root: Path) -> list[Path]:
    """Every run directory under `root`: one with records, facts or a status (not an experiment's or a
    sweep's own folder, nothing set aside, a replicate trial's seeds counted in their trial)."""
    found = {p.parent for name in RUN_FILES for p in root.rglob(name)}
    return sorted(d for d in found if not _set_aside(d, root) and d.parent.name != "seeds"
                  and not any((d / name).is_file() for name in GROUP_FILES))


def listing(root: Path) -> list[Row]:
    """Every experiment, sweep and run under `root` (a run inside an experiment or sweep is listed
    under it)."""
    root = Path(root)
    rows: list[Row] = []
    groups = sorted({p.parent for name in GROUP_FILES for p in root.rglob(name) if not _set_aside(p.parent, root)})
    grouped: set[Path] = set()
    for group in groups:
        kind = "sweep" if (group / "sweep.json").is_file() else "experiment"
        members_dirs = run_dirs(group)
        grouped.update(members_dirs)
        members = [run_row(d, group, "trial" if kind == "sweep" else "run", depth=1) for d in members_dirs]
        rows.append(group_row(group, members, root, kind))
        if kind == "experiment":
            rows += members
    rows += [run_row(d, root) for d in run_dirs(root) if d not in grouped]
    return rows


def age_text(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def format_listing(rows: list[Row]) -> str:
    cells = [["path", "kind", "status", "steps", "best val loss", "age"]]
    for r in rows:
        cells.append([("  " * r.depth) + r.path, r.kind, r.status + (f" ({r.note})" if r.note else ""), r.steps,
                      "-" if r.best is None else f"{r.best:.4f}", age_text(r.age)])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(v.rjust(w) if i in (4, 5) else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths,
                                                                                             strict=True))).rstrip()
             for c in cells]
    return "\n".join(lines)
