"""`dtlab sweep`: Ray Tune + Optuna over routing hyperparameters, ASHA, resume.

Tune runs `sweep_trial` once per trial; it builds one Ray Train `TorchTrainer` (run name from
the trial id) whose workers run the ordinary training loop, with `TuneReportCallback` forwarding
each evaluation to Tune. Optuna's TPE (seeded) proposes configurations through a define-by-run
space, so routing keys are suggested only for the variants that have them. A trial is one
configuration: with several seeds it trains them side by side and reports their mean at each
step (`replicates.py`), so ASHA and Optuna compare like with like. Each trial keeps its own run
directory under `OUT/trials/` (its seeds under `seeds/`), whose `metrics.jsonl` is the full history.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from ray.tune import Callback
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from dtlab.analysis.rundir import (
    METRICS,
    diverged_reason,
    reached_last_step,
    read_jsonl,
    read_status,
    write_atomic,
    write_status,
)
from dtlab.models.config import CONFIG_CLASSES, did_you_mean
from dtlab.trainers.spec import DENSE_CONTROL, MODEL_KEYS, Distribution, Spec, SpecError, dump_spec

if TYPE_CHECKING:
    import optuna
    from ray.tune import ResultGrid, Tuner
    from ray.tune.experiment import Trial

    from dtlab.trainers.monitor.progress import Watch
    from dtlab.trainers.monitor.tracking import Tracking
    from dtlab.trainers.run.data import Prepared

log = logging.getLogger(__name__)

TUNE_DIR, EXPERIMENT = "tune", "sweep"


# ---- the search space ---------------------------------------------------------------------------
@dataclass
class Dimension:
    key: str  # dotted spec key
    dist: Distribution
    variants: list[str] | None = None  # a model key applies only to these variants


@dataclass
class Plan:
    spec: Spec
    dims: list[Dimension]
    variants: list[str]
    variant_is_searched: bool
    seeds: list[int]
    max_t: int


def trial_spec(spec: Spec, params: dict[str, Any], seed: int | None) -> Spec:
    """The spec of one trial: the sweep's spec with the suggested values (model keys only where
    the trial's variant has them) and the replicate seed."""
    variant = params.get("model.type", spec.model.type)
    return spec.for_run(variant, spec.seed if seed is None else seed, params, source="trial")


def _dimension_variants(key: str, variants: list[str], source: str) -> list[str] | None:
    """For a model config key: the swept variants that have it (refused when none does)."""
    parts = key.split(".")
    if parts[0] == "sweep":
        raise SpecError(f"{source}: sweep.search_space.{key}: the sweep section itself cannot be searched")
    if parts[0] != "model" or len(parts) != 2 or parts[1] in MODEL_KEYS:
        return None
    have = [v for v in variants if parts[1] in CONFIG_CLASSES[v].field_names()]
    if not have:
        owners = [v for v, c in CONFIG_CLASSES.items() if parts[1] in c.field_names()]
        every = {k for c in CONFIG_CLASSES.values() for k in c.field_names()}
        hint = f" (it belongs to {owners})" if owners else did_you_mean(parts[1], every)
        raise SpecError(f"{source}: sweep.search_space.{key}: none of the swept variants {variants} has "
                        f"this key{hint}")
    return have


def plan_sweep(spec: Spec, source: str = "spec") -> Plan:
    """Check the sweep section completely, before Ray starts (its shape is checked by the spec)."""
    if spec.sweep is None:
        raise SpecError(f"{source}: no sweep section; `dtlab sweep` needs one (see experiments/sweep_smoke.yaml)")
    space = spec.sweep.search_space
    type_dist = space.get("model.type")
    if type_dist is not None and (type_dist.kind != "choice" or set(type_dist.args) - set(CONFIG_CLASSES)):
        raise SpecError(f"{source}: sweep.search_space.model.type: expected a choice among "
                        f"{sorted(CONFIG_CLASSES)}, got {type_dist.kind} {type_dist.args!r}")
    variants = list(dict.fromkeys(type_dist.args)) if type_dist is not None else spec.variant_list()
    if DENSE_CONTROL in variants:
        raise SpecError(f"{source}: variants: dense_control is a fixed baseline for `dtlab run` experiments; a "
                        "sweep searches routed variants (sweep num_hidden_layers for a dense one)")
    dims = [Dimension(key, dist, _dimension_variants(key, variants, source)) for key, dist in space.items()]
    for dim in dims:  # every corner of every dimension makes a valid spec, for each variant it applies to
        for variant in (dim.variants or variants) if dim.key != "model.type" else []:
            for value in dim.dist.corners():
                try:
                    trial_spec(spec, {"model.type": variant, dim.key: value}, None)
                except SpecError as err:
                    msg = str(err).replace("trial: ", "")
                    raise SpecError(f"{source}: sweep.search_space.{dim.key}={value!r}: {msg}") from None
    check_metrics(spec, variants, source)
    n_evals = _evaluations(spec)
    max_t = spec.sweep.asha.max_t or n_evals + 1
    if spec.sweep.asha.enabled and max_t <= n_evals:
        raise SpecError(f"{source}: sweep.asha.max_t={max_t} must exceed the number of evaluations ({n_evals}) so "
                        "that trials that finish end normally")
    return Plan(spec, dims, variants, type_dist is not None, spec.seed_list(), max_t)


