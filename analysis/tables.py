"""Comparison tables: DataFrames in, DataFrames out (pure pandas)."""

from __future__ import annotations

import json
import math
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pandas as pd
from scipy import stats


def t95(n: int) -> float:
    """The two-sided 95% Student-t quantile for a mean of `n` values (n - 1 degrees of freedom)."""
    if n < 2:
        raise ValueError(f"a t interval needs two values or more, got {n}")
    return float(stats.t.ppf(0.975, n - 1))


SHAPE = ["hidden_size", "intermediate_size", "vocab_size", "seq_len"]  # what makes runs one model family


def _shape_key(runs: pd.DataFrame) -> pd.Series:
    """One key per model family: runs that differ only in depth and routing share it."""
    cols = [c for c in SHAPE if c in runs]
    if not cols:
        return pd.Series("", index=runs.index)
    return runs[cols].apply(lambda r: "|".join(map(str, r)), axis=1)


def label_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Adds `label`: the variant, its capacity, and for Standard runs shallower than the deepest
    run of their model family (same width, vocabulary and sequence length), 'dense control (L
    layers)': a compute-matched dense baseline."""
    runs = runs.copy()
    if runs.empty:
        runs["label"] = []
        return runs
    family = _shape_key(runs)
    deepest = runs["num_hidden_layers"].groupby(family).transform("max") if "num_hidden_layers" in runs else None

    def label(r: pd.Series) -> str:
        v = r.get("variant") or "unknown"
        layers = r.get("num_hidden_layers")
        # pandas-stubs take only scalar types in Series[...]; a row's name is any Hashable index label
        top = None if deepest is None else deepest[r.name]  # type: ignore[call-overload]
        if v == "standard" and top and layers and not pd.isna(layers) and layers < top:
            return f"dense control ({int(layers)} layers)"
        cap = r.get("capacity")
        if v in ("mod", "dtf") and cap is not None and not pd.isna(cap) and not r.get("params"):
            return f"{v} c={cap:g}"
        return v

    runs["label"] = runs.apply(label, axis=1)
    return full_depth_flop_ratio(runs, family)


