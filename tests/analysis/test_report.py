"""The report: files, tables, and a real headless Chromium that renders every chart without errors."""

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dtlab.analysis.report import ReportError, write_report
from dtlab.trainers.cli.main import main
from tests.analysis.fixtures import make_run

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def experiment(tmp_path):
    for seed in (0, 1):
        make_run(tmp_path, f"standard-seed{seed}", "standard", seed=seed, final=5.0 + seed * 0.1)
        make_run(tmp_path, f"mod-seed{seed}", "mod", seed=seed, final=5.2 + seed * 0.1, tps=1500)
        make_run(tmp_path, f"dtf-seed{seed}", "dtf", seed=seed, final=5.1 + seed * 0.1, tps=1400)
    make_run(tmp_path, "control", "standard", layers=2, final=5.5, tps=2000)
    (tmp_path / "bench.json").write_text(json.dumps([
        {"variant": "standard", "capacity": None, "step_s": 0.1, "tokens_per_s": 1000, "flops_per_token": 1e6,
         "flop_ratio_vs_dense": 1.0, "step_ratio_vs_dense": 1.0, "mfu": None, "peak_mem_gib": None, "device": "cpu",
         "preset": "debug"}]))
    return tmp_path


def test_report_files_and_tables(tmp_path):
    exp = experiment(tmp_path / "exp")
    report = write_report([exp])
    assert report.html == exp / "report.html" and report.charts >= 8
    page = report.html.read_text()
    assert "<script src=" not in page and "plotly" in page.lower()  # self-contained: JavaScript inlined
    tables = {p.stem for p in report.tables_dir.glob("*.csv")}
    assert {"final_loss", "speed", "best_configs", "runs"} <= tables
    md = report.markdown.read_text()
    lead = "Validation losses of routed models (MoD, DTF) are in causal routing"
    assert lead in md.splitlines()[4] and page.index(lead) < page.index("<section>")  # said first
    assert "| dense control (2 layers) |" in md and "dtlab bench (cpu, debug)" in md
    assert "abc123def4" in md  # the commit of each run
    # written again in place (it is ours), but never over a file that is not, or one changed since
    write_report([exp])
    (tmp_path / "mine.html").write_text("<html>my notes</html>")
    with pytest.raises(ReportError, match="not written by dtlab"):
        write_report([exp], tmp_path / "mine.html")
    assert (tmp_path / "mine.html").read_text() == "<html>my notes</html>"
    (report.tables_dir / "speed.csv").write_text("my edits")
    with pytest.raises(ReportError, match=r"speed.csv exists and was not written by dtlab report \(or was changed"):
        write_report([exp])
    assert (report.tables_dir / "speed.csv").read_text() == "my edits"
    write_report([exp], force=True)  # --force replaces it
    assert (report.tables_dir / "speed.csv").read_text() != "my edits"


def test_lead_sentence_says_when_a_routed_headline_is_top_k(tmp_path):
    make_run(tmp_path / "e", "mod-seed0", "mod")
    run = make_run(tmp_path / "e", "dtf-seed0", "dtf")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in lines:  # as training.eval_causal: false writes them
        r.pop("val_loss_causal", None), r.pop("routing_causal", None)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    md = write_report([tmp_path / "e"]).markdown.read_text()
    assert "are in causal routing" in md and "Except dtf-seed0: evaluated without causal routing" in md
    make_run(tmp_path / "d", "standard-seed0", "standard")
    assert "No routed models here" in write_report([tmp_path / "d"]).markdown.read_text()


def test_report_says_what_is_missing(tmp_path):
    make_run(tmp_path / "exp", "mod-seed0", "mod", cut=True)
    report = write_report([tmp_path / "exp", tmp_path / "ghost"], tmp_path / "r.html")
    page = html.unescape(report.html.read_text())
    assert "What is missing or odd" in page and "its last line is cut" in page and "ghost: no such directory" in page
    with pytest.raises(ReportError, match=r"no runs found under .*ghost.*ghost: no such directory"):
        write_report([tmp_path / "ghost"], tmp_path / "empty.html")
    assert not (tmp_path / "empty.html").exists() and not (tmp_path / "empty_tables").exists()


def test_markdown_shows_html_like_text_never_runs_it(tmp_path):
    run = make_run(tmp_path / "e", "mod-seed0", "mod")
    (run / "spec.yaml").write_text((run / "spec.yaml").read_text().replace("name: fx", "name: <script>x()</script>"))
    (run / "run.json").write_text((run / "run.json").read_text().replace('"abc123def4567"', '"<b>x</b>"'))
    md = write_report([tmp_path / "e"]).markdown.read_text()
    assert "<script>" not in md and "<b>" not in md and "&lt;b&gt;x&lt;/b&gt;" in md


def test_run_files_that_are_not_mappings_are_problems_not_crashes(tmp_path):
    a = make_run(tmp_path / "e", "mod-seed0", "mod")
    b = make_run(tmp_path / "e", "dtf-seed0", "dtf")
    (a / "run.json").write_text("[1, 2]")
    (b / "spec.yaml").write_text("- a\n- list\n")
    report = write_report([tmp_path / "e"])
    text = "\n".join(report.problems)
    assert "run.json: not a JSON object" in text and "spec.yaml: not a mapping of spec sections" in text


