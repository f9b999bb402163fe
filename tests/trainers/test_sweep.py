"""Sweeps: the plan is checked before Ray starts; end to end with ASHA; SIGINT then --resume."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dtlab.trainers.orchestrate.sweep import check_gpus, plan_sweep, trial_resources, trial_spec
from dtlab.trainers.spec import SpecError, load_spec, spec_from_dict
from tests.records import records
from tests.trainers.conftest import stored, tiny_spec

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
    from dtlab.trainers.orchestrate.sweep import make_searcher

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
    from dtlab.trainers.cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "experiments/sweep_smoke.yaml").read_text().replace("[0.1, 0.5]}", "[0.5, 0.1]}"))
    code = main(["sweep", str(bad), "--out", str(tmp_path / "s")])
    assert code == 2 and "bad.yaml: sweep.search_space.model.mod_capacity: empty range" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_sweep_smoke_end_to_end_with_asha(tmp_path):
    """The smoke sweep with two objectives (loss and cost): ASHA compares trials at equal training
    FLOPs; the study's COMPLETE trials are the finished ones, its PRUNED ones those ASHA stopped, and
    its best trials are `summary.json`'s Pareto set; a stopped trial keeps only its best weights."""
    out = tmp_path / "sweep"
    objectives = "sweep.objectives=[{metric: val_loss, mode: min}, {metric: flop_ratio_vs_dense, mode: min}]"
    # evaluations every 5 steps: ASHA's first rung, one interval of the costliest corner of the space (capacity
    # 0.5), is reached by the trials drawn around step 10 of 30, early enough for a stop to save steps
    proc = subprocess.run([sys.executable, "-m", "dtlab.trainers.cli", "sweep", "experiments/sweep_smoke.yaml",
                           objectives, "training.eval_every=5", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
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
    assert all(0 < t["step"] < 30 for t in stopped), [t["step"] for t in stopped]  # step 0 is never a rung
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
        steps = [r["step"] for r in records(run, "eval")]
        assert steps == sorted(set(steps)) and steps[0] == 0
    _asha_compared_at_equal_flops(out)
    _study_tells_the_truth(out, summary)
    _stopped_trials_keep_best_weights_only(out, summary)


def _asha_compared_at_equal_flops(out):
    """Each value at a rung is the trial's own loss at exactly the rung's FLOPs: interpolated between
    its two evaluations around them; trials of different cost per step are among those compared."""
    state = json.loads((out / "asha.json").read_text())
    assert state["settings"]["time_attr"] == "train_flops"
    costs = set()
    for milestone, rung in zip(state["settings"]["milestones"], state["rungs"], strict=True):
        for trial, value in rung.items():
            evals = records(out / "trials" / trial / "metrics.jsonl", "eval")
            after = next(i for i, r in enumerate(evals) if r["train_flops"] >= milestone)
            before = evals[after - 1]
            share = (milestone - before["train_flops"]) / (evals[after]["train_flops"] - before["train_flops"])
            assert value == pytest.approx(before["val_loss"] + share * (evals[after]["val_loss"] - before["val_loss"]))
            if len(rung) > 1:
                costs.add(evals[0]["flops_per_token"])
    assert len(costs) > 1, state  # a rung compared configurations of different cost


def _study_tells_the_truth(out, summary):
    import optuna

    from dtlab.trainers.orchestrate.sweep import STUDY

    study = optuna.load_study(study_name="sweep_smoke", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / STUDY))))
    by_params = {json.dumps(t["params"], sort_keys=True): t for t in summary["trials"]}
    told = {by_params[json.dumps(t.params, sort_keys=True)]["trial_id"]: t for t in study.trials}
    assert len(told) == len(summary["trials"]) == len(study.trials)
    status = {t["trial_id"]: t["status"] for t in summary["trials"]}
    for state, end in (("COMPLETE", "finished"), ("PRUNED", "stopped")):
        assert {i for i, t in told.items() if t.state.name == state} == {i for i, s in status.items() if s == end}
    best = {by_params[json.dumps(t.params, sort_keys=True)]["trial_id"] for t in study.best_trials}
    assert best == set(summary["pareto"]) and best, (best, summary["pareto"])
    for i in best:  # the same values: each finished trial's last evaluation
        row = next(t for t in summary["trials"] if t["trial_id"] == i)
        assert told[i].values == [row["val_loss"], row["flop_ratio_vs_dense"]]


