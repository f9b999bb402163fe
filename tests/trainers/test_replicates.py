"""Seed replicates in one trial: seeds in lockstep, the trial's records and reports are the mean over
seeds at one step, each seed is the run it would be alone, and a resume continues each seed. In turn in
one process (no process group, `--no-ray`), and side by side: `num_workers x seeds` ranks (Ray Train, or
a gloo worker group of processes here), each seed's ranks a process group of their own."""

import json
from pathlib import Path

import pytest

from dtlab.trainers.orchestrate.replicates import seed_dir, train_trial
from dtlab.trainers.run.data import prepare_data
from dtlab.trainers.run.loop import Hooks
from dtlab.trainers.spec import spec_from_dict
from tests.records import evals, records
from tests.trainers.conftest import tiny_spec


class Reports(Hooks):
    def __init__(self, stop_after: int | None = None) -> None:
        self.reports, self.calls, self.stop_after = [], 0, stop_after

    def report(self, metrics, checkpoint_dir):
        self.reports.append((metrics, checkpoint_dir))

    def on_step(self, step):
        self.calls += 1
        if self.stop_after is not None and self.calls > self.stop_after:
            raise KeyboardInterrupt

    def export(self, record):
        self.exported = getattr(self, "exported", set()) | {record["run"]}


def config(tmp_path, name, seeds=None, seed=0):
    spec = spec_from_dict(tiny_spec(model={"type": "dtf"}, seed=seed))
    data = prepare_data(spec.data)
    (tmp_path / name).mkdir(exist_ok=True)
    return {"spec": spec.model_dump(mode="json"), "run_dir": str(tmp_path / name), "data_dir": str(data.path),
            "seeds": seeds}


def test_seeds_advance_together_and_the_trial_reports_their_mean(tmp_path):
    hooks = Reports()
    train_trial(config(tmp_path, "trial", seeds=[0, 1]), hooks)
    trial = tmp_path / "trial"
    alone = {}
    for seed in (0, 1):
        train_trial(config(tmp_path, f"alone{seed}", seed=seed), Hooks())
        alone[seed] = evals(tmp_path / f"alone{seed}")
        # each seed is the run it would be on its own: same records at the same steps
        assert [(r["step"], r["val_loss"]) for r in evals(seed_dir(trial, seed))] == \
            [(r["step"], r["val_loss"]) for r in alone[seed]]
    assert alone[0][-1]["val_loss"] != alone[1][-1]["val_loss"]  # the seeds differ
    steps = [0, 4, 8, 12]
    assert [m["step"] for m, _ in hooks.reports] == steps  # one report per step, never per seed
    mine = evals(trial)
    assert [r["step"] for r in mine] == steps and [r["step"] for r in records(trial, "train")] == [2, 4, 6, 8, 10, 12]
    for (metrics, ckpt), rec, a, b in zip(hooks.reports, mine, alone[0], alone[1], strict=True):
        mean = (a["val_loss"] + b["val_loss"]) / 2
        assert metrics["val_loss"] == pytest.approx(mean, rel=1e-12) and rec["val_loss"] == metrics["val_loss"]
        assert rec["seeds"] == {"0": a["val_loss"], "1": b["val_loss"]}
        assert metrics["val_loss_seed0"] == a["val_loss"]
        assert (ckpt is not None) == (metrics["step"] > 0)  # the seeds' checkpoints (none of the untrained step 0)
    assert mine[-1]["done"] and not any(r["done"] for r in mine[:-1])
    assert hooks.exported == {"trial-seed0", "trial-seed1"}  # the seeds' metrics series are the trial's own


