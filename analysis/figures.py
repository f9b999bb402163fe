"""Plotly figures built from the loaders' DataFrames. Each returns None when it has no data."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import plotly.graph_objects as go

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


def _colors(labels: Iterable[str]) -> dict[str, str]:
    return {lab: PALETTE[i % len(PALETTE)] for i, lab in enumerate(sorted(set(labels)))}


def _layout(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, template="plotly_white", height=420,
                      margin=dict(l=60, r=20, t=50, b=50), legend=dict(orientation="v"))
    return fig


def val_loss_curves(evals: pd.DataFrame, runs: pd.DataFrame) -> go.Figure | None:
    if evals.empty or "val_loss" not in evals:
        return None
    df = evals.merge(runs[["run_id", "label"]], on="run_id")
    x = "tokens_seen" if "tokens_seen" in df and df["tokens_seen"].notna().all() else "step"
    colors, fig, shown = _colors(df["label"]), go.Figure(), set()
    for run_id, g in df.sort_values("step").groupby("run_id", sort=True):
        lab = g["label"].iloc[0]
        fig.add_trace(go.Scatter(x=g[x], y=g["val_loss"], mode="lines+markers", name=lab, legendgroup=lab,
                                 showlegend=lab not in shown, line=dict(color=colors[lab]),
                                 hovertemplate=f"{run_id}<br>%{{x}}: %{{y:.4f}}<extra></extra>"))
        shown.add(lab)
    return _layout(fig, "Validation loss (LM only; routed models in causal routing) during training",
                   x.replace("_", " "), "val loss (nats)")


def final_loss_bars(table: pd.DataFrame) -> go.Figure | None:
    """The final loss per label (`tables.final_loss`): the mean over seeds with its 95% interval; where a
    label had several configurations (a sweep), the bar is its best configuration and a second trace
    shows the range of its configurations' means, the spread over configurations, apart from the seeds'."""
    if table.empty:
        return None
    err = table["ci95_high"] - table["val_loss_mean"]
    configs = table["configurations"] if "configurations" in table else pd.Series(1, index=table.index)
    swept = bool((configs > 1).any())
    fig = go.Figure(go.Bar(x=table["label"], y=table["val_loss_mean"],
                           error_y=dict(type="data", array=err.fillna(0), visible=True),
                           marker_color=[_colors(table["label"])[lab] for lab in table["label"]],
                           name="best configuration: mean over its seeds" if swept else "mean over seeds",
                           text=[f"n={n}" + (f", best of {c} configs" if c > 1 else "") for n, c in
                                 zip(table["runs"], configs, strict=True)],
                           textposition="outside"))
    low, high = float(table["val_loss_min"].min()), float(table["val_loss_max"].max())
    if swept:
        several = table[configs > 1]
        fig.add_trace(go.Scatter(x=several["label"], y=several["config_means_min"], mode="markers",
                                 name="range of the configurations' means (not a seed interval)",
                                 marker=dict(symbol="line-ew-open", size=14, color="black"),
                                 error_y=dict(type="data", symmetric=False, visible=True, arrayminus=[0] * len(several),
                                              array=several["config_means_max"] - several["config_means_min"])))
        low = min(low, float(several["config_means_min"].min()))
        high = max(high, float(several["config_means_max"].max()))
    fig.update_yaxes(range=[low * 0.98, high * 1.02])
    title = ("Final validation loss: each variant's best configuration, mean and 95% interval over its seeds"
             if swept else "Final validation loss: mean and 95% interval over seeds")
    return _layout(fig, title, "", "val loss (nats)")


def pareto(runs: pd.DataFrame) -> go.Figure | None:
    df = runs.dropna(subset=["val_loss", "train_flops"])
    df = df[df["train_flops"] > 0]
    if df.empty:
        return None
    colors, fig = _colors(df["label"]), go.Figure()
    for lab, g in df.groupby("label", sort=True):
        fig.add_trace(go.Scatter(x=g["train_flops"], y=g["val_loss"], mode="markers", name=lab,
                                 marker=dict(size=10, color=colors[lab],
                                             symbol="diamond" if lab.startswith("dense control") else "circle"),
                                 text=g["run_id"], hovertemplate="%{text}<br>%{x:.3g} FLOPs: %{y:.4f}<extra></extra>"))
    front, best = [], float("inf")
    # at equal FLOPs (the seeds of one configuration) the lower loss first, so the higher is dominated
    for _, r in df.sort_values(["train_flops", "val_loss"]).iterrows():
        if r["val_loss"] < best:
            best = r["val_loss"]
            front.append((r["train_flops"], r["val_loss"]))
    fig.add_trace(go.Scatter(x=[f for f, _ in front], y=[v for _, v in front], mode="lines", name="Pareto front",
                             line=dict(color="black", dash="dash")))
    fig.update_xaxes(type="log")
    return _layout(fig, "Loss against training FLOPs", "training FLOPs", "final val loss (nats)")


def task_vs_flops(runs: pd.DataFrame, scores: pd.DataFrame) -> go.Figure | None:
    """Downstream accuracy of each run against its training FLOPs, one marker per run and task."""
    if scores.empty or runs.empty:
        return None
    df = scores[scores["metric"] == "acc"].merge(runs[["run_id", "label", "train_flops"]], on="run_id")
    df = df.dropna(subset=["value", "train_flops"])
    df = df[df["train_flops"] > 0]
    if df.empty:
        return None
    colors, fig = _colors(df["label"]), go.Figure()
    symbols = dict(zip(sorted(df["task"].unique()), ["circle", "square", "diamond", "triangle-up", "x", "star"] * 9,
                       strict=False))
    for (lab, task), g in df.groupby(["label", "task"], sort=True):
        fig.add_trace(go.Scatter(x=g["train_flops"], y=g["value"], mode="markers", name=f"{lab}: {task}",
                                 marker=dict(size=10, color=colors[lab], symbol=symbols[task]), text=g["run_id"],
                                 hovertemplate="%{text}<br>%{x:.3g} FLOPs: %{y:.3f}<extra></extra>"))
    fig.update_xaxes(type="log")
    return _layout(fig, "Downstream accuracy against training FLOPs (causal routing)", "training FLOPs",
                   "accuracy")


def speed_bars(table: pd.DataFrame) -> go.Figure | None:
    df = table[table["source"] == "training runs"] if not table.empty else table
    if df.empty or df["tokens_per_s"].isna().all():
        return None
    fig = go.Figure()
    fig.add_trace(go.Bar(x=df["label"], y=df["flop_ratio_vs_dense"], name="FLOP ratio vs dense"))
    fig.add_trace(go.Bar(x=df["label"], y=df["time_ratio_vs_dense"], name="time per token vs dense (measured)"))
    fig.update_layout(barmode="group")
    return _layout(fig, "Compute: FLOP ratio next to measured time ratio", "", "ratio to Standard")


def _last_eval_stat(routing: pd.DataFrame, stat: str, mode: str) -> pd.DataFrame:
    df = routing[(routing["kind"] == "eval") & (routing["stat"] == stat) & (routing["mode"] == mode)]
    if df.empty:
        return df
    last = df.groupby("run_id")["step"].transform("max")
    return df[df["step"] == last]


def selected_by_layer(routing: pd.DataFrame, runs: pd.DataFrame) -> go.Figure | None:
    if routing.empty:
        return None
    mode = "causal" if (routing["mode"] == "causal").any() else "topk"
    df = _last_eval_stat(routing, "selected_frac", mode)
    if df.empty:
        return None
    df = df.merge(runs[["run_id", "label"]], on="run_id")
    z = df.pivot_table(index="run_id", columns="layer", values="value")
    labels = df.drop_duplicates("run_id").set_index("run_id")["label"]
    fig = go.Figure(go.Heatmap(z=z.values, x=[f"layer {c}" for c in z.columns],
                               y=[f"{labels[r]} · {r}" for r in z.index], colorscale="Viridis",
                               colorbar=dict(title="selected")))
    fig.update_layout(height=max(300, 28 * len(z) + 120))
    return _layout(fig, f"Selected fraction by layer, last evaluation ({mode} routing)", "", "")


def selected_by_position(positions: pd.DataFrame, runs: pd.DataFrame, bins: int = 64) -> list[go.Figure]:
    """One heat-map (layer x position) per routed label, from its best run's last evaluation."""
    if positions.empty:
        return []
    figs = []
    df = positions[positions["mode"] == "topk"]
    df = df[df["step"] == df.groupby("run_id")["step"].transform("max")]
    ranked = runs.dropna(subset=["val_loss"]).sort_values("val_loss")
    for lab, g in ranked[ranked["run_id"].isin(df["run_id"])].groupby("label", sort=True):
        run_id = g["run_id"].iloc[0]
        d = df[df["run_id"] == run_id].copy()
        T = int(d["position"].max()) + 1
        d["bin"] = (d["position"] * min(bins, T) // T)
        z = d.pivot_table(index="layer", columns="bin", values="selected_frac", aggfunc="mean")
        width = T / z.shape[1]
        fig = go.Figure(go.Heatmap(z=z.values, x=[int(b * width) for b in z.columns],
                                   y=[f"layer {i}" for i in z.index], colorscale="Viridis",
                                   colorbar=dict(title="selected")))
        figs.append(_layout(fig, f"{lab}: selected fraction by position ({run_id}, last evaluation)",
                            "position in the sequence", ""))
    return figs


def stat_over_training(routing: pd.DataFrame, runs: pd.DataFrame, stats: list[str], title: str,
                       variants: tuple[str, ...] = ("mod", "dtf"), per_layer: bool = True) -> go.Figure | None:
    if routing.empty:
        return None
    keep = runs.loc[runs["variant"].isin(variants), ["run_id", "label"]]
    df = routing[(routing["kind"] == "train") & routing["stat"].isin(stats) & (routing["mode"] == "topk")]
    df = df.merge(keep, on="run_id")
    if df.empty:
        return None
    ranked = runs.dropna(subset=["val_loss"]).sort_values("val_loss")
    show = set(ranked[ranked["run_id"].isin(df["run_id"])].groupby("label").head(1)["run_id"]) or set(df["run_id"])
    df = df[df["run_id"].isin(show)]
    fig = go.Figure()
    if not per_layer:
        df = df.groupby(["run_id", "label", "stat", "step"], as_index=False)["value"].mean()
        df["layer"] = -1
    for (run_id, lab, stat, layer), g in df.sort_values("step").groupby(["run_id", "label", "stat", "layer"]):
        name = f"{lab} {stat}" + (f" L{layer}" if layer >= 0 else "")
        fig.add_trace(go.Scatter(x=g["step"], y=g["value"], mode="lines", name=name,
                                 hovertemplate=f"{run_id}<br>step %{{x}}: %{{y:.4f}}<extra></extra>"))
    return _layout(fig, title, "step", "")


BUDGET_SYMBOLS = ["circle", "square", "diamond", "triangle-up", "cross", "x", "pentagon", "hexagon", "star-square"]
BUDGET_DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]