def test_report_cli(tmp_path, capsys):
    exp = experiment(tmp_path / "exp")
    assert main(["report", str(exp), "--out", str(tmp_path / "out.html")]) == 0
    assert "charts" in capsys.readouterr().out and (tmp_path / "out.html").is_file()


def _chromium(args, url, tmp_path):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chrome-profile'}", "--virtual-time-budget=20000"]
    return subprocess.run([CHROMIUM, *flags, *args, url], capture_output=True, text=True, timeout=180)


def _isoflop_study(root):
    """Two budgets x five sizes x Standard and MoD, two seeds: MoD's optima 0.1 nats lower."""
    import math
    import random

    from tests.analysis.fixtures import make_isoflop_study

    def loss(variant, budget, params, seed):
        return 3.0 - 0.1 * (variant == "mod") + 0.8 * (math.log10(params) - 6.55) ** 2 + random.Random(
            f"{variant}{budget}{params}{seed}").gauss(0, 0.01)

    sizes = {f"s{i}": (int(1e6 * 2 ** i), 64 + 32 * i) for i in range(5)}
    return make_isoflop_study(root, [1e15, 1e16], sizes, ["standard", "mod"], [0, 1], loss)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["experiment", "isoflop"])
def test_report_renders_in_headless_chromium(tmp_path, kind):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed")
    exp = experiment(tmp_path / "exp") if kind == "experiment" else _isoflop_study(tmp_path / "iso")
    report = write_report([exp])
    if kind == "isoflop":
        assert "isoFLOP curves" in report.html.read_text()  # precondition: the study's figures are on the page
    dom = _chromium(["--dump-dom"], report.html.as_uri(), tmp_path).stdout
    errors = re.search(r'data-errors="([^"]*)"', dom)
    charts = re.search(r'data-charts="(\d+)"', dom)
    assert errors and charts, "the page did not finish loading"
    assert json.loads(html.unescape(errors.group(1))) == [], html.unescape(errors.group(1))
    assert int(charts.group(1)) == report.charts, (charts.group(1), report.charts)
    assert dom.count('class="main-svg"') >= report.charts
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / ("report.png" if kind == "experiment" else "report-isoflop.png")
    _chromium(["--window-size=1400,5000", f"--screenshot={shot}"], report.html.as_uri(), tmp_path)
    assert shot.is_file() and shot.stat().st_size > 50_000


def test_report_shows_samples_and_decode_speed(tmp_path):
    exp = experiment(tmp_path / "exp")
    for run, text in (("standard-seed0", "first line\nsecond | <b>bold</b>"), ("mod-seed0", "mod text"),
                      ("mod-seed1", "seed 1 is not shown")):
        (exp / run / "samples.json").write_text(json.dumps({
            "step": 20, "routing_mode": "causal", "samples": [{"prompt": "The", "text": text}]}))
    (exp / "bench-decode.json").write_text(json.dumps([
        {"bench": "decode", "variant": "standard", "capacity": None, "batch": 1, "decode_tokens_per_s": 100.0,
         "decode_speedup_vs_standard": 1.0, "realised_capacity_mean": None, "device": "cpu", "preset": "small"},
        {"bench": "decode", "variant": "mod", "capacity": 0.125, "batch": 1, "decode_tokens_per_s": 150.0,
         "decode_speedup_vs_standard": 1.5, "realised_capacity_mean": 0.13, "device": "cpu", "preset": "small"}]))
    report = write_report([exp])
    md = report.markdown.read_text()
    rows = [line for line in md.splitlines() if line.startswith("| The |")]
    assert len(rows) == 2 and "mod text" in rows[0] + rows[1] and "seed 1 is not shown" not in md
    assert "first line ⏎ second \\| &lt;b&gt;bold&lt;/b&gt;" in md  # one table row, escaped
    decode = [line for line in md.splitlines() if "bench --decode" in line]
    assert len(decode) == 2 and "mod c=0.125 (realised 0.130)" in decode[1] and "| 150 |" in decode[1]
    assert "0.6667" in decode[1]  # time per token relative to Standard
    assert "<b>bold</b>" not in report.html.read_text()