def test_an_interrupted_trial_resumes_each_seed_and_keeps_one_record_per_step(tmp_path):
    whole = Reports()
    train_trial(config(tmp_path, "whole", seeds=[0, 1]), whole)
    # 4 + 4 steps reach step 4 for both seeds, seed 0 then reaches step 8 and seed 1 stops at step 6:
    # seed 0 is an interval ahead when the trial resumes
    cut = Reports(stop_after=4 + 4 + 4 + 2)
    with pytest.raises(KeyboardInterrupt):
        train_trial(config(tmp_path, "cut", seeds=[0, 1]), cut)
    cut_trial = tmp_path / "cut"
    assert [r["step"] for r in evals(seed_dir(cut_trial, 0))] == [0, 4, 8]  # the precondition: one ahead
    assert [r["step"] for r in evals(seed_dir(cut_trial, 1))] == [0, 4]
    assert [r["step"] for r in evals(cut_trial)] == [0, 4]
    again = Reports()
    train_trial(config(tmp_path, "cut", seeds=[0, 1]), again)
    assert [m["step"] for m, _ in again.reports] == [8, 12]
    for kind in ("train", "eval"):
        got = [(r["step"], r.get("val_loss", r.get("loss"))) for r in records(cut_trial, kind)]
        want = [(r["step"], r.get("val_loss", r.get("loss"))) for r in records(tmp_path / "whole", kind)]
        assert got == want
    assert again.reports[-1][0]["val_loss"] == whole.reports[-1][0]["val_loss"]


def test_a_replicate_trial_comes_back_whole_from_its_storage_bundle(tmp_path):
    """What Ray's storage keeps of a replicate trial (`pack_for_storage`: the trial's records, each seed's last
    checkpoint and records) is enough to resume it with every local copy gone."""
    import shutil

    from dtlab.trainers.run.checkpoint import pack_for_storage, unpack_from_storage

    whole = Reports()
    train_trial(config(tmp_path, "whole", seeds=[0, 1]), whole)
    with pytest.raises(KeyboardInterrupt):
        train_trial(config(tmp_path, "cut", seeds=[0, 1]), Reports(stop_after=4 + 4 + 2))
    trial = tmp_path / "cut"
    pack_for_storage(trial, tmp_path / "stored")
    assert (tmp_path / "stored" / "seeds" / "1" / "checkpoint" / "model.safetensors").is_file()
    assert not (tmp_path / "stored" / "checkpoint").exists()  # the trial itself has no weights
    for seed in (0, 1):  # the local copies are lost
        shutil.rmtree(seed_dir(trial, seed) / "checkpoints")
        (seed_dir(trial, seed) / "metrics.jsonl").unlink()
    (trial / "metrics.jsonl").unlink()
    said = unpack_from_storage(tmp_path / "stored", trial)
    assert len(said) == 2 and all("checkpoint of step 4 read back" in line for line in said)
    again = Reports()
    train_trial(config(tmp_path, "cut", seeds=[0, 1]), again)
    assert [m["step"] for m, _ in again.reports] == [8, 12]
    for kind in ("train", "eval"):
        assert [(r["step"], r.get("val_loss", r.get("loss"))) for r in records(trial, kind)] == \
            [(r["step"], r.get("val_loss", r.get("loss"))) for r in records(tmp_path / "whole", kind)]


def test_a_worker_on_another_node_prepares_the_same_data(tmp_path, monkeypatch):
    """A node that cannot see the driver's data cache prepares the data itself, to the same key (the
    same rows), or refuses when what it prepares differs."""
    from dtlab.trainers.orchestrate.ray_train import node_data

    cfg = config(tmp_path, "run")
    driver = Path(cfg["data_dir"])
    monkeypatch.setenv("DTLAB_CACHE", str(tmp_path / "other-node"))
    here = node_data({**cfg, "data_dir": str(tmp_path / "not-on-this-node" / driver.name)})
    assert here.is_relative_to(tmp_path / "other-node") and here.name == driver.name
    assert (here / "train-00000.bin").read_bytes() == (driver / "train-00000.bin").read_bytes()
    assert node_data(cfg) == driver  # where the driver's folder is seen, it is used
    with pytest.raises(RuntimeError, match="differs from the driver's"):
        node_data({**cfg, "data_dir": str(tmp_path / "not-on-this-node" / "another-key")})


