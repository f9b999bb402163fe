"""`dtlab run`: the whole experiment in one command: train (or sweep) as the spec says, then report."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtlab.analysis.rundir import diverged_reason, reached_last_step
from dtlab.trainers.monitor.progress import RESULT
from dtlab.trainers.spec import Spec, SpecError, dump_spec

if TYPE_CHECKING:
    from dtlab.analysis.report import Report
    from dtlab.trainers.monitor.tracking import Tracking

log = logging.getLogger(__name__)

MARKER = "experiment.json"
INTERRUPT_WAIT_S = 30.0  # how long an interrupted `dtlab run` waits for its runs in flight to record it


def run_experiment(spec: Spec, out: str | Path | None, resume: bool = False, force: bool = False,
                   use_ray: bool | None = None, source: str = "spec") -> dict[str, Any]:
    """Train every variant x seed of `spec` (or sweep, when it has a sweep section) into `out`, then
    write the report there. Everything that can be refused is refused before the first write."""
    if spec.isoflop is not None:
        raise SpecError(f"{source}: has an isoflop: section; an isoFLOP study runs with dtlab isoflop {source}")
    out = Path(out or f"runs/{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")

    def train(tracking: Tracking) -> dict[str, Any] | None:
        if spec.sweep is not None:
            from dtlab.trainers.orchestrate.sweep import run_sweep

            return run_sweep(spec, out, resume=resume, force=force, source=source, tracking=tracking)
        train_all(spec, out, resume, force, use_ray, source, tracking)
        return None

    report, summary = train_and_report(out, train)
    return {"out": str(out), "report": str(report.html), "charts": report.charts, "problems": report.problems,
            "sweep": summary}


def train_and_report(out: Path, train: Callable[[Tracking], Any]) -> tuple[Report, Any]:
    """`train(tracking)` into `out`, then the report there: the tail that `dtlab run` and `dtlab isoflop`
    share. The tracker is closed (pointing at the report when there is one) whatever happens."""
    from dtlab.trainers.monitor.tracking import Tracking

    tracking = Tracking(out)
    report = None
    try:
        result = train(tracking)
        report = _report(out)
    finally:
        tracking.close(report.html if report is not None else None)
    log.info("\n" + report.table_text(), extra=RESULT)
    log.info(f"report: {report.html.resolve()}", extra=RESULT)
    return report, result


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
    from dtlab.trainers.orchestrate.runner import prepare_run_dir

    plan = [(v, s) for v in spec.variant_list() for s in spec.seed_list()]
    runs = {out / f"{v}-seed{s}": spec.for_run(v, s) for v, s in plan}
    check_experiment_dir(out, resume, force)  # what needs no data first
    check_tracking(spec)
    check_runs(runs, resume, use_ray)
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
    failed = train_runs(runs, use_ray, tracking)
    if spec.eval is not None:  # in turn, once the runs have trained (each loads a model in this process)
        for run_dir, sub in runs.items():
            if run_dir.name not in failed and not diverged_reason(run_dir):
                downstream(run_dir, sub)
    raise_failed(failed, len(runs), f"dtlab run {source} --out {out} --resume")


def use_ray_for(spec: Spec, use_ray: bool | None) -> bool:
    return spec.resources.use_ray if use_ray is None else use_ray


def check_runs(runs: dict[Path, Spec], resume: bool, use_ray: bool | None) -> None:
    """Every run's input, checked before the first one starts: resources, data against model (the
    data prepared once, in the cache), and on --resume that each unfinished run can continue."""
    from dtlab.trainers.orchestrate.runner import check_fit, check_resources, check_run_dir, holds_run
    from dtlab.trainers.run.data import prepare_data

    for sub in runs.values():
        check_resources(sub, use_ray_for(sub, use_ray))
    for sub in runs.values():
        check_fit(sub, prepare_data(sub.data), sub.resources.num_workers)
    for run_dir, sub in runs.items():
        if resume and holds_run(run_dir) and not (reached_last_step(run_dir) or diverged_reason(run_dir)):
            check_run_dir(run_dir, True, False, sub)


def concurrent_runs(specs: list[Spec], use_ray: bool | None) -> int:
    """How many of these runs train at the same time: as many as the Ray cluster's nodes hold their
    workers at once (each worker `cpus_per_worker` CPUs and, where the cluster has GPUs, a GPU or
    `gpus_per_worker`), the rest waiting for a run to end. One at a time without Ray, and on a single
    machine without GPUs (its cores are all one run's: two runs would only share them)."""
    if len(specs) < 2 or not all(use_ray_for(s, use_ray) for s in specs):
        return 1
    import ray

    from dtlab.trainers.orchestrate.ray_train import init_ray

    if not ray.is_initialized():
        init_ray()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    fit = len(specs)
    for spec in specs:
        res = spec.resources
        gpw = ((res.gpus_per_worker if res.gpus_per_worker is not None else 1.0)
               if res.device in ("auto", "cuda") and gpus > 0 else 0.0)
        if len(nodes) < 2 and not gpw:
            return 1

        def workers(node: dict[str, float], cpw: float = res.cpus_per_worker, gpw: float = gpw) -> int:
            n = math.floor(node.get("CPU", 0.0) / cpw + 1e-9)
            return min(n, math.floor(node.get("GPU", 0.0) / gpw + 1e-9)) if gpw else n

        fit = min(fit, sum(workers(n) for n in nodes) // res.num_workers)
    return max(1, fit)


def train_runs(runs: dict[Path, Spec], use_ray: bool | None, tracking: Tracking | None = None
               ) -> dict[str, BaseException]:
    """Train each run that has not finished (a run that reached its last step, or diverged, is kept as
    it is; one that stopped part way continues from its last checkpoint), as many at a time as
    `concurrent_runs` says (each in a thread of this process that drives its own Ray Train run; the
    others wait for a free place). A run that fails does not stop the others: returns the failed
    runs' errors by run name. An interrupt stops them all (`in_threads`)."""
    from dtlab.trainers.orchestrate.runner import holds_run, run_training

    todo = unfinished(runs)
    failed: dict[str, BaseException] = {}

    def train(run_dir: Path, sub: Spec) -> None:
        try:
            run_training(sub, run_dir, resume=holds_run(run_dir), use_ray=use_ray, tracking=tracking)
        except Exception as err:  # the others go on; said once they are done
            failed[run_dir.name] = err
            log.info(f"{run_dir.name}: {' '.join(str(err).split())[:300]}")

    slots = concurrent_runs([sub for _, sub in todo], use_ray)
    if slots == 1:  # one after another, in this thread
        for run_dir, sub in todo:
            train(run_dir, sub)
    else:
        log.info(f"{len(todo)} runs, up to {slots} at a time (as the cluster's resources hold them)")
        in_threads(todo, slots, train)
    return failed


def unfinished(runs: dict[Path, Spec]) -> list[tuple[Path, Spec]]:
    """The runs still to train; those that reached their last step or diverged are kept as they are."""
    from dtlab.trainers.orchestrate.runner import holds_run
    from dtlab.trainers.tools.sample import ensure_samples

    todo = []
    for run_dir, sub in runs.items():
        if holds_run(run_dir) and reached_last_step(run_dir):
            log.info(f"{run_dir.name}: finished earlier, kept")
            ensure_samples(run_dir)  # a run finished by an older dtlab has none yet
        elif holds_run(run_dir) and diverged_reason(run_dir):
            log.info(f"{run_dir.name}: diverged earlier ({diverged_reason(run_dir)}), kept as it is "
                     "(--force starts the experiment afresh)")
        else:
            todo.append((run_dir, sub))
    return todo


def in_threads(todo: list[tuple[Path, Spec]], slots: int, train: Callable[[Path, Spec], None]) -> None:
    """`train` each run in a thread of its own, `slots` at a time. An interrupt (Ctrl-C) stops them all:
    the runs in flight record it as theirs ("interrupted", which --resume continues; `INTERRUPTED`),
    and this waits up to INTERRUPT_WAIT_S for them to say so before it raises."""
    from dtlab.trainers.orchestrate.runner import INTERRUPTED

    free = threading.Semaphore(slots)

    def in_turn(run_dir: Path, sub: Spec, done: threading.Event) -> None:
        try:
            train(run_dir, sub)
        finally:
            free.release()
            done.set()

    # Waits go through each run's own event, not Thread.join: a join that an interrupt cuts short can
    # leave the thread marked as ended while it still runs (CPython 3.11's _wait_for_tstate_lock).
    started: list[tuple[threading.Thread, threading.Event]] = []
    try:
        for run_dir, sub in todo:
            while not free.acquire(timeout=0.5):  # short waits: an interrupt reaches this thread
                pass
            done = threading.Event()
            thread = threading.Thread(target=in_turn, args=(run_dir, sub, done), name=f"dtlab-{run_dir.name}",
                                      daemon=True)
            started.append((thread, done))  # before it starts: an interrupt from here on waits for it too
            thread.start()
        for _, done in started:
            while not done.wait(0.5):
                pass
    except KeyboardInterrupt:  # the runs in flight end as interrupted, and say so, before this one does
        INTERRUPTED.set()
        deadline = time.monotonic() + INTERRUPT_WAIT_S
        for thread, done in started:
            if thread.ident is not None:  # it started
                done.wait(max(0.0, deadline - time.monotonic()))
        raise
    finally:
        INTERRUPTED.clear()


def raise_failed(failed: dict[str, BaseException], total: int, resume: str) -> None:
    """Once every run has ended: the runs that failed, said together (bad input found only once a run
    started stays bad input), with how to continue."""
    from dtlab.trainers.orchestrate.runner import RunFailed

    if not failed:
        return
    said = "; ".join(f"{name}: {' '.join(str(err).split()).split('; continue with')[0]}"
                     for name, err in failed.items())
    first = next(iter(failed.values()))
    if len(failed) == 1 and isinstance(first, SpecError):
        raise SpecError(said) from first
    kept = f" (the other {total - len(failed)} kept their records)" if total > len(failed) else ""
    raise RunFailed(f"{len(failed)} of {total} run(s) did not finish{kept}: {said}; continue with: {resume}") from first


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
