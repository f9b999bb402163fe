"""`dtlab run`: the whole experiment in one command: train (or sweep) as the spec says, then report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .records import finished
from .spec import Spec, SpecError, dump_spec

MARKER = "experiment.json"


def run_experiment(spec: Spec, out: str | Path | None, resume: bool = False, force: bool = False,
                   use_ray: bool | None = None, source: str = "spec", log=print) -> dict[str, Any]:
    from dtlab.analysis.report import check_report_targets, write_report

    from .data import prepare_data
    from .runner import check_fit, holds_run, prepare_run_dir

    out = Path(out or f"runs/{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if spec.sweep is not None:
        from .sweep import run_sweep

        run_sweep(spec, out, resume=resume, force=force, source=source, log=log)
    else:
        plan = [(v, s) for v in spec.variant_list() for s in spec.seed_list()]
        specs = {(v, s): spec.for_run(v, s) for v, s in plan}
        for sub in specs.values():  # every run's input is checked before the first one starts
            check_fit(sub, prepare_data(sub.data), sub.resources.num_workers)
        if out.exists() and not out.is_dir():
            raise SpecError(f"--out {out}: is a file, not an experiment directory")
        if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
            raise SpecError(f"--out {out}: holds something that is not a dtlab experiment (a single run, or your "
                            "own files); choose an empty or new directory (nothing there is overwritten)")
        check_report_targets(out / "report.html")  # before training, not after it
        if out.exists() and (out / MARKER).is_file():
            if not (resume or force):
                raise SpecError(f"{out} already holds an experiment: pass --resume to continue it or --force to "
                                "set it aside")
            if force:
                prepare_run_dir(out, False, True, log)
        elif resume:
            raise SpecError(f"--resume: {out} holds no experiment to continue")
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec.yaml").write_text(dump_spec(spec))
        (out / MARKER).write_text(json.dumps({"name": spec.name, "runs": [f"{v}-seed{s}" for v, s in plan],
                                              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
        from .runner import run_training

        for (variant, seed), sub in specs.items():
            run_dir = out / f"{variant}-seed{seed}"
            if holds_run(run_dir) and finished(run_dir):
                log(f"{run_dir.name}: finished earlier, kept")
                continue
            log(f"== {variant}, seed {seed} -> {run_dir}")
            run_training(sub, run_dir, resume=holds_run(run_dir), use_ray=use_ray, log=log)
    report = write_report([out], out / "report.html")
    log(f"report: {report.html.resolve()}")
    return {"out": str(out), "report": str(report.html), "charts": report.charts, "problems": report.problems}
