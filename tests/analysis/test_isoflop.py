"""The isoFLOP analysis: synthetic studies whose losses come from known parabolas in log parameters (plus
noise), written as `dtlab isoflop` writes its directory, loaded as the report loads them. No training."""

import json
import math
import random

import numpy as np
import pandas as pd
import pytest

from dtlab.analysis import isoflop
from dtlab.analysis.isoflop import IsoflopError, fit_budget, huber_parabola
from dtlab.analysis.loaders import load
from dtlab.analysis.report import write_report
from tests.analysis.fixtures import VOCAB, make_isoflop_study

SIZES = {f"s{i}": (int(1e6 * 2 ** i), 64 + 32 * i) for i in range(5)}  # 1M to 16M parameters, 2x apart
TRUE_X, E, CURVE = 6.55, 3.0, 0.8  # optimum at 10^6.55 = 3.55M parameters, loss 3.0 there


def parabola(x_star: float = TRUE_X, floor: float = E, sd: float = 0.01, offsets: dict | None = None):
    """Losses from a known parabola in log10 parameters, plus Gaussian noise drawn from the run's name."""
    def loss(variant, budget, params, seed):
        rng = random.Random(f"{variant}|{budget}|{params}|{seed}")
        return floor + (offsets or {}).get(variant, 0.0) + CURVE * (math.log10(params) - x_star) ** 2 \
            + rng.gauss(0, sd)
    return loss


def points(root, **kw) -> pd.DataFrame:
    got, problems = isoflop.study_points(root, load([root]).runs)
    assert not problems, problems
    return got


def one_budget(tmp_path, sizes=SIZES, seeds=(0, 1, 2), **kw) -> pd.DataFrame:
    root = make_isoflop_study(tmp_path / "iso", [1e15], sizes, ["standard"], list(seeds), parabola(**kw))
    return points(root)


def test_the_fit_recovers_a_known_optimum(tmp_path):
    pts = one_budget(tmp_path)
    assert len(pts) == 15 and pts["size"].nunique() == 5  # precondition: every run finished and was read
    fit = fit_budget(pts)
    assert fit.status == "optimum" and fit.sizes == 5 and fit.points == 15
    true_n = 10 ** TRUE_X
    assert fit.optimum_low <= true_n <= fit.optimum_high, (fit.optimum_low, true_n, fit.optimum_high)
    assert fit.optimum_high / fit.optimum_low < 1.5  # not absurdly wide: the sizes tried span 16x
    assert fit.loss_low <= E <= fit.loss_high and fit.loss_high - fit.loss_low < 0.05
    assert abs(math.log10(fit.optimum) - TRUE_X) < 0.05 and abs(fit.loss - E) < 0.02
    # fitted against tokens too: at one budget log tokens = log(C / 6 / tokens per step...) - log N, a
    # parabola of its own whose vertex is at the optimal size's tokens
    tokens = fit_budget(pts, "tokens")
    assert tokens.status == "optimum"
    at_optimum = float(np.interp(TRUE_X, np.log10(pts["parameters"]), np.log10(pts["tokens"])))
    assert tokens.optimum_low <= 10 ** at_optimum <= tokens.optimum_high


def test_the_interval_covers_the_optimum_in_most_draws(tmp_path):
    """The stated 95% interval is an interval: over 20 noisy draws of the same study (3 seeds x 5 sizes,
    noise 0.01 nats) it holds the true optimum in most of them, and it is narrow."""
    x = np.repeat(np.log10([p for p, _ in SIZES.values()]), 3)
    held, widths = 0, []
    rng = np.random.default_rng(7)
    for draw in range(20):
        y = E + CURVE * (x - TRUE_X) ** 2 + rng.normal(0, 0.01, len(x))
        pts = pd.DataFrame({"budget": 1e15, "variant": "standard", "size": [f"s{i // 3}" for i in range(15)],
                            "parameters": 10 ** x, "val_loss": y})
        fit = fit_budget(pts, bootstrap=200, seed=draw)
        assert fit.status == "optimum"
        held += fit.optimum_low <= 10 ** TRUE_X <= fit.optimum_high
        widths.append(fit.optimum_high / fit.optimum_low)
    assert held >= 16, held  # a 95% interval misses 1 in 20 on average; 4 or more would be a broken interval
    assert max(widths) < 1.5, widths