# ---- side by side: the seeds of a trial at the same time, each in processes of its own -------------
def _within_each_interval(trial, every):
    """For each evaluation interval of the trial: when (Unix time) and in which process each seed wrote
    its training records, {seed: [(time, process), ...]}, from the trial's own records."""
    out = {}
    for rec in records(trial, "train"):
        assert set(rec["seed_time"]) == set(rec["seeds"]), rec  # every seed's time is on record
        for seed, when in rec["seed_time"].items():
            out.setdefault((rec["step"] - 1) // every, {}).setdefault(seed, []).append(
                (when, rec["seed_process"][seed]))
    return out


def _trained_at_once(a, b):
    """Two seeds' records of one interval interleave in time: each wrote one before the other's last."""
    return min(t for t, _ in a) < max(t for t, _ in b) and min(t for t, _ in b) < max(t for t, _ in a)


def _side_by_side_spec(**training):
    return spec_from_dict(tiny_spec(model={"type": "dtf"}, training={"max_steps": 12, "eval_every": 6, "log_every": 1,
                                                                     **training},
                                    resources={"use_ray": True, "num_workers": 1, "cpus_per_worker": 1}))


@pytest.fixture(scope="module")
def ray_two_cpus():
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory, ray_two_cpus):
    """A trial of 2 seeds x 1 worker through Ray Train, and each seed trained alone (Ray, one worker)."""
    from dtlab.trainers.orchestrate.ray_train import train_with_ray
    from dtlab.trainers.run.data import prepare_data

    tmp = tmp_path_factory.mktemp("side-by-side")
    spec = _side_by_side_spec()
    base = {"spec": spec.model_dump(mode="json"), "data_dir": str(prepare_data(spec.data).path)}
    (tmp / "trial").mkdir()
    result = train_with_ray({**base, "run_dir": str(tmp / "trial"), "seeds": [0, 1]}, spec)
    for seed in (0, 1):
        alone = spec_from_dict({**spec.model_dump(mode="json"), "seed": seed})
        (tmp / f"alone{seed}").mkdir()
        train_with_ray({**base, "spec": alone.model_dump(mode="json"), "run_dir": str(tmp / f"alone{seed}")}, alone)
    return tmp, result


@pytest.mark.slow
def test_a_trials_seeds_train_at_the_same_time_in_processes_of_their_own(side_by_side, tmp_path):
    tmp, _ = side_by_side
    trial = tmp / "trial"
    assert json.loads((trial / "run.json").read_text())["side_by_side"] == {"ranks_per_seed": 1}
    got = _within_each_interval(trial, 6)
    assert sorted(got) == [0, 1] and all(len(got[i][s]) == 6 for i in (0, 1) for s in ("0", "1"))
    for interval in got.values():
        assert _trained_at_once(interval["0"], interval["1"]), interval
        processes = {s: {p for _, p in interval[s]} for s in ("0", "1")}
        assert all(len(p) == 1 for p in processes.values()) and processes["0"] != processes["1"], processes
    # the check can fail: the same trial with its seeds in turn (no process group) says it is not at once
    inturn = config(tmp_path, "inturn", seeds=[0, 1])
    inturn["spec"] = _side_by_side_spec().model_dump(mode="json") | {"resources": {"use_ray": False,
                                                                                   "device": "cpu"}}
    train_trial(inturn, Hooks())
    turns = _within_each_interval(tmp_path / "inturn", 6)
    assert sorted(turns) == [0, 1]
    for interval in turns.values():
        assert not _trained_at_once(interval["0"], interval["1"]), interval
        assert {p for _, p in interval["0"]} == {p for _, p in interval["1"]}  # one process for both


VOLATILE = ("tokens_per_s", "peak_rss_gib", "peak_mem_gib")


