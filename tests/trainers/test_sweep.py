"""Sweeps: the plan is checked before Ray starts; end to end with ASHA; SIGINT then --resume."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dtlab.trainers.spec import SpecError, load_spec, spec_from_dict
from dtlab.trainers.sweep import Replicates, check_gpus, plan_sweep, trial_resources, trial_spec
from tests.trainers.conftest import tiny_spec

ROOT = Path(__file__).resolve().parents[2]


def sweep_spec(space, **extra):
    raw = tiny_spec(variants=["mod", "dtf"])
    raw["sweep"] = {"search_space": space, **extra}
    return spec_from_dict(raw)


def test_smoke_spec_plan():
    plan = plan_sweep(load_spec(ROOT / "experiments/sweep_smoke.yaml"))
    assert plan.variants == ["mod", "dtf"] and not plan.variant_is_searched  # a fixed list, taken in turn
    by_key = {d.key: d for d in plan.dims}
    assert by_key["model.mod_capacity"].variants == ["mod"] and by_key["model.beta_ce_init"].variants == ["dtf"]
    assert by_key["training.optimizer.lr"].variants is None
    assert plan.max_t == 5  # 4 evaluations (steps 0, 10, 20, 30) + 1


def test_searcher_takes_a_fixed_variant_list_in_turn_with_conditional_keys():
    from dtlab.trainers.sweep import make_searcher

    searcher = make_searcher(plan_sweep(load_spec(ROOT / "experiments/sweep_smoke.yaml")))
    configs = [searcher.suggest(f"t{i}") for i in range(4)]
    assert [c["model.type"] for c in configs] == ["mod", "dtf", "mod", "dtf"]
    for c in configs:
        keys = {k for k in c if k.startswith("model.") and k != "model.type"}
        want = {"mod": {"model.mod_capacity", "model.mod_aux_loss_weight"},
                "dtf": {"model.dtf_capacity", "model.beta_ce_init"}}[c["model.type"]]
        assert keys == want and "training.optimizer.lr" in c


def test_trial_spec_applies_routing_keys_only_where_they_belong():
    plan = plan_sweep(load_spec(ROOT / "experiments/sweep_smoke.yaml"))
    params = {"model.type": "dtf", "model.mod_capacity": 0.3, "model.dtf_capacity": 0.25,
              "training.optimizer.lr": 1e-3}
    spec = trial_spec(plan.spec, params, seed=7)
    assert spec.model.type == "dtf" and spec.seed == 7 and spec.training.optimizer.lr == 1e-3
    assert spec.model.overrides() == {"dtf_capacity": 0.25}


@pytest.mark.parametrize("space,match", [
    ({"model.mod_capacty": {"uniform": [0.1, 0.5]}}, r"sweep.search_space.model.mod_capacty.*did you mean"),
    ({"training.lrr": {"choice": [1, 2]}}, r"sweep.search_space.training.lrr"),
    ({"model.mod_capacity": {"uniform": [0.5, 0.1]}}, r"empty range \[0.5, 0.1\]"),
    ({"model.mod_capacity": {"choice": []}}, r"non-empty list"),
    ({"training.optimizer.lr": {"loguniform": [0, 1]}}, r"loguniform needs lo > 0"),
    ({"model.mod_capacity": {"normal": [0, 1]}}, r"expected one of \{choice"),
    ({"model.mod_capacity": {"uniform": [0.1, 1.5]}}, r"mod_capacity=1.5.*capacity must be a number in \(0, 1\]"),
    ({"model.ma_window": {"int": [5, 50]}, "model.type": {"choice": ["mod", "standard"]}},
     r"none of the swept variants \['mod', 'standard'\] has this key \(it belongs to \['dtf'\]\)"),
    ({"model.type": {"choice": ["mod", "moe"]}}, r"model.type: expected a choice among"),
])
def test_bad_search_space_fails_before_ray(space, match):
    with pytest.raises(SpecError, match=match):
        plan_sweep(sweep_spec(space))


def test_asha_max_t_and_missing_sweep_section():
    with pytest.raises(SpecError, match=r"max_t=3 must exceed the number of evaluations \(4\)"):
        plan_sweep(sweep_spec({}, asha={"max_t": 3}))
    with pytest.raises(SpecError, match="no sweep section"):
        plan_sweep(spec_from_dict(tiny_spec()))


def test_more_gpus_per_trial_than_the_cluster_has():
    spec = spec_from_dict(tiny_spec(resources={"num_workers": 2, "gpus_per_worker": 1, "device": "auto"}))
    with pytest.raises(SpecError, match=r"asks for 2 GPU\(s\).*the cluster has 1"):
        check_gpus(spec, 1)
    check_gpus(spec, 2)


def test_cli_refuses_bad_sweep_before_ray(tmp_path, capsys):
    from dtlab.trainers.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "experiments/sweep_smoke.yaml").read_text().replace("[0.1, 0.5]}", "[0.5, 0.1]}"))
    code = main(["sweep", str(bad), "--out", str(tmp_path / "s")])
    assert code == 2 and "bad.yaml: sweep.search_space.model.mod_capacity: empty range" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


class FakeSearcher:
    metric, mode = "val_loss", "min"

    def __init__(self):
        self.n, self.told = 0, {}

    def suggest(self, trial_id):
        self.n += 1
        return {"model.mod_capacity": 0.1 * self.n}

    def on_trial_result(self, trial_id, result):
        pass

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.told[trial_id] = result


def test_replicates_run_each_proposal_once_per_seed_and_report_the_mean():
    inner = FakeSearcher()
    rep = Replicates(inner, [0, 1, 2])
    configs = [rep.suggest(f"t{i}") for i in range(6)]
    assert [c["seed"] for c in configs] == [0, 1, 2, 0, 1, 2]
    assert configs[0]["model.mod_capacity"] == configs[2]["model.mod_capacity"] != configs[3]["model.mod_capacity"]
    for i, loss in enumerate([3.0, 4.0, 5.0]):
        rep.on_trial_complete(f"t{i}", {"val_loss": loss})
    assert inner.told == {"t0": {"val_loss": 4.0}}


def _evals(path):
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "eval"]


@pytest.mark.slow
def test_sweep_smoke_end_to_end_with_asha(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "dtlab.trainers.cli", "sweep", "experiments/sweep_smoke.yaml",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Ray dashboard: http://127.0.0.1:" in proc.stdout + proc.stderr
    runs = sorted(out.glob("trials/*/metrics.jsonl"))
    assert len(runs) == 6
    summary = json.loads((out / "summary.json").read_text())
    variants = {t["params"]["model.type"] for t in summary["trials"]}
    assert len(summary["trials"]) == 6 and summary["best"]["val_loss"] == min(
        t["val_loss"] for t in summary["trials"] if t["status"] == "finished")
    stopped = [t for t in summary["trials"] if not t["done"]]
    assert stopped, "ASHA stopped no trial early"
    assert {t["status"] for t in stopped} == {"stopped"}
    assert all(t["step"] >= 10 for t in stopped), [t["step"] for t in stopped]  # step 0 is never a rung
    assert summary["best"]["status"] == "finished"
    # what the terminal showed (no TTY: plain lines): each trial's end, the running counts, the last line
    err = proc.stderr
    assert err.count(": stopped at step") == len(stopped) and "finished at step 30/30" in err, err[-3000:]
    assert f"sweep: 0 running, {6 - len(stopped)} finished, {len(stopped)} stopped, 0 diverged, 0 failed" in err
    assert err.splitlines()[-1] == f"trials: {6 - len(stopped)} finished, {len(stopped)} stopped, 0 diverged, 0 failed"
    assert "TrainController" not in err + proc.stdout and "TrainController" in (out / "output.log").read_text()
    table = proc.stdout.splitlines()
    assert table[table.index(next(t for t in table if t.startswith("run "))) + 2].startswith("trial-")
    assert variants == {"mod", "dtf"}
    for run in runs:
        steps = [r["step"] for r in _evals(run)]
        assert steps == sorted(set(steps)) and steps[0] == 0


def test_replicates_state_round_trips_through_tunes_wrapper_protocol():
    """Tune saves a wrapper searcher with get_state and restores it with set_state (a replicate sweep
    died at its first experiment-state save without them)."""
    rep = Replicates(FakeSearcher(), [0, 1])
    rep.suggest("t0")
    rep.suggest("t1")
    rep.suggest("t2")
    rep.on_trial_complete("t0", {"val_loss": 3.0})
    state = json.loads(json.dumps(rep.get_state()))  # Tune pickles it; JSON is stricter
    again = Replicates(FakeSearcher(), [5])
    again.set_state(state)
    assert again.seeds == [0, 1] and again.queue == rep.queue == [("t2", 1)]
    assert again.suggest("t3") == {**rep.configs["t2"], "seed": 1} and again.results == rep.results


@pytest.mark.slow
def test_sigint_then_resume_loses_nothing(tmp_path):
    """A replicate sweep (2 configurations x 2 seeds) through Tune, interrupted once a trial has
    finished, then resumed: finished trials are kept as they were, the rest complete once."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "dtlab.trainers.cli", "sweep", "experiments/sweep_smoke.yaml", "sweep.num_samples=2",
           "seeds=[0,1]", "sweep.asha.enabled=false", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any('"done": true' in p.read_text()
                                             for p in out.glob("trials/*/metrics.jsonl")):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=180) == 130
    before = {p.parent.name: p.read_text() for p in out.glob("trials/*/metrics.jsonl")}
    finished = {k for k, text in before.items() if '"done": true' in text}
    assert finished, "no trial had finished before the interrupt"
    assert len(finished) < 4, "every trial had finished: the interrupt tested nothing"
    proc = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(": started (") == 4 - len(finished), proc.stderr  # progress after a resume too
    after = {p.parent.name: p.read_text() for p in out.glob("trials/*/metrics.jsonl")}
    assert len(after) == 4 and set(before) <= set(after)
    for name in finished:
        assert after[name] == before[name], f"finished trial {name} was rerun"
    for name, text in after.items():
        steps = [r["step"] for r in map(json.loads, text.splitlines()) if r["kind"] == "eval"]
        assert steps == [0, 10, 20, 30], f"trial {name}: evaluations {steps}"
    seeds = {}
    for p in out.glob("trials/*/params.json"):
        info = json.loads(p.read_text())
        seeds.setdefault(json.dumps(info["params"], sort_keys=True), []).append(info["seed"])
    assert sorted(map(sorted, seeds.values())) == [[0, 1], [0, 1]], seeds  # each configuration once per seed
    import optuna  # the study is in its file store, continued by the resume: one trial per configuration

    study = optuna.load_study(study_name="sweep_smoke", storage=f"sqlite:///{out / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 2, states


@pytest.mark.parametrize("name", ["sweep_smoke.yaml", "sweep_gpu.yaml", "sweep_multigpu.yaml"])
def test_shipped_sweeps_plan(name):
    plan = plan_sweep(load_spec(ROOT / "experiments" / name), name)
    assert len(plan.variants) >= 2 and len(plan.dims) >= 3


@pytest.mark.parametrize("name, gpus, per_trial, at_once", [
    ("sweep_gpu.yaml", 1, 0.5, 2),  # one 80 GB GPU, two single-worker trials sharing it
    ("sweep_multigpu.yaml", 8, 2.0, 4),  # an 8-GPU node: two ranks of one whole GPU each
])
def test_gpu_sweeps_fit_a_cluster_of_their_shape(name, gpus, per_trial, at_once):
    spec = plan_sweep(load_spec(ROOT / "experiments" / name), name).spec
    check_gpus(spec, gpus)
    cpus, gpu = trial_resources(spec, gpus)
    assert gpu == per_trial and int(gpus / gpu) == at_once
    with pytest.raises(SpecError, match="but the cluster has"):
        check_gpus(spec, per_trial / 2 if per_trial >= 1 else 0)


def test_pareto_set_of_finished_trials():
    from dtlab.trainers.sweep import pareto

    t = [{"trial_id": "a", "status": "finished", "val_loss": 5.0, "flop_ratio_vs_dense": 0.6},
         {"trial_id": "b", "status": "finished", "val_loss": 4.8, "flop_ratio_vs_dense": 0.8},
         {"trial_id": "c", "status": "finished", "val_loss": 5.1, "flop_ratio_vs_dense": 0.7},  # beaten by a
         {"trial_id": "d", "status": "stopped", "val_loss": 4.0, "flop_ratio_vs_dense": 0.5},  # not finished
         {"trial_id": "e", "status": "diverged", "val_loss": float("nan"), "flop_ratio_vs_dense": 0.5}]
    objectives = [{"metric": "val_loss", "mode": "min"}, {"metric": "flop_ratio_vs_dense", "mode": "min"}]
    assert pareto(t, objectives) == ["b", "a"]


@pytest.mark.parametrize("metric, match", [
    ("val_los", r"'val_los': no trial reports it.*did you mean 'val_loss'"),
    ("train_flops", "cumulative training FLOPs.*flops_per_token or flop_ratio_vs_dense"),
])
def test_sweep_metric_names_are_checked_before_ray(metric, match):
    raw = yaml.safe_load((ROOT / "experiments" / "sweep_smoke.yaml").read_text())
    raw["sweep"]["metric"] = metric
    with pytest.raises(SpecError, match=match):
        plan_sweep(spec_from_dict(raw), "s.yaml")


def test_causal_metric_refused_when_standard_is_swept():
    raw = yaml.safe_load((ROOT / "experiments" / "sweep_multigpu.yaml").read_text())
    raw["sweep"]["objectives"][0]["metric"] = "val_loss_causal"
    with pytest.raises(SpecError, match="Standard trials have no causal routing"):
        plan_sweep(spec_from_dict(raw), "s.yaml")


def test_fractional_gpus_are_refused_for_ranks_of_one_run():
    with pytest.raises(SpecError, match="two ranks of one run could share a GPU"):
        spec_from_dict(tiny_spec(resources={"num_workers": 2, "gpus_per_worker": 0.5}))
    assert spec_from_dict(tiny_spec(resources={"num_workers": 1, "gpus_per_worker": 0.5}))


@pytest.mark.slow
def test_resources_come_from_the_cluster_not_the_drivers_node():
    """Two nodes on one machine, one advertising a GPU: a trial driver placed on the node without one
    still gives its workers GPUs (and a cluster without GPUs gives them none)."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from dtlab.trainers.ray_train import scaling

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    try:
        cluster.add_node(num_cpus=1, num_gpus=1)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        no_gpu = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and not n["Resources"].get("GPU"))
        spec = spec_from_dict(tiny_spec(resources={"device": "auto"}))

        @ray.remote(num_cpus=0.1)
        def decide(spec):
            import torch

            cfg = scaling(spec)
            return torch.cuda.is_available(), cfg.use_gpu, cfg.resources_per_worker

        here = decide.options(scheduling_strategy=NodeAffinitySchedulingStrategy(no_gpu, soft=False))
        local_cuda, use_gpu, per_worker = ray.get(here.remote(spec))
        assert not local_cuda  # the driver's node has no GPU (this machine has none at all)
        assert use_gpu and per_worker["GPU"] == 1.0
    finally:
        ray.shutdown()
        cluster.shutdown()