# What every trial reports to Tune at each evaluation (the eval record's numbers), for `metric`/`objectives`.
REPORTED = ("val_loss", "val_ppl", "val_loss_topk", "val_ppl_topk", "val_loss_causal", "val_ppl_causal",
            "flops_per_token", "flop_ratio_vs_dense", "tokens_seen", "step")


def check_metrics(spec: Spec, variants: list[str], source: str) -> None:
    """Every metric a sweep optimises is one every trial reports, refused before Ray starts."""
    for obj in spec.sweep.objective_list():
        if obj.metric == "train_flops":
            raise SpecError(f"{source}: sweep metric train_flops: the cumulative training FLOPs of however long a "
                            "trial ran (a trial ASHA stops early looks cheap); optimise the configuration's cost: "
                            "flops_per_token or flop_ratio_vs_dense")
        if obj.metric not in REPORTED:
            raise SpecError(f"{source}: sweep metric {obj.metric!r}: no trial reports it; expected one of "
                            f"{list(REPORTED)}{did_you_mean(obj.metric, REPORTED)}")
        if obj.metric.endswith("_causal") and "standard" in variants:
            raise SpecError(f"{source}: sweep metric {obj.metric}: Standard trials have no causal routing; use "
                            f"{obj.metric.replace('_causal', '')} (the causal loss for routed models)")


def _evaluations(spec: Spec) -> int:
    t = spec.training
    if t.max_steps is None:
        return 10_000  # epochs: not known before the data; ASHA's max_t then only caps
    n = t.max_steps // t.eval_every + (0 if t.max_steps % t.eval_every == 0 else 1)
    return n + (1 if t.eval_at_start else 0)


class DefineByRun:
    """Optuna define-by-run space: routing keys are suggested only for variants that have them."""

    def __init__(self, dims: list[Dimension], variants: list[str]) -> None:
        self.dims, self.variants = dims, variants

    def __call__(self, trial) -> dict[str, Any] | None:
        variant = trial.suggest_categorical("model.type", self.variants)
        for d in self.dims:
            if d.key == "model.type" or (d.variants and variant not in d.variants):
                continue
            kind, args = d.dist.kind, d.dist.args
            if kind == "choice":
                trial.suggest_categorical(d.key, args)
            elif kind == "int":
                trial.suggest_int(d.key, int(args[0]), int(args[1]))
            else:
                trial.suggest_float(d.key, float(args[0]), float(args[1]), log=kind == "loguniform")
        return None


STUDY = "optuna.journal"  # Optuna's study of the sweep, in the sweep directory (Optuna's journal file storage)


def study_storage(out: Path) -> optuna.storages.BaseStorage:
    """The study's store: `OUT/optuna.journal`, Optuna's journal file storage (an append-only log,
    locked with a symlink, safe on NFS where SQLite's locking is not), which `--resume` continues
    and `optuna-dashboard OUT/optuna.journal` opens."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str((Path(out) / STUDY).resolve())))


class TruthfulOptunaSearch(OptunaSearch):
    """Ray's `OptunaSearch`, telling the study how each trial really ended, from the trial's own
    records: COMPLETE only when it reached its last step (with its last evaluation, the values
    `summary.json` holds), PRUNED when ASHA stopped it (with its last intermediate value, where
    Optuna keeps them: one objective), FAILED when it diverged or failed. (Ray's own marks a trial
    that ASHA stopped COMPLETE with its partial values.)"""

    def __init__(self, *args: Any, trials_dir: str | Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trials_dir = str(trials_dir)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        run = Path(self.trials_dir) / trial_id
        if error or trial_failed(run):
            super().on_trial_complete(trial_id, None, error=True)
        elif reached_last_step(run):
            last = read_jsonl(run / METRICS).of_kind("eval")[-1]
            super().on_trial_complete(trial_id, {**(result or {}), **last}, error=False)
        else:
            super().on_trial_complete(trial_id, None, error=False)  # Optuna: PRUNED


def trial_failed(run: Path) -> bool:
    """The trial ended for good on a deterministic failure (its driver says so), or diverged."""
    return bool(diverged_reason(run)) or read_status(run).get("state") in ("failed", "diverged")


def make_searcher(plan: Plan, out: Path | None = None, resume: bool = False) -> OptunaSearch:
    """The sweep's searcher; on `--resume` Tune then puts its saved state back (the variants still
    to come in turn included: queued into the study once, at the start)."""
    objectives = plan.spec.sweep.objective_list()
    metric = [o.metric for o in objectives] if len(objectives) > 1 else objectives[0].metric
    mode = [o.mode for o in objectives] if len(objectives) > 1 else objectives[0].mode
    points = None
    if len(plan.variants) > 1 and not plan.variant_is_searched and not resume:  # a fixed list: each in turn
        points = [{"model.type": plan.variants[i % len(plan.variants)]} for i in range(plan.spec.sweep.num_samples)]
    searcher = TruthfulOptunaSearch(space=DefineByRun(plan.dims, plan.variants), metric=metric, mode=mode,
                                    points_to_evaluate=points, seed=plan.spec.seed, study_name=plan.spec.name,
                                    storage=study_storage(out) if out is not None else None,
                                    trials_dir=(out / "trials").resolve() if out is not None else "trials")
    return searcher  # seeds are not trials: a trial trains all of them (`replicates.py`)


# ---- objects Tune pickles, rebuilt on --resume -------------------------------------------------------
# Tune keeps the Tuner's configuration (searcher, scheduler, callbacks) as a pickle made when the
# sweep started, and `Tuner.restore` takes none of them anew. These objects pickle as a reference to
# the ones this process built from the current spec and cluster (`_LIVE`), so a resumed sweep runs
# with the cluster's concurrency now, its display and trackers, and ASHA's rungs as they were saved.
_LIVE: dict[str, Any] = {}


def _live(key: str) -> Any:
    if key == "progress":
        return _LIVE.get(key) or Callback()
    if key not in _LIVE:
        raise RuntimeError(f"this sweep's Tune state ({key}) is restored by `dtlab sweep --resume`, not directly")
    return _LIVE[key]


class SweepLimit(ConcurrencyLimiter):
    """At most `max_concurrent` trials at once: what the cluster fits now (`start_cluster`)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_live, ("limit",))


