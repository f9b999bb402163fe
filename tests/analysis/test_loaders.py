"""Loaders on fixture directories: DataFrames, no torch or Ray, and honest problems."""

import subprocess
import sys
from pathlib import Path

import pandas as pd

from dtlab.analysis.loaders import load
from dtlab.analysis.tables import final_loss, importances, label_runs, speed
from tests.analysis.fixtures import make_run, set_epochs

ROOT = Path(__file__).resolve().parents[2]


def test_loads_runs_steps_evals_and_routing(tmp_path):
    make_run(tmp_path, "standard-seed0", "standard", final=5.0)
    make_run(tmp_path, "mod-seed0", "mod", final=5.2)
    make_run(tmp_path, "dtf-seed0", "dtf", final=5.1)
    rs = load([tmp_path])
    assert sorted(rs.runs["variant"]) == ["dtf", "mod", "standard"]
    assert len(rs.steps) == 6 and len(rs.evals) == 9 and not rs.problems
    assert set(rs.routing["stat"]) >= {"selected_frac", "gate_mean", "s_ce", "temp_cu"}
    assert set(rs.routing["mode"]) == {"topk", "causal"}
    assert len(rs.positions) == 2 * 2 * 3 * 16  # 2 routed runs x 2 layers x 3 evals x 16 positions
    row = rs.runs.set_index("variant").loc["mod"]
    assert row["done"] and row["device"] == "cpu" and row["routing_modes"] == "causal,topk"


def test_headline_loss_of_a_routed_model_is_its_causal_loss(tmp_path):
    """The top-k loss looks ahead within the row: it is shown, labelled training-mode, never the headline."""
    make_run(tmp_path, "standard-seed0", "standard", final=5.0)
    make_run(tmp_path, "mod-seed0", "mod", final=5.2)  # the fixture's causal loss is 0.01 above top-k
    rs = load([tmp_path])
    runs = rs.runs.set_index("variant")
    assert runs.loc["mod", "val_loss"] == 5.21 and runs.loc["mod", "val_loss_topk"] == 5.2
    assert runs.loc["mod", "headline_mode"] == "causal"
    assert runs.loc["standard", "val_loss"] == 5.0 and runs.loc["standard", "headline_mode"] == "topk"
    last = rs.evals[rs.evals["run_id"] == "mod-seed0"].sort_values("step").iloc[-1]
    assert last["val_loss"] == 5.21 and last["val_loss_topk"] == 5.2
    table = final_loss(label_runs(rs.runs)).set_index("label")
    assert table.loc["mod c=0.125", "val_loss_mean"] == 5.21 and table.loc["mod c=0.125", "routing"] == "causal"
    assert table.loc["mod c=0.125", "val_loss_topk_mean (training mode)"] == 5.2


def test_final_loss_interval_over_seeds(tmp_path):
    for seed, final in enumerate([5.0, 5.2, 5.4]):
        make_run(tmp_path, f"mod-seed{seed}", "mod", seed=seed, final=final)
    make_run(tmp_path, "standard-seed0", "standard")
    table = final_loss(label_runs(load([tmp_path]).runs)).set_index("label")
    mod = table.loc["mod c=0.125"]
    assert mod["runs"] == 3 and abs(mod["val_loss_mean"] - 5.21) < 1e-9 and abs(mod["val_loss_std"] - 0.2) < 1e-9
    assert abs((mod["ci95_high"] - mod["val_loss_mean"]) - 4.3026527 * 0.2 / 3 ** 0.5) < 1e-6  # t(2 dof)
    assert table.loc["standard"]["ci95_high"] != table.loc["standard"]["ci95_high"]  # one seed: no interval
    assert mod["seeds"] == 3 and mod["seed_ids"] == "0,1,2"
    assert table.loc["standard"]["seeds"] == 1 and table.loc["standard"]["seed_ids"] == "0"  # one seed, not "0"


