"""`dtlab isoflop`: an isoFLOP study in one command.

For each compute budget (training FLOPs), every size of a model family x variant x seed is trained
to exactly that budget: its steps are set so that FLOPs per token (`models.flops.flops_per_token`,
as the training loop counts them) x tokens equals the budget within one step and within 1%, and its
learning-rate schedule spans exactly those steps. No early stopping. The runs go out as the cluster
holds them (`experiment.train_runs`), resumable like `dtlab run`; then the report.

The study's directory (what `analysis` reads):

    OUT/isoflop.json   budgets, sizes (name and shape), variants, seeds, and one entry per run:
                       {dir: runs/NAME, variant, size, budget, seed, steps, planned_flops}
    OUT/runs/NAME/     an ordinary run directory (NAME = VARIANT-SIZE-C<budget>-seedS)
    OUT/spec.yaml, OUT/report.html
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtlab.analysis.rundir import write_atomic
from dtlab.trainers.spec import ISOFLOP_SHAPE_KEYS, IsoflopSize, Spec, SpecError, dump_spec, spec_from_dict

if TYPE_CHECKING:
    from dtlab.trainers.monitor.tracking import Tracking

log = logging.getLogger(__name__)

INDEX = "isoflop.json"  # the study's plan, and the mark of a directory that holds one
MIN_STEPS = 100  # fewer, and a run's schedule is mostly warm-up (and one step is more than 1% of it)
TOLERANCE = 0.01  # planned FLOPs within 1% of the budget


@dataclass(frozen=True)
class PlannedRun:
    name: str
    variant: str
    size: str
    budget: float
    seed: int
    steps: int
    flops_per_token: float
    tokens_per_step: int
    spec: Spec

    @property
    def planned_flops(self) -> float:
        return self.steps * self.tokens_per_step * self.flops_per_token

    def entry(self) -> dict[str, Any]:
        return {"dir": f"runs/{self.name}", "variant": self.variant, "size": self.size, "budget": self.budget,
                "seed": self.seed, "steps": self.steps, "planned_flops": self.planned_flops,
                "flops_per_token": self.flops_per_token, "tokens_per_step": self.tokens_per_step}


def budget_label(budget: float) -> str:
    """1e+15 -> 1e15, 3.2e+12 -> 3.2e12 (part of a run's name)."""
    return f"{budget:g}".replace("+", "")


def size_shape(spec: Spec, size: IsoflopSize) -> dict[str, int]:
    """The shape (ISOFLOP_SHAPE_KEYS) of a size of the family, resolved from its preset."""
    from dtlab.models.config import make_config

    config = make_config("standard", size.size or spec.model.size, **size.overrides)
    return {key: int(getattr(config, key)) for key in ISOFLOP_SHAPE_KEYS}


def run_spec(spec: Spec, variant: str, size: IsoflopSize, seed: int, steps: int) -> Spec:
    """One run's spec: the variant at the size's shape, the seed, `steps` steps with the schedule's
    warm-up at most a tenth of them."""
    from dtlab.trainers.spec import model_section_for

    raw = spec.model_dump(mode="json", exclude={"sweep", "isoflop"})
    raw.update(seed=seed, variants=None, seeds=None)
    raw["model"] = {**model_section_for(raw["model"], variant), "size": size.size or spec.model.size,
                    **size.overrides}
    raw["training"]["max_steps"] = steps
    scheduler = raw["training"].setdefault("scheduler", {})
    scheduler["warmup_steps"] = min(spec.training.scheduler.warmup_steps, steps // 10)
    return spec_from_dict(raw, f"{spec.name} ({variant}, {size.name}, seed {seed})")


def step_cost(spec: Spec, vocab_size: int, seq_len: int) -> tuple[float, int]:
    """(training FLOPs per token, tokens per step) of a run's spec, as the loop counts them
    (`loop.run_info`): the model `build_for_training` builds (the vocabulary the data's unless the
    spec sets it), `flops_per_token(config, seq_len)`, batch x accumulation x workers x seq_len."""
    from dtlab.models.config import make_config
    from dtlab.models.flops import flops_per_token

    overrides = spec.model.overrides_for(spec.model.type)
    overrides.setdefault("vocab_size", vocab_size)
    config = make_config(spec.model.type, spec.model.size, **overrides)
    training = spec.training
    tokens = training.batch_size * training.grad_accum_steps * spec.resources.num_workers * seq_len
    return flops_per_token(config, seq_len), tokens


def plan_isoflop(spec: Spec, vocab_size: int, seq_len: int, source: str = "spec") -> list[PlannedRun]:
    """Every run of the study with its steps; a budget that some size cannot meet within 1% in at
    least MIN_STEPS steps is refused, naming the budget, the size and what would do."""
    if spec.isoflop is None:
        raise SpecError(f"{source}: no isoflop: section (budgets, sizes) to plan")
    runs, short, costliest = [], {}, 0.0
    for budget in spec.isoflop.budgets:
        for size in spec.isoflop.sizes:
            for variant in spec.variant_list():
                fpt, tokens = step_cost(run_spec(spec, variant, size, spec.seed_list()[0], 1), vocab_size, seq_len)
                per_step = fpt * tokens
                costliest = max(costliest, per_step)
                steps = round(budget / per_step)
                if steps < MIN_STEPS or abs(steps * per_step - budget) > TOLERANCE * budget:
                    short.setdefault(budget, []).append(f"{variant} at {size.name}: {budget / per_step:,.1f} steps "
                                                        f"of {per_step:.3g} FLOPs")
                    continue
                for seed in spec.seed_list():
                    name = f"{variant}-{size.name}-C{budget_label(budget)}-seed{seed}"
                    runs.append(PlannedRun(name, variant, size.name, float(budget), seed, steps, fpt, tokens,
                                           run_spec(spec, variant, size, seed, steps)))
    if short:
        pairs = len(spec.isoflop.sizes) * len(spec.variant_list())
        said = "; ".join(f"{budget:g} FLOPs is fewer than {MIN_STEPS} steps for {len(runs_)} of the {pairs} sizes "
                         f"x variants ({', '.join(runs_[:3])}{', ...' if len(runs_) > 3 else ''})"
                         for budget, runs_ in short.items())
        raise SpecError(f"{source}: isoflop.budgets: {said}. Each run needs at least {MIN_STEPS} steps to meet its "
                        f"budget within 1% with a schedule worth the name: the smallest budget every size and "
                        f"variant meets is {MIN_STEPS * costliest:.3g} FLOPs; raise the budget, or make the step "
                        "smaller (training.batch_size, data.block_size) or the largest size smaller")
    names = [r.name for r in runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SpecError(f"{source}: isoflop.budgets: two budgets give one run name ({twice[0]}); make them differ "
                        "in their first six digits")
    return runs


def index(spec: Spec, runs: list[PlannedRun]) -> dict[str, Any]:
    """What `isoflop.json` holds."""
    assert spec.isoflop is not None
    return {"name": spec.name, "budgets": [float(b) for b in spec.isoflop.budgets],
            "sizes": [{"name": s.name, "preset": s.size or spec.model.size, "overrides": size_shape(spec, s)}
                      for s in spec.isoflop.sizes],
            "variants": spec.variant_list(), "seeds": spec.seed_list(),
            "runs": [r.entry() for r in runs]}


def check_isoflop_dir(out: Path, resume: bool, force: bool, runs: list[PlannedRun] | None = None) -> None:
    """`--out`, `--resume` and `--force` against what is there; on --resume, a run already there keeps
    its steps (its schedule was made for them)."""
    from dtlab.trainers.orchestrate.runner import check_out

    if resume and force:
        raise SpecError("--resume and --force contradict each other: resume keeps the runs, force sets them aside")
    check_out(out, "isoFLOP study")
    ours = (out / INDEX).is_file()
    if out.is_dir() and any(out.iterdir()) and not ours:
        raise SpecError(f"--out {out}: holds something that is not a dtlab isoFLOP study; choose an empty or new "
                        "directory (nothing there is overwritten)")
    if ours and not (resume or force):
        raise SpecError(f"{out} already holds an isoFLOP study: pass --resume to continue it or --force to set it "
                        "aside")
    if resume and not ours:
        raise SpecError(f"--resume: {out} holds no isoFLOP study to continue")
    if resume and runs is not None:
        try:
            before = {r["dir"]: r for r in json.loads((out / INDEX).read_text())["runs"]}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SpecError(f"--resume: {out / INDEX} is not readable ({type(err).__name__}); the study cannot "
                            "continue (--force sets it aside)") from None
        for run in runs:
            old = before.get(f"runs/{run.name}")
            if old is not None and old.get("steps") != run.steps:
                raise SpecError(f"--resume: runs/{run.name} was planned for {old.get('steps')} steps, now "
                                f"{run.steps} (the spec's training or data changed); resume it with the spec it "
                                "was started with, or --force")


def run_isoflop(spec: Spec, out: str | Path | None, resume: bool = False, force: bool = False,
                use_ray: bool | None = None, source: str = "spec") -> dict[str, Any]:
    """Plan, check and train the study, then write the report. Everything that can be refused is
    refused before the first write."""
    from dtlab.trainers.orchestrate.experiment import train_and_report

    if spec.isoflop is None:
        raise SpecError(f"{source}: no isoflop: section; an isoFLOP study needs isoflop.budgets and isoflop.sizes "
                        "(see experiments/isoflop_smoke.yaml)")
    out = Path(out or f"runs/isoflop-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    report, _ = train_and_report(out, lambda tracking: train_study(spec, out, resume, force, use_ray, source,
                                                                   tracking))
    return {"out": str(out), "report": str(report.html), "charts": report.charts, "problems": report.problems}


def train_study(spec: Spec, out: Path, resume: bool, force: bool, use_ray: bool | None, source: str,
                tracking: Tracking | None = None) -> list[PlannedRun]:
    from dtlab.trainers.monitor.progress import current
    from dtlab.trainers.monitor.tracking import check_tracking
    from dtlab.trainers.orchestrate.experiment import check_runs, raise_failed, train_runs
    from dtlab.trainers.orchestrate.runner import prepare_run_dir
    from dtlab.trainers.run.data import prepare_data

    check_isoflop_dir(out, resume, force)  # what needs no data first
    check_tracking(spec)
    data = prepare_data(spec.data)
    runs = plan_isoflop(spec, data.vocab_size, int(data.train.shape[1]), source)
    check_isoflop_dir(out, resume, force, runs)
    planned = {out / "runs" / r.name: r.spec for r in runs}
    check_runs(planned, resume, use_ray)
    if force and (out / INDEX).is_file():
        prepare_run_dir(out, False, True)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    current().capture(out)  # what the libraries print goes to out/output.log
    if resume and (out / "spec.yaml").read_text() != dump_spec(spec):
        (out / f"spec.resumed-{time.strftime('%Y%m%d-%H%M%S')}.yaml").write_text(dump_spec(spec))
    if not resume:
        (out / "spec.yaml").write_text(dump_spec(spec))
    write_atomic(out / INDEX, json.dumps({**index(spec, runs), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                                         indent=1))
    sizes = len(spec.isoflop.sizes) if spec.isoflop else 0
    log.info(f"isoFLOP study: {len(runs)} runs ({len(spec.isoflop.budgets) if spec.isoflop else 0} budgets x "
             f"{sizes} sizes x {len(spec.variant_list())} variants x {len(spec.seed_list())} seeds), "
             f"{sum(r.planned_flops for r in runs):.3g} training FLOPs in all")
    failed = train_runs(planned, use_ray, tracking)
    raise_failed(failed, len(runs), f"dtlab isoflop {source} --out {out} --resume")
    return runs
