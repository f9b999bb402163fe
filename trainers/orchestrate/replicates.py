"""Seed replicates: one configuration, several seeds, one worker group. No Ray here.

A sweep trial with `seeds: [0, 1]` is one configuration. Its seeds are ordinary runs in
`TRIAL/seeds/<seed>/` (each its own `metrics.jsonl` and checkpoints, resumable on its own), held
by one worker group and advanced one evaluation interval at a time: every seed reaches step k,
then the trial reports the mean over its seeds at step k. So whatever judges the trial (ASHA's
rungs, Optuna's objective, the sweep's summary) compares like with like, means at one step, and
never mixes a seed that was stopped with one that finished: a trial is stopped or finished as a
whole.

Two ways to hold the seeds, chosen from the worker group's size (`train_trial`):

- side by side (`train_side_by_side`, what Ray Train runs: `num_workers x seeds` ranks): the ranks
  of seed i are a process group of their own (`dist.new_group`) with its own DDP wrapper, data order
  and checkpoint, on its own devices, so memory per device is one seed's and the seeds train at the
  same time. At each evaluation step the seeds' evaluations are gathered over the whole group and
  every rank reports the same mean.
- in turn (`train_replicates`: no process group, or `num_workers` ranks): one model, optimizer and
  DDP wrapper per seed in every process, the seeds trained one after another within each interval.

Both give each seed the records it would have alone, and the same trial records and reports.

`TRIAL/metrics.jsonl` holds the trial's records: at each logged and evaluated step, the mean over
seeds of every number the seeds agree on having, with each seed's own headline value under
`seeds`, and when (`seed_time`, Unix seconds) and in which process (`seed_process`, host:pid) each
seed wrote its record. It is rebuilt from the seeds' records on every start, so a resume cuts it
back with them.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

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
from dtlab.trainers.spec import Spec

SEEDS = "seeds"


def this_process() -> str:
    """This process, as a trial record names it: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def seed_dir(trial_dir: Path, seed: int) -> Path:
    return Path(trial_dir) / SEEDS / str(seed)


class SeedHooks(Hooks):
    """One seed's hooks: everything goes to the trial's hooks except the report, which the trial
    makes once all its seeds have reached the step. It notes when and where each of the seed's
    records was written (rank 0 of the seed), for the trial's records."""

    def __init__(self, base: Hooks, seed: int, trial: str) -> None:
        self.base, self.seed, self.trial = base, seed, trial
        self.prefix = f"{base.prefix}[seed {seed}] "
        self.saved: Path | None = None  # the checkpoint this seed wrote since the last report
        self.written: dict[tuple[str, int], tuple[float, str]] = {}  # (kind, step): (time, process)

    def device(self, requested: str) -> torch.device:
        return self.base.device(requested)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.saved = checkpoint_dir or self.saved

    def on_step(self, step: int) -> None:
        self.base.on_step(step)

    def export(self, record: dict[str, Any]) -> None:
        self.written[(record.get("kind", ""), record["step"])] = (time.time(), this_process())
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


# ---- what a seed tells the trial ------------------------------------------------------------------
def seed_view(state: RunState, hooks: SeedHooks, after: float, until: float) -> dict[str, Any]:
    """What the trial needs of one seed after an interval: its step, its last evaluation, whether it
    wrote a checkpoint since the last report, and (from rank 0 of the seed, which holds them) its
    records of steps in (after, until] with when and where each was written."""
    view: dict[str, Any] = {"step": state.step, "last_eval": scalars(state.last_eval) if state.last_eval else {},
                            "saved": str(hooks.saved) if hooks.saved else None, "records": [], "written": {}}
    if state.rank == 0:
        view["records"] = [r for r in read_jsonl(state.run_dir / METRICS).records
                           if r.get("kind") in ("train", "eval") and after < r["step"] <= until]
        view["written"] = {k: v for k, v in hooks.written.items() if after < k[1] <= until}
        for key in [k for k in hooks.written if k[1] <= until]:  # said once: the notes do not grow
            del hooks.written[key]
    return view