# ---- ASHA at equal compute ------------------------------------------------------------------------------
class EqualComputeASHA(FIFOScheduler):
    """ASHA (asynchronous successive halving, one bracket, as Tune's `ASHAScheduler`) whose rungs are
    at equal cumulative training FLOPs (each evaluation's `train_flops`), not equal steps: a routed
    configuration that costs less per step is judged against the others after the same compute.
    A trial's value at a rung is its `metric` at exactly the rung's FLOPs, interpolated linearly
    between its two evaluations around it, so every value a rung compares is at the same compute.
    At each rung a trial worse than the best 1/reduction_factor of those recorded there before it
    is stopped (the first is never stopped). Its state (rungs, each trial's last report) is its own,
    saved to `path` at every result and read back by `restore`, which refuses other settings."""

    TIME_ATTR = "train_flops"

    def __init__(self, metric: str, mode: str, milestones: Sequence[float], reduction_factor: float,
                 path: str | Path | None = None) -> None:
        super().__init__()
        self.set_search_properties(metric, mode)
        self.mode, self.path = mode, (str(path) if path is not None else None)
        self.settings = {"scheduler": "EqualComputeASHA", "version": 1, "time_attr": self.TIME_ATTR,
                         "metric": metric, "mode": mode, "milestones": [float(m) for m in milestones],
                         "reduction_factor": float(reduction_factor)}
        self.rungs: list[dict[str, float]] = [{} for _ in milestones]
        self.last: dict[str, list[float]] = {}  # trial id -> [train_flops, value] of its previous result

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if metric is None or self.metric in (None, metric):
            return super().set_search_properties(metric if self.metric is None else None, mode)
        return False

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        return self.judge(trial.trial_id, result.get(self.TIME_ATTR), result.get(self.metric))

    def judge(self, trial_id: str, flops: float | None, value: float | None) -> str:
        """Record the trial at every rung its compute passed since its previous result; STOP when it
        is in the worse part of any of them."""
        if not isinstance(flops, (int, float)) or not isinstance(value, (int, float)):
            return TrialScheduler.CONTINUE
        prev = self.last.get(trial_id)
        self.last[trial_id] = [float(flops), float(value)]
        action = TrialScheduler.CONTINUE
        for milestone, recorded in zip(self.settings["milestones"], self.rungs, strict=True):
            if flops < milestone or trial_id in recorded:
                continue
            at = float(value)
            if prev is not None and prev[0] < milestone and flops > prev[0]:
                at = prev[1] + (float(value) - prev[1]) * (milestone - prev[0]) / (flops - prev[0])
            cutoff = self.cutoff(recorded)
            if cutoff is not None and (at > cutoff if self.mode == "min" else at < cutoff):
                action = TrialScheduler.STOP
            recorded[trial_id] = at
        self.save(self.path)
        return action

    def cutoff(self, recorded: dict[str, float]) -> float | None:
        """The value a trial must match to stay: the best 1/reduction_factor of those recorded."""
        values = [v for v in recorded.values() if math.isfinite(v)]
        if not values:
            return None
        keep = 100.0 / self.settings["reduction_factor"]
        return float(np.percentile(values, keep if self.mode == "min" else 100.0 - keep))

    def state(self) -> dict[str, Any]:
        return {"settings": self.settings, "rungs": self.rungs, "last": self.last}

    def save(self, checkpoint_path: str | None) -> None:
        if checkpoint_path:
            write_atomic(Path(checkpoint_path), json.dumps(self.state(), indent=1))

    def restore(self, checkpoint_path: str) -> None:
        saved = json.loads(Path(checkpoint_path).read_text())
        if saved.get("settings") != self.settings:
            was, now = saved.get("settings") or {}, self.settings
            changed = [f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(was) | set(now))
                       if was.get(k) != now.get(k)]
            raise SpecError(f"--resume: the sweep's ASHA differs from the one it started with ({'; '.join(changed)}) "
                            f"in {checkpoint_path}; resume it with the spec it was started with")
        self.rungs = [{str(k): float(v) for k, v in rung.items()} for rung in saved["rungs"]]
        self.last = {str(k): [float(x) for x in v] for k, v in saved.get("last", {}).items()}

    def debug_string(self) -> str:
        return "EqualComputeASHA: " + ", ".join(f"{m:.3g} FLOPs: {len(r)} trial(s)"
                                                 for m, r in zip(self.settings["milestones"], self.rungs, strict=True))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_live, ("scheduler",))


