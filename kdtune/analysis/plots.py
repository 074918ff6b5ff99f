"""Plots of searches, from the tables of :mod:`kdtune.analysis`.

Every function returns a matplotlib ``Figure`` (a notebook shows it inline) and, given ``path``,
also writes it there as a PNG; it returns None, drawing nothing, when its data is absent (no
CTKD metrics in a KD search, say). Figures are made without pyplot, so no GUI backend is ever
needed and no figure stays alive after it is returned (scripts and tests run headless as they are).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from kdtune.analysis.loaders import FINISHED, _objective

STATUS_COLOURS = {"completed": "tab:green", "stopped early": "tab:blue", "diverged": "tab:red",
                  "failed": "black", "interrupted": "tab:gray"}
DPI = 100


# --------------------------------------------------------------------------- helpers



def objective_label(metric: str) -> str:
    """The axis label of the objective: what is plotted, not the best epoch's value."""
    return f"{metric} at the last epoch trained"

def _figure(panels: int, width: float = 4.6, height: float = 3.4, columns: int = 3) -> tuple[Figure, list]:
    ncols = min(panels, columns)
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _finish(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI)
    return fig


def _palette(values: list[Any]) -> dict[Any, Any]:
    """A colour per group: the status colours for statuses, matplotlib's cycle otherwise."""
    if all(v in STATUS_COLOURS for v in values):
        return {v: STATUS_COLOURS[v] for v in values}
    cycle = [f"C{i}" for i in range(10)]
    return {v: cycle[i % len(cycle)] for i, v in enumerate(values)}


def _legend(ax, palette: dict[Any, Any], title: str | None = None, marker: str | None = None, **kwargs) -> None:
    handles = [Line2D([], [], color=c, marker=marker, linestyle="none" if marker else "-", label=str(v))
               for v, c in palette.items()]
    ax.legend(handles=handles, title=title, fontsize="small", title_fontsize="small", **kwargs)


def _groups(frame: pd.DataFrame, column: str) -> list[Any]:
    order = list(STATUS_COLOURS) if column == "status" else []
    found = list(dict.fromkeys(frame[column].fillna("-")))
    return [v for v in order if v in found] + [v for v in found if v not in order]


def default_hue(trials: pd.DataFrame) -> str:
    """What tells the trials apart best: several searches, else a searched sampler, else a
    searched method, else how the trials ended."""
    for column in ("search", "sampler", "method"):
        if column in trials and trials[column].nunique(dropna=False) > 1:
            return column
    return "status"