def test_one_bad_run_does_not_carry_the_fit(tmp_path):
    """One run 0.3 nats too high (a bad seed) moves the Huber optimum little, while an ordinary least-squares
    parabola through the same points moves several times as far (so the test can tell the two apart)."""
    pts = one_budget(tmp_path)
    clean = fit_budget(pts)
    bad = pts.copy()
    i = bad.index[(bad["size"] == "s1") & (bad["seed"] == 0)][0]
    bad.loc[i, "val_loss"] += 0.3
    robust = fit_budget(bad)
    assert robust.status == "optimum"
    x = np.log10(bad["parameters"].astype(float)) - robust.x_center
    a, b, _ = np.polyfit(x, bad["val_loss"], 2)
    ols_shift = abs(-b / (2 * a) + robust.x_center - math.log10(clean.optimum))
    huber_shift = abs(math.log10(robust.optimum) - math.log10(clean.optimum))
    assert huber_shift < 0.005 < 2 * 0.005 < ols_shift, (huber_shift, ols_shift)  # in log10 parameters
    assert robust.optimum_low <= 10 ** TRUE_X <= robust.optimum_high


def test_huber_parabola_with_exact_points_is_the_parabola():
    x = np.array([-1.0, 0.0, 1.0, 2.0])
    p, delta = huber_parabola(x, 2 * x ** 2 - x + 3)
    assert p == pytest.approx([2, -1, 3], abs=1e-6) and delta == pytest.approx(1.345e-3)


def test_fewer_than_three_sizes_are_refused(tmp_path):
    two = {k: SIZES[k] for k in ("s1", "s2")}
    pts = one_budget(tmp_path, sizes=two)
    assert len(pts) == 6  # precondition: 3 seeds at each of the 2 sizes, so 6 points but 2 sizes
    with pytest.raises(IsoflopError, match=r"standard at 1e\+15 FLOPs: 2 size\(s\) with a finished run .* at least 3"):
        fit_budget(pts)
    study = isoflop.analyse(tmp_path / "iso", load([tmp_path / "iso"]).runs)
    row = study.optima[study.optima["axis"] == "parameters"].iloc[0]
    assert row["status"].startswith("refused: standard at 1e+15 FLOPs: 2 size(s)")
    assert any("at least 3 sizes" in p for p in study.problems)
    from dtlab.analysis import figures

    fig = figures.isoflop_curves(study.points, study.optima)  # the runs are still drawn, with no fit
    assert [t.mode for t in fig.data] == ["markers"] and len(fig.data[0].x) == 6


@pytest.mark.parametrize("side", ["below", "above"])
def test_a_minimum_at_the_edge_is_a_bound_with_the_sizes_to_add(tmp_path, side):
    x_star = 5.7 if side == "below" else 7.5  # 0.5M or 32M: outside the 1M-16M tried
    pts = one_budget(tmp_path, x_star=x_star)
    fit = fit_budget(pts)
    edge = 1e6 if side == "below" else 16e6
    assert fit.status == f"{side} the {'smallest' if side == 'below' else 'largest'} size tried"
    assert math.isnan(fit.optimum) and math.isnan(fit.optimum_low) and fit.best_tried == pytest.approx(edge)
    want = ("500k and 250k" if side == "below" else "32M and 64M")  # the tried sizes' 2x spacing, continued
    assert f"add sizes at about {want} parameters" in fit.note
    study = isoflop.analyse(tmp_path / "iso", load([tmp_path / "iso"]).runs)
    row = study.optima[study.optima["axis"] == "parameters"].iloc[0]
    shown = f"{'≤ 1M' if side == 'below' else '≥ 16M'} (bound) parameters"
    assert row["optimum [95%] or bound"] == shown and math.isnan(row["loss"])