def test_differences_within_the_seed_spread_are_not_established(tmp_path):
    for seed in range(3):
        make_run(tmp_path, f"standard-seed{seed}", "standard", seed=seed, final=5.0 + 0.1 * seed)  # sd 0.1
        make_run(tmp_path, f"mod-seed{seed}", "mod", seed=seed, final=5.05 + 0.1 * seed)  # 0.06 above: within
        make_run(tmp_path, f"dtf-seed{seed}", "dtf", seed=seed, final=5.5 + 0.1 * seed)  # 0.51 above: beyond
    make_run(tmp_path, "control", "standard", layers=2, final=6.0)  # one seed
    table = final_loss(label_runs(load([tmp_path]).runs)).set_index("label")
    assert table.loc["standard", "difference"] == "reference"
    assert table.loc["mod c=0.125", "difference"].startswith("not established (|0.060| within the seed spread")
    # sd 0.1 on both sides, 3 seeds: Welch's 4 degrees of freedom, t = 2.776, half-width 0.227
    assert table.loc["dtf c=0.125", "difference"] == ("established (95% interval of the difference [0.283, 0.737], "
                                                      "3 vs 3 seeds)")
    assert table.loc["dense control (2 layers)", "difference"] == "not established (single seed)"
    assert abs(table.loc["dtf c=0.125", "vs_standard"] - 0.51) < 1e-9
    # and against the compute-matched control, the comparison it exists for
    assert table.loc["dense control (2 layers)", "difference_vs_dense_control"] == "reference"
    assert table.loc["mod c=0.125", "difference_vs_dense_control"] == "not established (single seed)"
    assert abs(table.loc["mod c=0.125", "vs_dense_control"] - (5.16 - 6.0)) < 1e-9


def test_dense_control_and_speed(tmp_path):
    make_run(tmp_path, "standard-seed0", "standard", layers=4, tps=1000)
    make_run(tmp_path, "control", "standard", layers=2, tps=2000)
    make_run(tmp_path, "mod-seed0", "mod", tps=1500)
    runs = label_runs(load([tmp_path]).runs)
    assert "dense control (2 layers)" in set(runs["label"])
    table = speed(runs, load([tmp_path]).benches).set_index("label")
    assert abs(table.loc["mod c=0.125"]["time_ratio_vs_dense"] - 1000 / 1500) < 1e-9  # vs full-depth Standard
    assert table.loc["mod c=0.125"]["flop_ratio_vs_dense"] == 0.6
    # the control records a ratio of 1 to its own (2-layer) shape; against full-depth Standard it is cheaper
    (tmp_path / "control" / "run.json").write_text((tmp_path / "control" / "run.json").read_text().replace(
        '"flops_per_token": 1000000.0', '"flops_per_token": 550000.0'))
    runs = label_runs(load([tmp_path]).runs).set_index("label")
    assert runs.loc["dense control (2 layers)", "flop_ratio_vs_dense"] == 0.55


def test_beyond_the_spread_is_not_enough_when_the_interval_holds_zero(tmp_path):
    """Measured in the CPU study: MoD 5.196 +- 0.086 vs Standard 5.297 +- 0.062 over 3 seeds is beyond the
    seed spread, but Welch's 95% interval of the difference, about [-0.29, 0.09], holds 0."""
    from dtlab.analysis.tables import verdict

    row = pd.Series({"val_loss_mean": 5.1959, "val_loss_std": 0.0856, "seeds": 3, "configurations": 1})
    ref = pd.Series({"val_loss_mean": 5.2974, "val_loss_std": 0.0616, "seeds": 3, "configurations": 1})
    assert verdict(row, ref).startswith("not established (beyond the seed spread 0.086, but its 95% interval")
    sharp = pd.Series({"val_loss_mean": 4.9, "val_loss_std": 0.02, "seeds": 3, "configurations": 1})
    assert verdict(sharp, ref).startswith("established")