ASHA_STATE = "asha.json"


def asha_milestones(spec: Spec, plan: Plan, eval_flops: float) -> list[float]:
    """ASHA's rungs in cumulative training FLOPs: `grace_period x reduction_factor^k` evaluations of
    the sweep's most expensive configuration (`eval_flops`, the FLOPs of one evaluation interval), for
    as many rungs as Tune's ASHA would give below `max_t` evaluations. So no configuration can be
    stopped before `grace_period` of its own evaluations, and a cheaper one reaches each rung later
    in steps, after the same compute."""
    asha = spec.sweep.asha
    rungs = int(math.log(plan.max_t / asha.grace_period) / math.log(asha.reduction_factor) + 1)
    return [asha.grace_period * asha.reduction_factor ** k * eval_flops for k in range(rungs)]


def eval_interval_flops(plan: Plan, vocab_size: int) -> float:
    """The training FLOPs of one evaluation interval of the sweep's most expensive configuration: the
    largest over each variant at every corner of the dimensions that change a trial's cost."""
    import itertools

    from dtlab.models.config import make_config
    from dtlab.models.flops import flops_per_token

    costly = [d for d in plan.dims if d.key != "model.type" and (
        d.key.startswith("model.") or d.key in ("training.batch_size", "training.grad_accum_steps",
                                                 "data.block_size", "training.eval_every"))]
    best = 0.0
    for variant in plan.variants:
        dims = [d for d in costly if not d.variants or variant in d.variants]
        for corner in itertools.islice(itertools.product(*(d.dist.corners() for d in dims)), 4096):
            one = trial_spec(plan.spec, {"model.type": variant, **{d.key: v for d, v in zip(dims, corner,
                                                                                          strict=True)}}, None)
            overrides = one.model.overrides_for(variant)
            overrides.setdefault("vocab_size", vocab_size)
            t = one.training
            tokens = t.batch_size * t.grad_accum_steps * one.resources.num_workers * one.data.block_size
            fpt = flops_per_token(make_config(variant, one.model.size, **overrides), one.data.block_size)
            best = max(best, t.eval_every * tokens * fpt)
    return best


# ---- one trial --------------------------------------------------------------------------------------
def sweep_trial(config: dict[str, Any]) -> None:
    """Tune's trainable: one TorchTrainer for this trial, resumed from its own run directory."""
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from dtlab.trainers.orchestrate.ray_train import ray_worker, run_config, scaling
    from dtlab.trainers.orchestrate.replicates import seed_dir
    from dtlab.trainers.orchestrate.runner import check_fit, holds_run
    from dtlab.trainers.run.checkpoint import last_checkpoint
    from dtlab.trainers.run.data import prepare_data

    trial_id = ray.tune.get_context().get_trial_id()
    params = {k: v for k, v in config.items() if "." in k}
    sweep_spec = Spec.model_validate(config["spec"])
    seeds = sweep_spec.seed_list()
    spec = trial_spec(sweep_spec, params, seeds[0])
    run_dir = Path(config["sweep_dir"]) / "trials" / trial_id
    runs = {seed: seed_dir(run_dir, seed) for seed in seeds} if len(seeds) > 1 else {seeds[0]: run_dir}
    resume = holds_run(run_dir) and any(last_checkpoint(r).is_dir() for r in runs.values())
    if trial_failed(run_dir):  # ended for good (a trial Tune starts again after a restart of the driver)
        return
    try:
        data = prepare_data(spec.data)
        check_fit(spec, data, spec.resources.num_workers, seeds=len(seeds))
        if not resume:
            lay_out_trial(run_dir, runs, trial_id, params, sweep_spec, data)
        write_status(run_dir, "running")  # the trial's driver, for `dtlab ls` (the sweep's callback ends it)
        trainer = TorchTrainer(
            ray_worker,
            train_loop_config={"spec": spec.model_dump(mode="json"), "run_dir": str(run_dir),
                               "data_dir": str(data.path), "resume": resume,
                               "seeds": seeds if len(seeds) > 1 else None},
            scaling_config=scaling(spec, len(seeds)),  # num_workers ranks per seed: the seeds side by side
            run_config=run_config(spec, f"{Path(config['sweep_dir']).name}-{trial_id}",
                                  Path(config["sweep_dir"]) / "train", callbacks=[TuneReportCallback()]),
        )
        trainer.fit()
    except Exception as err:
        if not run_dir.is_dir():  # refused before its directory was laid out: a record of the refusal
            run_dir.mkdir(parents=True)
            (run_dir / "params.json").write_text(json.dumps({"trial_id": trial_id, "params": params,
                                                             "seed": seeds[0] if len(seeds) == 1 else None,
                                                             "seeds": seeds}, indent=1))
        end_for_good(run_dir, err)


