"""`dtlab run` fills the cluster: its runs train side by side as the cluster's resources hold them,
a failed run does not cost the others their results, and --resume continues only what did not finish."""

import json
import threading
import time

import pytest

from dtlab.analysis.rundir import reached_last_step
from dtlab.trainers.orchestrate import experiment
from dtlab.trainers.orchestrate.experiment import concurrent_runs, run_experiment
from dtlab.trainers.orchestrate.runner import RunFailed
from dtlab.trainers.spec import spec_from_dict
from tests.trainers.conftest import tiny_spec


class _Nodes:
    """`ray.nodes()` of a described cluster."""

    def __init__(self, monkeypatch, nodes):
        import ray

        monkeypatch.setattr(ray, "is_initialized", lambda: True)
        monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": r} for r in nodes]
                            + [{"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}])


@pytest.mark.parametrize("nodes,resources,runs,expected", [
    ([{"CPU": 2.0}], {}, 4, 1),  # one machine without GPUs: one run at a time, as before
    ([{"CPU": 1.0}, {"CPU": 1.0}], {}, 4, 2),  # two nodes of one CPU: two runs, the others wait
    ([{"CPU": 2.0}, {"CPU": 2.0}], {"num_workers": 2}, 4, 2),
    ([{"CPU": 2.0}, {"CPU": 2.0}], {"cpus_per_worker": 1.5}, 4, 2),  # a node holds one such worker
    ([{"CPU": 16.0, "GPU": 8.0}], {}, 6, 6),  # a GPU each: all six on an 8-GPU node
    ([{"CPU": 16.0, "GPU": 8.0}], {}, 12, 8),
    ([{"CPU": 16.0, "GPU": 8.0}], {"num_workers": 2}, 12, 4),
    ([{"CPU": 16.0, "GPU": 8.0}], {"gpus_per_worker": 0.5}, 12, 12),
    ([{"CPU": 4.0, "GPU": 8.0}], {"cpus_per_worker": 2}, 12, 2),  # CPUs run out first
    ([{"CPU": 16.0, "GPU": 8.0}] * 4, {"num_workers": 8}, 12, 4),  # a run a node
])
def test_concurrent_runs_from_the_clusters_resources(monkeypatch, nodes, resources, runs, expected):
    _Nodes(monkeypatch, nodes)
    spec = spec_from_dict(tiny_spec(resources={"use_ray": True, "device": "auto", **resources}))
    assert concurrent_runs([spec] * runs, None) == expected
    assert concurrent_runs([spec] * runs, False) == 1  # --no-ray: in this process, one at a time
    assert concurrent_runs([spec], None) == 1


def test_a_failed_run_leaves_the_others_and_resume_continues_it(tmp_path, monkeypatch, caplog):
    """One run of three fails: the other two still train to their last step, the experiment says
    which failed and how to continue, and --resume trains only that one."""
    import logging

    from dtlab.trainers.orchestrate import runner

    real = runner.launch

    def launch(config, spec, run_dir, use_ray, hooks):
        if run_dir.name == "mod-seed0":
            raise OSError(28, "No space left on device")
        return real(config, spec, run_dir, use_ray, hooks)

    monkeypatch.setattr(runner, "launch", launch)
    spec = spec_from_dict(tiny_spec(variants=["standard", "mod", "dtf"], training={"max_steps": 4, "eval_every": 2}))
    exp = tmp_path / "exp"
    with pytest.raises(RunFailed, match=r"1 of 3 run\(s\) did not finish .*mod-seed0: .*No space left on device.*"
                                        r"continue with: dtlab run s.yaml --out .* --resume"):
        run_experiment(spec, exp, use_ray=False, source="s.yaml")
    assert not reached_last_step(exp / "mod-seed0")
    for run in ("standard-seed0", "dtf-seed0"):  # trained after the failure as well as before it
        assert reached_last_step(exp / run), run
    kept = (exp / "dtf-seed0" / "metrics.jsonl").read_text()
    monkeypatch.setattr(runner, "launch", real)
    with caplog.at_level(logging.INFO, logger="dtlab"):
        result = run_experiment(spec, exp, resume=True, use_ray=False, source="s.yaml")
    assert reached_last_step(exp / "mod-seed0") and (exp / "dtf-seed0" / "metrics.jsonl").read_text() == kept
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("dtlab.")]
    assert sum("finished earlier, kept" in line for line in lines) == 2, lines
    assert result["problems"] == []


class _Watcher(threading.Thread):
    """Reads the runs' records every 0.1 s: when each was first seen training and when it had
    written its last evaluation."""

    def __init__(self, runs):
        super().__init__(daemon=True)
        self.runs, self.first, self.done, self.stop = runs, {}, {}, threading.Event()

    def run(self):
        while not self.stop.wait(0.1):
            now = time.time()
            for run in self.runs:
                try:
                    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                               if line.endswith("}")]
                except OSError:
                    continue
                if any(r.get("kind") == "train" for r in records):
                    self.first.setdefault(run.name, now)
                if any(r.get("kind") == "eval" and r.get("done") for r in records):
                    self.done.setdefault(run.name, now)


