"""Faults: a kill -9 in the middle of a checkpoint save, a full disk. Each ends with a resume whose
records and final loss equal those of a run that was never interrupted."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dtlab.trainers.cli.main import main
from tests.records import records
from tests.trainers.conftest import tiny_spec

VOLATILE = ("tokens_per_s", "peak_rss_gib", "peak_mem_gib")


def train(spec: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dtlab.trainers.cli", "train", str(spec), "--out", str(out), "--no-ray", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Saves at steps 0, 2, 4, 6, 8: the faults below strike the third (step 4)."""
    folder = tmp_path_factory.mktemp("faults")
    spec = folder / "tiny.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(training={"max_steps": 8, "eval_every": 2, "log_every": 2})))
    proc = train(spec, folder / "full")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return spec, records(folder / "full", drop=VOLATILE)


@pytest.mark.parametrize("point", ["checkpoint-written:3", "checkpoint-best:3", "checkpoint-last:3"])
def test_kill_during_a_checkpoint_save_then_resume(uninterrupted, tmp_path, point):
    spec, full = uninterrupted
    run = tmp_path / "cut"
    proc = train(spec, run, env={"DTLAB_FAULT": point})
    assert proc.returncode == -9, f"the fault did not strike: {proc.returncode} {proc.stderr[-1000:]}"
    ckpt = run / "checkpoints"
    steps = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step-"))
    # precondition: killed after step 4's directory was complete, before (or just after) `last` moved to it
    assert "step-0000004" in steps, steps
    moved = {"checkpoint-written:3": (), "checkpoint-best:3": ("best",), "checkpoint-last:3": ("best", "last")}[point]
    for link in ("best", "last"):  # the losses fall at every evaluation here: each checkpoint is the best
        assert os.readlink(ckpt / link) == ("step-0000004" if link in moved else "step-0000002"), link
    # the step-4 training record is there; its eval record is not
    assert max(r["step"] for r in records(run, drop=VOLATILE)) == 4
    proc = train(spec, run, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert records(run, drop=VOLATILE) == full
    best = min((r for r in full if r["kind"] == "eval"), key=lambda r: r["val_loss"])["step"]
    assert json.loads((ckpt / "best" / "trainer_state.json").read_text())["step"] == best
    assert json.loads((ckpt / "last" / "trainer_state.json").read_text())["step"] == 8
    assert not [p.name for p in ckpt.iterdir() if p.name.startswith(".")]  # nothing half-written is left


def test_disk_full_during_a_checkpoint_then_resume(uninterrupted, tmp_path, monkeypatch, capsys):
    """An injected ENOSPC (no small filesystem to fill here): one line that says to resume, exit 1,
    and the old checkpoint intact."""
    import safetensors.torch

    spec, full = uninterrupted
    real, calls = safetensors.torch.save_file, []

    def full_disk(tensors, filename, *args, **kwargs):  # once, at the third checkpoint (step 4)
        calls.append(str(filename))
        if str(filename).endswith("optimizer.safetensors") and len([f for f in calls if "optimizer" in f]) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    assert main(["train", str(spec), "--out", str(tmp_path / "run"), "--no-ray"]) == 1
    err = capsys.readouterr().err.strip().splitlines()  # the run's progress, then the error in one line
    assert err[0].startswith("run: started") and err[1].startswith("run: failed at step 4/8"), err
    assert len(err) == 3 and "No space left on device" in err[2] and "--resume" in err[2], err
    assert os.readlink(tmp_path / "run" / "checkpoints" / "last") == "step-0000002"  # the old one, intact
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert main(["train", str(spec), "--out", str(tmp_path / "run"), "--no-ray", "--resume"]) == 0
    assert records(tmp_path / "run", drop=VOLATILE) == full
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_resume_from_the_step_0_checkpoint_does_not_evaluate_step_0_twice(uninterrupted, tmp_path):
    spec, full = uninterrupted
    proc = train(spec, tmp_path / "run", env={"DTLAB_FAULT": "checkpoint-written:2"})  # dies saving step 2
    assert proc.returncode == -9 and os.readlink(tmp_path / "run" / "checkpoints" / "last") == "step-0000000"
    proc = train(spec, tmp_path / "run", "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    evals = [r["step"] for r in records(tmp_path / "run", drop=VOLATILE) if r["kind"] == "eval"]
    assert evals == [0, 2, 4, 6, 8] and records(tmp_path / "run", drop=VOLATILE) == full