def _stopped_trials_keep_best_weights_only(out, summary):
    for t in summary["trials"]:
        ckpt = out / "trials" / t["trial_id"] / "checkpoints"
        files = {p for p in ckpt.rglob("*") if p.is_file()}
        if t["status"] == "stopped":
            assert not (ckpt / "last").exists() and not (ckpt / "last").is_symlink()
            best = (ckpt / "best").resolve()
            assert (best / "model.safetensors").stat().st_size > 0
            assert files == {p for p in best.rglob("*") if p.is_file()}  # the bytes on disk: best's, no more
            assert not [p for p in files if "optimizer" in p.name]
        else:
            assert (ckpt / "last" / "optimizer.safetensors").is_file()


@pytest.mark.slow
def test_sigint_then_resume_loses_nothing(tmp_path, s3):
    """A replicate sweep (3 configurations x 2 seeds, each configuration one trial that trains both
    seeds) through Tune, its checkpoints in S3 (a real server on loopback), interrupted once a trial
    has finished and another has trained; the unfinished trials' local checkpoints and records are then
    deleted, and the resume reads them back from S3: finished trials are kept as they were, the rest
    complete once, and each trial's record is the mean of its seeds."""
    out = tmp_path / "sweep"
    storage = s3("sweep")
    cmd = [sys.executable, "-m", "dtlab.trainers.cli", "sweep", "experiments/sweep_smoke.yaml", "sweep.num_samples=3",
           "seeds=[0,1]", "sweep.asha.enabled=false", f"resources.storage={storage}", "training.max_steps=80",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def trained(text):  # two evaluations in (the first one's checkpoint is in S3), and far from its end (80)
        steps = [r["step"] for r in map(json.loads, text.splitlines()) if r["kind"] == "eval"]
        return bool(steps) and 20 <= steps[-1] <= 40

    deadline = time.time() + 300
    while time.time() < deadline:
        texts = [p.read_text() for p in out.glob("trials/*/metrics.jsonl")]
        if any('"done": true' in t for t in texts) and any(trained(t) for t in texts):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=180) == 130  # also when Tune counts the trial it stopped as terminated
    assert json.loads((out / "summary.json").read_text())["interrupted"]
    before = {p.parent.name: p.read_text() for p in out.glob("trials/*/metrics.jsonl")}
    finished = {k for k, text in before.items() if '"done": true' in text}
    assert finished, "no trial had finished before the interrupt"
    assert len(finished) < 3, "every trial had finished: the interrupt tested nothing"
    _, kept = stored(storage)
    lost = {name for name in set(before) - finished if any(f"/sweep-{name}/" in k for k in kept)}
    assert lost, "no unfinished trial had a checkpoint in S3: the read-back would test nothing"
    for name in lost:  # the unfinished trials' local copies are gone (a lost node, a wiped disk)
        for seed in (0, 1):
            shutil.rmtree(out / "trials" / name / "seeds" / str(seed) / "checkpoints")
            (out / "trials" / name / "seeds" / str(seed) / "metrics.jsonl").unlink()
    proc = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "output.log").read_text()
    assert log.count("read back from storage") >= 2 * len(lost), log[-3000:]  # each seed of each such trial
    assert proc.stderr.count(": started (") == 3 - len(finished), proc.stderr  # progress after a resume too
    # a trial whose local copy was lost restarts in a fresh directory; what was left of it is set aside
    after = {p.parent.name: p.read_text() for p in out.glob("trials/*/metrics.jsonl") if ".old-" not in p.parent.name}
    assert len(after) == 3 and set(before) <= set(after)
    for name in finished:
        assert after[name] == before[name], f"finished trial {name} was rerun"
    for name, text in after.items():
        evals = [r for r in map(json.loads, text.splitlines()) if r["kind"] == "eval"]
        assert [r["step"] for r in evals] == list(range(0, 81, 10)), f"trial {name}: evaluations {evals}"
        seeds = {s: records(out / "trials" / name / "seeds" / str(s) / "metrics.jsonl", "eval") for s in (0, 1)}
        for i, rec in enumerate(evals):  # the trial's record at each step: the mean of its seeds at that step
            assert rec["seeds"] == {str(s): seeds[s][i]["val_loss"] for s in (0, 1)}
            assert rec["val_loss"] == pytest.approx((seeds[0][i]["val_loss"] + seeds[1][i]["val_loss"]) / 2)
        assert json.loads((out / "trials" / name / "params.json").read_text())["seeds"] == [0, 1]
    fs, kept = stored(storage)
    for name in after:  # each trial's storage: at most the latest and the best, each with both seeds
        mine = [k for k in kept if f"/sweep-{name}/" in k]
        assert 1 <= len(mine) <= 2, mine
        for folder in mine:
            assert all(fs.get_file_info(f"{folder}/seeds/{s}/checkpoint/model.safetensors").size > 0 for s in (0, 1))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["finished"] == 3 and all(t["seeds"] == [0, 1] for t in summary["trials"])
    from dtlab.analysis.loaders import load
    from dtlab.trainers.cli.listing import listing

    runs = load([out]).runs  # the report's runs: each seed of each trial, never the trial's means
    assert sorted(runs["run_id"]) == sorted(f"trial-{n}-seed{s}" for n in after for s in (0, 1))
    assert runs.groupby("params")["seed"].apply(sorted).tolist() == [[0, 1]] * 3
    rows = listing(out)  # `dtlab ls`: the sweep, its three trials finished
    assert rows[0].kind == "sweep" and rows[0].status == "3 finished" and rows[0].steps == "3 trials", rows[0]
    import optuna  # the study is in its journal file, continued by the resume: one trial per configuration

    study = optuna.load_study(study_name="sweep_smoke", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "optuna.journal"))))
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 3, states
    finals = sorted(t["val_loss"] for t in summary["trials"])  # Optuna was told each trial's mean over seeds
    assert sorted(t.value for t in study.trials if t.state.name == "COMPLETE") == pytest.approx(finals)