def isoflop_curves(points: pd.DataFrame, optima: pd.DataFrame) -> go.Figure | None:
    """An isoFLOP study (`isoflop.analyse`): final loss against parameters (log axis), one curve per budget
    (a marker and dash per budget), a colour per variant; each run a point, the fitted parabola over the
    sizes tried, the optimum a star with its interval where the sizes bracket it, else a triangle at the
    best size tried pointing where the optimum lies."""
    if points.empty or "parameters" not in points:
        return None
    fits = (optima[(optima["axis"] == "parameters") & optima["fit_a"].notna()] if "fit_a" in optima
            else pd.DataFrame(columns=["variant", "budget"]))  # no budget could be fitted: the points alone
    colors, fig = _colors(points["variant"]), go.Figure()
    budgets = sorted(points["budget"].unique())
    for (variant, budget), g in points.sort_values("parameters").groupby(["variant", "budget"], sort=True):
        i, name = budgets.index(budget), f"{variant} · {budget:.3g} FLOPs"
        fig.add_trace(go.Scatter(x=g["parameters"], y=g["val_loss"], mode="markers", name=name, legendgroup=name,
                                 marker=dict(color=colors[variant], size=8,
                                             symbol=BUDGET_SYMBOLS[i % len(BUDGET_SYMBOLS)]),
                                 text=g["run_id"], hovertemplate="%{text}<br>%{x:.4g} parameters: %{y:.4f}"
                                                                 "<extra></extra>"))
        fit = fits[(fits["variant"] == variant) & (fits["budget"] == budget)]
        if fit.empty:
            continue
        f = fit.iloc[0]
        lx = np.log10(g["parameters"].astype(float))
        xs = np.linspace(float(lx.min()) - 0.05, float(lx.max()) + 0.05, 60) - f["x_center"]
        fig.add_trace(go.Scatter(x=10 ** (xs + f["x_center"]), y=f["fit_a"] * xs ** 2 + f["fit_b"] * xs + f["fit_c"],
                                 mode="lines", name=f"{name}: Huber fit", legendgroup=name, showlegend=False,
                                 line=dict(color=colors[variant], dash=BUDGET_DASHES[i % len(BUDGET_DASHES)])))
        if f["status"] == "optimum":
            fig.add_trace(go.Scatter(
                x=[f["optimum"]], y=[f["loss"]], mode="markers", name=f"{name}: optimum", legendgroup=name,
                showlegend=False, marker=dict(symbol="star", size=16, color=colors[variant],
                                              line=dict(color="black", width=1)),
                error_x=dict(type="data", symmetric=False, array=[f["optimum_high"] - f["optimum"]],
                             arrayminus=[f["optimum"] - f["optimum_low"]], visible=True),
                hovertemplate=f"optimum %{{x:.4g}} parameters, loss %{{y:.4f}}<br>{f['status']}<extra></extra>"))
        else:
            left = str(f["status"]).startswith("below")
            fig.add_trace(go.Scatter(
                x=[f["best_tried"]], y=[f["best_tried_loss"]], mode="markers", name=f"{name}: {f['status']}",
                legendgroup=name, showlegend=False,
                marker=dict(symbol="triangle-left" if left else "triangle-right", size=14, color=colors[variant],
                            line=dict(color="black", width=1)),
                hovertemplate=f"{f['status']}<extra></extra>"))
    fig.update_xaxes(type="log")
    # stars: bracketed optima with their 95% intervals; triangles: the optimum lies beyond the sizes tried
    return _layout(fig, "isoFLOP curves: final validation loss against parameters, one curve per budget",
                   "parameters (with embeddings)", "final val loss (nats)")