@pytest.mark.parametrize("name", ["optuna.journal", "optuna.db"])  # the journal; SQLite of older sweeps
def test_importances_come_from_the_sweeps_optuna_study(tmp_path, name):
    """A sweep directory's Optuna study (one trial per configuration, its value the mean over seeds) is
    what the importance table reads, not the per-seed runs; only COMPLETE trials count."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    from dtlab.analysis import tables
    from dtlab.analysis.report import _studies

    path = tmp_path / name
    storage = (optuna.storages.JournalStorage(JournalFileBackend(str(path))) if name.endswith(".journal")
               else f"sqlite:///{path}")
    study = optuna.create_study(study_name="s", storage=storage)
    dists = {"model.type": optuna.distributions.CategoricalDistribution(["mod"]),
             "model.mod_capacity": optuna.distributions.FloatDistribution(0.1, 0.5),
             "training.optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    for i in range(6):
        cap, lr = 0.1 + 0.07 * i, 1e-4 * (2 ** i)
        study.add_trial(optuna.trial.create_trial(params={"model.type": "mod", "model.mod_capacity": cap,
                                                          "training.optimizer.lr": lr},
                                                  distributions=dists, value=5.0 - cap))
    study.add_trial(optuna.trial.create_trial(params={"model.type": "mod", "model.mod_capacity": 0.2,
                                                      "training.optimizer.lr": 1e-3}, distributions=dists,
                                              state=optuna.trial.TrialState.PRUNED, intermediate_values={10: 9.0}))
    assert _studies([tmp_path]) == [path]
    trials = tables.study_trials(path)
    assert len(trials) == 6 and set(trials["variant"]) == {"mod"}
    imp = tables.importances(trials)
    assert set(imp["parameter"]) == {"model.mod_capacity", "training.optimizer.lr"}
    assert imp["note"].iloc[0] == "6 trials"


def _replicate_trial(root, trial, params, finals, total=20, stopped=False, diverged=False):
    """A sweep trial with its seeds under seeds/, as `dtlab sweep` writes one with `seeds: [0, 1]`."""
    for seed, final in enumerate(finals):
        run = make_run(root / "trials" / trial / "seeds", str(seed), "mod", seed=seed, final=final, steps=total,
                       params=params)
        info = json.loads((run / "params.json").read_text())
        (run / "params.json").write_text(json.dumps({**info, "trial_id": trial}))
        if stopped:  # ASHA stopped the trial (both seeds) at step 20 of 40
            facts = json.loads((run / "run.json").read_text())
            facts["training"]["total_steps"] = 40
            (run / "run.json").write_text(json.dumps(facts))
            lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            (run / "metrics.jsonl").write_text("".join(json.dumps({**r, "done": False}) + "\n" for r in lines))
    (root / "trials" / trial / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": total,
                                                                       "val_loss": sum(finals) / 2}) + "\n")
    if diverged:
        (root / "trials" / trial / "diverged.json").write_text(json.dumps({"step": 10, "reason": "diverged at 10"}))


def test_a_replicate_sweep_is_compared_by_configuration(tmp_path):
    """The report of a sweep with seeds in each trial: the runs are the seeds (never the trial's
    means), the best configuration is the best mean over seeds (as Optuna and the summary judge), a
    stopped trial is counted once, and the seeds of a diverged trial are diverged."""
    sweep = tmp_path / "sweep"
    _replicate_trial(sweep, "a", {"model.type": "mod", "model.mod_capacity": 0.2}, [5.0, 5.4], total=40)  # mean 5.2
    _replicate_trial(sweep, "b", {"model.type": "mod", "model.mod_capacity": 0.3}, [4.9, 5.7], total=40)  # mean 5.3
    _replicate_trial(sweep, "c", {"model.type": "mod", "model.mod_capacity": 0.4}, [4.0, 4.1], stopped=True)
    _replicate_trial(sweep, "d", {"model.type": "mod", "model.mod_capacity": 0.5}, [3.0, 3.1], diverged=True)
    report = write_report([sweep])
    import pandas as pd

    got = pd.read_csv(report.tables_dir / "best_configs.csv").iloc[0]  # not trial b's seed 0 (4.9, the best seed)
    assert got["model.mod_capacity"] == 0.2 and got["val_loss"] == pytest.approx(5.2 + 0.01)  # causal loss
    assert got["seeds"] == 2 and got["run_id"] == "trial-a-seed0, trial-a-seed1"
    md = report.markdown.read_text()
    assert "1 trial(s) stopped early by ASHA (at step 20)" in md
    # the headline: the best finished configuration over its seeds (a), with the spread over a and b apart
    final = pd.read_csv(report.tables_dir / "final_loss.csv").iloc[0]
    assert final["val_loss_mean"] == pytest.approx(5.21) and final["runs"] == 2 and final["configurations"] == 2
    assert final["ci95_low"] == pytest.approx(5.21 - 12.7062047 * 0.4 / 2, abs=1e-6)  # seeds 5.0 and 5.4: sd 0.283
    assert (final["config_means_min"], final["config_means_max"]) == pytest.approx((5.21, 5.31))
    common = pd.read_csv(report.tables_dir / "common_step.csv")  # every trial at the step all reached
    assert list(common["trial"]) == ["c", "a", "b"] and set(common["step"]) == {20}  # d diverged: not a result
    assert list(common["status"]) == ["stopped at step 20", "finished", "finished"]
    # a and b at step 20 of their 40 (2.0 above their final losses), not at their ends
    assert common["val_loss"].tolist() == pytest.approx([4.06, 7.21, 7.31]) and set(common["seeds"]) == {2}
    from dtlab.analysis.loaders import load

    rs = load([sweep])
    assert sorted(rs.runs["run_id"]) == sorted(f"trial-{t}-seed{s}" for t in "abcd" for s in (0, 1))
    assert rs.runs.set_index("run_id").loc[["trial-d-seed0", "trial-d-seed1"], "diverged"].notna().all()
