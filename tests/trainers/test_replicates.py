"""Seed replicates in one trial: seeds in lockstep, the trial's records and reports are the mean over
seeds at one step, each seed is the run it would be alone, and a resume continues each seed."""

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
        assert metrics["val_loss_seed0"] == a["val_loss"] and ckpt is not None
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
