"""isoFLOP studies: at each training-compute budget, which model size reaches the lowest loss, and is a
routed family's compute-optimal loss lower than the dense family's? (Hoffmann et al. 2022, approach 2;
the Mixture-of-Depths paper, section 4; Marin's isoFLOP sweeps.) Pure pandas, numpy and scipy.

A study directory (written by `dtlab isoflop`) holds `isoflop.json`:

    {"budgets": [C, ...], "sizes": [{"name", "overrides"}, ...], "variants": [...], "seeds": [...],
     "runs": [{"dir": "runs/<name>", "variant", "size", "budget", "seed", "steps", "planned_flops"}, ...]}

and one ordinary run directory per entry of `runs`. The analysis, per budget and variant:

- the points: each finished run's final validation loss (the headline `val_loss`: causal routing for a
  routed model) against its parameters (with and without the embeddings) and against its training tokens;
  a run that did not finish (`done` false on its last evaluation), diverged or never started is left out
  and counted;
- a quadratic in log10 of the axis, fitted with a Huber loss (`scipy.optimize.least_squares`), so one bad
  run does not carry the fit: started near L1, its scale then taken from the residuals' median absolute
  deviation (the Huber threshold 1.345 sigma), twice;
- the optimum (the parabola's vertex: the optimal size and its loss) only where the sizes tried bracket
  it (a size with a larger mean loss on each side of the best one, and the vertex between the smallest
  and the largest size), with a 95% percentile interval from a bootstrap over the points (each point a
  run: a seed at a size; each side widened by sqrt(n / (n - 3)), the small-sample correction for the
  parabola's 3 parameters), else a bound ("below the smallest size tried", "above the largest") with
  the sizes to add;
- across budgets, per variant, the compute-optimal loss and size as power laws in C (where two budgets or
  more have optima), and one sentence per routed variant against the dense one.

Fewer than 3 sizes at a budget cannot give a parabola with a minimum: `fit_budget` refuses it
(`IsoflopError`), and the study's table says so for that budget.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, stats

STUDY = "isoflop.json"
MIN_SIZES = 3
BOOTSTRAP = 500  # resamples per bracketed optimum
# the x axes a budget's losses are fitted against: (name, column of the points)
AXES = (("parameters", "parameters"), ("non-embedding parameters", "non_embedding_parameters"),
        ("tokens", "tokens"))
HUBER_K = 1.345  # Huber's threshold in units of the residuals' scale: 95% efficiency for normal noise
MIN_SCALE = 1e-3  # nats: the smallest residual scale the Huber threshold is set from


class IsoflopError(ValueError):
    """An isoFLOP study that cannot be read or fitted as asked; the message names what and why."""


# ---- reading a study ---------------------------------------------------------------------------------

def find_studies(paths: list[Path]) -> list[Path]:
    """The isoFLOP study directories among `paths` (one holding `isoflop.json`, or a folder right above one)."""
    out: list[Path] = []
    for p in paths:
        if not p.is_dir():
            continue
        for f in [p / STUDY, *sorted(p.glob(f"*/{STUDY}"))]:
            if f.is_file() and f.parent.resolve() not in {q.resolve() for q in out}:
                out.append(f.parent)
    return out


def read_study(root: Path) -> dict[str, Any]:
    """`root/isoflop.json`, checked: budgets, and runs that each name a dir, a variant, a size, a budget
    and a seed."""
    path = root / STUDY
    try:
        study = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise IsoflopError(f"{path}: not readable as JSON ({err})") from err
    if not isinstance(study, dict) or not isinstance(study.get("runs"), list):
        raise IsoflopError(f"{path}: expected an object with a list `runs`")
    for i, r in enumerate(study["runs"]):
        missing = [k for k in ("dir", "variant", "size", "budget", "seed") if not isinstance(r, dict) or k not in r]
        if missing:
            raise IsoflopError(f"{path}: runs[{i}] has no {', '.join(missing)}")
    return study


def study_points(root: Path, runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One row per run of the study that finished: budget, variant, size, seed, its parameters (with and
    without the embeddings), training tokens, final loss (nats, and bits per byte where the data says
    how many bytes), training FLOPs against the budget. And what was left out, in words."""
    study = read_study(root)
    by_path = {Path(p).resolve(): r for p, r in zip(runs["path"], runs.to_dict("records"), strict=True)} \
        if not runs.empty else {}
    rows: list[dict[str, Any]] = []
    missing, unfinished, diverged = [], [], []
    for entry in study["runs"]:
        run = by_path.get((root / entry["dir"]).resolve())
        name = Path(entry["dir"]).name
        if run is None or run.get("val_loss") is None or pd.isna(run.get("val_loss")):
            missing.append(name)
            continue
        if isinstance(run.get("diverged"), str):
            diverged.append(name)
            continue
        if not run.get("done"):
            unfinished.append(name)
            continue
        flops = run.get("train_flops")
        rows.append({"run_id": run["run_id"], "budget": float(entry["budget"]), "variant": str(entry["variant"]),
                     "size": str(entry["size"]), "seed": entry["seed"], "model": run.get("variant"),
                     "parameters": run.get("parameters"),
                     "non_embedding_parameters": run.get("non_embedding_parameters"),
                     "tokens": run.get("tokens_seen"), "val_loss": float(run["val_loss"]),
                     "val_bpb": run.get("val_bpb"), "headline_mode": run.get("headline_mode"),
                     "train_flops": flops, "flops_vs_budget": flops / float(entry["budget"])
                     if isinstance(flops, (int, float)) and entry["budget"] else None,
                     "steps": run.get("final_step")})
    problems = []
    for what, names in (("never started or have no evaluation", missing),
                        ("did not finish (done false on their last evaluation)", unfinished),
                        ("diverged", diverged)):
        if names:
            problems.append(f"isoFLOP study {root}: {len(names)} of {len(study['runs'])} runs {what}, left out of "
                            f"the fits: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
    return pd.DataFrame(rows), problems


# ---- the fit at one budget ---------------------------------------------------------------------------

def _residuals(p: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return p[0] * x ** 2 + p[1] * x + p[2] - y


def _jacobian(p: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.stack([x ** 2, x, np.ones_like(x)], axis=1)


def huber_parabola(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """(a, b, c) of y = a x^2 + b x + c fitted with a Huber loss, and the Huber threshold used (nats).
    Started near L1 (soft-L1 with a tiny scale), so that one bad point does not pull the start; then the
    threshold is 1.345 x the residuals' scale (1.4826 x their median absolute value), refitted twice."""
    p = np.polyfit(x, y, 2)
    p = optimize.least_squares(_residuals, p, jac=_jacobian, args=(x, y), loss="soft_l1", f_scale=MIN_SCALE).x
    delta = HUBER_K * MIN_SCALE
    for _ in range(2):
        delta = HUBER_K * max(1.4826 * float(np.median(np.abs(_residuals(p, x, y)))), MIN_SCALE)
        p = optimize.least_squares(_residuals, p, jac=_jacobian, args=(x, y), loss="huber", f_scale=delta).x
    return p, delta


def _vertex(p: np.ndarray) -> tuple[float, float]:
    """(x, y) of the parabola's minimum; NaN when it opens downward (no minimum)."""
    if p[0] <= 0:
        return math.nan, math.nan
    x = -p[1] / (2 * p[0])
    return x, p[2] - p[1] ** 2 / (4 * p[0])


@dataclass
class BudgetFit:
    """The fit of one budget and variant against one axis. `x` values are log10 of the axis, centred on
    `x_center` (the coefficients are of that centred x)."""

    budget: float
    variant: str
    axis: str
    status: str  # "optimum", "below the smallest size tried", "above the largest size tried", or why not
    sizes: int  # distinct sizes with a finished run
    points: int
    coef: tuple[float, float, float]
    x_center: float
    huber_delta: float
    x_range: tuple[float, float]  # log10 of the smallest and largest value tried
    best_tried: float  # the axis value of the size with the lowest mean loss
    best_tried_loss: float
    optimum: float = math.nan  # the vertex, in the axis' units (parameters or tokens)
    optimum_low: float = math.nan
    optimum_high: float = math.nan
    loss: float = math.nan  # the fitted loss at the vertex (nats)
    loss_low: float = math.nan
    loss_high: float = math.nan
    loss_samples: np.ndarray = field(default_factory=lambda: np.empty(0))  # bootstrap draws of `loss`
    optimum_samples: np.ndarray = field(default_factory=lambda: np.empty(0))  # and of log10 `optimum`
    note: str = ""

    @property
    def bracketed(self) -> bool:
        return self.status == "optimum"


def _unit(axis: str) -> str:
    return "tokens" if axis == "tokens" else "parameters"


# a minimum at the edge of what was tried, by the axis' unit: (at the low end, at the high end)
EDGES = {"parameters": ("below the smallest size tried", "above the largest size tried"),
         "tokens": ("below the fewest tokens tried", "above the most tokens tried")}


def fmt_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    if not math.isfinite(n):
        return "?"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.3g}"


def fit_budget(points: pd.DataFrame, axis: str = "parameters", column: str | None = None,
               bootstrap: int = BOOTSTRAP, seed: int = 0) -> BudgetFit:
    """The fit of one budget and variant's points (rows of `study_points`) against log10 of `column`
    (default: the axis' own column). Refused (`IsoflopError`) with fewer than 3 sizes."""
    column = column or dict(AXES).get(axis, axis)
    budget = float(points["budget"].iloc[0]) if len(points) else math.nan
    variant = str(points["variant"].iloc[0]) if len(points) else "?"
    have = points.dropna(subset=[column, "val_loss"]) if column in points else points.iloc[0:0]
    have = have[have[column].astype(float) > 0]
    sizes = have["size"].nunique() if len(have) else 0
    if sizes < MIN_SIZES:
        raise IsoflopError(f"{variant} at {budget:.3g} FLOPs: {sizes} size(s) with a finished run and a known "
                           f"{axis} count; a parabola's minimum needs at least {MIN_SIZES} sizes")
    x_all = np.log10(have[column].astype(float).to_numpy())
    y = have["val_loss"].astype(float).to_numpy()
    center = float(x_all.mean())
    x = x_all - center
    # the size's value of the axis is the mean over its runs (tokens differ by a step between seeds at most)
    per_size = have.assign(_x=x_all).groupby("size").agg(x=("_x", "mean"), loss=("val_loss", "mean")).sort_values("x")
    if per_size["x"].nunique() < MIN_SIZES:
        raise IsoflopError(f"{variant} at {budget:.3g} FLOPs: the sizes tried have only {per_size['x'].nunique()} "
                           f"distinct {axis} counts; a parabola's minimum needs at least {MIN_SIZES}")
    p, delta = huber_parabola(x, y)
    best = int(np.argmin(per_size["loss"].to_numpy()))
    fit = BudgetFit(budget, variant, axis, "", sizes, len(have), (float(p[0]), float(p[1]), float(p[2])), center,
                    delta, (float(per_size["x"].iloc[0]), float(per_size["x"].iloc[-1])),
                    float(10 ** per_size["x"].iloc[best]), float(per_size["loss"].iloc[best]))
    vx, vy = _vertex(p)
    lo, hi = fit.x_range
    below, above = EDGES[_unit(axis)]
    if best == 0:
        fit.status = below
    elif best == len(per_size) - 1:
        fit.status = above
    elif not math.isfinite(vx):
        fit.status, fit.note = "no minimum", "bracketed by the sizes tried, but the fitted parabola opens downward"
    elif not lo <= vx + center <= hi:
        fit.status = below if vx + center < lo else above
        fit.note = "the best size tried is inside, but the fitted minimum lies outside the sizes tried"
    else:
        fit.status = "optimum"
        fit.optimum, fit.loss = float(10 ** (vx + center)), float(vy)
        _bootstrap(fit, x, y, have["size"].to_numpy(), p, bootstrap, seed)
    if not fit.bracketed and fit.status != "no minimum":
        step = (hi - lo) / max(1, len(per_size) - 1)  # the tried sizes' mean spacing in log10
        edge, sign = (lo, -1) if fit.status == below else (hi, 1)
        add = " and ".join(fmt_count(10 ** (edge + sign * k * step)) for k in (1, 2))
        fit.note = "; ".join(s for s in (fit.note, f"to bracket it, add sizes at about {add} {_unit(axis)} (the "
                                                   "spacing of the sizes tried)") if s)
    return fit


def _bootstrap(fit: BudgetFit, x: np.ndarray, y: np.ndarray, sizes: np.ndarray, p: np.ndarray, n: int,
               seed: int) -> None:
    """Percentile intervals of the vertex over resamples of the points (runs: seeds at sizes) with
    replacement; a resample with fewer than 3 distinct sizes is drawn again. Where more than 2.5% of the
    resamples have no minimum, the interval is not stated (it would be open)."""
    if fit.points <= 3:
        fit.note = (f"no interval: {fit.points} points for a parabola's 3 parameters (add seeds or sizes)")
        return
    rng = np.random.default_rng(seed)
    xs: list[float] = []
    ys: list[float] = []
    tries = 0
    while len(xs) < n and tries < 20 * n:
        tries += 1
        i = rng.integers(0, len(x), len(x))
        if len(set(sizes[i])) < MIN_SIZES or len(set(np.round(x[i], 12))) < MIN_SIZES:
            continue
        q = optimize.least_squares(_residuals, p, jac=_jacobian, args=(x[i], y[i]), loss="huber",
                                   f_scale=fit.huber_delta).x
        vx, vy = _vertex(q)
        xs.append(vx + fit.x_center)
        ys.append(vy)
    vx_arr, vy_arr = np.asarray(xs), np.asarray(ys)
    ok = np.isfinite(vx_arr)
    if not len(vx_arr) or ok.mean() < 0.975:
        fit.note = f"no interval: {100 * (1 - ok.mean()) if len(ok) else 100:.0f}% of the resamples have no minimum"
        return
    fit.optimum_samples, fit.loss_samples = vx_arr[ok], vy_arr[ok]
    # Resampling n points underestimates the spread of a 3-parameter fit, as a residual variance over n
    # instead of n - 3 does: each side of the percentile interval is widened by sqrt(n / (n - 3)).
    widen = math.sqrt(fit.points / (fit.points - 3))
    at = math.log10(fit.optimum)
    lo, hi = np.percentile(vx_arr[ok], [2.5, 97.5])
    fit.optimum_low, fit.optimum_high = 10 ** (at - (at - lo) * widen), 10 ** (at + (hi - at) * widen)
    lo, hi = np.percentile(vy_arr[ok], [2.5, 97.5])
    fit.loss_low, fit.loss_high = fit.loss - (fit.loss - lo) * widen, fit.loss + (hi - fit.loss) * widen
    fit.note = (f"95% bootstrap interval over {len(vx_arr)} resamples of the {fit.points} points, each side "
                f"widened by sqrt(n/(n-3)) = {widen:.3f}")


# ---- the study ---------------------------------------------------------------------------------------

@dataclass
class Isoflop:
    """An isoFLOP study's analysis: the points, the fits, their table, the power laws, the sentences."""

    root: Path
    points: pd.DataFrame
    fits: list[BudgetFit]
    optima: pd.DataFrame
    laws: pd.DataFrame
    sentences: list[str]
    problems: list[str]
    reference: str | None
    labels: dict[str, str]  # run_id -> `variant · size · budget`


def _bpb_factor(points: pd.DataFrame) -> float:
    """bits per byte / nats per token, where every run of `points` has the same (same validation data)."""
    if "val_bpb" not in points or points["val_bpb"].isna().any() or points.empty:
        return math.nan
    ratio = points["val_bpb"].astype(float) / points["val_loss"].astype(float)
    return float(ratio.iloc[0]) if np.allclose(ratio, ratio.iloc[0], rtol=1e-9) else math.nan


def _row(fit: BudgetFit, bpb: float) -> dict[str, Any]:
    """One row of the optima table: what is established, in words first, then every number."""
    unit = _unit(fit.axis)
    if fit.bracketed:
        shown = f"{fmt_count(fit.optimum)} [{fmt_count(fit.optimum_low)}, {fmt_count(fit.optimum_high)}]"
        loss = f"{fit.loss:.4f} [{fit.loss_low:.4f}, {fit.loss_high:.4f}]"
    elif fit.status == EDGES[unit][0]:
        shown, loss = f"≤ {fmt_count(fit.best_tried)} (bound)", f"≤ {fit.best_tried_loss:.4f} (best tried)"
    elif fit.status == EDGES[unit][1]:
        shown, loss = f"≥ {fmt_count(fit.best_tried)} (bound)", f"≤ {fit.best_tried_loss:.4f} (best tried)"
    else:
        shown, loss = fit.status, ""
    return {"budget": fit.budget, "variant": fit.variant, "axis": fit.axis, "status": fit.status,
            "optimum [95%] or bound": f"{shown} {unit}", "loss at optimum [95%]": loss,
            "optimum": fit.optimum, "optimum_low": fit.optimum_low, "optimum_high": fit.optimum_high,
            "loss": fit.loss, "loss_low": fit.loss_low, "loss_high": fit.loss_high,
            "loss_bpb": fit.loss * bpb, "loss_bpb_low": fit.loss_low * bpb, "loss_bpb_high": fit.loss_high * bpb,
            "best_tried": fit.best_tried, "best_tried_loss": fit.best_tried_loss, "sizes": fit.sizes,
            "points": fit.points, "fit_a": fit.coef[0], "fit_b": fit.coef[1], "fit_c": fit.coef[2],
            "x_center": fit.x_center, "huber_delta": fit.huber_delta, "note": fit.note}


def study_labels(root: Path, runs: pd.DataFrame) -> dict[str, str]:
    """A label per run of the study (`variant · size · budget`): the study's runs differ in size and budget,
    so the report's per-label tables compare a configuration's seeds, never different sizes."""
    if runs.empty:
        return {}
    by_path = {Path(p).resolve(): r for p, r in zip(runs["path"], runs["run_id"], strict=True)}
    out = {}
    for entry in read_study(root)["runs"]:
        run_id = by_path.get((root / entry["dir"]).resolve())
        if run_id is not None:
            out[str(run_id)] = f"{entry['variant']} · {entry['size']} · {float(entry['budget']):.3g} FLOPs"
    return out


def analyse(root: Path, runs: pd.DataFrame, bootstrap: int = BOOTSTRAP) -> Isoflop:
    """The study in `root` from the loaded `runs` (`loaders.load(...).runs`)."""
    points, problems = study_points(root, runs)
    study = read_study(root)
    fits: list[BudgetFit] = []
    rows: list[dict[str, Any]] = []
    budgets = sorted({float(r["budget"]) for r in study["runs"]})
    variants = list(dict.fromkeys(str(r["variant"]) for r in study["runs"]))
    for bi, budget in enumerate(budgets):
        for vi, variant in enumerate(variants):
            g = points[(points["budget"] == budget) & (points["variant"] == variant)] if len(points) else points
            for ai, (axis, column) in enumerate(AXES):
                if column not in g or g[column].isna().all():
                    continue
                try:
                    fit = fit_budget(g, axis, column, bootstrap, seed=1000 * bi + 10 * vi + ai)
                except IsoflopError as err:
                    if axis == "parameters":
                        problems.append(f"isoFLOP study {root}: {err}")
                    rows.append({"budget": budget, "variant": variant, "axis": axis, "status": f"refused: {err}",
                                 "sizes": g["size"].nunique() if len(g) else 0, "points": len(g)})
                    continue
                fits.append(fit)
                rows.append(_row(fit, _bpb_factor(g)))
    optima = pd.DataFrame(rows)
    reference = _reference(points, variants)
    laws = power_laws(fits)
    return Isoflop(root, points, fits, optima, laws, sentences(fits, reference, variants), problems, reference,
                   study_labels(root, runs))


def _reference(points: pd.DataFrame, variants: list[str]) -> str | None:
    """The dense family the routed ones are compared with: the study variant whose runs are Standard."""
    if "standard" in variants:
        return "standard"
    if len(points) and "model" in points:
        dense = points.loc[points["model"] == "standard", "variant"]
        if len(dense):
            return str(dense.iloc[0])
    return None


def power_laws(fits: list[BudgetFit], axis: str = "parameters") -> pd.DataFrame:
    """Per variant, over the budgets with a bracketed optimum: the compute-optimal loss L*(C) = A C^s and
    the optimal size N*(C) = k C^e, fitted in log-log by least squares; a 95% interval of the exponent
    where three budgets or more allow one."""
    rows: list[dict[str, Any]] = []
    for variant in dict.fromkeys(f.variant for f in fits):
        opt = sorted((f for f in fits if f.variant == variant and f.axis == axis and f.bracketed),
                     key=lambda f: f.budget)
        for quantity, values in (("optimal loss (nats)", [f.loss for f in opt]),
                                 ("optimal parameters", [f.optimum for f in opt])):
            row: dict[str, Any] = {"variant": variant, "quantity": quantity, "budgets": len(opt)}
            if len(opt) < 2 or any(v <= 0 for v in values):
                rows.append({**row, "note": f"needs bracketed optima at 2 budgets or more; has {len(opt)}"})
                continue
            lc, lv = np.log10([f.budget for f in opt]), np.log10(values)
            fit = stats.linregress(lc, lv)
            half = (float(stats.t.ppf(0.975, len(opt) - 2)) * float(fit.stderr) if len(opt) > 2
                    else math.nan)
            coef = float(10 ** fit.intercept)
            rows.append({**row, "coefficient": coef, "exponent": float(fit.slope),
                         "exponent_low": float(fit.slope) - half, "exponent_high": float(fit.slope) + half,
                         "law": f"{coef:.4g} x C^{float(fit.slope):.4f}",
                         "note": "exact through 2 points: no interval" if len(opt) == 2
                         else f"95% interval of the exponent over {len(opt)} budgets"})
    return pd.DataFrame(rows)


def _compare(fit: BudgetFit, ref: BudgetFit) -> tuple[str, str]:
    """(better | worse | not established, the numbers) for one budget where both have an optimum."""
    k = min(len(fit.loss_samples), len(ref.loss_samples))
    what = (f"at {fit.budget:.3g} FLOPs its optimal loss {fit.loss:.3f} [95%: {fit.loss_low:.3f}, {fit.loss_high:.3f}] "
            f"at {fmt_count(fit.optimum)} parameters against {ref.loss:.3f} [{ref.loss_low:.3f}, "
            f"{ref.loss_high:.3f}] at {fmt_count(ref.optimum)}")
    if k < 40:  # no interval on a side: nothing is established
        return "not established", what + " (no interval on one side)"
    diff = fit.loss_samples[:k] - ref.loss_samples[:k]  # independent resamples: a draw of the difference
    lo, hi = np.percentile(diff, [2.5, 97.5])
    what += f", difference {fit.loss - ref.loss:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    return ("better" if hi < 0 else "worse" if lo > 0 else "not established"), what


def sentences(fits: list[BudgetFit], reference: str | None, variants: list[str]) -> list[str]:
    """One sentence per routed variant: better, worse, or not established against the dense family at
    these budgets, with the numbers. Only budgets where both optima are bracketed are compared; better
    (worse) means the 95% interval of the difference of optimal losses is below (above) 0 at every such
    budget."""
    if reference is None:
        return ["No dense (Standard) family in this study: the routed families are not compared with one."]
    out = []
    param = [f for f in fits if f.axis == "parameters"]
    budgets = sorted({f.budget for f in param})
    for variant in variants:
        if variant == reference:
            continue
        outcomes, said, skipped = [], [], []
        for budget in budgets:
            mine = next((f for f in param if f.variant == variant and f.budget == budget), None)
            ref = next((f for f in param if f.variant == reference and f.budget == budget), None)
            if mine is None or ref is None or not (mine.bracketed and ref.bracketed):
                why = ", ".join(f"{name} {f.status if f else 'not fitted'}" for name, f in
                                ((variant, mine), (reference, ref)) if f is None or not f.bracketed)
                skipped.append(f"{budget:.3g} FLOPs ({why})")
                continue
            outcome, text = _compare(mine, ref)
            outcomes.append(outcome)
            said.append(text)
        verdict = ("better than" if outcomes and all(o == "better" for o in outcomes) else
                   "worse than" if outcomes and all(o == "worse" for o in outcomes) else "not established against")
        text = f"{variant}: {verdict} {reference} at equal training compute at these budgets"
        if said:
            text += ": " + "; ".join(said)
        if skipped:
            text += ("; " if said else ": ") + "no two bracketed optima to compare at " + "; ".join(skipped)
        out.append(text + ".")
    return out