def end_for_good(run_dir: Path, err: Exception) -> None:
    """A trial's failure: a deterministic one (diverged, out of memory, refused: `failure_kind`)
    ends the trial here, once, marked in its `status.json` with the reason; the trial then ends
    normally for Tune, which neither retries it nor reruns it on `--resume` (the searcher tells
    Optuna it FAILED, from that mark). Any other is raised: Tune retries the trial from its last
    checkpoint, up to `resources.max_failures` (the one retry layer of a sweep's trial)."""
    from dtlab.trainers.orchestrate.runner import DIVERGED_KIND, _cause, _one_line, failure_kind

    kind = failure_kind(err)
    if kind is None:
        raise err
    reason = diverged_reason(run_dir) or f"{kind}: {_one_line(_cause(err))}"
    write_status(run_dir, "diverged" if kind == DIVERGED_KIND else "failed", error=reason)
    log.info(f"trial {run_dir.name}: {reason}; not retried")


def lay_out_trial(run_dir: Path, runs: dict[int, Path], trial_id: str, params: dict[str, Any], sweep_spec: Spec,
                  data: Prepared) -> None:
    """A new trial's directory: its spec and facts, and each seed a run of its own (in a replicate
    trial, under `seeds/`), each with the trial's parameters."""
    from dtlab.trainers.orchestrate.runner import holds_run, prepare_run_dir, write_run_files

    seeds = list(runs)
    prepare_run_dir(run_dir, resume=False, force=holds_run(run_dir))
    write_run_files(run_dir, trial_spec(sweep_spec, params, seeds[0]), data, resume=False)
    for seed, one in runs.items():
        if one != run_dir:  # a seed of a replicate trial: a run of its own
            one.mkdir(parents=True, exist_ok=True)
            write_run_files(one, trial_spec(sweep_spec, params, seed), data, resume=False)
            (one / "params.json").write_text(json.dumps({"trial_id": trial_id, "params": params, "seed": seed,
                                                         "seeds": seeds}, indent=1))
    (run_dir / "params.json").write_text(json.dumps({"trial_id": trial_id, "params": params,
                                                      "seed": seeds[0] if len(seeds) == 1 else None,
                                                      "seeds": seeds}, indent=1))


# ---- the driver ---------------------------------------------------------------------------------------
DASHBOARD_PACKAGES = ("aiohttp", "aiohttp_cors", "grpc", "opencensus", "opentelemetry", "prometheus_client")


def check_ray_dashboard() -> None:
    """The packages Ray's dashboard (and its agent) import, the `ray[default]` extras, import here."""
    import importlib

    for name in DASHBOARD_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise SpecError(f"the Ray dashboard's dependencies do not import ({name}: {err}); install ray[default] "
                            "(pip install 'ray[default,tune,train]'): without them, trials that ASHA stops leak "
                            "their worker reservations and the sweep hangs") from None


def check_gpus(spec: Spec, gpus_available: float) -> None:
    res, seeds = spec.resources, len(spec.seed_list())  # a trial's seeds train side by side
    per_trial = res.num_workers * (res.gpus_per_worker or 0) * seeds
    if res.device == "cuda" and res.gpus_per_worker is None:
        per_trial = res.num_workers * seeds
    if per_trial > gpus_available:
        side = f" x {seeds} seeds side by side" if seeds > 1 else ""
        raise SpecError(f"resources: a trial asks for {per_trial:g} GPU(s) (num_workers={res.num_workers} x "
                        f"gpus_per_worker={res.gpus_per_worker}{side}) but the cluster has {gpus_available:g}")


def trial_resources(spec: Spec, gpus: float) -> tuple[float, float]:
    """(CPUs, GPUs) one trial holds: its driver and its workers (`num_workers` for each seed)."""
    res = spec.resources
    use_gpu = res.device in ("auto", "cuda") and gpus > 0
    gpw = (res.gpus_per_worker if res.gpus_per_worker is not None else 1.0) if use_gpu else 0.0
    workers = res.num_workers * len(spec.seed_list())
    return spec.sweep.driver_cpus + workers * res.cpus_per_worker, workers * gpw


def run_sweep(spec: Spec, out: str | Path, resume: bool = False, force: bool = False, source: str = "spec",
              tracking: Tracking | None = None) -> dict[str, Any]:
    """Check everything, lay out `out`, run the trials through Tune, write `summary.json`. The trials'
    progress shows on the command's console and their records go to the spec's trackers."""
    from dtlab.trainers.monitor.progress import current
    from dtlab.trainers.monitor.tracking import Tracking, check_tracking

    plan = plan_sweep(spec, source)
    check_tracking(spec)
    out = Path(out)
    lay_out(plan, out, resume, force, source)
    current().capture(out)  # Ray's and Tune's output goes to out/output.log
    own = tracking is None
    tracking = tracking or Tracking(out)
    try:
        concurrent = start_cluster(plan, out)  # on --resume too: the cluster as it is now
        results = make_tuner(plan, out, resume, concurrent, [TrialProgress(plan, out, tracking)]).fit()
    finally:
        current().end_display()  # the summary and the table print below the live lines (stdout stays stdout)
        if own:
            tracking.close()
    return finish(plan, out, results)