def test_runs_of_two_model_families_in_one_report(tmp_path):
    """A debug experiment and a wider one side by side: each Standard is full depth in its own
    family (not a 'dense control' of the other), and FLOP ratios are taken within the family."""
    make_run(tmp_path / "a", "standard-seed0", "standard", layers=4)
    make_run(tmp_path / "a", "mod-seed0", "mod", layers=4)
    wide = make_run(tmp_path / "b", "standard-seed0", "standard", layers=10)
    info = (wide / "run.json").read_text().replace('"hidden_size": 64', '"hidden_size": 384').replace(
        '"flops_per_token": 1000000.0', '"flops_per_token": 9000000.0')
    (wide / "run.json").write_text(info)
    runs = label_runs(load([tmp_path]).runs)
    assert sorted(runs["label"]) == ["mod c=0.125", "standard", "standard"]
    assert runs.set_index("label").loc["mod c=0.125", "flop_ratio_vs_dense"] == 0.6


def test_truncated_metrics_missing_files_and_different_spec_versions(tmp_path):
    make_run(tmp_path, "a", "mod", cut=True)
    other = {"name": "fx", "seed": 0, "model": {"type": "mod", "size": "small"}, "data": {}, "training": {}}
    make_run(tmp_path, "b", "mod", spec=other)
    (tmp_path / "b" / "run.json").unlink()
    rs = load([tmp_path, tmp_path / "nothing"])
    text = "\n".join(rs.problems)
    assert "metrics.jsonl: its last line is cut" in text
    assert "no run.json" in text
    assert "different spec versions" in text
    assert "nothing: no such directory" in text
    assert len(rs.runs) == 2  # nothing dropped silently


def test_empty_directory(tmp_path):
    rs = load([tmp_path])
    assert rs.empty and "no runs found" in rs.problems[0]


def test_sweep_trials_and_importance(tmp_path):
    for i in range(8):
        make_run(tmp_path / "trials", f"t{i}", "mod", final=5.0 + (i % 4) * 0.3 + 0.01 * i,
                 params={"model.type": "mod", "model.mod_capacity": 0.1 + 0.05 * (i % 4),
                         "training.optimizer.lr": 1e-3 * (1 + i % 2)})
    runs = label_runs(load([tmp_path]).runs)
    assert runs["run_id"].str.startswith("trial-").all()
    imp = importances(runs, {"training.optimizer.lr": {"loguniform": [1e-3, 2e-3]}})
    top = imp.sort_values("importance", ascending=False).iloc[0]
    assert top["parameter"] == "model.mod_capacity"  # the loss was made to depend on it


