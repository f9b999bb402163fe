"""Run and sweep directories into pandas DataFrames. No torch, no Ray: works on a copied folder.

A run is a directory holding `metrics.jsonl` (written by the training loop), usually with
`run.json`, `spec.yaml` and, for sweep trials, `params.json`. `load(paths)` finds every run under
the given paths and returns a `RunSet` of DataFrames:

- `runs`: one row per run (variant, seed, device, precision, FLOPs, final metrics, parameters).
- `steps`: one row per logged training step.
- `evals`: one row per evaluation. `val_loss` is the headline: the causal-routing loss for a
  routed model (the one it can use autoregressively), the only loss for a dense one;
  `val_loss_topk` is the training-mode (top-k, looks ahead within the row) loss, and
  `headline_mode` says which routing `val_loss` comes from. `runs` has the same columns.
- `routing`: long format, one row per (run, kind, step, mode, layer, stat).
- `positions`: the selected fraction by position, per (run, step, mode, layer, position).
- `problems`: what was missing or odd, in words, for the report to say.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .rundir import METRICS, diverged_reason
from .rundir import read_jsonl as _read_records


@dataclass
class RunSet:
    runs: pd.DataFrame
    steps: pd.DataFrame
    evals: pd.DataFrame
    routing: pd.DataFrame
    positions: pd.DataFrame
    problems: list[str] = field(default_factory=list)
    benches: pd.DataFrame = field(default_factory=pd.DataFrame)
    samples: pd.DataFrame = field(default_factory=pd.DataFrame)  # greedy samples (samples.json) per run
    downstream: pd.DataFrame = field(default_factory=pd.DataFrame)  # lm-eval task scores (eval_tasks.jsonl)

    @property
    def empty(self) -> bool:
        return self.runs.empty


def find_runs(path: Path) -> list[Path]:
    """Directories under `path` (itself included) that hold a `metrics.jsonl`."""
    if (path / METRICS).is_file():
        return [path]
    return sorted(p.parent for p in path.rglob(METRICS)
                  if "checkpoints" not in p.parts and "ray" not in p.parent.parts[-1:] and ".old-" not in p.parent.name
                  and not (p.parent / "seeds").is_dir())  # a replicate trial's means: its seeds are the runs


def read_jsonl(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    """The records of `path`; what does not parse is said in `problems`."""
    got = _read_records(path)
    if got.bad_lines:
        where = ("its last line is cut (a crashed run?)" if got.cut_at_end
                 else f"lines {got.bad_lines[:5]} do not parse")
        problems.append(f"{path}: {where}; {len(got.records)} records read, {len(got.bad_lines)} skipped")
    return got.records


def _read_json(path: Path, problems: list[str], what: str) -> dict[str, Any]:
    if not path.is_file():
        problems.append(f"{path.parent}: no {path.name} ({what} unknown)")
        return {}
    try:
        raw = json.loads(path.read_text(errors="replace"))
    except json.JSONDecodeError:
        problems.append(f"{path}: not valid JSON ({what} unknown)")
        return {}
    if not isinstance(raw, dict):
        problems.append(f"{path}: not a JSON object ({what} unknown)")
        return {}
    return raw


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def spec_fingerprint(spec: dict[str, Any], any_length: bool = False) -> str:
    """What makes runs comparable: the spec less what a comparison varies (variant, seed, sweep
    parameters, routing knobs, names). `any_length`: less the training length too (an isoFLOP study
    trains each size for its own number of steps, with a warm-up of at most a tenth of them, and its
    sizes are model overrides)."""
    import copy

    s = copy.deepcopy(spec or {})
    for key in ("name", "description", "seed", "seeds", "variants", "sweep", "tracking", "isoflop"):
        s.pop(key, None)
    s["model"] = {k: v for k, v in _dict(s.get("model")).items() if k in ("size", "pretrained")}
    s["resources"] = {"num_workers": _dict(s.get("resources")).get("num_workers", 1)}
    _dict(_dict(s.get("training")).get("optimizer")).pop("lr", None)
    if any_length:
        for key in ("max_steps", "num_epochs"):
            _dict(s.get("training")).pop(key, None)
        _dict(_dict(s.get("training")).get("scheduler")).pop("warmup_steps", None)
        s["model"].pop("size", None)
    return hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:10]


def version_problem(runs: pd.DataFrame, column: str = "spec_version") -> str | None:
    """A line when `runs` come from more than one spec version (by `column`), naming which runs are which."""
    if runs.empty or column not in runs:
        return None
    versions = runs[column].dropna().unique()
    if len(versions) < 2:
        return None
    groups = {v: sorted(runs.loc[runs[column] == v, "run_id"]) for v in versions}
    return ("runs come from different spec versions (data, shape or training settings differ), so their losses "
            "are not directly comparable: " + "; ".join(f"{v}: {', '.join(ids[:6])}{' ...' if len(ids) > 6 else ''}"
                                                       for v, ids in groups.items()))


def _routing_rows(run_id: str, rec: dict[str, Any], rows: list[dict[str, Any]],
                  pos_rows: list[dict[str, Any]]) -> None:
    for mode, key in (("topk", "routing"), ("causal", "routing_causal")):
        for layer, stats in (rec.get(key) or {}).items():
            for stat, value in stats.items():
                if isinstance(value, list):
                    if stat == "selected_by_pos":
                        pos_rows.extend({"run_id": run_id, "step": rec["step"], "mode": mode, "layer": int(layer),
                                         "position": i, "selected_frac": v} for i, v in enumerate(value))
                    continue
                rows.append({"run_id": run_id, "kind": rec.get("kind", "train"), "step": rec["step"], "mode": mode,
                             "layer": int(layer), "stat": stat, "value": value})


def headline(rec: dict[str, Any]) -> dict[str, Any]:
    """`val_loss` is the causal-routing loss where there is one; the top-k loss is `val_loss_topk`,
    and `headline_mode` says which `val_loss` is. Records written since the loop made that its own
    format say so themselves; older ones (`val_loss` = top-k) are converted here."""
    if "val_loss_topk" in rec:
        rec["headline_mode"] = rec.get("routing_mode", "topk")
        return rec
    causal = rec.get("val_loss_causal")
    rec["val_loss_topk"] = rec.get("val_loss")
    rec["headline_mode"] = "causal" if causal is not None else rec.get("routing_mode", "topk")
    if causal is not None:
        rec["val_loss"], rec["val_ppl_topk"] = causal, rec.get("val_ppl")
        rec["val_ppl"] = rec.get("val_ppl_causal", rec.get("val_ppl"))
    return rec


def load_run(path: Path, problems: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]],
                                                       list[dict[str, Any]], list[dict[str, Any]]]:
    run_id = path.name if path.parent.name != "trials" else f"trial-{path.name}"
    if path.parent.name == "seeds" and path.parent.parent.parent.name == "trials":  # one seed of a trial
        run_id = f"trial-{path.parent.parent.name}-seed{path.name}"
    records = read_jsonl(path / METRICS, problems)
    info = _read_json(path / "run.json", problems, "device, seed and commit")
    params = _read_json(path / "params.json", [], "") if (path / "params.json").is_file() else {}
    spec = _read_spec(path / "spec.yaml", problems)
    steps = [{"run_id": run_id, **{k: v for k, v in r.items() if not isinstance(v, (dict, list))}}
             for r in records if r.get("kind", "train") == "train"]
    evals = [headline({"run_id": run_id, **{k: v for k, v in r.items() if not isinstance(v, (dict, list))}})
             for r in records if r.get("kind") == "eval"]
    routing: list[dict[str, Any]] = []
    positions: list[dict[str, Any]] = []
    for r in records:
        _routing_rows(run_id, r, routing, positions)
    if not evals:
        problems.append(f"{path}: no evaluation recorded (the run stopped before its first evaluation?)")
    return _run_row(run_id, path, info, spec, params, steps, evals), steps, evals, routing, positions


def _read_spec(path: Path, problems: list[str]) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        spec = yaml.safe_load(path.read_text(errors="replace")) or {}
    except yaml.YAMLError:
        problems.append(f"{path}: not valid YAML")
        return {}
    if not isinstance(spec, dict):
        problems.append(f"{path}: not a mapping of spec sections")
        return {}
    return spec


def _run_row(run_id: str, path: Path, info: dict, spec: dict, params: dict, steps: list[dict],
             evals: list[dict]) -> dict[str, Any]:
    """One run's row of `runs`: its facts, its last evaluation, its medians."""
    training, mc = _dict(info.get("training")), _dict(_dict(info.get("training")).get("model_config"))
    last = evals[-1] if evals else {}
    variant = training.get("variant") or info.get("variant") or _dict(spec.get("model")).get("type")
    return {
        "run_id": run_id, "path": str(path), "name": spec.get("name") or info.get("name"), "variant": variant,
        "seed": info.get("seed", spec.get("seed")), "device": training.get("device"),
        "precision": training.get("precision"), "world_size": training.get("world_size"),
        "parameters": training.get("parameters"), "flops_per_token": training.get("flops_per_token"),
        "flop_ratio_vs_dense": training.get("flop_ratio_vs_dense"), "seq_len": training.get("seq_len"),
        "num_hidden_layers": mc.get("num_hidden_layers"), "hidden_size": mc.get("hidden_size"),
        # runs recorded before run.json carried the capacity name it in their config only
        "capacity": training.get("capacity", mc.get("mod_capacity", mc.get("dtf_capacity"))),
        "vocab_size": mc.get("vocab_size"), "intermediate_size": mc.get("intermediate_size"),
        "commit": info.get("commit"), "dirty": info.get("dirty"), "total_steps": training.get("total_steps"),
        "final_step": last.get("step"), "val_loss": last.get("val_loss"), "val_loss_topk": last.get("val_loss_topk"),
        "headline_mode": last.get("headline_mode"), "val_ppl": last.get("val_ppl"),
        "val_loss_causal": last.get("val_loss_causal"), "train_flops": last.get("train_flops"),
        "tokens_seen": last.get("tokens_seen"), **_data_facts(info, training, mc, last, steps, evals),
        "done": bool(last.get("done")) or (
            last.get("step") is not None and last.get("step") == training.get("total_steps")),
        "evaluations": len(evals),
        "routing_modes": ",".join(m for m in ("causal", "topk") if any(f"val_loss_{m}" in e for e in evals)),
        "tokens_per_s": pd.Series([s.get("tokens_per_s") for s in steps], dtype="float64").median() if steps else None,
        "peak_mem_gib": max((s.get("peak_mem_gib") or 0 for s in steps), default=None) or None,
        "peak_rss_gib": max((s.get("peak_rss_gib") or 0 for s in steps), default=None) or None,
        "spec_version": spec_fingerprint(spec) if spec else None,
        "spec_version_any_length": spec_fingerprint(spec, any_length=True) if spec else None,
        "params": json.dumps(params.get("params", {}), sort_keys=True) if params else None,
        "trial_id": params.get("trial_id"),
        # why it stopped on a non-finite loss, else None; a seed of a replicate trial stops with its trial
        "diverged": diverged_reason(path) or (diverged_reason(path.parent.parent) if path.parent.name == "seeds"
                                              else None),
    }


