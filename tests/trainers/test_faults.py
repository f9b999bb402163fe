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
    """Saves at steps 2, 4, 6, 8 (the untrained step 0 is evaluated, not saved): the faults below
    strike the second save (step 4)."""
    folder = tmp_path_factory.mktemp("faults")
    spec = folder / "tiny.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(training={"max_steps": 8, "eval_every": 2, "log_every": 2})))
    proc = train(spec, folder / "full")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return spec, records(folder / "full", drop=VOLATILE)


@pytest.mark.parametrize("point", ["checkpoint-written:2", "checkpoint-best:2", "checkpoint-last:2"])
def test_kill_during_a_checkpoint_save_then_resume(uninterrupted, tmp_path, point):
    spec, full = uninterrupted
    run = tmp_path / "cut"
    proc = train(spec, run, env={"DTLAB_FAULT": point})
    assert proc.returncode == -9, f"the fault did not strike: {proc.returncode} {proc.stderr[-1000:]}"
    ckpt = run / "checkpoints"
    steps = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step-"))
    # precondition: killed after step 4's directory was complete, before (or just after) `last` moved to it
    assert "step-0000004" in steps, steps
    moved = {"checkpoint-written:2": (), "checkpoint-best:2": ("best",), "checkpoint-last:2": ("best", "last")}[point]
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

    def full_disk(tensors, filename, *args, **kwargs):  # once, at the second checkpoint (step 4)
        calls.append(str(filename))
        if str(filename).endswith("optimizer.safetensors") and len([f for f in calls if "optimizer" in f]) == 2:
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


def test_a_crash_before_the_first_checkpoint_starts_the_run_over(uninterrupted, tmp_path):
    """Killed while saving its first checkpoint (step 2): no `last`, the step-0 evaluation and the first
    training records on file. The loop started again on that directory (a restarted worker group)
    drops those records and trains from scratch: the records equal an uninterrupted run's, step 0
    evaluated once."""
    from dtlab.trainers.run.data import prepare_data
    from dtlab.trainers.run.loop import train as train_loop
    from dtlab.trainers.spec import load_spec

    spec, full = uninterrupted
    run = tmp_path / "run"
    proc = train(spec, run, env={"DTLAB_FAULT": "checkpoint-written:1"})  # dies saving step 2
    assert proc.returncode == -9, f"the fault did not strike: {proc.returncode} {proc.stderr[-1000:]}"
    assert not (run / "checkpoints" / "last").is_symlink()
    assert [r["step"] for r in records(run, "eval")] == [0]  # precondition: records before any checkpoint
    loaded = load_spec(run / "spec.yaml")  # as the run was started
    train_loop({"spec": loaded.model_dump(mode="json"), "run_dir": str(run),
                "data_dir": str(prepare_data(loaded.data).path)})
    evals = [r["step"] for r in records(run, drop=VOLATILE) if r["kind"] == "eval"]
    assert evals == [0, 2, 4, 6, 8] and records(run, drop=VOLATILE) == full


def test_which_failures_are_retried():
    """Divergence, out of memory and a refused input end a run at once, on whichever worker they
    happen (Ray Train's `WorkerGroupError` holds each rank's error); a killed worker, a lost node or
    a broken collective is transient and retried."""
    import torch
    from ray.train import ControllerError, WorkerGroupError

    from dtlab.trainers.orchestrate.runner import OOM, REFUSED, failure_kind
    from dtlab.trainers.run.loop import Diverged
    from dtlab.trainers.spec import SpecError

    def group(*errors):
        return WorkerGroupError("worker errors", dict(enumerate(errors)))

    broken = RuntimeError("[gloo] Connection closed by peer")  # what the surviving rank of a killed one raises
    assert failure_kind(group(Diverged("diverged at step 3: loss nan"))) == "diverged"
    assert failure_kind(group(broken, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))) == OOM
    assert failure_kind(group(SpecError("data: ..."))) == REFUSED
    wrapped = RuntimeError("wrapper")
    wrapped.__cause__ = ValueError("block_size too large")
    assert failure_kind(group(wrapped)) == REFUSED
    assert failure_kind(group(broken)) is None
    assert failure_kind(ControllerError(RuntimeError("The actor died unexpectedly"))) is None
    assert failure_kind(group(broken, RuntimeError("ActorDiedError: the worker's process was killed"))) is None
    try:  # a transient failure raised while a ValueError was being handled is still transient
        try:
            raise ValueError("a value the code handled")
        except ValueError:
            raise RuntimeError("[gloo] Connection reset by peer")  # noqa: B904 (the implicit context is the point)
    except RuntimeError as during:
        assert during.__context__ is not None and isinstance(during.__context__, ValueError)  # the precondition
        assert failure_kind(group(during)) is None