@pytest.mark.slow
def test_dtlab_run_trains_two_runs_at_once_on_a_two_node_cluster(tmp_path, monkeypatch):
    """Four runs on a simulated cluster of two nodes of one CPU each: two train at the same time
    (their training intervals, seen in their records, overlap), never more than two, and all four
    finish with the usual records and report."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        ray.init(address=cluster.address)
        spec = spec_from_dict(tiny_spec(variants=["standard", "mod"], seeds=[0, 1],
                                        training={"max_steps": 40, "eval_every": 20, "log_every": 2},
                                        resources={"use_ray": True, "device": "cpu"}))
        exp = tmp_path / "exp"
        names = [f"{v}-seed{s}" for v in ("standard", "mod") for s in (0, 1)]
        watcher = _Watcher([exp / n for n in names])
        watcher.start()
        slots = []
        real = experiment.concurrent_runs
        monkeypatch.setattr(experiment, "concurrent_runs", lambda specs, use_ray: slots.append(real(specs, use_ray))
                            or slots[-1])
        result = run_experiment(spec, exp, source="s.yaml")
        watcher.stop.set()
        watcher.join()
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert slots == [2]
    for name in names:  # the precondition: every run trained to its last step, with its records
        assert reached_last_step(exp / name), name
        assert json.loads((exp / name / "run.json").read_text())["training"]["total_steps"] == 40
    assert set(watcher.first) == set(names) and set(watcher.done) == set(names), (watcher.first, watcher.done)
    spans = {n: (watcher.first[n], watcher.done[n]) for n in names}
    overlapping = [(a, b) for a in names for b in names
                   if a < b and max(spans[a][0], spans[b][0]) < min(spans[a][1], spans[b][1])]
    assert overlapping, spans
    for t, _ in spans.values():  # never three training at once
        assert sum(lo <= t < hi for lo, hi in spans.values()) <= 2, spans
    assert (exp / "report.html").is_file() and result["problems"] == []


def test_an_interrupt_ends_the_runs_in_flight_as_interrupted(tmp_path, monkeypatch):
    """Ctrl-C while two runs train in `dtlab run`'s threads: each run's launch then ends with an error
    (here a stand-in for Ray's, raised once the interrupt has reached the driver), and each records
    "interrupted", not "failed", before the interrupt leaves `train_runs`. The same error without an
    interrupt records "failed"."""
    import _thread

    from dtlab.analysis.rundir import read_status
    from dtlab.trainers.orchestrate import runner

    started, both = [], threading.Barrier(3, timeout=60)

    def run_training(spec, run_dir, resume, use_ray, tracking):  # the run's driver, without its data and model
        run_dir.mkdir(parents=True)
        return runner.launch_watched({}, spec, run_dir, False, None, tracking)

    def launch(config, spec, run_dir, use_ray, hooks):
        started.append(run_dir.name)
        if run_dir.name != "lone-seed0":
            both.wait()  # both runs in flight
            assert runner.INTERRUPTED.wait(60)
        raise RuntimeError("the run's workers were stopped")

    def press_ctrl_c():
        both.wait()
        _thread.interrupt_main()

    monkeypatch.setattr(runner, "run_training", run_training)
    monkeypatch.setattr(runner, "launch", launch)
    monkeypatch.setattr(experiment, "concurrent_runs", lambda specs, use_ray: 2)
    spec = spec_from_dict(tiny_spec())
    runs = {tmp_path / f"{v}-seed0": spec.for_run(v, 0) for v in ("standard", "mod")}
    import signal

    # Ctrl-C raises KeyboardInterrupt in the driver, as in a fresh `dtlab run` (an earlier test in this
    # process, through Ray Tune, may have left a handler of its own)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=press_ctrl_c, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            experiment.train_runs(runs, use_ray=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sorted(started) == ["mod-seed0", "standard-seed0"]  # the precondition: both were in flight
    for run_dir in runs:
        assert read_status(run_dir)["state"] == "interrupted", read_status(run_dir)
    assert not runner.INTERRUPTED.is_set()  # cleared for whatever runs next in this process
    lone = tmp_path / "lone-seed0"  # no interrupt: the same error is a failure
    failed = experiment.train_runs({lone: spec.for_run("standard", 0)}, use_ray=False)
    assert started[-1] == "lone-seed0" and "lone-seed0" in failed and read_status(lone)["state"] == "failed"