def test_analysis_imports_neither_torch_nor_ray():
    code = ("import sys, dtlab.analysis.loaders, dtlab.analysis.tables, dtlab.analysis.figures, dtlab.analysis.report,"
            " dtlab.analysis.isoflop;"
            "print('torch' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_welch_interval_is_scipys():
    """The Welch interval from the table's means, standard deviations and seed counts equals scipy's
    `ttest_ind(equal_var=False)` interval from the values themselves (fractional degrees of freedom)."""
    import math

    from scipy import stats

    from dtlab.analysis.tables import welch_interval

    a, b = [5.0, 5.3, 5.1, 5.45], [4.7, 4.75, 4.72]
    row = pd.Series({"val_loss_mean": sum(a) / 4, "val_loss_std": pd.Series(a).std(), "seeds": 4})
    ref = pd.Series({"val_loss_mean": sum(b) / 3, "val_loss_std": pd.Series(b).std(), "seeds": 3})
    want = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    got = welch_interval(row, ref)
    assert math.isclose(got[0], want.low) and math.isclose(got[1], want.high), (got, want)
    assert not math.isclose(stats.ttest_ind(a, b).confidence_interval(0.95).low, want.low)  # pooled differs


def test_a_sweeps_headline_is_each_variants_best_configuration(tmp_path):
    """Two DTF configurations of one seed each (as in sweep_smoke) are not two seeds: the headline is the
    better configuration (one seed: no interval), and the spread over configurations is its own columns."""
    make_run(tmp_path / "trials", "a", "dtf", final=6.1, params={"model.type": "dtf", "model.dtf_capacity": 0.2})
    make_run(tmp_path / "trials", "b", "dtf", final=6.5, params={"model.type": "dtf", "model.dtf_capacity": 0.4})
    for seed, final in enumerate([6.0, 6.2]):  # Standard: one configuration, two seeds
        make_run(tmp_path / "trials", f"s{seed}", "standard", seed=seed, final=final,
                 params={"model.type": "standard"})
    table = final_loss(label_runs(load([tmp_path]).runs)).set_index("label")
    dtf, std = table.loc["dtf"], table.loc["standard"]
    assert dtf["configurations"] == 2 and dtf["runs"] == 1 and '"model.dtf_capacity": 0.2' in dtf["configuration"]
    assert abs(dtf["val_loss_mean"] - 6.11) < 1e-9 and pd.isna(dtf["ci95_high"])  # causal loss, one seed
    assert abs(dtf["config_means_min"] - 6.11) < 1e-9 and abs(dtf["config_means_max"] - 6.51) < 1e-9
    assert std["configurations"] == 1 and std["runs"] == 2 and pd.isna(std["config_means_min"])
    assert abs(std["val_loss_mean"] - 6.1) < 1e-9 and std["ci95_high"] > std["val_loss_mean"]
    assert dtf["difference"] == "not established (single seed; best of 2 vs 1 configurations, each chosen on " \
                                "these seeds)"


def test_parameters_without_embeddings(tmp_path):
    import json

    run = make_run(tmp_path, "standard-seed0", "standard")
    info = json.loads((run / "run.json").read_text())
    info["training"]["model_config"].update(vocab_size=512, tie_word_embeddings=True)
    (run / "run.json").write_text(json.dumps(info))
    row = load([tmp_path]).runs.iloc[0]
    assert row["parameters"] == 1000 + 0 and row["embedding_parameters"] == 512 * 64
    assert row["non_embedding_parameters"] == 1000 - 512 * 64
    assert pd.isna(row["val_bpb"])  # the manifest has no byte count


def test_the_report_says_when_a_run_repeated_its_data(tmp_path):
    from dtlab.analysis.report import write_report

    set_epochs(make_run(tmp_path / "e", "standard-s0", "standard"), planned=2.2, per_step=2.2 / 20)
    set_epochs(make_run(tmp_path / "e", "mod-s0", "mod"), planned=None, per_step=0.15)  # older run.json
    set_epochs(make_run(tmp_path / "e", "dtf-s0", "dtf"), planned=0.6, per_step=0.6 / 20)  # one pass, not all of it
    make_run(tmp_path / "e", "dtf-s1", "dtf", seed=1)  # nothing recorded about epochs
    runs = load([tmp_path / "e"]).runs.set_index("run_id")
    assert runs.loc["standard-s0", "epochs_seen"] == 2.2 and runs.loc["standard-s0", "last_epoch"] == 2
    assert runs.loc["dtf-s0", "epochs_seen"] == 0.6 and runs.loc["dtf-s0", "last_epoch"] == 0
    report = write_report([tmp_path / "e"])
    repeated = [p for p in report.problems if "training data" in p]
    assert repeated == ["mod-s0 repeated its training data: its records reach pass 3",  # in the order of the runs
                        "standard-s0 saw its training data 2.2 times: later passes repeat rows it has trained on"]
    md = report.markdown.read_text()
    assert all(line in md for line in repeated)
    facts = pd.read_csv(report.tables_dir / "runs.csv").set_index("run_id")
    assert facts.loc["standard-s0", "epochs_seen"] == 2.2 and pd.isna(facts.loc["dtf-s1", "epochs_seen"])
