"""Seed replicates side by side: one configuration, several seeds, one worker group. No Ray here.

A sweep trial with `seeds: [0, 1]` is one configuration. Its seeds are ordinary runs in
`TRIAL/seeds/<seed>/` (each its own `metrics.jsonl` and checkpoints, resumable on its own), held
by the same workers and advanced in lockstep, one evaluation interval at a time: every seed
reaches step k, then the trial reports the mean over its seeds at step k. So whatever judges the
trial (ASHA's rungs, Optuna's objective, the sweep's summary) compares like with like, means at
one step, and never mixes a seed that was stopped with one that finished: a trial is stopped or
finished as a whole.

`TRIAL/metrics.jsonl` holds the trial's records: at each logged and evaluated step, the mean over
seeds of every number the seeds agree on having, with each seed's own headline value under
`seeds`. It is rebuilt from the seeds' records on every start, so a resume cuts it back with them.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from dtlab.analysis.rundir import DIVERGED, METRICS, JsonlWriter, diverged_reason, read_jsonl, rewrite_jsonl
from dtlab.trainers.run.loop import (
    Diverged,
    Hooks,
    Meter,
    RunState,
    evaluate_at_start,
    scalars,
    setup,
    train,
    train_until,
)

SEEDS = "seeds"


def seed_dir(trial_dir: Path, seed: int) -> Path:
    return Path(trial_dir) / SEEDS / str(seed)


class SeedHooks(Hooks):
    """One seed's hooks: everything goes to the trial's hooks except the report, which the trial
    makes once all its seeds have reached the step."""

    def __init__(self, base: Hooks, seed: int, trial: str) -> None:
        self.base, self.seed, self.trial = base, seed, trial
        self.prefix = f"{base.prefix}[seed {seed}] "
        self.saved: Path | None = None  # the checkpoint this seed wrote since the last report

    def device(self, requested: str) -> torch.device:
        return self.base.device(requested)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.saved = checkpoint_dir or self.saved

    def on_step(self, step: int) -> None:
        self.base.on_step(step)

    def export(self, record: dict[str, Any]) -> None:
        self.base.export({**record, "run": f"{self.trial}-seed{self.seed}"})  # not "0": every trial has one


def mean_record(records: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """The mean over seeds of one step's records (one per seed, same kind): numbers are averaged,
    what all seeds share (the routing mode, `done` when every seed is done) is kept, the rest
    (per-layer statistics) is left to the seeds' own records."""
    first = records[0]
    out: dict[str, Any] = {"kind": first["kind"], "step": first["step"]}
    for key, value in first.items():
        if key in out:
            continue
        values = [r.get(key) for r in records]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            mean = math.fsum(values) / len(values) if all(math.isfinite(v) for v in values) else float("nan")
            out[key] = int(mean) if all(isinstance(v, int) for v in values) and mean == int(mean) else mean
        elif isinstance(value, (str, bool)) and all(v == value for v in values):
            out[key] = value
    headline = "val_loss" if first["kind"] == "eval" else "loss"
    out["seeds"] = {str(s): r.get(headline) for s, r in zip(seeds, records, strict=True)}
    return out


def trial_records(states: list[RunState], seeds: list[int], after: int, until: int) -> list[dict[str, Any]]:
    """The trial's records for steps in (after, until], from the seeds' own files (rank 0)."""
    per_seed = [{(r.get("kind"), r["step"]): r for r in read_jsonl(s.run_dir / METRICS).records
                 if r.get("kind") in ("train", "eval") and after < r["step"] <= until} for s in states]
    keys = sorted(set.intersection(*(set(p) for p in per_seed)), key=lambda k: (k[1], k[0] == "eval"))
    return [mean_record([p[k] for p in per_seed], seeds) for k in keys]