def embedding_parameters(mc: dict[str, Any]) -> int | None:
    """Parameters in the token embedding and, untied, the output head (vocab_size x hidden_size each):
    what dominates a small model's count. None when the config does not say."""
    vocab, hidden = mc.get("vocab_size"), mc.get("hidden_size")
    if not isinstance(vocab, int) or not isinstance(hidden, int):
        return None
    return vocab * hidden * (1 if mc.get("tie_word_embeddings", True) else 2)


def _data_facts(info: dict[str, Any], training: dict[str, Any], mc: dict[str, Any], last: dict[str, Any],
                steps: list[dict[str, Any]], evals: list[dict[str, Any]]) -> dict[str, Any]:
    """Parameters without the embeddings, the final loss in bits per byte where the data manifest
    counts the validation bytes, and how many times the run went over its training data."""
    data = _dict(info.get("data"))
    val_tokens, val_bytes = data.get("val_tokens"), data.get("val_bytes")
    loss = last.get("val_loss")
    bpb = None
    if (isinstance(val_tokens, (int, float)) and isinstance(val_bytes, (int, float)) and val_tokens > 0
            and val_bytes > 0 and isinstance(loss, (int, float))):
        # bits per byte: nats per token / ln 2 x tokens per byte of validation text (as Paloma and Marin report it)
        bpb = loss / math.log(2) * val_tokens / val_bytes
    params, embedding = training.get("parameters"), embedding_parameters(mc)
    planned = training.get("epochs")  # passes over the training rows the run planned (above 1: it repeats)
    total, final = training.get("total_steps"), last.get("step")
    seen = (planned * final / total if isinstance(planned, (int, float)) and isinstance(total, int) and total > 0
            and isinstance(final, int) else None)
    passes = [r["epoch"] for r in (*steps, *evals) if isinstance(r.get("epoch"), int)]
    return {"non_embedding_parameters": params - embedding if isinstance(params, int) and embedding else None,
            "embedding_parameters": embedding, "val_tokens": val_tokens, "val_bytes": val_bytes, "val_bpb": bpb,
            "epochs_planned": planned, "epochs_seen": seen,
            "last_epoch": max(passes) if passes else None}  # the 0-based pass of its last record