@pytest.mark.slow
def test_each_seed_trained_side_by_side_is_the_run_it_would_be_alone(side_by_side):
    tmp, result = side_by_side
    for seed in (0, 1):
        mine = records(seed_dir(tmp / "trial", seed), drop=VOLATILE)
        alone = records(tmp / f"alone{seed}", drop=VOLATILE)
        assert [(r["kind"], r["step"]) for r in mine] == [("eval", 0), *(("train", s) for s in range(1, 7)),
                                                           ("eval", 6), *(("train", s) for s in range(7, 13)),
                                                           ("eval", 12)]
        assert mine == alone  # every number of every record, exactly (losses, grad norms, routing, val_loss)
    assert records(tmp / "alone0", "train")[-1]["loss"] != records(tmp / "alone1", "train")[-1]["loss"]
    # the trial's records: the seeds' mean at each step
    seeds = {s: {(r["kind"], r["step"]): r for r in records(seed_dir(tmp / "trial", s))} for s in (0, 1)}
    for rec in records(tmp / "trial"):
        a, b = seeds[0][rec["kind"], rec["step"]], seeds[1][rec["kind"], rec["step"]]
        key = "val_loss" if rec["kind"] == "eval" else "loss"
        assert rec[key] == (a[key] + b[key]) / 2 and rec["seeds"] == {"0": a[key], "1": b[key]}
    assert result["step"] == 12 and result["val_loss"] == (seeds[0]["eval", 12]["val_loss"] +
                                                           seeds[1]["eval", 12]["val_loss"]) / 2


class RankReports(Reports):
    """A rank's reports; `diverge` makes this rank's seed stop as a diverged run does before step `at`."""

    def __init__(self, diverge_at: int | None = None) -> None:
        super().__init__()
        self.diverge_at = diverge_at

    def on_step(self, step):
        from dtlab.trainers.run.loop import Diverged

        if self.diverge_at is not None and step == self.diverge_at:
            raise Diverged(f"diverged at step {step + 1}: loss nan (a test)")


def _rank(rank, world, init, cfg, out, diverge):
    """One process of a worker group (gloo over a file), as Ray Train would start it."""
    import os

    import torch
    import torch.distributed as dist

    from dtlab.trainers.run.loop import Diverged

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    hooks = RankReports(diverge.get(rank))
    error = None
    try:
        train_trial(cfg, hooks)
    except Diverged as err:
        error = str(err)
    finally:
        dist.destroy_process_group()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({
        "pid": os.getpid(), "error": error,
        "reports": [[metrics, str(ckpt) if ckpt else None] for metrics, ckpt in hooks.reports]}))