def test_unfinished_runs_are_left_out_and_counted(tmp_path):
    root = make_isoflop_study(tmp_path / "iso", [1e15], SIZES, ["standard"], [0, 1], parabola(),
                              unfinished=("standard-s2-c1e+15-s0",))
    got, problems = isoflop.study_points(root, load([root]).runs)
    assert len(got) == 9 and "standard-s2-c1e+15-s0" not in set(got["run_id"])
    assert problems == [f"isoFLOP study {root}: 1 of 10 runs did not finish (done false on their last evaluation), "
                        "left out of the fits: standard-s2-c1e+15-s0"]
    (root / "runs" / "standard-s3-c1e+15-s1" / "metrics.jsonl").unlink()
    got, problems = isoflop.study_points(root, load([root]).runs)
    assert len(got) == 8 and any("1 of 10 runs never started" in p for p in problems)


def test_parameters_without_embeddings_and_bits_per_byte(tmp_path):
    root = make_isoflop_study(tmp_path / "tied", [1e15], SIZES, ["standard"], [0], parabola(), val_bytes=5000)
    pts = points(root).set_index("size")
    params, hidden = SIZES["s2"]
    assert pts.loc["s2", "non_embedding_parameters"] == params - VOCAB * hidden  # one matrix, tied
    assert pts.loc["s2", "val_bpb"] == pytest.approx(pts.loc["s2", "val_loss"] / math.log(2) * 2000 / 5000)
    root = make_isoflop_study(tmp_path / "untied", [1e15], SIZES, ["standard"], [0], parabola(), val_bytes=None,
                              tied=False)
    pts = points(root).set_index("size")
    assert pts.loc["s2", "non_embedding_parameters"] == params - 2 * VOCAB * hidden  # embedding and head
    assert pts["val_bpb"].isna().all()  # no byte count in the data manifest: no bits per byte
    study = isoflop.analyse(root, load([root]).runs)
    assert study.optima["loss_bpb"].isna().all() and study.optima["loss"].notna().any()


def test_power_laws_across_budgets_and_the_verdicts(tmp_path):
    """Three budgets whose optima follow known power laws, L*(C) = 40 C^-0.1 and N*(C) = 10^-1 C^0.5, with
    MoD 0.05 nats below Standard at each: the fits give back the exponents, and MoD is better."""
    budgets = [1e14, 1e15, 1e16]

    def loss(variant, budget, params, seed):
        x_star = -1 + 0.5 * math.log10(budget)
        floor = 40 * budget ** -0.1 - (0.05 if variant == "mod" else 0.0)
        rng = random.Random(f"{variant}|{budget}|{params}|{seed}")
        return floor + CURVE * (math.log10(params) - x_star) ** 2 + rng.gauss(0, 0.005)

    sizes = {f"s{i}": (int(10 ** (5.5 + 0.5 * i)), 64 + 32 * i) for i in range(6)}  # 0.32M to 32M
    root = make_isoflop_study(tmp_path / "iso", budgets, sizes, ["standard", "mod"], [0, 1], loss)
    study = isoflop.analyse(root, load([root]).runs, bootstrap=200)
    opt = study.optima[study.optima["axis"] == "parameters"]
    assert (opt["status"] == "optimum").all() and len(opt) == 6
    laws = study.laws.set_index(["variant", "quantity"])
    for variant in ("standard", "mod"):
        loss_law, size_law = laws.loc[(variant, "optimal loss (nats)")], laws.loc[(variant, "optimal parameters")]
        assert loss_law["budgets"] == 3 and size_law["budgets"] == 3
        assert size_law["exponent_low"] <= 0.5 <= size_law["exponent_high"] and abs(size_law["exponent"] - 0.5) < 0.05
        # MoD's optimal loss is 40 C^-0.1 - 0.05: close to a power law over two decades, not exactly one
        assert abs(loss_law["exponent"] + 0.1) < 0.01
    (sentence,) = study.sentences
    assert sentence.startswith("mod: better than standard at equal training compute at these budgets: at 1e+14 FLOPs "
                               "its optimal loss")
    assert sentence.count("difference -0.0") == 3 and "Not compared" not in sentence


