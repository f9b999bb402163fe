"""`tracking:` sends each run's records to TensorBoard, MLflow and W&B: the same numbers as metrics.jsonl."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from dtlab.trainers.monitor.tracking import flatten
from dtlab.trainers.orchestrate.runner import run_training
from dtlab.trainers.spec import SpecError, spec_from_dict
from tests.records import records
from tests.trainers.conftest import tiny_spec


def expected(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every number of metrics.jsonl as (step, value) series under the trackers' keys."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records(run_dir):
        for key, value in flatten(r, f"{r['kind']}/").items():
            series.setdefault(key, []).append((r["step"], value))
    return series


def same_series(got: list[tuple[int, float]], want: list[tuple[int, float]], rel: float) -> bool:
    got, want = sorted(got), sorted(want)
    return [s for s, _ in got] == [s for s, _ in want] and all(
        math.isclose(a, b, rel_tol=rel, abs_tol=1e-12) for (_, a), (_, b) in zip(got, want, strict=True))


def mlflow_series(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], object]:
    from mlflow import MlflowClient

    state = json.loads((run_dir / "tracking.json").read_text())
    assert state["mlflow_uri"] == f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=state["mlflow_uri"])
    run = client.get_run(state["mlflow_run_id"])
    got = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
           for key in run.data.metrics}
    return got, run


@pytest.mark.slow
def test_tensorboard_and_mlflow_hold_what_metrics_jsonl_holds_and_resume_adds_no_duplicates(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = tiny_spec(model={"type": "dtf"}, training={"max_steps": 8}, tracking=["tensorboard", "mlflow"])
    run_dir = tmp_path / "run"
    run_training(spec_from_dict(raw), run_dir)
    raw["training"]["max_steps"] = 12  # resumed and trained further: the same tracker runs continue
    run_training(spec_from_dict(raw), run_dir, resume=True)

    want = expected(run_dir)
    assert len(want["eval/val_loss"]) == 4 and "eval/routing/1/selected_frac" in want  # steps 0, 4, 8, 12
    got, run = mlflow_series(run_dir)
    assert got.keys() == want.keys()
    for key, points in want.items():  # each step once, the very values of metrics.jsonl
        assert same_series(got[key], points, 1e-6), (key, got[key], points)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["model.type"] == "dtf"
    assert run.data.params["training.max_steps"] == "8"  # the spec the run was started with

    events = EventAccumulator(str(run_dir / "tensorboard" / "run"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(want)
    for key, points in want.items():
        tb = [(e.step, e.value) for e in events.Scalars(key)]
        assert same_series(tb, points, 1e-6), (key, tb, points)  # float32 in the event file


def test_missing_tracker_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    spec = spec_from_dict(tiny_spec(tracking=["mlflow"]))
    with pytest.raises(SpecError, match=r"tracking: mlflow .*not installed.*dtlab\[tracking\]"):
        run_training(spec, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_tracking_spec_forms():
    assert spec_from_dict({"tracking": "mlflow"}).tracking.backends == ["mlflow"]
    assert spec_from_dict({"tracking": ["wandb", "mlflow", "wandb"]}).tracking.backends == ["wandb", "mlflow"]
    cfg = spec_from_dict({"tracking": {"backends": ["wandb"], "wandb_mode": "online"}}).tracking
    assert cfg.wandb_mode == "online"
    assert spec_from_dict({}).tracking.backends == []
    with pytest.raises(SpecError, match="tracking.backends.0"):
        spec_from_dict({"tracking": ["mlfow"]})


def test_flatten_keeps_numbers_only():
    rec = {"kind": "eval", "step": 4, "done": True, "val_loss": 2.5, "routing_mode": "causal",
           "routing": {"1": {"selected_frac": 0.125, "selected_by_pos": [0.1, 0.2]}}}
    assert flatten(rec, "eval/") == {"eval/val_loss": 2.5, "eval/routing/1/selected_frac": 0.125}


@pytest.mark.slow
def test_wandb_offline_run_is_written_under_the_output(tmp_path):
    pytest.importorskip("wandb")
    raw = tiny_spec(training={"max_steps": 4}, tracking=["wandb"])
    run_dir = tmp_path / "run"
    run_training(spec_from_dict(raw), run_dir)
    state = json.loads((run_dir / "tracking.json").read_text())
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{state['wandb_id']}"))
    assert offline and list(offline[0].glob("*.wandb")), list((run_dir / "wandb").iterdir())
    assert state["logged"] == {"wandb": {"eval": 4, "train": 4}}


@pytest.mark.slow
def test_experiment_runs_share_one_store_and_carry_the_report(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow import MlflowClient

    from dtlab.trainers.orchestrate.experiment import run_experiment

    raw = tiny_spec(variants=["standard", "mod"], training={"max_steps": 4}, tracking=["mlflow", "wandb"])
    out = tmp_path / "exp"
    result = run_experiment(spec_from_dict(raw), out)
    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("t")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"standard-seed0", "mod-seed0"}
    for name, run in runs.items():
        assert run.info.status == "FINISHED"
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["report.html"], name
        local = client.download_artifacts(run.info.run_id, "report.html", str(tmp_path))
        assert Path(local).read_bytes() == Path(result["report"]).read_bytes()
    assert len(list((out / "wandb").glob("offline-run-*"))) == 2


def test_a_failing_tracker_neither_stops_training_nor_loses_records(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from dtlab.trainers.monitor import tracking

    real, calls = tracking.RunTracker._send_mlflow, []

    def flaky(self, client, values, step):  # the server is down for the first two records it is sent
        calls.append(step)
        if len(calls) <= 2:
            raise ConnectionError("tracking server down")
        return real(self, client, values, step)

    monkeypatch.setattr(tracking.RunTracker, "_send_mlflow", flaky)
    run_dir = tmp_path / "run"
    run_training(spec_from_dict(tiny_spec(training={"max_steps": 8}, tracking=["mlflow"])), run_dir)
    assert len(calls) > 2 and json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    got, _ = mlflow_series(run_dir)
    for key, points in expected(run_dir).items():
        assert same_series(got[key], points, 1e-6), key


def test_a_tracker_added_on_resume_gets_the_whole_history(tmp_path):
    pytest.importorskip("mlflow")
    raw = tiny_spec(training={"max_steps": 4}, tracking=["tensorboard"])
    run_dir = tmp_path / "run"
    run_training(spec_from_dict(raw), run_dir)
    raw.update(tracking=["tensorboard", "mlflow"], training={**raw["training"], "max_steps": 8})
    run_training(spec_from_dict(raw), run_dir, resume=True)
    got, _ = mlflow_series(run_dir)
    assert [s for s, _ in got["eval/val_loss"]] == [0, 4, 8]