def compute_optimal_loss(optima: pd.DataFrame, laws: pd.DataFrame) -> go.Figure | None:
    """Each variant's compute-optimal loss (its bracketed isoFLOP optima, with their intervals) against the
    budget, log-log, with the power law L*(C) = A C^s through them where two budgets or more allow one."""
    if optima.empty or "loss" not in optima:
        return None
    opt = optima[(optima["axis"] == "parameters") & (optima["status"] == "optimum")]
    if opt.empty:
        return None
    colors, fig = _colors(optima["variant"]), go.Figure()
    for variant, g in opt.sort_values("budget").groupby("variant", sort=True):
        fig.add_trace(go.Scatter(x=g["budget"], y=g["loss"], mode="markers", name=variant,
                                 marker=dict(size=11, color=colors[variant]),
                                 error_y=dict(type="data", symmetric=False, array=g["loss_high"] - g["loss"],
                                              arrayminus=g["loss"] - g["loss_low"], visible=True)))
        law = laws[(laws["variant"] == variant) & (laws["quantity"] == "optimal loss (nats)")] \
            if not laws.empty and "exponent" in laws else laws
        if len(law) and law["exponent"].notna().iloc[0]:
            c = np.geomspace(float(g["budget"].min()), float(g["budget"].max()), 30)
            fig.add_trace(go.Scatter(x=c, y=law["coefficient"].iloc[0] * c ** law["exponent"].iloc[0], mode="lines",
                                     name=f"{variant}: {law['law'].iloc[0]}", line=dict(color=colors[variant])))
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return _layout(fig, "Compute-optimal loss against training FLOPs", "training FLOPs (budget)",
                   "optimal final val loss (nats)")