def mean_records(views: list[dict[str, Any]], seeds: list[int], until: float = math.inf) -> list[dict[str, Any]]:
    """The trial's records from its seeds' (each view holding that seed's records): one per step
    (up to `until`) and kind that every seed has, the mean over seeds, with when and where each seed
    wrote its own when that is known for every seed."""
    per_seed = [{(r.get("kind"), r["step"]): r for r in v["records"] if r["step"] <= until} for v in views]
    keys = sorted(set.intersection(*(set(p) for p in per_seed)), key=lambda k: (k[1], k[0] == "eval"))
    out = []
    for key in keys:
        record = mean_record([p[key] for p in per_seed], seeds)
        written = [v["written"].get(key) for v in views]
        if all(written):
            record["seed_time"] = {str(s): w[0] for s, w in zip(seeds, written, strict=True)}
            record["seed_process"] = {str(s): w[1] for s, w in zip(seeds, written, strict=True)}
        out.append(record)
    return out


def start_trial_records(trial: Path, views: list[dict[str, Any]], seeds: list[int], done: int,
                        info: dict[str, Any], **facts: Any) -> None:
    """At a start (rank 0): the trial's records rebuilt from its seeds' up to the step every seed has
    reached (when and where each seed wrote one kept from the records they replace), and `run.json`."""
    before = {(r.get("kind"), r["step"]): r for r in read_jsonl(trial / METRICS).records}
    rebuilt = mean_records(views, seeds, done)
    for record in rebuilt:
        old = before.get((record["kind"], record["step"]), {})
        if "seed_time" not in record and old.get("seeds") == record["seeds"]:
            record.update({k: old[k] for k in ("seed_time", "seed_process") if k in old})
    rewrite_jsonl(trial / METRICS, lambda r: False, append=rebuilt)
    run = json.loads((trial / "run.json").read_text()) if (trial / "run.json").is_file() else {}
    (trial / "run.json").write_text(json.dumps({**run, "seeds": seeds, "training": info, **facts}, indent=1))


def write_trial_records(trial: Path, views: list[dict[str, Any]], seeds: list[int]) -> None:
    """Append the trial's records of the steps in the views (rank 0), those not on record yet (a
    resumed trial's step 0 is)."""
    have = {(r.get("kind"), r["step"]) for r in read_jsonl(trial / METRICS).records}
    writer = JsonlWriter(trial / METRICS)
    try:
        for record in mean_records(views, seeds):
            if (record["kind"], record["step"]) not in have:
                writer.write(record)
    finally:
        writer.close()