def _worker_group(tmp_path, cfg, world, diverge=None, timeout=240):
    """Run `train_trial(cfg)` on `world` processes; each rank's reports, pid and error."""
    import time

    import torch.multiprocessing as mp

    out = tmp_path / f"ranks-{time.monotonic_ns()}"
    out.mkdir()
    init = f"file://{out / 'rendezvous'}"
    ctx = mp.start_processes(_rank, args=(world, init, cfg, str(out), diverge or {}), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError(f"the worker group did not end within {timeout} s (a rank waits for another)")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def test_side_by_side_every_rank_reports_the_mean_of_its_seeds_at_each_step(tmp_path):
    """Each rank reports (what Ray Train passes on to Tune, hence to ASHA and Optuna) the same values at
    the same steps: the mean over the seeds' own evaluations at that step; the checkpoint from rank 0."""
    cfg = config(tmp_path, "trial", seeds=[0, 1])
    ranks = _worker_group(tmp_path, cfg, world=2)
    assert ranks[0]["pid"] != ranks[1]["pid"] and not any(r["error"] for r in ranks)
    seeds = [evals(seed_dir(tmp_path / "trial", s)) for s in (0, 1)]
    assert [r["step"] for r in seeds[0]] == [r["step"] for r in seeds[1]] == [0, 4, 8, 12]
    assert seeds[0][-1]["val_loss"] != seeds[1][-1]["val_loss"]
    for r, rank in enumerate(ranks):
        assert [m["step"] for m, _ in rank["reports"]] == [0, 4, 8, 12]  # one report per step, never per seed
        for (metrics, ckpt), a, b in zip(rank["reports"], *seeds, strict=True):
            assert metrics["val_loss"] == (a["val_loss"] + b["val_loss"]) / 2
            assert metrics["val_loss_seed0"] == a["val_loss"] and metrics["val_loss_seed1"] == b["val_loss"]
            assert metrics["train_flops"] == a["train_flops"]
            assert (ckpt is not None) == (r == 0 and metrics["step"] > 0)  # rank 0 has the seeds' checkpoints
    assert [m for m, _ in ranks[0]["reports"]] == [m for m, _ in ranks[1]["reports"]]
    mine = evals(tmp_path / "trial")
    assert [r["val_loss"] for r in mine] == [m["val_loss"] for m, _ in ranks[0]["reports"]]
    assert mine[-1]["done"] and not any(r["done"] for r in mine[:-1])


def test_a_seed_that_diverges_side_by_side_ends_the_trial_on_every_rank(tmp_path):
    """The seed on rank 1 diverges before step 6: the other seed finishes the interval (step 8), then
    every rank stops with the divergence (no rank waits for ever), the trial is marked diverged with
    the reason and no report is made past step 4; started again, it stays stopped."""
    from dtlab.analysis.rundir import diverged_reason

    cfg = config(tmp_path, "trial", seeds=[0, 1])
    ranks = _worker_group(tmp_path, cfg, world=2, diverge={1: 5})
    assert all(r["error"] == "diverged at step 6: loss nan (a test)" for r in ranks), ranks
    assert all([m["step"] for m, _ in r["reports"]] == [0, 4] for r in ranks)
    trial = tmp_path / "trial"
    assert diverged_reason(trial) == "diverged at step 6: loss nan (a test)"
    assert [r["step"] for r in evals(seed_dir(trial, 0))] == [0, 4, 8]  # seed 0 reached the interval's end
    assert [r["step"] for r in evals(trial)] == [0, 4]
    again = _worker_group(tmp_path, cfg, world=2)
    assert all("the trial stays stopped" in r["error"] and not r["reports"] for r in again), again


@pytest.mark.slow
def test_a_sweep_tells_asha_and_optuna_the_mean_of_the_seeds_it_trains_side_by_side(tmp_path):
    """`dtlab sweep` with two seeds: the trial's seeds train side by side (two processes), and every result
    Tune received (what ASHA judges) and the value Optuna was told are the mean over the seeds at that step."""
    import subprocess
    import sys

    import optuna

    from dtlab.trainers.orchestrate.sweep import study_storage

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "dtlab.trainers.cli", "sweep", "experiments/sweep_smoke.yaml",
                           "sweep.num_samples=1", "seeds=[0,1]", "training.max_steps=20", "--out", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [trial] = [p for p in (out / "trials").iterdir() if p.is_dir()]
    assert json.loads((trial / "run.json").read_text())["side_by_side"] == {"ranks_per_seed": 1}
    processes = {p for r in records(trial, "train") for p in r["seed_process"].values()}
    assert len(processes) == 2, processes
    seeds = [evals(seed_dir(trial, s)) for s in (0, 1)]
    mine = evals(trial)
    assert [r["step"] for r in mine] == [r["step"] for r in seeds[0]] == [r["step"] for r in seeds[1]] == [0, 10, 20]
    assert seeds[0][-1]["val_loss"] != seeds[1][-1]["val_loss"]
    told = [json.loads(line) for path in (out / "tune").rglob("result.json") for line in path.read_text().splitlines()]
    assert [r["step"] for r in told] == [0, 10, 20]  # one result per step, never one per seed
    for result, rec, a, b in zip(told, mine, *seeds, strict=True):
        assert result["val_loss"] == rec["val_loss"] == (a["val_loss"] + b["val_loss"]) / 2
        assert result["val_loss_seed0"] == a["val_loss"] and result["val_loss_seed1"] == b["val_loss"]
        assert result["train_flops"] == rec["train_flops"] == a["train_flops"]
    study = optuna.load_study(study_name="sweep_smoke", storage=study_storage(out))
    [done] = study.trials
    assert done.state.name == "COMPLETE" and done.value == mine[-1]["val_loss"]


@pytest.mark.slow
def test_two_ranks_per_seed_side_by_side_each_seed_is_its_two_rank_run_alone(tmp_path):
    """2 seeds x 2 workers: four ranks, each seed's two a process group with its own DDP wrapper; every
    collective of a seed stays within its group, so each seed's records are those of the same seed
    trained alone on two ranks, exactly."""
    two = {"resources": {"use_ray": False, "device": "cpu", "num_workers": 2}}
    cfg = config(tmp_path, "trial", seeds=[0, 1])
    cfg["spec"] = {**cfg["spec"], **two}
    ranks = _worker_group(tmp_path, cfg, world=4)
    assert len({r["pid"] for r in ranks}) == 4 and not any(r["error"] for r in ranks)
    assert all([m["step"] for m, _ in r["reports"]] == [0, 4, 8, 12] for r in ranks)
    for seed in (0, 1):
        alone = config(tmp_path, f"alone{seed}", seed=seed)
        alone["spec"] = {**alone["spec"], **two}
        _worker_group(tmp_path, alone, world=2)
        facts = json.loads((seed_dir(tmp_path / "trial", seed) / "run.json").read_text())["training"]
        assert facts["world_size"] == 2 and facts["tokens_per_step"] == 2 * 4 * 64
        assert records(seed_dir(tmp_path / "trial", seed), drop=VOLATILE) == records(tmp_path / f"alone{seed}",
                                                                                     drop=VOLATILE)
    assert evals(tmp_path / "alone0")[-1]["val_loss"] != evals(tmp_path / "alone1")[-1]["val_loss"]
    mine = evals(tmp_path / "trial")
    assert [r["val_loss"] for r in mine] == [m["val_loss"] for m, _ in ranks[0]["reports"]]


def test_a_trial_cut_with_one_seed_ahead_resumes_side_by_side(tmp_path):
    """A trial cut when seed 0 was an interval ahead of seed 1 (trained in turn, as a `--no-ray` trial or
    an older sweep left it) resumes side by side: seed 1 catches up, the trial reports from step 8, and
    its records are those of the trial never cut, one per step."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank of the worker group below: the same arithmetic
    try:
        whole = Reports()
        train_trial(config(tmp_path, "whole", seeds=[0, 1]), whole)
        with pytest.raises(KeyboardInterrupt):
            train_trial(config(tmp_path, "cut", seeds=[0, 1]), Reports(stop_after=4 + 4 + 4 + 2))
    finally:
        torch.set_num_threads(threads)
    cut = tmp_path / "cut"
    assert [r["step"] for r in evals(seed_dir(cut, 0))] == [0, 4, 8]  # the precondition: one ahead
    assert [r["step"] for r in evals(seed_dir(cut, 1))] == [0, 4]
    ranks = _worker_group(tmp_path, config(tmp_path, "cut", seeds=[0, 1]), world=2)
    assert not any(r["error"] for r in ranks) and ranks[0]["pid"] != ranks[1]["pid"]
    assert all([m["step"] for m, _ in r["reports"]] == [8, 12] for r in ranks)
    for kind in ("train", "eval"):
        got = [(r["step"], r.get("val_loss", r.get("loss"))) for r in records(cut, kind)]
        assert got == [(r["step"], r.get("val_loss", r.get("loss"))) for r in records(tmp_path / "whole", kind)]
    for seed in (0, 1):
        assert records(seed_dir(cut, seed), drop=VOLATILE) == records(seed_dir(tmp_path / "whole", seed),
                                                                      drop=VOLATILE)
    assert ranks[0]["reports"][-1][0]["val_loss"] == whole.reports[-1][0]["val_loss"]