def _failure_logged(method: Callable[..., Any]) -> Callable[..., Any]:
    """The display and the trackers never stop a sweep: what fails is logged (output.log), not raised."""

    @functools.wraps(method)
    def guarded(self: TrialProgress, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as err:
            log.debug(f"sweep progress/tracking: {method.__name__} failed: {type(err).__name__}: {err}")
            return None

    return guarded


class TrialProgress(Callback):
    """A Tune callback (on the driver): each trial's progress on the console, its records to the
    trackers, and a line of counts: running, finished, stopped (by ASHA), diverged, failed, and the
    best so far."""

    def __init__(self, plan: Plan, out: Path, tracking) -> None:
        from dtlab.trainers.monitor.progress import current

        self.plan, self.out, self.tracking, self.ui = plan, out, tracking, current()
        self.first = plan.spec.sweep.objective_list()[0]
        self.states: dict[str, str] = {}
        self.best: tuple[float, str] | None = None
        self.ui.header = self.line

    def __reduce__(self) -> tuple[Any, ...]:  # Tune pickles its run config: on --resume, this process's own
        return (_live, ("progress",))

    def line(self) -> str:
        counts = {s: sum(1 for v in self.states.values() if v == s)
                  for s in ("running", "finished", "stopped", "diverged", "failed")}
        best = f" | best {self.first.metric} {self.best[0]:.4f} ({self.best[1]})" if self.best else ""
        return "sweep: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + best

    @_failure_logged
    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        run_dir = self.out / "trials" / trial.trial_id
        if reached_last_step(run_dir):  # a resumed sweep's trial that had finished: kept, not rerun
            self.states[trial.trial_id] = "finished"
            return
        params = {k: v for k, v in trial.config.items() if "." in k}
        spec = trial_spec(self.plan.spec, params, self.plan.seeds[0])
        tracker = self.tracking.start(spec, run_dir, name=f"trial-{trial.trial_id}")
        label = f"{trial.trial_id} {params.get('model.type', self.plan.spec.model.type)}"
        self.ui.follow(trial.trial_id, run_dir, label, sinks=[tracker.record] if tracker else [])
        self.states[trial.trial_id] = "running"

    @_failure_logged
    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any],
                        **info: Any) -> None:
        value, sign = result.get(self.first.metric), 1 if self.first.mode == "min" else -1
        if isinstance(value, (int, float)) and math.isfinite(value) and (
                self.best is None or sign * value < sign * self.best[0]):
            self.best = (float(value), trial.trial_id)

    def _end(self, trial: Trial, status: str) -> None:
        run_dir = self.out / "trials" / trial.trial_id
        ended = read_status(run_dir)  # a deterministic failure: the trial's driver marked it, with the reason
        error = ended.get("error") if ended.get("state") in ("failed", "diverged") else None

        def said(watch: Watch) -> str:  # the trial's own records tell diverged, and stopped early (ASHA)
            early = status == "finished" and (not watch.total or watch.step < watch.total)
            return ("diverged" if diverged_reason(run_dir) else ended["state"] if error else
                    "stopped" if early else status)

        watch = self.ui.unfollow(trial.trial_id, said)
        status = watch.status if watch is not None else ("diverged" if diverged_reason(run_dir) else
                                                          ended["state"] if error else status)
        self.states[trial.trial_id] = status
        write_status(run_dir, status, **({"error": error} if error else {}))
        self.tracking.end(run_dir, status)
        if status == "stopped" and not self.plan.spec.sweep.keep_stopped_last:
            drop_last(run_dir)
        if not self.ui.live:
            log.info(self.line())

    @_failure_logged
    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._end(trial, "finished")

    @_failure_logged
    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._end(trial, "failed")