@pytest.mark.parametrize("name", ["sweep_smoke.yaml", "sweep_gpu.yaml", "sweep_multigpu.yaml"])
def test_shipped_sweeps_plan(name):
    plan = plan_sweep(load_spec(ROOT / "experiments" / name), name)
    assert len(plan.variants) >= 2 and len(plan.dims) >= 3


@pytest.mark.parametrize("name, gpus, per_trial, at_once", [
    ("sweep_gpu.yaml", 1, 1.0, 1),  # one GPU: one trial at a time, its two seeds side by side on it (0.5 GPU each)
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
    from dtlab.trainers.orchestrate.sweep import pareto

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

    from dtlab.trainers.orchestrate.ray_train import scaling

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


class _Trial:
    def __init__(self, trial_id):
        self.trial_id = trial_id


def test_asha_rungs_compare_trials_at_equal_compute():
    """Two configurations evaluated every 10 steps, one twice the other's cost per step: at the rung
    of 40 FLOPs the costly one is judged after 20 steps and the cheap one after 40, each at exactly
    40 FLOPs; at equal steps (20) the cheap one would look worse and be cut."""
    from dtlab.trainers.orchestrate.sweep import EqualComputeASHA

    asha = EqualComputeASHA("val_loss", "min", milestones=[40.0, 80.0], reduction_factor=2)
    costly = [(0, 0.0, 6.0), (10, 20.0, 4.0), (20, 40.0, 3.0), (30, 60.0, 2.9)]  # (step, train_flops, val_loss)
    cheap = [(0, 0.0, 6.0), (10, 10.0, 5.0), (20, 20.0, 4.0), (30, 30.0, 3.2), (40, 40.0, 2.8)]
    assert cheap[2][2] > costly[2][2]  # precondition: at step 20 the cheap one is behind
    for _, flops, loss in costly:
        assert asha.judge("costly", flops, loss) == "CONTINUE"
    decisions = [asha.judge("cheap", flops, loss) for _, flops, loss in cheap]
    assert decisions == ["CONTINUE"] * 5  # ahead at equal compute: kept
    assert asha.rungs[0] == {"costly": 3.0, "cheap": 2.8}
    # a third one, worse at 40 FLOPs but reaching them between two evaluations: interpolated, then cut
    assert asha.judge("late", 0.0, 6.0) == "CONTINUE"
    assert asha.judge("late", 30.0, 3.5) == "CONTINUE"
    assert asha.judge("late", 50.0, 3.1) == "STOP"
    assert asha.rungs[0]["late"] == pytest.approx(3.5 + (3.1 - 3.5) * (40 - 30) / (50 - 30))


def test_asha_state_round_trip_and_a_changed_asha_is_refused(tmp_path):
    from dtlab.trainers.orchestrate.sweep import EqualComputeASHA

    path = tmp_path / "asha.json"
    asha = EqualComputeASHA("val_loss", "min", milestones=[10.0, 20.0], reduction_factor=2, path=path)
    for trial, losses in {"a": [5.0, 3.0, 2.0], "b": [5.0, 3.5, 2.5], "c": [5.0, 2.9, 2.2]}.items():
        for i, loss in enumerate(losses):
            asha.judge(trial, 10.0 * i, loss)
    assert asha.rungs == [{"a": 3.0, "b": 3.5, "c": 2.9}, {"a": 2.0, "b": 2.5, "c": 2.2}]
    fresh = EqualComputeASHA("val_loss", "min", milestones=[10.0, 20.0], reduction_factor=2)
    assert fresh.judge("d", 10.0, 4.0) == "CONTINUE"  # empty rungs (Tune's ASHA on a resume): nothing to compare
    again = EqualComputeASHA("val_loss", "min", milestones=[10.0, 20.0], reduction_factor=2, path=path)
    again.restore(str(path))
    assert again.rungs == asha.rungs and again.last == asha.last
    assert again.judge("d", 10.0, 4.0) == "STOP"  # the rungs it had: a resumed trial below the cutoff is cut
    changed = EqualComputeASHA("val_loss", "min", milestones=[10.0, 30.0], reduction_factor=3, path=path)
    with pytest.raises(SpecError, match=r"ASHA differs .*milestones.*reduction_factor: 2.0 -> 3.0"):
        changed.restore(str(path))


def test_asha_rungs_from_the_plan_are_in_flops_of_the_costliest_configuration():
    from dtlab.models.config import make_config
    from dtlab.models.flops import flops_per_token
    from dtlab.trainers.orchestrate.sweep import asha_milestones, eval_interval_flops

    plan = plan_sweep(load_spec(ROOT / "experiments/sweep_smoke.yaml"))
    flops = eval_interval_flops(plan, 1024)
    t, d = plan.spec.training, plan.spec.data
    tokens = t.batch_size * t.grad_accum_steps * d.block_size
    each = {(v, c): t.eval_every * tokens * flops_per_token(make_config(v, "debug", vocab_size=1024,
                                                                        **{f"{v}_capacity": c}), d.block_size)
            for v in ("mod", "dtf") for c in (0.1, 0.5)}
    assert flops == pytest.approx(max(each.values())) and len(set(each.values())) == 4  # costs differ
    milestones = asha_milestones(plan.spec, plan, flops)
    assert milestones == pytest.approx([flops, 2 * flops, 4 * flops])  # grace 1, factor 2, max_t 5 evaluations


def test_optuna_is_told_how_each_trial_ended(tmp_path):
    """Finished: COMPLETE with the trial's last evaluation; stopped by ASHA: PRUNED with its last
    intermediate value; diverged or failed: FAILED. The study is Optuna's journal file."""
    import optuna

    from dtlab.trainers.orchestrate.sweep import STUDY, make_searcher

    plan = plan_sweep(load_spec(ROOT / "experiments/sweep_smoke.yaml"))
    searcher = make_searcher(plan, tmp_path)
    ends = {"t0": "finished", "t1": "stopped", "t2": "diverged", "t3": "failed"}
    for i, (trial, end) in enumerate(ends.items()):
        assert searcher.suggest(trial)
        run = tmp_path / "trials" / trial
        run.mkdir(parents=True)
        evals = [{"kind": "eval", "step": s, "val_loss": 5.0 - s / 10 - i / 100, "done": s == 30}
                 for s in (0, 10, 20, 30)]
        evals = evals if end == "finished" else evals[:2]
        (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
        for n, e in enumerate(evals, 1):
            searcher.on_trial_result(trial, {**e, "training_iteration": n})
        if end == "diverged":
            (run / "diverged.json").write_text(json.dumps({"step": 10, "reason": "diverged at step 10"}))
        if end == "failed":
            (run / "status.json").write_text(json.dumps({"state": "failed", "error": "out of memory: ..."}))
        searcher.on_trial_complete(trial, {**evals[-1], "val_loss": 1.0})  # Tune's last result, stopped or not
    assert (tmp_path / STUDY).is_file()
    study = optuna.load_study(study_name=plan.spec.name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / STUDY))))
    states = [t.state.name for t in study.trials if t.state.name != "WAITING"]  # (the variants queued in turn)
    assert states == ["COMPLETE", "PRUNED", "FAIL", "FAIL"]
    assert study.trials[0].value == pytest.approx(5.0 - 3.0)  # its own last evaluation, not the result passed
    assert study.trials[1].value == pytest.approx(5.0 - 1.0 - 0.01)  # the last intermediate value
    assert study.best_trial.number == 0


