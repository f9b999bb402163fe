"""Ray Train: the same loop inside a TorchTrainer, one and two CPU workers, and the CLI target."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dtlab.trainers.orchestrate.runner import run_training
from dtlab.trainers.spec import spec_from_dict
from tests.records import evals, records
from tests.trainers.conftest import tiny_spec

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


def test_two_cpu_workers(tmp_path, ray_session):
    spec = spec_from_dict(tiny_spec(model={"type": "dtf"}, training={"max_steps": 8},
                                    resources={"use_ray": True, "num_workers": 2, "storage": str(tmp_path / "store")}))
    result = run_training(spec, tmp_path / "run")
    assert result["step"] == 8 and result["val_loss"] == evals(tmp_path / "run")[-1]["val_loss"]
    facts = json.loads((tmp_path / "run" / "run.json").read_text())
    assert facts["training"]["world_size"] == 2
    assert facts["training"]["tokens_per_step"] == 2 * 4 * 64
    kept = list((tmp_path / "store" / facts["storage_name"]).glob("checkpoint_*"))
    assert 1 <= len(kept) <= 2, kept  # 3 checkpoints reported; the latest and the best kept
    assert not list((tmp_path / "run" / "ray").rglob("checkpoint_*"))  # no second copy beside the run


def test_replicates_on_two_workers(tmp_path, ray_session):
    """Two seeds of one configuration side by side in one worker group of four ranks, two per seed (DDP
    within each seed's process group): every collective of one seed's model pairs with the same seed's
    on its other rank, and the trial reports the seeds' mean."""
    from dtlab.trainers.orchestrate.ray_train import train_with_ray
    from dtlab.trainers.run.data import prepare_data

    spec = spec_from_dict(tiny_spec(model={"type": "mod"}, training={"max_steps": 8},
                                    resources={"use_ray": True, "num_workers": 2, "cpus_per_worker": 0.5}))
    run = tmp_path / "trial"
    run.mkdir()
    result = train_with_ray({"spec": spec.model_dump(mode="json"), "run_dir": str(run), "seeds": [0, 1],
                             "data_dir": str(prepare_data(spec.data).path)}, spec)
    seeds = [evals(run / "seeds" / str(s)) for s in (0, 1)]
    for recs in (evals(run), *seeds):
        assert [r["step"] for r in recs] == [0, 4, 8]
    assert seeds[0][-1]["val_loss"] != seeds[1][-1]["val_loss"]
    assert result["val_loss"] == (seeds[0][-1]["val_loss"] + seeds[1][-1]["val_loss"]) / 2
    for s in (0, 1):
        assert json.loads((run / "seeds" / str(s) / "run.json").read_text())["training"]["world_size"] == 2


@pytest.mark.parametrize("variant", ["standard", "mod", "dtf"])
def test_quick_spec_target_from_the_command_line(tmp_path, variant):
    """The issue's check, verbatim: val_loss falls by more than 0.3 nats, first to last evaluation."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "dtlab.trainers.cli", "train", "experiments/quick.yaml",
                           f"model.type={variant}", "training.max_steps=120", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = evals(out)
    assert recs[0]["val_loss"] - recs[-1]["val_loss"] > 0.3, [r["val_loss"] for r in recs]
    assert all(r["routing_mode"] == ("topk" if variant == "standard" else "causal") for r in recs)
    # and the run generates text (best checkpoint, its tokenizer, causal routing with the KV cache)
    proc = subprocess.run([sys.executable, "-m", "dtlab.trainers.cli", "sample", str(out), "--prompt", "The",
                           "--max-new-tokens", "16", "--stats"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("The") and len(proc.stdout) > len("The\n"), proc.stderr
    assert ("processed" in proc.stderr) is (variant != "standard")


def _listening(init) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening socket of a local Ray session's processes."""
    import psutil
    import ray

    if ray.is_initialized():
        ray.shutdown()
    init()
    try:
        ray.get(ray.remote(lambda: 1).remote())  # a worker is up
        session = Path(ray._private.worker._global_node.get_session_dir_path()).name
        ours = [p for p in psutil.process_iter(["pid", "name", "cmdline"])
                if session in " ".join(p.info["cmdline"] or []) or "ray::" in " ".join(p.info["cmdline"] or [])]
        return [(p.info["name"], c.laddr.ip, c.laddr.port) for p in ours for c in _inet(p) if c.status == "LISTEN"]
    finally:
        ray.shutdown()


def test_local_ray_dashboard_listens_on_loopback(ray_session):
    from dtlab.trainers.orchestrate.ray_train import init_ray

    listening = _listening(init_ray)
    dashboard = [(name, ip) for name, ip, port in listening if port == 8265]
    assert dashboard and all(ip == "127.0.0.1" for _, ip in dashboard), listening


@pytest.mark.xfail(strict=True, reason="Ray 2.60 binds its GCS, raylet and worker gRPC servers to all interfaces "
                                       "whatever the node IP; no setting changes that (strict: tells us when one does)")
def test_local_ray_listens_on_loopback_only(ray_session):
    from dtlab.trainers.orchestrate.ray_train import init_ray

    listening = _listening(init_ray)
    assert len(listening) >= 3, listening  # GCS, raylet, dashboard at least: the check saw them
    assert all(ip in ("127.0.0.1", "::1") for _, ip, _ in listening), listening


def _inet(proc):
    try:
        return proc.net_connections(kind="inet")
    except Exception:  # a process that ended meanwhile
        return []


def test_a_killed_ray_worker_says_how_to_resume_and_resume_loses_nothing(tmp_path):
    """The worker kills itself (SIGKILL) while saving its third checkpoint: the command ends with one
    line naming the failure and `--resume`; the resumed run's records equal an uninterrupted one's."""
    import os

    import yaml

    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(resources={"use_ray": True}, training={"max_steps": 6,
                                                                                     "eval_every": 2})))
    cmd = [sys.executable, "-m", "dtlab.trainers.cli", "train", str(spec)]
    full = subprocess.run(cmd + ["--out", str(tmp_path / "full"), "--no-ray"], capture_output=True, text=True,
                          timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    cut = subprocess.run(cmd + ["--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "DTLAB_FAULT": "checkpoint-written:3"})
    assert cut.returncode == 1, (cut.returncode, cut.stderr[-3000:])
    last = cut.stderr.strip().splitlines()[-1]
    assert last.startswith("dtlab train: training failed in a Ray worker") and "--resume" in last, last
    # Ray's own processes still log to this terminal (their lines carry a "(pid=...)" prefix); dtlab's is one line
    assert not [line for line in cut.stderr.splitlines() if line.startswith("Traceback")], cut.stderr[-3000:]
    resumed = subprocess.run(cmd + ["--out", str(tmp_path / "run"), "--resume"], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    volatile = ("tokens_per_s", "peak_rss_gib")
    assert records(tmp_path / "run", drop=volatile) == records(tmp_path / "full", drop=volatile)


def test_a_killed_worker_is_restarted_from_the_checkpoint_with_each_record_once(tmp_path):
    """SIGKILL to the Ray Train worker mid-run (resources.max_failures=1): Ray restarts the worker
    group, the loop continues from the last checkpoint, and the records equal an uninterrupted run's."""
    import os
    import signal
    import time

    import psutil
    import yaml

    raw = tiny_spec(model={"type": "dtf"}, training={"max_steps": 40, "eval_every": 8, "log_every": 4},
                    resources={"use_ray": True, "max_failures": 1})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    whole = spec_from_dict({**raw, "resources": {**raw["resources"], "use_ray": False}})
    run_training(whole, tmp_path / "whole")

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dtlab.trainers.cli", "train", str(spec_file), "--out", str(run)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, killed = time.time() + 300, None
    while time.time() < deadline and killed is None and proc.poll() is None:
        steps = [r["step"] for r in evals(run, cut_end_ok=True)] if (run / "metrics.jsonl").exists() else []
        if steps and steps[-1] >= 16:
            workers = [p for p in psutil.process_iter(["cmdline"])
                       if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid()]
            if workers:
                killed = steps[-1]
                for w in workers:
                    os.kill(w.pid, signal.SIGKILL)
        time.sleep(0.2)
    assert killed is not None and killed < 40, "the run finished before a worker could be killed"
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    got, want = records(run), records(tmp_path / "whole")
    keys = [(r["kind"], r["step"]) for r in got]
    assert len(keys) == len(set(keys)) and keys == [(r["kind"], r["step"]) for r in want]  # each step once
    assert got[-1]["val_loss"] == want[-1]["val_loss"] and got[-1]["done"]
    log = (run / "output.log").read_text()  # the restarted worker group resumed (it did not start over)
    assert "resumed from step-" in log, log[-3000:]