def lay_out(plan: Plan, out: Path, resume: bool, force: bool, source: str = "spec") -> None:
    """Every check before Ray starts (devices, data, model fit, `--out`), then the sweep's own files."""
    from dtlab.trainers.orchestrate.runner import check_fit, check_resources, check_run_dir, holds_run, prepare_run_dir
    from dtlab.trainers.run.data import prepare_data

    spec = plan.spec
    check_ray_dashboard()
    if not os.environ.get("RAY_ADDRESS"):
        import torch

        check_gpus(spec, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    from dtlab.trainers.tools.plan import plan_sweep_spec

    # memory, once the devices are known to be there: `auto` decided, a trial that won't fit refused
    spec = plan.spec = plan_sweep_spec(plan.spec, source)
    a_sweep = (out / "sweep.json").is_file() or (out / TUNE_DIR).is_dir()
    if holds_run(out) and not a_sweep and not force:  # a training run, or an experiment: not what this continues
        what = "an experiment" if (out / "experiment.json").is_file() else "a training run"
        raise SpecError(f"--out {out} holds {what}, not a sweep; choose another --out (--force sets it aside)")
    check_run_dir(out, resume, force)
    if resume and not (holds_run(out) and (out / TUNE_DIR / EXPERIMENT).is_dir()):
        raise SpecError(f"--resume: {out} holds no sweep to continue")
    ones = [trial_spec(spec, {"model.type": variant}, None) for variant in plan.variants]
    for one in ones:  # devices and precision first: they need no data
        check_resources(one, use_ray=True)
    for one in ones:  # data and model fit, once per variant, before any trial
        check_fit(one, prepare_data(one.data), spec.resources.num_workers, seeds=len(spec.seed_list()))
    prepare_run_dir(out, resume, force)
    if not resume:
        (out / "spec.yaml").write_text(dump_spec(spec))
        (out / "sweep.json").write_text(json.dumps(
            {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "variants": plan.variants,
             "seeds": plan.seeds, "max_t": plan.max_t,
             "search_space": {d.key: {d.dist.kind: d.dist.args, "variants": d.variants} for d in plan.dims}},
            indent=1))


def start_cluster(plan: Plan, out: Path) -> int:
    """Start (or join) Ray; returns how many trials run at once: what the cluster fits, capped."""
    import ray

    spec = plan.spec
    if not ray.is_initialized():
        from dtlab.trainers.orchestrate.ray_train import init_ray

        ctx = init_ray(spec.sweep.dashboard_host)
        url = getattr(ctx, "dashboard_url", None)
        log.info(f"Ray dashboard: http://{url}" if url and not str(url).startswith("http") else f"Ray dashboard: {url}")
    cluster = ray.cluster_resources()
    check_gpus(spec, cluster.get("GPU", 0.0))
    cpus, gpus = trial_resources(spec, cluster.get("GPU", 0.0))
    fits = math.floor(cluster.get("CPU", 1.0) / cpus + 1e-9)
    if gpus > 0:
        fits = min(fits, math.floor(cluster.get("GPU", 0.0) / gpus + 1e-9))
    concurrent = max(1, min(spec.sweep.max_concurrent or fits, fits))
    log.info(f"sweep: {spec.sweep.num_samples} trial(s) over {plan.variants}, {len(plan.seeds)} seed(s) in each, "
             f"{concurrent} at a time ({cpus:g} CPU, {gpus:g} GPU per trial), results in {out}")
    return concurrent


def make_tuner(plan: Plan, out: Path, resume: bool, concurrent: int, callbacks: Sequence[Callback] = (),
               eval_flops: float | None = None) -> Tuner:
    """A new Tuner (Optuna, ASHA at equal compute), or the interrupted one restored from `out` with
    this process's searcher limit (`concurrent`), scheduler and callbacks (see `_LIVE`)."""
    from ray import tune

    spec = plan.spec
    trainable = tune.with_resources(sweep_trial, {"cpu": spec.sweep.driver_cpus})
    tune_path = out / TUNE_DIR / EXPERIMENT
    scheduler = None
    if spec.sweep.asha.enabled:
        first = spec.sweep.objective_list()[0]
        if eval_flops is None:
            from dtlab.trainers.run.data import prepare_data

            eval_flops = eval_interval_flops(plan, prepare_data(spec.data).vocab_size)
        scheduler = EqualComputeASHA(first.metric, first.mode, asha_milestones(spec, plan, eval_flops),
                                     spec.sweep.asha.reduction_factor, out / ASHA_STATE)
    if resume:
        saved = (out / ASHA_STATE).is_file()
        if saved != (scheduler is not None):
            raise SpecError(f"--resume: {out} was swept with ASHA {'on' if saved else 'off'}; resume it with the spec "
                            "it was started with")
        if scheduler is not None:
            scheduler.restore(str(out / ASHA_STATE))
            log.info(f"ASHA: {sum(map(len, scheduler.rungs))} rung result(s) restored")
    else:
        if scheduler is not None:
            scheduler.save(scheduler.path)
    _LIVE.clear()
    _LIVE.update(limit=SweepLimit(make_searcher(plan, out, resume), max_concurrent=concurrent), scheduler=scheduler,
                 progress=next((c for c in callbacks if isinstance(c, TrialProgress)), None))
    if resume:
        log.info(f"resuming the sweep in {tune_path}, {concurrent} trial(s) at a time")
        # unfinished trials continue; a trial that failed (after its retries) or diverged stays as it ended
        return tune.Tuner.restore(str(tune_path.resolve()), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False)
    return tune.Tuner(
        trainable,
        param_space={"spec": spec.model_dump(mode="json"), "sweep_dir": str(out.resolve())},
        tune_config=tune.TuneConfig(search_alg=_LIVE["limit"], scheduler=scheduler,
                                    num_samples=spec.sweep.num_samples),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str((out / TUNE_DIR).resolve()),
                                  failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
                                  callbacks=list(callbacks)),
    )


def drop_last(run_dir: Path) -> int:
    """A stopped trial keeps its `best` weights and loses its `last` checkpoint (the optimizer state
    it could resume from: it never will), in the trial's run and each seed's. Returns the bytes freed."""
    import shutil

    freed = 0
    for ckpt in [run_dir / "checkpoints", *sorted(run_dir.glob("seeds/*/checkpoints"))]:
        last, best = ckpt / "last", ckpt / "best"
        if not last.is_symlink():
            continue
        target, keep = last.resolve(), best.resolve() if best.exists() else None
        last.unlink()
        if target == keep:  # one directory for both: what `last` adds is the optimizer's state
            drop = [target / "optimizer.safetensors"]
        else:
            drop = [target] if target.is_dir() else []
        for path in drop:
            if path.is_dir():
                freed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_file():
                freed += path.stat().st_size
                path.unlink()
    return freed


