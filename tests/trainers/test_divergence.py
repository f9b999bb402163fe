"""A non-finite loss or gradient norm stops a run at once, says why, and is never a result."""

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from dtlab.analysis.report import write_report
from dtlab.trainers.cli.listing import listing
from dtlab.trainers.cli.main import main
from dtlab.trainers.orchestrate.runner import RunDiverged, run_training
from dtlab.trainers.spec import spec_from_dict
from tests.records import records
from tests.trainers.conftest import tiny_spec

ROOT = Path(__file__).resolve().parents[2]
EXPLODES = {"optimizer": {"lr": 1.0e6}, "scheduler": {"warmup_steps": 1}}  # AdamW steps of 1e6: NaN in 2 steps


def test_a_diverging_run_stops_within_one_logging_interval_and_stays_stopped(tmp_path):
    run = tmp_path / "run"
    spec = spec_from_dict(tiny_spec(training={"max_steps": 40, "log_every": 2, "eval_every": 10, **EXPLODES}))
    with pytest.raises(RunDiverged, match=r"run: diverged at step \d+: .*nan"):
        run_training(spec, run)
    recs = records(run)
    bad = [r for r in recs if r["kind"] == "train" and not all(
        math.isfinite(r[k]) for k in ("loss", "lm_loss", "grad_norm"))]
    assert bad, "the run never logged a non-finite value: it did not diverge"
    assert recs[-1]["kind"] == "diverged" and recs[-1]["step"] == bad[0]["step"] == recs[-2]["step"]
    assert recs[-1]["step"] <= 2 + spec.training.log_every  # NaN from step 2 on, caught at the next record
    assert json.loads((run / "diverged.json").read_text())["step"] == recs[-1]["step"]
    saved = [int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*")]
    assert all(s < recs[-1]["step"] for s in saved)  # no checkpoint of diverged weights
    assert json.loads((run / "status.json").read_text())["state"] == "diverged"
    assert [r.status for r in listing(tmp_path)] == ["diverged"]
    # --resume is refused (it would only diverge again), before anything is written
    before = (run / "metrics.jsonl").read_text()
    assert main(["train", str(_spec_file(tmp_path, spec)), "--out", str(run), "--no-ray", "--resume"]) == 2
    assert (run / "metrics.jsonl").read_text() == before


def _spec_file(tmp_path: Path, spec) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return path


def test_the_report_leaves_a_diverged_run_out_and_says_so(tmp_path):
    ok = spec_from_dict(tiny_spec(training={"max_steps": 4}))
    run_training(ok, tmp_path / "exp" / "mod-seed0")
    bad = spec_from_dict(tiny_spec(seed=1, training={"max_steps": 20, "log_every": 2, **EXPLODES}))
    with pytest.raises(RunDiverged):
        run_training(bad, tmp_path / "exp" / "mod-seed1")
    report = write_report([tmp_path / "exp"])
    assert any(p.startswith("mod-seed1: diverged at step") for p in report.problems), report.problems
    assert list(report.closing["runs"]) == [1]  # mod's mean is mod-seed0's alone
    md = report.markdown.read_text()
    assert "| mod c=0.125 | mod | causal | 1 |" in md


@pytest.mark.slow
def test_a_sweep_retries_a_killed_worker_but_never_a_diverged_trial(tmp_path):
    """resources.max_failures=2, two trials. One diverges: its worker group starts once, the trial is
    diverged (FAILED in the study) and `--resume` does not start it again. The other's worker kills
    itself (SIGKILL) at its second checkpoint (step 10): Tune starts the trial again, it continues
    from that checkpoint and finishes, each record once."""
    import optuna

    from dtlab.trainers.orchestrate.sweep import STUDY, make_searcher, plan_sweep

    raw = yaml.safe_load((ROOT / "experiments" / "sweep_smoke.yaml").read_text())
    raw["training"].update(max_steps=20, eval_every=10, log_every=10)
    raw["resources"]["max_failures"] = 2
    raw["sweep"].update(num_samples=2, asha={"enabled": False})
    raw["sweep"]["search_space"] = {"training.optimizer.lr": {"choice": [0.003, 1.0e6]}}
    for raw["seed"] in range(50):  # a seed for which TPE's first two trials take both learning rates
        searcher = make_searcher(plan_sweep(spec_from_dict(raw)))
        if {searcher.suggest(f"t{i}")["training.optimizer.lr"] for i in range(2)} == {0.003, 1.0e6}:
            break
    else:
        pytest.fail("no seed gives both learning rates")
    spec = tmp_path / "diverging.yaml"
    spec.write_text(yaml.safe_dump(raw))
    out, starts = tmp_path / "sweep", tmp_path / "starts.txt"
    env = {**os.environ, "DTLAB_WORKER_STARTS": str(starts), "DTLAB_FAULT": "checkpoint-written:2"}
    cmd = [sys.executable, "-m", "dtlab.trainers.cli", "sweep", str(spec), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    summary = json.loads((out / "summary.json").read_text())
    status = {t["trial_id"]: t["status"] for t in summary["trials"]}
    lr = {t["trial_id"]: t["params"]["training.optimizer.lr"] for t in summary["trials"]}
    assert sorted(status.values()) == ["diverged", "finished"], (status, proc.stderr[-3000:])
    assert proc.returncode == 1, proc.stderr[-3000:]
    bad, good = (next(t for t, s in status.items() if s == want) for want in ("diverged", "finished"))
    assert lr[bad] == 1.0e6 and lr[good] == 0.003
    launched = Counter(line.split()[0] for line in starts.read_text().splitlines())
    assert launched == {bad: 1, good: 2}, launched  # diverged: once; killed once: started twice
    steps = [(r["kind"], r["step"]) for r in records(out / "trials" / good)]
    assert len(steps) == len(set(steps)) and [s for k, s in steps if k == "eval"] == [0, 10, 20]
    assert "resumed from step-0000010" in (out / "output.log").read_text()
    assert "diverged at step" in next(t for t in summary["trials"] if t["trial_id"] == bad)["reason"]
    assert summary["best"]["trial_id"] == good and summary["counts"]["diverged"] == 1
    assert "trials: " in proc.stderr and "diverged" in proc.stderr.splitlines()[-1]

    proc = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]  # still a diverged trial
    assert Counter(line.split()[0] for line in starts.read_text().splitlines()) == launched  # nothing started
    again = json.loads((out / "summary.json").read_text())
    assert {t["trial_id"]: t["status"] for t in again["trials"]} == status
    study = optuna.load_study(study_name=raw["name"], storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / STUDY))))
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "FAIL"]