def results(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that are results, labelled: a run that diverged is not one."""
    runs = label_runs(runs)
    return runs[runs["diverged"].isna()] if "diverged" in runs else runs


def full_depth_flop_ratio(runs: pd.DataFrame, family: pd.Series) -> pd.DataFrame:
    """`flop_ratio_vs_dense` against the full-depth Standard runs of the same model family where
    there are any: a run records its ratio to a Standard of its OWN shape, which for a shallower
    dense control is 1."""
    if "flops_per_token" not in runs:
        return runs
    full = runs["label"] == "standard"
    ref = runs.loc[full, "flops_per_token"].groupby(family[full]).median()
    base = family.map(ref)
    have = base.notna() & runs["flops_per_token"].notna()
    runs = runs.copy()
    runs.loc[have, "flop_ratio_vs_dense"] = runs.loc[have, "flops_per_token"].astype(float) / base[have]
    return runs


def _mean(g: pd.DataFrame, col: str) -> float:
    return float(g[col].astype(float).mean()) if col in g and g[col].notna().any() else float("nan")


def final_loss(runs: pd.DataFrame) -> pd.DataFrame:
    """Final validation loss per label: mean, spread and a 95% interval over seeds (n >= 2), in the
    headline routing (`causal` for routed models), the training-mode top-k loss beside it, and
    whether each difference from Standard is established.

    Runs of different hyperparameters (a sweep's configurations) are not replicates: where a label has
    several, its headline is its best configuration (the lowest mean over that configuration's seeds),
    with the interval over those seeds; `configurations` counts the label's configurations, and
    `config_means_min`/`config_means_max` give the range of their means, the spread over configurations
    (NaN for one)."""
    rows = []
    for label, g in runs.dropna(subset=["val_loss"]).groupby("label", sort=True):
        key = g["params"].fillna("") if "params" in g else pd.Series("", index=g.index)
        means = g["val_loss"].astype(float).groupby(key).mean()
        best = str(means.idxmin())
        members = g[key == best]
        x = members["val_loss"].astype(float)
        n, configs = len(x), len(means)
        sd = float(x.std(ddof=1)) if n > 1 else float("nan")
        half = t95(n) * sd / math.sqrt(n) if n > 1 else float("nan")
        seeds = sorted(members["seed"].dropna().unique())
        rows.append({"label": label, "variant": g["variant"].iloc[0], "routing": _modes(members), "runs": n,
                     "seeds": len(seeds), "seed_ids": ",".join(str(int(s)) for s in seeds),
                     "configurations": configs, "configuration": best,
                     "val_loss_mean": float(x.mean()), "val_loss_std": sd,
                     "ci95_low": float(x.mean()) - half, "ci95_high": float(x.mean()) + half,
                     "val_loss_min": float(x.min()), "val_loss_max": float(x.max()),
                     "config_means_min": float(means.min()) if configs > 1 else float("nan"),
                     "config_means_max": float(means.max()) if configs > 1 else float("nan"),
                     "val_loss_topk_mean (training mode)": _mean(members, "val_loss_topk"),
                     "flop_ratio_vs_dense": _mean(members, "flop_ratio_vs_dense")})
    return with_verdicts(pd.DataFrame(rows))


def _modes(g: pd.DataFrame) -> str:
    modes = sorted(set(g["headline_mode"].dropna())) if "headline_mode" in g else []
    return ",".join(modes) or "?"


def verdict(row: pd.Series, ref: pd.Series) -> str:
    """Whether `row`'s difference from `ref` is established. Not with a single seed on either side, nor
    within the seed-to-seed spread (the larger standard deviation), nor when the 95% Welch interval of the
    difference of means includes 0. Rows that are the best of several configurations (a sweep) are
    compared on their seeds, and the verdict says that the best was chosen on those same seeds (which
    favours it)."""
    diff, spread = row["val_loss_mean"] - ref["val_loss_mean"], max(row["val_loss_std"], ref["val_loss_std"])
    tried = [int(c) for c in (row.get("configurations", 1), ref.get("configurations", 1)) if c == c]
    chosen = (f"; best of {tried[0]} vs {tried[1]} configurations, each chosen on these seeds"
              if len(tried) == 2 and max(tried) > 1 else "")
    if min(row["seeds"], ref["seeds"]) < 2:
        return f"not established (single seed{chosen})"
    if abs(diff) <= spread:
        return f"not established (|{diff:.3f}| within the seed spread {spread:.3f}{chosen})"
    lo, hi = welch_interval(row, ref)
    if lo <= 0 <= hi:
        return (f"not established (beyond the seed spread {spread:.3f}, but its 95% interval "
                f"[{lo:.3f}, {hi:.3f}] holds 0{chosen})")
    return f"established (95% interval of the difference [{lo:.3f}, {hi:.3f}], {int(row['seeds'])} vs " \
           f"{int(ref['seeds'])} seeds{chosen})"


def welch_interval(row: pd.Series, ref: pd.Series) -> tuple[float, float]:
    """The 95% interval of mean(row) - mean(ref), unequal variances (Welch: Welch-Satterthwaite degrees
    of freedom, not rounded; `scipy.stats.ttest_ind(..., equal_var=False)` gives the same from the values)."""
    va, vb = row["val_loss_std"] ** 2 / row["seeds"], ref["val_loss_std"] ** 2 / ref["seeds"]
    se = math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / (row["seeds"] - 1) + vb ** 2 / (ref["seeds"] - 1)) if se > 0 else 1.0
    half = float(stats.t.ppf(0.975, dof)) * se
    diff = row["val_loss_mean"] - ref["val_loss_mean"]
    return diff - half, diff + half


def with_verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """For each label, its difference of mean losses from Standard (`vs_standard`, `difference`)
    and, where the set has one, from the compute-matched dense control (`vs_dense_control`,
    `difference_vs_dense_control`), each with a `verdict`."""
    out = table.copy()
    labels = set(table["label"]) if not table.empty else set()
    refs = [("standard", "vs_standard", "difference")]
    controls = sorted(lab for lab in labels if lab.startswith("dense control"))
    if controls:
        refs.append((controls[0], "vs_dense_control", "difference_vs_dense_control"))
    for ref_label, diff_col, verdict_col in refs:
        if ref_label not in labels:
            out[diff_col], out[verdict_col] = float("nan"), ""
            continue
        ref = table.set_index("label").loc[ref_label]
        out[diff_col] = table["val_loss_mean"] - ref["val_loss_mean"]
        out[verdict_col] = ["reference" if r["label"] == ref_label else verdict(r, ref) for _, r in table.iterrows()]
    return out


def speed(runs: pd.DataFrame, benches: pd.DataFrame) -> pd.DataFrame:
    """Measured tokens/s and memory next to each label's FLOP ratio (from the runs' own records,
    and from `dtlab bench` files found beside them)."""
    rows: list[dict[str, Any]] = []
    dense = runs.loc[runs["label"] == "standard", "tokens_per_s"].dropna()  # full depth, not the controls
    dense_tps = float(dense.median()) if len(dense) else float("nan")
    for label, g in runs.groupby("label", sort=True):
        tps = float(g["tokens_per_s"].dropna().median()) if g["tokens_per_s"].notna().any() else float("nan")
        mem = g["peak_mem_gib"].dropna() if "peak_mem_gib" in g else pd.Series(dtype=float)
        rss = g["peak_rss_gib"].dropna() if "peak_rss_gib" in g else pd.Series(dtype=float)
        rows.append({"source": "training runs", "label": label,
                     "flop_ratio_vs_dense": float(g["flop_ratio_vs_dense"].astype(float).mean())
                     if g["flop_ratio_vs_dense"].notna().any() else float("nan"),
                     "tokens_per_s": tps,
                     "time_ratio_vs_dense": dense_tps / tps if tps == tps and tps else float("nan"),
                     "peak_mem_gib": float(mem.max()) if len(mem) else float("nan"),
                     "peak_rss_gib": float(rss.max()) if len(rss) else float("nan"),
                     "devices": ",".join(sorted(set(g["device"].dropna().astype(str))))})
    if not benches.empty:
        for _, b in benches.iterrows():
            cap = b.get("capacity")
            if b.get("bench") == "decode":
                rows.append(_decode_row(b, cap))
                continue
            rows.append({"source": f"dtlab bench ({b.get('device')}, {b.get('preset')})",
                         "label": b["variant"]
                         + (f" c={cap:g}" if isinstance(cap, (int, float)) and cap == cap else ""),
                         "flop_ratio_vs_dense": b.get("flop_ratio_vs_dense"), "tokens_per_s": b.get("tokens_per_s"),
                         "time_ratio_vs_dense": b.get("step_ratio_vs_dense"), "peak_mem_gib": b.get("peak_mem_gib"),
                         "peak_rss_gib": float("nan"), "devices": b.get("device")})
    return pd.DataFrame(rows)


def _decode_row(b: pd.Series, cap: object) -> dict[str, Any]:
    """A `dtlab bench --decode` row: generated tokens/s, the time per token relative to Standard."""
    label = b["variant"] + (f" c={cap:g}" if isinstance(cap, (int, float)) and cap == cap else "")
    speedup = b.get("decode_speedup_vs_standard")
    realised = b.get("realised_capacity_mean")
    if isinstance(realised, float) and realised == realised:
        label += f" (realised {realised:.3f})"
    return {"source": f"dtlab bench --decode ({b.get('device')}, {b.get('preset')}, batch {b.get('batch')})",
            "label": label,
            "flop_ratio_vs_dense": float("nan"), "tokens_per_s": b.get("decode_tokens_per_s"),
            "time_ratio_vs_dense": 1 / speedup if speedup else float("nan"), "peak_mem_gib": float("nan"),
            "peak_rss_gib": float("nan"), "devices": b.get("device")}


def downstream(runs: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """Downstream task scores (lm-eval, causal routing) per task, metric and label: mean over seeds and
    a 95% Student-t interval (two seeds or more), with the routing mode and example count stated."""
    if scores.empty or runs.empty:
        return pd.DataFrame()
    df = scores.merge(runs[["run_id", "label", "variant", "seed"]], on="run_id").dropna(subset=["value"])
    rows = []
    for (task, metric, label), g in df.groupby(["task", "metric", "label"], sort=True):
        x = g["value"].astype(float)
        n = len(x)
        half = t95(n) * float(x.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
        rows.append({"task": task, "metric": metric, "label": label, "routing": ",".join(sorted(
            set(g["routing_mode"].dropna().astype(str)))) or "?", "seeds": n, "mean": float(x.mean()),
            "ci95_low": float(x.mean()) - half, "ci95_high": float(x.mean()) + half,
            "stderr (single run)": float(g["stderr"].iloc[0]) if n == 1 and g["stderr"].notna().any()
            else float("nan"),
            "examples": g["samples"].iloc[0] if "samples" in g else None})
    return pd.DataFrame(rows)


def samples(runs: pd.DataFrame, samples_df: pd.DataFrame) -> pd.DataFrame:
    """Greedy continuations of fixed prompts, from each label's first seed (causal routing)."""
    if samples_df.empty or runs.empty:
        return pd.DataFrame()
    first = runs.sort_values(["label", "seed"], na_position="last").groupby("label", sort=True).head(1)
    merged = samples_df.merge(first[["run_id", "label", "seed"]], on="run_id")
    cols = ["prompt", "label", "seed", "step", "text"]
    return merged.sort_values(["prompt", "label"])[cols].rename(columns={"text": "continuation"})


def best_configs(runs: pd.DataFrame, mode: str = "min") -> pd.DataFrame:
    """The best configuration per variant, with its hyperparameters (sweep trials carry them). A
    configuration is judged on the mean over its seeds, as Optuna and the sweep's summary judge it; a
    run that is not a trial is a configuration of its own."""
    have = runs.dropna(subset=["val_loss"]).copy()
    if have.empty:
        return pd.DataFrame()
    have["config"] = [p if isinstance(p, str) else f"run:{r}" for p, r in zip(have["params"], have["run_id"],
                                                                           strict=True)]
    rows = []
    for variant, g in have.groupby("variant", sort=True):
        means = g.groupby("config")["val_loss"].mean()
        key = means.idxmin() if mode == "min" else means.idxmax()
        members = g[g["config"] == key].sort_values("seed", na_position="last")
        first = members.iloc[0]
        params = json.loads(first["params"]) if isinstance(first.get("params"), str) else {}
        rows.append({"variant": variant, "run_id": ", ".join(members["run_id"]), "val_loss": float(means[key]),
                     "seeds": len(members), "seed": ", ".join(str(s) for s in members["seed"].dropna().astype(int)),
                     "evaluations": first.get("evaluations"),
                     **{k: v for k, v in params.items() if k != "model.type"}})
    return pd.DataFrame(rows)


def common_step(runs: pd.DataFrame, evals: pd.DataFrame) -> pd.DataFrame:
    """Each sweep trial's validation loss, the mean over its seeds, at one step every trial reached:
    the last step at which all of them (finished, or stopped by ASHA; not diverged) were evaluated,
    so that trials are compared at equal training. Best first."""
    trials = runs[runs["params"].notna()] if "params" in runs else runs.iloc[0:0]
    if trials.empty or evals.empty:
        return pd.DataFrame()
    ev = evals[evals["run_id"].isin(trials["run_id"])][["run_id", "step", "val_loss"]].dropna()
    steps = [set(g) for _, g in ev.groupby("run_id")["step"]]
    common = set.intersection(*steps) if steps else set()
    if not common:
        return pd.DataFrame()
    step = max(common)
    at = ev[ev["step"] == step].merge(trials[["run_id", "trial_id", "variant", "params", "done", "final_step"]],
                                      on="run_id")
    at["trial"] = at["trial_id"].fillna(at["run_id"])
    g = at.groupby("trial").agg(variant=("variant", "first"), seeds=("run_id", "count"),
                                val_loss=("val_loss", "mean"), done=("done", "all"), ended=("final_step", "max"),
                                params=("params", "first")).reset_index()
    g.insert(3, "step", step)
    g["status"] = ["finished" if d else f"stopped at step {int(e)}" for d, e in zip(g["done"], g["ended"],
                                                                                  strict=True)]
    return g.drop(columns=["done", "ended"]).sort_values("val_loss").reset_index(drop=True)


def importances(runs: pd.DataFrame, space: dict | None = None) -> pd.DataFrame:
    """Which hyperparameters mattered: Optuna's fANOVA importance of each swept key for the final
    validation loss, per variant (needs at least 4 trials with results)."""
    import optuna
    from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    trials = runs.dropna(subset=["val_loss", "params"])
    for variant, g in trials.groupby("variant", sort=True):
        params = [{k: v for k, v in json.loads(p).items() if k != "model.type"} for p in g["params"]]
        keys = sorted({k for p in params for k in p if all(k in q for q in params)})
        if len(g) < 4 or not keys:
            continue
        dists: dict[str, BaseDistribution] = {}
        for k in keys:
            values = [p[k] for p in params]
            kind = next(iter((space or {}).get(k, {})), None)
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and kind != "choice":
                lo, hi = float(min(values)), float(max(values))
                if lo == hi:
                    continue
                dists[k] = FloatDistribution(lo, hi, log=kind == "loguniform" and lo > 0)
            else:
                dists[k] = CategoricalDistribution(sorted(set(map(str, values))))
        if not dists:
            continue
        study = optuna.create_study(direction="minimize")
        for p, loss in zip(params, g["val_loss"], strict=True):
            chosen = {k: (float(p[k]) if isinstance(dists[k], FloatDistribution) else str(p[k])) for k in dists}
            study.add_trial(optuna.trial.create_trial(params=chosen, distributions=dists, value=float(loss)))
        try:
            imp = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError) as err:  # too little variation to tell
            rows.append({"variant": variant, "parameter": "(not computed)", "importance": float("nan"),
                         "note": str(err)[:120]})
            continue
        rows += [{"variant": variant, "parameter": k, "importance": v, "note": f"{len(g)} trials"}
                 for k, v in imp.items()]
    return pd.DataFrame(rows)


def study_trials(db: str | Path) -> pd.DataFrame:
    """The completed trials of a sweep's Optuna study (`optuna.journal`, Optuna's journal file, or an
    older sweep's SQLite `optuna.db`: one trial per configuration, its value the mean over seeds;
    COMPLETE only when the configuration finished) as rows `importances` takes: variant, params
    (JSON), val_loss (the first objective)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage: optuna.storages.BaseStorage
    if str(db).endswith(".db"):
        storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    else:
        from optuna.storages.journal import JournalFileBackend

        storage = optuna.storages.JournalStorage(JournalFileBackend(str(db)))
    rows = []
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            value = t.values[0] if t.values else None
            if value is not None and math.isfinite(value):
                rows.append({"variant": t.params.get("model.type"), "params": json.dumps(t.params, sort_keys=True),
                             "val_loss": float(value)})
    return pd.DataFrame(rows)


def repeated_data(runs: pd.DataFrame, limit: int = 20) -> list[str]:
    """One line per run that went over its training data more than once: how many times it saw it (its
    planned passes, `training.epochs` in run.json, times the share of its steps it ran), else the pass its
    records reached (their `epoch`, 0 for the first). At most `limit` lines, then a count of the rest."""
    if runs.empty:
        return []
    lines = []
    for _, r in runs.iterrows():
        seen, last = r.get("epochs_seen"), r.get("last_epoch")
        if isinstance(seen, (int, float)) and seen == seen and seen > 1:
            planned = r.get("epochs_planned")
            lines.append(f"{r['run_id']} saw its training data {seen:.1f} times"
                         + (f" (planned {planned:.1f})" if planned != seen and planned == planned else "")
                         + ": later passes repeat rows it has trained on")
        elif isinstance(last, (int, float)) and last == last and last >= 1:
            lines.append(f"{r['run_id']} repeated its training data: its records reach pass {int(last) + 1}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more runs repeated their training data"]
    return lines


def facts(runs: pd.DataFrame) -> pd.DataFrame:
    cols = ["run_id", "label", "variant", "seed", "device", "precision", "world_size", "routing_modes",
            "tokens_seen", "epochs_seen", "final_step", "total_steps", "done", "diverged", "evaluations", "commit",
            "dirty", "spec_version"]
    out = runs[[c for c in cols if c in runs]].copy()
    if "commit" in out:
        out["commit"] = out["commit"].map(lambda c: c[:10] if isinstance(c, str) else c)
    return out


ORDER = {"standard": 0, "mod": 2, "dtf": 3}  # the dense control (Standard, shallower) comes second


def closing(runs: pd.DataFrame, per_run: bool = False, limit: int = 12) -> pd.DataFrame:
    """The table a command ends with in the terminal (and `dtlab report` prints): per variant (mean
    over its runs), or per run for a sweep's trials (finished first, best first)."""
    if runs.empty:
        return pd.DataFrame()
    runs = runs if "label" in runs else label_runs(runs)
    mem = runs["peak_mem_gib"] if "peak_mem_gib" in runs else pd.Series(float("nan"), index=runs.index)
    if "peak_rss_gib" in runs:
        mem = mem.fillna(runs["peak_rss_gib"])
    runs = runs.assign(_mem=mem)
    rows = []
    groups = ([(r["run_id"], runs.loc[[i]]) for i, r in runs.iterrows()] if per_run
              else list(runs.groupby("label", sort=False)))
    for name, g in groups:
        row = {"run" if per_run else "variant": name}
        if per_run:
            row["_done"] = bool(g["done"].iloc[0]) if "done" in g else False
            row["variant"] = g["variant"].iloc[0]
            row["steps"] = f"{_int(g['final_step'].iloc[0])}/{_int(g['total_steps'].iloc[0])}"
        else:
            row["runs"] = len(g)
        routed = g["variant"].isin(["mod", "dtf"]).any()
        row.update({"val loss": _mean(g, "val_loss"), "routing": _modes(g) if routed else "dense",
                    "FLOP ratio": _mean(g, "flop_ratio_vs_dense"),
                    "tokens/s": float(g["tokens_per_s"].astype(float).median()) if "tokens_per_s" in g else math.nan,
                    "peak mem GiB": float(g["_mem"].astype(float).max())})
        row["_rank"] = ORDER.get(g["variant"].iloc[0], 9) + str(g["label"].iloc[0]).startswith("dense control")
        rows.append(row)
    out = pd.DataFrame(rows).sort_values("_rank", kind="stable").drop(columns="_rank")
    if per_run:
        out = out.sort_values(["_done", "val loss"], ascending=[False, True]).drop(columns="_done")
        out = out.head(limit)
    return out.reset_index(drop=True)


def _int(value: Any) -> str:
    return "?" if value is None or pd.isna(value) else str(int(value))


FORMATS: dict[Hashable, str] = {"val loss": "{:.4f}", "FLOP ratio": "{:.3f}", "tokens/s": "{:,.0f}",
                                 "peak mem GiB": "{:.2f}"}


def text_table(df: pd.DataFrame) -> str:
    """A DataFrame as aligned plain text (no colours, no box characters): what a terminal, a log or
    CI shows alike."""
    if df.empty:
        return "(no runs)"
    cells = [[str(c) for c in df.columns]]
    for _, row in df.iterrows():
        cells.append(["-" if isinstance(v, float) and math.isnan(v) else FORMATS.get(c, "{}").format(v)
                      for c, v in row.items()])
    widths = [max(len(r[i]) for r in cells) for i in range(len(df.columns))]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    lines = ["  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(r, widths, numeric, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