def test_a_resumed_sweep_runs_at_the_clusters_concurrency_now(tmp_path):
    """Tune restores a sweep's searcher, scheduler and callbacks from the pickle it made at the start;
    ours unpickle as the ones this process built, so a resume runs as many trials at once as the
    cluster fits now, and with the scheduler's saved rungs."""
    import ray.cloudpickle as pickle
    from ray import tune

    from dtlab.trainers.orchestrate import sweep

    plan = plan_sweep(load_spec(ROOT / "experiments/sweep_smoke.yaml"))
    out = tmp_path / "s"
    out.mkdir()
    tuner = sweep.make_tuner(plan, out, resume=False, concurrent=1, eval_flops=1e6)
    assert tuner is not None and (out / "asha.json").is_file()
    first = sweep._LIVE["limit"]
    sweep._LIVE.clear()  # a new process
    state = (out / "tune" / "sweep" / "tuner.pkl").read_bytes()
    with pytest.raises(RuntimeError, match="restored by `dtlab sweep --resume`"):
        pickle.loads(state)
    restored = sweep.make_tuner(plan, out, resume=True, concurrent=3, eval_flops=1e6)
    assert isinstance(restored, tune.Tuner)
    config = pickle.loads(state)["_tune_config"]  # what Tuner.restore reads back
    assert config.search_alg is sweep._LIVE["limit"] is not first and config.search_alg.max_concurrent == 3
    assert config.scheduler is sweep._LIVE["scheduler"]
    with pytest.raises(SpecError, match="ASHA differs"):
        sweep.make_tuner(plan, out, resume=True, concurrent=3, eval_flops=2e6)  # other rungs: refused