def mean_eval(views: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """The mean of the seeds' last evaluations, when they are all at one step."""
    last = [v["last_eval"] for v in views]
    if not all(last) or len({e["step"] for e in last}) > 1:
        return {}
    return mean_record(last, seeds)


def report_mean(views: list[dict[str, Any]], seeds: list[int], until: int, hooks: Hooks,
                seed_hooks: list[SeedHooks], first_rank: bool) -> bool:
    """One report (on every rank, the same values) of the mean evaluation at `until` when every seed
    has one there, with a checkpoint (on the first rank) when the seeds wrote one since the last;
    True when it went with one."""
    mean = mean_eval(views, seeds)
    if not mean or mean["step"] != until:
        return False
    saved = next((v["saved"] for v in views if v["saved"]), None)
    for h in seed_hooks:
        h.saved = None
    hooks.report({k: v for k, v in mean.items() if k != "seeds"}
                 | {f"val_loss_seed{s}": v for s, v in mean["seeds"].items()},
                 Path(saved) if saved and first_rank else None)
    return saved is not None


def stays_diverged(trial: Path, seeds: list[int]) -> None:
    why = next(filter(None, map(diverged_reason, [trial, *(seed_dir(trial, s) for s in seeds)])), None)
    if why:
        raise Diverged(f"{why}; the trial stays stopped")


def seed_config(config: dict[str, Any], seed: int) -> dict[str, Any]:
    """The run config of one seed of the trial: its own seed and run directory."""
    trial = Path(config["run_dir"])
    seed_dir(trial, seed).mkdir(parents=True, exist_ok=True)
    return {**config, "spec": {**config["spec"], "seed": seed}, "run_dir": str(seed_dir(trial, seed)), "seeds": None}


# ---- which way ------------------------------------------------------------------------------------
def train_trial(config: dict[str, Any], hooks: Hooks | None = None) -> dict[str, Any]:
    """A run, or with `config["seeds"]` (two or more) a trial of seed replicates: the caller's choice,
    made here so that the per-worker loop knows nothing of sweeps. The seeds train side by side
    when the worker group has `num_workers` ranks for each seed, in turn when it has `num_workers`
    (or there is no process group)."""
    seeds = config.get("seeds") or []
    if len(seeds) <= 1:
        return train(config, hooks)
    if not dist.is_initialized():
        return train_replicates(config, hooks or Hooks())
    workers, world = Spec.model_validate(config["spec"]).resources.num_workers, dist.get_world_size()
    if world == workers * len(seeds):
        return train_side_by_side(config, hooks or Hooks())
    if world == workers:
        return train_replicates(config, hooks or Hooks())
    raise ValueError(f"a trial of {len(seeds)} seeds x num_workers={workers} needs {workers * len(seeds)} ranks "
                     f"(side by side) or {workers} (in turn); the worker group has {world}")


# ---- side by side ---------------------------------------------------------------------------------
def train_side_by_side(config: dict[str, Any], hooks: Hooks) -> dict[str, Any]:
    """Train `config["seeds"]` at the same time, `world / len(seeds)` ranks each (ranks
    [i*n, (i+1)*n) hold seed i), one evaluation interval at a time; returns the trial's last record."""
    trial, seeds = Path(config["run_dir"]), [int(s) for s in config["seeds"]]
    world, rank = dist.get_world_size(), dist.get_rank()
    per = world // len(seeds)
    # every rank creates every group, in the same order (torch's rule), then keeps its seed's
    groups = [dist.new_group(list(range(i * per, (i + 1) * per))) for i in range(len(seeds))]
    # the records travel as Python objects: over gloo, whatever the device (NCCL would want CUDA tensors)
    objects = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    mine = rank // per
    stays_diverged(trial, seeds)
    hooks.restore(trial)
    seed_hooks = SeedHooks(hooks, seeds[mine], trial.name)
    state = setup(seed_config(config, seeds[mine]), seed_hooks, groups[mine])
    total, every = state.total_steps, state.spec.training.eval_every

    def gather(after: float, until: float, diverged: str | None = None) -> list[dict[str, Any]]:
        """Each seed's view (from rank 0 of the seed, the one that holds its records): on every rank,
        but its records (a resume's whole history) on the first rank only, which writes the trial's."""
        view = {**seed_view(state, seed_hooks, after, until), "diverged": diverged}
        heavy = {k: view.pop(k) for k in ("records", "written")}
        views: list[Any] = [None] * world
        dist.all_gather_object(views, view, group=objects)
        held: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(heavy, held, dst=0, group=objects)
        return [{**views[i * per], **(held[i * per] if held else {"records": [], "written": {}})}
                for i in range(len(seeds))]

    def interval(work, after: float, until: int) -> list[dict[str, Any]]:
        """`work` on this rank's seed, then every seed's view; a seed that diverged ends the trial, on
        every rank, once the others have reached the end of the interval."""
        why = None
        try:
            work()
        except Diverged as err:
            why = str(err)
        views = gather(after, until, why)
        bad = [v for v in views if v["diverged"]]
        if bad:
            if rank == 0:
                (trial / DIVERGED).write_text(json.dumps({"step": max(v["step"] for v in views),
                                                          "reason": bad[0]["diverged"]}))
            raise Diverged(bad[0]["diverged"])
        return views

    meter, paused = Meter(), time.perf_counter()

    def train_to(until: int) -> None:
        nonlocal meter
        if state.step < until:  # a seed can be one interval ahead (a crash between the seeds' checkpoints)
            meter.exclude(time.perf_counter() - paused)  # waiting for the other seeds is not training
            meter = train_until(state, until, meter)

    try:
        # a fresh seed's first pass and step-0 evaluation; then every seed's records so far
        views = interval(lambda: evaluate_at_start(state), -1, math.inf)
        done = min(v["step"] for v in views)
        if rank == 0:
            start_trial_records(trial, views, seeds, done, state.info, side_by_side={"ranks_per_seed": per})
        if done == 0 or done >= total:  # step 0, or a resumed trial with nothing left: said once
            report_mean(views, seeds, done, hooks, [seed_hooks], rank == 0)
        while done < total:
            until = min(total, (done // every + 1) * every)
            views = interval(lambda: train_to(until), done, until)  # noqa: B023 (called at once)
            paused = time.perf_counter()
            if rank == 0:
                write_trial_records(trial, views, seeds)
            if report_mean(views, seeds, until, hooks, [seed_hooks], rank == 0):
                # the first rank has taken the seeds' checkpoints (Ray's storage) before any seed
                # trains on and replaces its own
                dist.barrier(group=objects)
            done = until
    finally:
        if state.metrics is not None:
            state.metrics.close()
    return mean_eval(views, seeds)


# ---- in turn --------------------------------------------------------------------------------------
def setup_seeds(config: dict[str, Any], hooks: Hooks) -> tuple[list[RunState], list[SeedHooks]]:
    """Each seed's run state (resumed from its own checkpoint when it has one); the trial's records
    rebuilt from its seeds' up to the step every seed has reached."""
    trial = Path(config["run_dir"])
    seeds = [int(s) for s in config["seeds"]]
    stays_diverged(trial, seeds)
    hooks.restore(trial)
    seed_hooks = [SeedHooks(hooks, s, trial.name) for s in seeds]
    states = [setup(seed_config(config, s), h) for s, h in zip(seeds, seed_hooks, strict=True)]
    if states[0].rank == 0:
        done = min(s.step for s in states)
        views = [seed_view(s, h, -1, done) for s, h in zip(states, seed_hooks, strict=True)]
        start_trial_records(trial, views, seeds, done, states[0].info)
    return states, seed_hooks


def train_replicates(config: dict[str, Any], hooks: Hooks) -> dict[str, Any]:
    """Train `config["seeds"]` of one configuration in turn, in every process, one interval at a
    time; returns the trial's last record."""
    trial, seeds = Path(config["run_dir"]), [int(s) for s in config["seeds"]]
    states, seed_hooks = setup_seeds(config, hooks)
    rank, total, every = states[0].rank, states[0].total_steps, states[0].spec.training.eval_every
    done = min(s.step for s in states)
    meters = [Meter() for _ in states]
    paused = [time.perf_counter()] * len(states)  # a seed's meter stops while the others train

    def views(after: float, until: float) -> list[dict[str, Any]]:
        return [seed_view(s, h, after, until) for s, h in zip(states, seed_hooks, strict=True)]

    try:
        for s in states:  # a fresh seed's first pass and step-0 evaluation
            evaluate_at_start(s)
        if done == 0 or done >= total:  # step 0, or a resumed trial with nothing left: said once
            now = views(-1 if done == 0 else done, done)
            if rank == 0:
                write_trial_records(trial, now, seeds)
            report_mean(now, seeds, done, hooks, seed_hooks, rank == 0)
        while done < total:
            until = min(total, (done // every + 1) * every)
            for i, s in enumerate(states):
                if s.step < until:  # a seed can be one interval ahead (a crash between the seeds' checkpoints)
                    meters[i].exclude(time.perf_counter() - paused[i])
                    meters[i] = train_until(s, until, meters[i])
                    paused[i] = time.perf_counter()
            now = views(done, until)
            if rank == 0:
                write_trial_records(trial, now, seeds)
            report_mean(now, seeds, until, hooks, seed_hooks, rank == 0)
            done = until
    except Diverged as err:
        if rank == 0:
            (trial / DIVERGED).write_text(json.dumps({"step": max(s.step for s in states), "reason": str(err)}))
        raise
    finally:
        for s in states:
            if s.metrics is not None:
                s.metrics.close()
    return mean_eval(views(math.inf, math.inf), seeds)