def _searches(frame: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
    if "search" in frame and frame["search"].nunique() > 1:
        return list(frame.groupby("search", sort=False))
    return [(None, frame)]


# --------------------------------------------------------------------------- learning curves


def learning_curves(curves: pd.DataFrame, metric: str = "val/acc1", milestones: list[int] | dict | None = None,
                    path: str | Path | None = None) -> Figure | None:
    """``metric`` per epoch, a line per trial coloured by outcome (completed / stopped early /
    diverged / failed), with ASHA's rungs (``milestones``: epochs, or per search a dict) as
    dotted lines: where a stopped-early line ends on one, ASHA cut it there. A panel per search."""
    if metric not in curves or curves[metric].notna().sum() == 0:
        return None
    searches = _searches(curves)
    fig, axes = _figure(len(searches), width=6.0, height=4.0, columns=2)
    palette = _palette(_groups(curves, "status"))
    for ax, (name, frame) in zip(axes, searches):
        for _, trial in frame.groupby("trial_id", sort=False):
            status = trial["status"].iloc[0]
            ax.plot(trial["epoch"], trial[metric], color=palette.get(status, "tab:gray"), alpha=0.8, lw=1.2,
                    marker="o" if len(trial) == 1 else None, ms=3)
        rungs = milestones.get(name, []) if isinstance(milestones, dict) else (milestones or [])
        for i, epoch in enumerate(rungs):
            ax.axvline(epoch, color="0.5", ls=":", lw=1, label="ASHA rung" if i == 0 else None)
        ax.set(xlabel="epoch", ylabel=metric, title=name or f"{metric} per epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    _legend(axes[0], palette, title="outcome", loc="lower right")
    if milestones:
        axes[0].add_artist(axes[0].get_legend())
        axes[0].legend(handles=[Line2D([], [], color="0.5", ls=":", label="ASHA rung")], loc="upper left",
                       fontsize="small")
    return _finish(fig, path)


# --------------------------------------------------------------------------- accuracy vs hyperparameters


def accuracy_vs_params(trials: pd.DataFrame, params: list[str] | None = None, metric: str = "val/acc1",
                       hue: str | None = None, log: list[str] | None = None,
                       path: str | Path | None = None) -> Figure | None:
    """The objective (``final_<metric>``) of every trial against each hyperparameter (``params``; default: the
    columns between ``status`` and ``epochs``, i.e. the searched ones), a panel per parameter.
    Numbers on a log axis when listed in ``log`` (default: when they span more than 20x);
    choices as jittered columns. Diverged and failed trials are left out (their values are
    penalties). Colour: ``hue`` (default :func:`default_hue`)."""
    value = _objective(metric)
    if value not in trials:
        return None
    params = [p for p in (params or searched_params(trials)) if p in trials and trials[p].notna().any()]
    done = trials[trials["status"].isin(FINISHED)].dropna(subset=[value])
    if not params or not len(done):
        return None
    hue = hue or default_hue(done)
    palette = _palette(_groups(done, hue))
    fig, axes = _figure(len(params))
    rng = np.random.default_rng(0)  # jitter that is the same on every run
    for ax, name in zip(axes, params):
        present = done.dropna(subset=[name])
        column = present[name]
        numeric = pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
        if numeric:
            x = column.astype(float)
            if (log is not None and name in log) or (log is None and x.min() > 0 and x.max() / x.min() > 20):
                ax.set_xscale("log")
        else:
            labels = sorted(column.astype(str).unique())
            x = column.astype(str).map({v: i for i, v in enumerate(labels)}) + rng.uniform(-0.15, 0.15, len(column))
            ax.set_xticks(range(len(labels)), labels)
        colours = present[hue].fillna("-").map(palette)
        ax.scatter(x, present[value], c=list(colours), s=28, alpha=0.85, edgecolors="none")
        ax.set(xlabel=name, ylabel=objective_label(metric))
        ax.grid(alpha=0.3)
    _legend(axes[0], palette, title=hue, marker="o", loc="best")
    return _finish(fig, path)


def searched_params(trials: pd.DataFrame) -> list[str]:
    """The hyperparameter columns of a trials table (:mod:`kdtune.analysis` puts them between
    ``status`` and ``epochs``); ``method``/``sampler`` only when they vary."""
    columns = list(trials.columns)
    if "status" not in columns or "epochs" not in columns:
        return []
    inside = columns[columns.index("status") + 1:columns.index("epochs")]
    return [c for c in inside if c not in ("method", "sampler") or trials[c].nunique(dropna=False) > 1]


# --------------------------------------------------------------------------- importance


def importance_bars(importance: pd.DataFrame, path: str | Path | None = None) -> Figure | None:
    """Horizontal bars of :func:`kdtune.analysis.param_importance`, a panel per scope (and per
    search, when a ``search`` column names several)."""
    if importance is None or not len(importance):
        return None
    several = "search" in importance and importance["search"].nunique() > 1
    scope = (importance["search"] + ": " + importance["scope"]) if several else importance["scope"]
    scopes = list(dict.fromkeys(scope))
    fig, axes = _figure(len(scopes), width=4.6, height=0.6 + 0.45 * scope.value_counts().max())
    for ax, name in zip(axes, scopes):
        rows = importance[scope == name].sort_values("importance")
        interval = None
        if {"low", "high"} <= set(rows) and rows[["low", "high"]].notna().all().all():
            interval = [(rows["importance"] - rows["low"]).clip(lower=0), (rows["high"] - rows["importance"]).clip(lower=0)]
        ax.barh(rows["param"], rows["importance"], xerr=interval, color="tab:blue", ecolor="0.3", capsize=3)
        budget = rows["budget"].iloc[0] if "budget" in rows else None
        at = f", epoch {int(budget)}" if budget is not None and pd.notna(budget) else ""
        ax.set(xlim=(0, 1), xlabel="importance", title=f"{name} ({int(rows['trials'].iloc[0])} trials{at})")
        ax.grid(alpha=0.3, axis="x")
    return _finish(fig, path)


# --------------------------------------------------------------------------- what a trial cost


def accuracy_vs_cost(trials: pd.DataFrame, metric: str = "val/acc1", hue: str | None = None,
                     path: str | Path | None = None) -> Figure | None:
    """The objective (``final_<metric>``) against the trial's wall time and against the samples it back-propagated:
    what an adaptive sampler such as KDAS buys (colour by ``hue``; default :func:`default_hue`,
    the sampler in a KD-vs-KDAS search)."""
    value = _objective(metric)
    axes_of = [(c, label) for c, label in (("wall_s", "trial wall time (min)"),
                                           ("samples_backprop", "samples back-propagated"))
               if c in trials and trials[c].notna().any()]
    if value not in trials or not axes_of:
        return None
    done = trials[trials["status"].isin(FINISHED)].dropna(subset=[value])
    if not len(done):
        return None
    hue = hue or default_hue(done)
    palette = _palette(_groups(done, hue))
    fig, axes = _figure(len(axes_of), width=5.2, height=3.8)
    minutes = done["wall_s"].max() > 120 if "wall_s" in done else False
    for ax, (column, label) in zip(axes, axes_of):
        x = done[column] / 60 if column == "wall_s" and minutes else done[column]
        label = label if column != "wall_s" or minutes else "trial wall time (s)"
        ax.scatter(x, done[value], c=list(done[hue].fillna("-").map(palette)), s=30, alpha=0.85, edgecolors="none")
        ax.set(xlabel=label, ylabel=objective_label(metric))
        ax.grid(alpha=0.3)
    _legend(axes[0], palette, title=hue, marker="o", loc="lower right")
    return _finish(fig, path)


def pareto_front(trials: pd.DataFrame, objectives: list[tuple[str, str]] | None, hue: str | None = None,
                 path: str | Path | None = None) -> Figure | None:
    """A search with several objectives (``Search.objectives``: ``(metric, mode)`` pairs, the
    first what the trial learned): the first objective against each further one (what the trial
    cost, such as ``samples/backprop``), a panel each. Every completed trial is a dot (colour:
    ``hue``, default :func:`default_hue`); the Pareto front's trials (the ``pareto`` column) are
    ringed, and with two objectives joined by the front's staircase: the boundary of what the
    search found attainable. With more than two, a panel shows a projection, where a front trial
    may sit below another (it is better in an objective not drawn). None without objectives."""
    if not objectives or len(objectives) < 2 or "pareto" not in trials:
        return None
    (first, first_mode), others = objectives[0], objectives[1:]
    columns = [_objective(m) for m, _ in objectives]
    if any(c not in trials for c in columns):
        return None
    done = trials[trials["status"] == "completed"].dropna(subset=columns)
    if not len(done):
        return None
    hue = hue or default_hue(done)
    palette = _palette(_groups(done, hue))
    fig, axes = _figure(len(others), width=5.4, height=4.0)
    y = _objective(first)
    for ax, (metric, mode) in zip(axes, others):
        x = _objective(metric)
        for name, frame in _searches(done):
            ax.scatter(frame[x], frame[y], c=list(frame[hue].fillna("-").map(palette)), s=30, alpha=0.85,
                       edgecolors="none", zorder=2)
            front = frame[frame["pareto"].astype(bool)].sort_values(x)
            ax.scatter(front[x], front[y], s=90, facecolors="none", edgecolors="black", lw=1.2, zorder=3,
                       label="Pareto front" if name is None else f"front of {name}")
            if len(objectives) == 2 and len(front) > 1:
                sx, sy = _staircase(list(front[x]), list(front[y]), mode, first_mode)
                ax.plot(sx, sy, color="black", lw=1, alpha=0.6, zorder=1)
        ax.set(xlabel=f"{metric} ({mode}), the trial's total" if metric.startswith(("samples/", "time_"))
               else objective_label(metric) + f" ({mode})", ylabel=objective_label(first) + f" ({first_mode})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    if hue != "status" or len(palette) > 1:
        axes[0].add_artist(axes[0].get_legend())
        _legend(axes[0], palette, title=hue, marker="o", loc="lower right")
    return _finish(fig, path)


def _staircase(x: list[float], y: list[float], x_mode: str, y_mode: str) -> tuple[list[float], list[float]]:
    """The polyline through front points sorted by ``x`` that bounds the region they dominate:
    between two neighbours it passes through their corner, the worse ``x`` with the worse ``y``."""
    def worse(a: float, b: float, mode: str) -> float:
        return min(a, b) if mode == "max" else max(a, b)

    px, py = [x[0]], [y[0]]
    for i in range(1, len(x)):
        px += [worse(x[i - 1], x[i], x_mode), x[i]]
        py += [worse(y[i - 1], y[i], y_mode), y[i]]
    return px, py


# --------------------------------------------------------------------------- method-specific curves


def ctkd_curves(curves: pd.DataFrame, path: str | Path | None = None) -> Figure | None:
    """CTKD per epoch, a line per trial: the mean learned temperature, shaded between the
    epoch's lowest and highest (``ctkd/temperature_min`` / ``_max``), and the curriculum's λ;
    None when no ``ctkd/*`` metric was reported."""
    panels = [c for c in ("ctkd/temperature", "ctkd/lambda") if c in curves and curves[c].notna().any()]
    if not panels:
        return None
    fig, axes = _figure(len(panels), width=5.2, height=3.6)
    for ax, column in zip(axes, panels):
        for i, (_, trial) in enumerate(_with(curves, column).groupby("trial_id", sort=False)):
            colour = f"C{i % 10}"
            ax.plot(trial["epoch"], trial[column], color=colour, lw=1.2)
            bounds = ("ctkd/temperature_min", "ctkd/temperature_max")
            if column == "ctkd/temperature" and all(b in trial for b in bounds):
                ax.fill_between(trial["epoch"], trial[bounds[0]], trial[bounds[1]], color=colour, alpha=0.15, lw=0)
        ax.set(xlabel="epoch", ylabel=column, title=column.split("/", 1)[1] + " per epoch (a line per trial)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return _finish(fig, path)


def sakd_gates(curves: pd.DataFrame, path: str | Path | None = None) -> Figure | None:
    """SAKD's gate rates (the fraction of samples gated on) per epoch, a panel per spot: thin
    lines per trial, the mean over trials bold; None when no ``sakd/gate_*`` metric was reported."""
    spots = sorted(c for c in curves.columns if c.startswith("sakd/gate_") and curves[c].notna().any())
    if not spots:
        return None
    fig, axes = _figure(len(spots), width=4.2, height=3.2, columns=4)
    for ax, column in zip(axes, spots):
        present = _with(curves, column)
        for _, trial in present.groupby("trial_id", sort=False):
            ax.plot(trial["epoch"], trial[column], color="tab:blue", alpha=0.25, lw=0.8)
        mean = present.groupby("epoch")[column].mean()
        ax.plot(mean.index, mean.values, color="tab:blue", lw=2, label="mean over trials")
        ax.set(xlabel="epoch", ylabel="fraction gated on", ylim=(-0.02, 1.02),
               title=column.removeprefix("sakd/gate_"))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return _finish(fig, path)


def _with(curves: pd.DataFrame, column: str) -> pd.DataFrame:
    return curves.dropna(subset=[column])


# --------------------------------------------------------------------------- all at once


def plot_all(trials: pd.DataFrame, curves: pd.DataFrame, importance: pd.DataFrame | None, out: str | Path,
             metric: str = "val/acc1", milestones: list[int] | dict | None = None,
             log: list[str] | None = None, objectives: list[tuple[str, str]] | None = None) -> dict[str, Path]:
    """Every plot whose data is there, as ``<out>/<name>.png``; returns {name: path} of those written.
    ``milestones``: ASHA's rungs (``Search.milestones``); ``log``: the log-scaled hyperparameters
    (``Search.log_params``); ``objectives``: a multi-objective search's (``Search.objectives``)."""
    out = Path(out)
    makers = {
        "learning_curves": lambda p: learning_curves(curves, metric, milestones, p),
        "accuracy_vs_params": lambda p: accuracy_vs_params(trials, metric=metric, log=log, path=p),
        "importance": lambda p: importance_bars(importance, p),
        "pareto_front": lambda p: pareto_front(trials, objectives, path=p),
        "accuracy_vs_cost": lambda p: accuracy_vs_cost(trials, metric, path=p),
        "ctkd": lambda p: ctkd_curves(curves, p),
        "sakd_gates": lambda p: sakd_gates(curves, p),
    }
    written = {}
    for name, make in makers.items():
        path = out / f"{name}.png"
        if make(path) is not None:
            written[name] = path
    return written