def finish(plan: Plan, out: Path, results: ResultGrid) -> dict[str, Any]:
    """`summary.json` from the trials' own records (whether the sweep was interrupted, how many
    trials finished, were stopped, diverged or failed), then one line that counts them."""
    spec = plan.spec
    summary = summarize(out)
    if not spec.sweep.keep_stopped_last:  # again, now that no worker can still be writing one
        for t in summary["trials"]:
            if t["status"] == "stopped":
                drop_last(out / "trials" / t["trial_id"])
    unfinished = len(results) - results.num_terminated - results.num_errors
    # Tune counts a trial it stopped on SIGINT as terminated: the trials' own records say it is unfinished
    summary["interrupted"] = (unfinished > 0 or len(results) < spec.sweep.num_samples
                              or summary["counts"]["unfinished"] > 0)
    counts = summary["counts"]
    errors = [r.error for r in results if r.error]
    counts["failed"] = max(counts["failed"], len(errors) - counts["diverged"])  # some fail before any record
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for t in summary["trials"]:
        if t["status"] == "diverged":
            log.info(f"trial {t['trial_id']}: {t.get('reason', 'diverged')}")
    if errors and counts["failed"]:
        log.info(f"{counts['failed']} trial(s) failed: {[' '.join(str(e).split())[:200] for e in errors[:3]]}")
    best, first = summary.get("best"), spec.sweep.objective_list()[0]
    if best:
        log.info(f"best finished trial: {best['trial_id']} {first.metric} {best.get(first.metric):.4f} with "
                 f"{best['params']}")
    log.info("trials: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n or state != "unfinished"))
    return summary


TRIAL_STATES = ("finished", "stopped", "diverged", "failed", "unfinished")


def trial_status(run: Path, evals: list[dict[str, Any]]) -> str:
    """finished (its last step), diverged, stopped early (ASHA) or failed as the sweep's driver saw
    it end, else unfinished (the sweep was interrupted)."""
    if diverged_reason(run) or read_status(run).get("state") == "diverged":
        return "diverged"
    if evals and evals[-1].get("done"):
        return "finished"
    state = read_status(run).get("state")
    return state if state in ("stopped", "failed") else "unfinished"


def summarize(out: Path) -> dict[str, Any]:
    """Every trial's final record, parameters and status, read from the trials' own files; the best
    is the best finished trial (a stopped trial's loss is from fewer steps, a diverged one's is not
    a result)."""
    trials = []
    for run in sorted((out / "trials").glob("*")):
        params_file, metrics = run / "params.json", run / METRICS
        if ".old-" in run.name or not params_file.is_file():
            continue  # a trial restarted afresh set its first attempt aside: that is not a trial
        evals = read_jsonl(metrics).of_kind("eval")
        info = json.loads(params_file.read_text())
        last = evals[-1] if evals else {}
        status = trial_status(run, evals)
        trials.append({"trial_id": info["trial_id"], "params": info["params"], "seed": info.get("seed"),
                       "seeds": info.get("seeds", [info.get("seed")]),
                       "status": status, "evaluations": len(evals), "done": bool(last.get("done")),
                       **({"reason": diverged_reason(run) or read_status(run).get("error", "diverged")}
                          if status == "diverged" else
                          {"reason": read_status(run).get("error")} if status == "failed" and read_status(run).get(
                              "error") else {}),
                       **{k: v for k, v in last.items() if not isinstance(v, (dict, list))}})
    spec = yaml.safe_load((out / "spec.yaml").read_text()) if (out / "spec.yaml").is_file() else {}
    sweep = (spec or {}).get("sweep") or {}
    metric, mode = sweep.get("metric", "val_loss"), sweep.get("mode", "min")
    scored = [t for t in trials if t["status"] == "finished" and isinstance(t.get(metric), (int, float))
              and math.isfinite(t[metric])]
    best = (min if mode == "min" else max)(scored, key=lambda t: t[metric]) if scored else None
    counts = {state: sum(t["status"] == state for t in trials) for state in TRIAL_STATES}
    objectives = sweep.get("objectives") or [{"metric": metric, "mode": mode}]
    return {"trials": trials, "best": best, "counts": counts, "pareto": pareto(trials, objectives)}


def pareto(trials: list[dict[str, Any]], objectives: list[dict[str, str]]) -> list[str]:
    """The finished trials no other finished trial beats on every objective (ids, best first)."""
    sign = [(o["metric"], 1.0 if o.get("mode", "min") == "min" else -1.0) for o in objectives]
    pts = [(t["trial_id"], [s * float(t[m]) for m, s in sign]) for t in trials if t["status"] == "finished"
           and all(isinstance(t.get(m), (int, float)) and math.isfinite(t[m]) for m, _ in sign)]
    front = [(i, p) for i, p in pts if not any(all(a <= b for a, b in zip(q, p, strict=True)) and q != p
                                               for _, q in pts)]
    return [i for i, _ in sorted(front, key=lambda x: x[1])]