def setup_seeds(config: dict[str, Any], hooks: Hooks) -> tuple[list[RunState], list[SeedHooks]]:
    """Each seed's run state (resumed from its own checkpoint when it has one); the trial's records
    rebuilt from its seeds' up to the step every seed has reached."""
    trial = Path(config["run_dir"])
    seeds = [int(s) for s in config["seeds"]]
    why = next(filter(None, map(diverged_reason, [trial, *(seed_dir(trial, s) for s in seeds)])), None)
    if why:
        raise Diverged(f"{why}; the trial stays stopped")
    hooks.restore(trial)
    seed_hooks = [SeedHooks(hooks, s, trial.name) for s in seeds]
    for s in seeds:
        seed_dir(trial, s).mkdir(parents=True, exist_ok=True)
    states = [setup({**config, "spec": {**config["spec"], "seed": s}, "run_dir": str(seed_dir(trial, s)),
                     "seeds": None}, h) for s, h in zip(seeds, seed_hooks, strict=True)]
    if states[0].rank == 0:
        done = min(s.step for s in states)
        rewrite_jsonl(trial / METRICS, lambda r: False, append=trial_records(states, seeds, -1, done))
        run = json.loads((trial / "run.json").read_text()) if (trial / "run.json").is_file() else {}
        (trial / "run.json").write_text(json.dumps({**run, "seeds": seeds, "training": states[0].info}, indent=1))
    return states, seed_hooks


def train_trial(config: dict[str, Any], hooks: Hooks | None = None) -> dict[str, Any]:
    """A run, or with `config["seeds"]` (two or more) a trial of seed replicates: the caller's choice,
    made here so that the per-worker loop knows nothing of sweeps."""
    if len(config.get("seeds") or []) > 1:
        return train_replicates(config, hooks or Hooks())
    return train(config, hooks)


def train_replicates(config: dict[str, Any], hooks: Hooks) -> dict[str, Any]:
    """Train `config["seeds"]` of one configuration in lockstep; returns the trial's last record."""
    trial, seeds = Path(config["run_dir"]), [int(s) for s in config["seeds"]]
    states, seed_hooks = setup_seeds(config, hooks)
    rank, total, every = states[0].rank, states[0].total_steps, states[0].spec.training.eval_every
    done = min(s.step for s in states)
    meters = [Meter() for _ in states]
    paused = [time.perf_counter()] * len(states)  # a seed's meter stops while the others train
    try:
        for s in states:  # a fresh seed's first pass and step-0 evaluation
            evaluate_at_start(s)
        if done == 0 or done >= total:  # step 0, or a resumed trial with nothing left: said once
            _report(trial, states, seed_hooks, seeds, -1 if done == 0 else done, done, hooks)
        while done < total:
            until = min(total, (done // every + 1) * every)
            for i, s in enumerate(states):
                if s.step < until:  # a seed can be one interval ahead (a crash between the seeds' checkpoints)
                    meters[i].exclude(time.perf_counter() - paused[i])
                    meters[i] = train_until(s, until, meters[i])
                    paused[i] = time.perf_counter()
            _report(trial, states, seed_hooks, seeds, done, until, hooks)
            done = until
    except Diverged as err:
        if rank == 0:
            (trial / DIVERGED).write_text(json.dumps({"step": max(s.step for s in states), "reason": str(err)}))
        raise
    finally:
        for s in states:
            if s.metrics is not None:
                s.metrics.close()
    return _mean_eval(states, seeds)


def _mean_eval(states: list[RunState], seeds: list[int]) -> dict[str, Any]:
    """The mean of the seeds' last evaluations, when they are all at one step."""
    last = [s.last_eval for s in states]
    if not all(last) or len({e["step"] for e in last}) > 1:
        return {}
    return mean_record([scalars(e) for e in last], seeds)


def _report(trial: Path, states, seed_hooks, seeds, after: int, until: int, hooks: Hooks) -> None:
    """The trial's records up to `until`, then one report (on every rank) of the mean evaluation,
    with the checkpoint when the seeds wrote one."""
    if states[0].rank == 0:
        have = {(r.get("kind"), r["step"]) for r in read_jsonl(trial / METRICS).records}
        writer = JsonlWriter(trial / METRICS)
        for record in trial_records(states, seeds, after, until):
            if (record["kind"], record["step"]) not in have:  # a resumed trial's step 0 is on record
                writer.write(record)
        writer.close()
    mean = _mean_eval(states, seeds)
    if not mean or mean["step"] != until:
        return
    saved = next((h.saved for h in seed_hooks if h.saved is not None), None)
    for h in seed_hooks:
        h.saved = None
    hooks.report({k: v for k, v in mean.items() if k != "seeds"}
                 | {f"val_loss_seed{s}": v for s, v in mean["seeds"].items()}, saved)