def test_a_stopped_trial_keeps_best_and_drops_last(tmp_path):
    from dtlab.trainers.orchestrate.sweep import drop_last

    def checkpoint(run, name, files):
        folder = run / "checkpoints" / name
        folder.mkdir(parents=True)
        for f, size in files.items():
            (folder / f).write_bytes(b"x" * size)

    weights, opt = {"model.safetensors": 1000, "trainer_state.json": 10}, {"optimizer.safetensors": 2000}
    apart, together = tmp_path / "apart", tmp_path / "together"
    checkpoint(apart, "step-0000010", weights)
    checkpoint(apart, "step-0000020", {**weights, **opt})
    (apart / "checkpoints" / "best").symlink_to("step-0000010")
    (apart / "checkpoints" / "last").symlink_to("step-0000020")
    checkpoint(together, "step-0000020", {**weights, **opt})
    for link in ("best", "last"):
        (together / "checkpoints" / link).symlink_to("step-0000020")
    assert drop_last(apart) == 3010 and drop_last(together) == 2000
    for run in (apart, together):
        left = {p.relative_to(run / "checkpoints").as_posix(): p.stat().st_size
                for p in (run / "checkpoints").rglob("*") if p.is_file()}
        assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_symlink()) == ["best"]
        assert sum(left.values()) == 1010 and not any("optimizer" in k for k in left), left


def test_workers_get_the_drivers_cache_token_and_credentials():
    from dtlab.trainers.orchestrate.ray_train import worker_env

    env = {"DTLAB_CACHE": "/shared/cache", "HF_HOME": "/shared/hf", "HF_TOKEN": "hf_x", "AWS_ACCESS_KEY_ID": "k",
           "WANDB_MODE": "offline", "HOME": "/home/me", "PATH": "/bin", "RAY_ADDRESS": "auto"}
    assert worker_env(env) == {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "DTLAB_CACHE", "HF_HOME", "HF_TOKEN",
                                                   "WANDB_MODE")}
