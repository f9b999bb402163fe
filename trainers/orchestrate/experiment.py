"""`dtlab run`: the whole experiment in one command: train (or sweep) as the spec says, then report."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtlab.analysis.rundir import reached_last_step
from dtlab.trainers.monitor.progress import RESULT
from dtlab.trainers.spec import Spec, SpecError, dump_spec

if TYPE_CHECKING:
    from dtlab.analysis.report import Report
    from dtlab.trainers.monitor.tracking import Tracking

log = logging.getLogger(__name__)

MARKER = "experiment.json"


def run_experiment(spec: Spec, out: str | Path | None, resume: bool = False, force: bool = False,
                   use_ray: bool | None = None, source: str = "spec") -> dict[str, Any]:
    """Train every variant x seed of `spec` (or sweep, when it has a sweep section) into `out`, then
    write the report there. Everything that can be refused is refused before the first write."""
    from dtlab.trainers.monitor.tracking import Tracking

    out = Path(out or f"runs/{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    tracking = Tracking(out)
    report, summary = None, None
    try:
        if spec.sweep is not None:
            from dtlab.trainers.orchestrate.sweep import run_sweep

            summary = run_sweep(spec, out, resume=resume, force=force, source=source, tracking=tracking)
        else:
            train_all(spec, out, resume, force, use_ray, source, tracking)
        report = _report(out)
    finally:
        tracking.close(report.html if report is not None else None)
    log.info("\n" + report.table_text(), extra=RESULT)
    log.info(f"report: {report.html.resolve()}", extra=RESULT)
    return {"out": str(out), "report": str(report.html), "charts": report.charts, "problems": report.problems,
            "sweep": summary}


def check_experiment_dir(out: Path, resume: bool, force: bool) -> None:
    from dtlab.trainers.orchestrate.runner import check_out

    if resume and force:
        raise SpecError("--resume and --force contradict each other: resume keeps the runs, force sets them aside")
    check_out(out, "experiment")
    ours = (out / MARKER).is_file()
    if out.is_dir() and any(out.iterdir()) and not ours:
        raise SpecError(f"--out {out}: holds something that is not a dtlab experiment (a single run, or your "
                        "own files); choose an empty or new directory (nothing there is overwritten)")
    if ours and not (resume or force):
        raise SpecError(f"{out} already holds an experiment: pass --resume to continue it or --force to set it aside")
    if resume and not ours:
        raise SpecError(f"--resume: {out} holds no experiment to continue")


def train_all(spec: Spec, out: Path, resume: bool, force: bool, use_ray: bool | None, source: str,
              tracking: Tracking | None = None) -> None:
    from dtlab.trainers.monitor.progress import current
    from dtlab.trainers.monitor.tracking import check_tracking
    from dtlab.trainers.orchestrate.runner import (
        RunFailed,
        check_fit,
        check_resources,
        holds_run,
        prepare_run_dir,
        run_training,
    )
    from dtlab.trainers.run.data import prepare_data
    from dtlab.trainers.tools.sample import ensure_samples

    plan = [(v, s) for v in spec.variant_list() for s in spec.seed_list()]
    specs = {(v, s): spec.for_run(v, s) for v, s in plan}
    check_experiment_dir(out, resume, force)  # what needs no data first
    check_tracking(spec)
    for sub in specs.values():
        check_resources(sub, sub.resources.use_ray if use_ray is None else use_ray)
    for sub in specs.values():  # every run's input is checked before the first one starts
        check_fit(sub, prepare_data(sub.data), sub.resources.num_workers)
    if spec.eval is not None:  # task names too, before any training
        from dtlab.trainers.tools.downstream import check_tasks

        check_tasks(spec.eval.tasks, spec.eval.routing)
    if force and (out / MARKER).is_file():
        prepare_run_dir(out, False, True)
    out.mkdir(parents=True, exist_ok=True)
    current().capture(out)  # what the libraries print goes to out/output.log
    if resume and (out / "spec.yaml").read_text() != dump_spec(spec):  # the experiment's own spec stays
        (out / f"spec.resumed-{time.strftime('%Y%m%d-%H%M%S')}.yaml").write_text(dump_spec(spec))
    if not resume:
        (out / "spec.yaml").write_text(dump_spec(spec))
        (out / MARKER).write_text(json.dumps({"name": spec.name, "runs": [f"{v}-seed{s}" for v, s in plan],
                                              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
    for (variant, seed), sub in specs.items():
        run_dir = out / f"{variant}-seed{seed}"
        if holds_run(run_dir) and reached_last_step(run_dir):
            log.info(f"{run_dir.name}: finished earlier, kept")
            ensure_samples(run_dir)  # a run finished by an older dtlab has none yet
        else:
            try:
                run_training(sub, run_dir, resume=holds_run(run_dir), use_ray=use_ray, tracking=tracking)
            except RunFailed as err:  # the experiment resumes as a whole
                raise RunFailed(f"{run_dir.name}: {str(err).split('; continue with')[0]}; continue with: dtlab "
                                f"run {source} --out {out} --resume") from err
        if spec.eval is not None:
            downstream(run_dir, sub)


def downstream(run_dir: Path, spec: Spec) -> None:
    """The spec's `eval:` tasks on a trained run, in causal routing. Kept when already scored on the
    same checkpoint step with the same limit (a resumed experiment does not score them again)."""
    from dtlab.analysis.rundir import read_jsonl
    from dtlab.trainers.run.device import detect_device
    from dtlab.trainers.tools.downstream import RECORDS, evaluate_run
    from dtlab.trainers.tools.sample import best_step

    cfg, step = spec.eval, best_step(run_dir)
    done = {r.get("task") for r in read_jsonl(run_dir / RECORDS).records
            if r.get("step") == step and r.get("limit") == cfg.limit}
    todo = [t for t in cfg.tasks if t not in done]
    if todo:
        rows = evaluate_run(run_dir, todo, limit=cfg.limit, batch_size=cfg.batch_size,
                            device=detect_device(spec.resources.device))
        scores = [f"{r['task']} {r['metric']} {'n/a' if r['value'] is None else format(r['value'], '.4f')}"
                  for r in rows]
        log.info(f"{run_dir.name}: downstream (lm-eval, causal routing): {'; '.join(scores)}")


def _report(out: Path) -> Report:
    """The experiment's report: `report.html`, or, where a file of that name is not dtlab's own (or
    was changed since), beside it under a new name, so that nothing is overwritten after a long run."""
    from dtlab.analysis.report import ReportError, check_report_targets, write_report

    target = out / "report.html"
    try:
        check_report_targets(target)
    except ReportError:
        target = out / f"report-{time.strftime('%Y%m%d-%H%M%S')}.html"
        log.info(f"{out / 'report.html'} is not dtlab's own (or was changed): writing {target.name} beside it")
    return write_report([out], target)