def test_a_verdict_is_not_established_where_an_optimum_is_not_bracketed(tmp_path):
    def loss(variant, budget, params, seed):
        x_star = 5.7 if (variant == "standard" and budget == 1e16) else TRUE_X  # Standard's below at 1e16
        return parabola(x_star=x_star, offsets={"mod": -0.003})(variant, budget, params, seed)

    root = make_isoflop_study(tmp_path / "iso", [1e15, 1e16], SIZES, ["standard", "mod"], [0, 1, 2], loss)
    study = isoflop.analyse(root, load([root]).runs, bootstrap=200)
    (sentence,) = study.sentences
    # 0.003 nats within 0.01 noise: not established at 1e15; at 1e16 Standard's optimum is not bracketed
    assert sentence.startswith("mod: not established against standard at equal training compute at these budgets: "
                               "at 1e+15 FLOPs")
    assert "no two bracketed optima to compare at 1e+16 FLOPs (standard below the smallest size tried)" in sentence
    laws = study.laws.set_index(["variant", "quantity"])
    assert laws.loc[("standard", "optimal loss (nats)"), "note"] == "needs bracketed optima at 2 budgets or more; has 1"
    assert laws.loc[("mod", "optimal loss (nats)"), "note"] == "exact through 2 points: no interval"


def test_the_report_of_an_isoflop_study(tmp_path):
    root = make_isoflop_study(tmp_path / "iso", [1e15, 1e16], SIZES, ["standard", "mod"], [0, 1],
                              parabola(offsets={"mod": -0.1}))
    report = write_report([root])
    page, md = report.html.read_text(), report.markdown.read_text()
    assert "isoFLOP curves: final validation loss against parameters" in page  # the figure's title
    assert "Compute-optimal loss against training FLOPs" in page
    optima = pd.read_csv(report.tables_dir / "isoflop_optima.csv")
    assert len(optima) == 2 * 2 * 3  # budgets x variants x axes
    params = optima[optima["axis"] == "parameters"]
    assert (params["status"] == "optimum").all()
    assert all(lo <= 10 ** TRUE_X <= hi for lo, hi in zip(params["optimum_low"], params["optimum_high"], strict=True))
    assert "## isoflop optima" in md and "| 1e+15 | mod | parameters |" in md
    verdicts = pd.read_csv(report.tables_dir / "isoflop_verdicts.csv")["verdict"].tolist()
    assert len(verdicts) == 1 and verdicts[0].startswith("mod: better than standard") and verdicts[0] in page
    # the per-label tables compare a configuration's seeds, never different sizes or budgets
    final = pd.read_csv(report.tables_dir / "final_loss.csv")
    assert len(final) == 2 * 5 * 2 and set(final["runs"]) == {2}
    assert "standard · s2 · 1e+15 FLOPs" in set(final["label"])
    assert len(report.closing) == 20 and "standard · s2 · 1e+15 FLOPs" in set(report.closing["variant"])  # terminal
    points = pd.read_csv(report.tables_dir / "isoflop_points.csv")
    assert len(points) == 40 and ((points["flops_vs_budget"] - 1).abs() < 0.2).all()
    # sizes and steps differ by design: not a difference of spec versions (the loader alone says there is one)
    assert any("different spec versions" in p for p in load([root]).problems)
    assert not any("spec versions" in p for p in report.problems), report.problems
    assert md.index("## isoflop optima") < md.index("## final loss")  # the study's tables first
    import yaml

    spec_file = root / "runs" / "mod-s0-c1e+15-s0" / "spec.yaml"
    spec = yaml.safe_load(spec_file.read_text())
    spec["data"]["block_size"] = 32  # a run on other data: that is still said
    spec_file.write_text(yaml.safe_dump(spec))
    problems = write_report([root]).problems
    assert any("spec versions beyond their sizes and steps (data or training settings differ)" in p and
               "mod-s0-c1e+15-s0" in p for p in problems), problems


def test_a_broken_study_file_is_a_problem_not_a_crash(tmp_path):
    root = make_isoflop_study(tmp_path / "iso", [1e15], SIZES, ["standard"], [0], parabola())
    (root / "isoflop.json").write_text(json.dumps({"runs": [{"dir": "runs/x"}]}))
    report = write_report([root])
    assert any(p.startswith("isoFLOP study not analysed: ") and "runs[0] has no variant, size, budget, seed" in p
               for p in report.problems)