def load_bench(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError:
        problems.append(f"{path}: not valid JSON, benchmark skipped")
        return []
    return [r for r in rows if isinstance(r, dict) and "variant" in r] if isinstance(rows, list) else []


def load_samples(path: Path, run_id: str, problems: list[str]) -> list[dict[str, Any]]:
    """A run's `samples.json` (written by `dtlab run` from its best checkpoint), one row per prompt."""
    if not (path / "samples.json").is_file():
        return []
    data = _read_json(path / "samples.json", problems, "samples")
    return [{"run_id": run_id, "step": data.get("step"), "routing_mode": data.get("routing_mode"),
             "prompt": str(s.get("prompt", "")), "text": str(s.get("text", ""))}
            for s in data.get("samples", []) if isinstance(s, dict)]


def load_downstream(path: Path, run_id: str, problems: list[str]) -> list[dict[str, Any]]:
    """A run's `eval_tasks.jsonl` (`dtlab eval`): one row per task and metric."""
    keys = ("task", "metric", "value", "stderr", "routing_mode", "step", "limit", "samples")
    return [{"run_id": run_id, **{k: r.get(k) for k in keys}}
            for r in read_jsonl(path / "eval_tasks.jsonl", problems) if "task" in r and "metric" in r]


def load(paths: Sequence[str | Path]) -> RunSet:
    """Every run under `paths` (run, sweep or experiment directories) as DataFrames."""
    problems: list[str] = []
    runs, steps, evals, routing, positions, benches, samples, downstream = [], [], [], [], [], [], [], []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            problems.append(f"{p}: no such directory")
            continue
        found = find_runs(p) if p.is_dir() else []
        if not found:
            problems.append(f"{p}: no runs found (no metrics.jsonl below it)")
        for run in found:
            if run.resolve() in seen:
                continue
            seen.add(run.resolve())
            row, s, e, r, pos = load_run(run, problems)
            runs.append(row)
            steps += s
            evals += e
            routing += r
            positions += pos
            samples += load_samples(run, row["run_id"], problems)
            downstream += load_downstream(run, row["run_id"], problems)
        for bench in (sorted(p.rglob("bench*.json")) if p.is_dir() else []):
            benches += load_bench(bench, problems)
    runs_df = pd.DataFrame(runs)
    if not runs_df.empty:
        dupes = runs_df["run_id"].duplicated(keep=False)
        if dupes.any():  # the same directory name in two places: qualify by parent
            runs_df.loc[dupes, "run_id"] = [f"{Path(p).parent.name}/{r}" for p, r in
                                            zip(runs_df.loc[dupes, "path"], runs_df.loc[dupes, "run_id"], strict=True)]
        versions = version_problem(runs_df)
        if versions:
            problems.append(versions)
        for _, r in runs_df[runs_df["diverged"].notna()].iterrows():
            problems.append(f"{r['run_id']}: {r['diverged']}; left out of the comparisons")
        missing_variant = runs_df["variant"].isna()
        if missing_variant.any():
            problems.append(f"runs with no known variant: {list(runs_df.loc[missing_variant, 'run_id'])}")
    return RunSet(runs_df, pd.DataFrame(steps), pd.DataFrame(evals), pd.DataFrame(routing), pd.DataFrame(positions),
                  problems, pd.DataFrame(benches), pd.DataFrame(samples), pd.DataFrame(downstream))
