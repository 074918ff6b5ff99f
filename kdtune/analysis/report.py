"""The report of one or several searches, the library under ``kdtune report`` (its command line
is :mod:`kdtune.cli.report`).

RESULTS is a search folder (``<storage-path>/<name>``, e.g. ``ray_results/quickstart-digits``) or
the name of an MLflow experiment (:func:`kdtune.analysis.load_searches`). :func:`write_report`
writes the plots (PNG), ``report.md`` and ``report.html`` (the same text, the images embedded):
best configuration, gap to the baselines, parameter importance, cost.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import pandas as pd

from kdtune import analysis
from kdtune.analysis import plots, selection
from kdtune.analysis.importance import BOOTSTRAP, MIN_TRIALS

# Plot captions, in report order.
CAPTIONS = {
    "learning_curves": "Learning curves, coloured by how each trial ended; dotted: ASHA's rungs, where it "
                       "stopped the weaker trials.",
    "accuracy_vs_params": "The objective (the search metric at the last epoch trained) of every finished "
                          "trial against each hyperparameter (stopped-early trials: at the epoch ASHA stopped them).",
    "importance": "Parameter importance (Optuna's fANOVA over the trials at one common budget; bars: the "
                  "5-95 % bootstrap interval; a conditional parameter is assessed over the trials that have it).",
    "pareto_front": "Several objectives: the first against each further one (what the trial cost), every "
                    "completed trial a dot; ringed, and joined by its staircase with two objectives: the "
                    "Pareto front, the trials no other trial beats in every objective.",
    "accuracy_vs_cost": "The objective (validation accuracy at the last epoch trained) against what the "
                        "trial cost: wall time and samples back-propagated (what an adaptive sampler such as "
                        "KDAS buys).",
    "ctkd": "CTKD: learned temperature (shaded: the epoch's lowest to highest) and λ per epoch.",
    "sakd_gates": "SAKD: fraction of samples gated on, per spot.",
}


def parse_baselines(texts: list[str]) -> dict[str, float]:
    """``--baseline NAME=VALUE`` values as {name: accuracy}; ValueError names a malformed one."""
    out = {}
    for text in texts:
        name, sep, value = text.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"--baseline {text}: expected NAME=VALUE with a number, e.g. none=93.1")
    return out


def default_out(searches: list[analysis.Search]) -> Path:
    """Where the report goes without --out: into the one search's folder, else ./kdtune_report."""
    if len(searches) == 1 and searches[0].folder is not None:
        return searches[0].folder / "report"
    return Path("kdtune_report")


def write_report(searches: list[analysis.Search], out: str | Path,
                 baselines: dict[str, float] | None = None, bootstrap: int = BOOTSTRAP) -> dict[str, Path]:
    """Write the plots, ``report.md`` and ``report.html`` into ``out``; returns {name: path}.
    ``bootstrap``: resamples behind each importance's interval (:func:`kdtune.analysis.importance_table`)."""
    import matplotlib

    matplotlib.use("Agg")  # a script: never look for a display
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trials, curves = analysis.trials_table(searches), analysis.curves_table(searches)
    metric, mode = searches[0].metric, searches[0].mode
    importance = analysis.importance_table(searches, bootstrap=bootstrap)
    images = plots.plot_all(trials, curves, importance, out, metric, analysis.milestones(searches),
                            analysis.log_params(searches), objectives=searches[0].objectives)
    blocks = _blocks(searches, trials, importance, images, metric, mode, baselines)
    (out / "report.md").write_text(_markdown(blocks))
    (out / "report.html").write_text(_html(blocks, out))
    return {"md": out / "report.md", "html": out / "report.html", **images}


# --------------------------------------------------------------------------- content


def _blocks(searches, trials, importance, images, metric, mode, baselines) -> list[tuple]:
    """The report as (kind, ...) blocks, rendered to markdown and to HTML alike."""
    names = ", ".join(s.label for s in searches)
    blocks: list[tuple] = [("h1", f"kdtune report: {names}")]
    for s in searches:
        where = s.folder or f"MLflow {s.tracking_uri}"
        fixed = ", ".join(f"{k}={s.spec['fixed'][k]}" for k in ("dataset", "teacher", "student", "method", "epochs")
                          if k in s.spec["fixed"])
        blocks.append(("p", f"{s.label}: {len(s.trials)} trials, {s.spec['search']['algorithm']} on {s.metric} "
                            f"({s.mode}); {fixed}; read from {where}."))

    blocks.append(("h2", "Best configuration"))
    params = [c for c in dict.fromkeys(p for s in searches for p in s.space.names()) if c in trials]
    top = selection.top_table(trials, metric, mode, params) if len(trials) else pd.DataFrame()
    blocks.append(("table", top if len(top) else pd.DataFrame({"": ["no finished trial"]})))
    if len(top):
        blocks.append(("p", f"The 5 best trials of each search by the objective, {metric} at the last epoch "
                            f"trained (more when trials tie with the fifth); tie: the trials that share a value. "
                            f"One run per trial: seed noise is often as large as the differences here; see the "
                            f"confirmation stage (docs/best-configuration.md)."))
    for s in searches:
        front = selection.pareto_table(s)
        if front is not None:
            blocks.append(("h2", f"Pareto front: {s.label}"))
            blocks.append(("table", front))
            blocks.append(("p", f"Objectives: {', '.join(f'{m} ({d})' for m, d in s.objectives)}, each at the last "
                                f"epoch trained. The front: the completed trials that no other trial beats in "
                                f"every objective, best {s.metric} first; each is the best found at its trade-off. "
                                f"Re-run one with kdtune train --from-search FOLDER --trial ID --final."))
        confirmed = selection.confirmation_table(s)
        if confirmed is not None:
            table, record = confirmed
            blocks.append(("h2", f"Confirmation: {s.label}"))
            blocks.append(("table", table))
            blocks.append(("p", f"Chosen by: {record['rule']}. Single-run best: "
                                f"{', '.join(record['single_run_best'])}."
                                + (f" Tie in the mean: {', '.join(record['mean_ties'])}."
                                   if len(record.get("mean_ties", [])) > 1 else "")))
        finals = selection.final_runs_table(s)
        if finals is not None:
            blocks.append(("h2", f"Final runs: {s.label}"))
            blocks.append(("table", finals))
            blocks.append(("p", "kdtune train --from-search: the trial's configuration re-run per seed on the "
                                "search's teacher (test: trained on train+val, measured on the test set)."))

    by = plots.default_hue(trials)
    if by != "status":  # several searches, or a searched sampler/method: set the groups side by side
        blocks.append(("h2", f"By {by}"))
        blocks.append(("table", analysis.group_summary(trials, by, metric, mode)))

    blocks.append(("h2", "Gap to baselines"))
    gap = analysis.baseline_gap(trials, baselines, metric, mode)
    if len(gap):
        blocks.append(("table", gap))
        blocks.append(("p", "gap = best trial minus baseline (positive: better). Baselines: none = the student "
                            "alone (method: none), kd = plain KD, from these searches' trials when they have "
                            "such trials, else from --baseline; published X = what the reference publishes "
                            "for the best trial's pair and method X (kdtune/published.yaml)."))
        blocks += _published_notes(gap, metric)
    own = analysis.loaders.own_baselines(trials, metric, mode)
    if own:
        blocks.append(("p", " ".join(
            f"{search}: its best trial {trial} is itself {name} ({analysis.BASELINES[name]}), so this search has "
            f"no separate {name} baseline; compare with --baseline {name}=ACC (a number you measured) or the "
            f"published numbers." for search, name, trial in own)))
    if not len(gap):
        blocks.append(("p", "No separate baseline in these searches; pass --baseline none=ACC --baseline kd=ACC "
                            "to compare against known numbers."))

    blocks.append(("h2", "Parameter importance"))
    if len(importance):
        blocks.append(("table", importance))
        blocks.append(("p", "Trials are compared at one budget (the `budget` column: the epoch of the completed "
                            "trials, else the highest ASHA rung that enough trials reached), since trials stopped "
                            "at different epochs are not comparable; low and high bound the 5-95 % bootstrap "
                            "interval over resampled trials."))
        few = importance[importance["trials"] < MIN_TRIALS]
        if len(few):
            scopes = ", ".join(dict.fromkeys(few["scope"]))
            blocks.append(("p", f"Warning: fewer than {MIN_TRIALS} trials reached the common budget in {scopes}; "
                                f"read these importances as noise."))
    else:
        blocks.append(("p", "Not enough finished trials to estimate importance (at least 2 per scope)."))

    blocks.append(("h2", "Cost"))
    blocks.append(("table", selection.cost_table(analysis.cost_totals(trials))))
    blocks.append(("p", "trial/cpu/gpu time: wall time of every trial, times its cpus_per_trial / "
                        "gpus_per_trial; samples_backprop: samples that went through a backward pass."))

    blocks.append(("h2", "Plots"))
    for name, path in images.items():
        blocks.append(("img", CAPTIONS.get(name, name), path.name))
    return blocks


def _published_notes(gap: pd.DataFrame, metric: str) -> list[tuple]:
    """A sentence per search naming the published numbers it is compared with, and on which split
    each side was measured."""
    from kdtune.analysis.published import label

    rows = gap[gap["baseline"].str.startswith("published ")]
    if not len(rows):
        return []
    split = metric.partition("/")[0]
    lines = []
    for search, group in rows.groupby("search", sort=False):
        numbers = [f"{label(name.removeprefix('published '))} {value:.2f} "
                   f"({'; '.join(s.removesuffix(', test set') for s in found['source'])})"
                   for (name, value), found in group.groupby(["baseline", "baseline_value"], sort=False)]
        lines.append(f"{search}: published {', '.join(numbers)}; this search's best "
                     f"{group['best'].iloc[0]:.2f} on {split}.")
    notes = [("p", " ".join(lines))]
    if split != "test":
        notes.append(("p", f"Published numbers are test-set accuracies (the best of 240 epochs trained on all "
                           f"50,000 training images, usually the mean of several runs); this search's {metric} "
                           f"is measured on the validation split it held out of the training set, so the two "
                           f"are not measured on the same images. For a test-set number, run the best "
                           f"configuration with kdtune train CONFIG --final."))
    return notes


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return "" if value is None else str(value)


def _markdown(blocks: list[tuple]) -> str:
    lines: list[str] = []
    for kind, *content in blocks:
        if kind == "h1":
            lines += [f"# {content[0]}", ""]
        elif kind == "h2":
            lines += [f"## {content[0]}", ""]
        elif kind == "p":
            lines += [content[0], ""]
        elif kind == "table":
            table = content[0]
            lines.append("| " + " | ".join(map(str, table.columns)) + " |")
            lines.append("|" + "---|" * len(table.columns))
            for row in table.itertuples(index=False):
                lines.append("| " + " | ".join(_cell(v).replace("|", "\\|") for v in row) + " |")
            lines.append("")
        elif kind == "img":
            caption, file = content
            lines += [f"![{caption}]({file})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def _html(blocks: list[tuple], folder: Path) -> str:
    body: list[str] = []
    for kind, *content in blocks:
        if kind in ("h1", "h2", "p"):
            tag = kind
            body.append(f"<{tag}>{html.escape(content[0])}</{tag}>")
        elif kind == "table":
            table = content[0].astype(object).map(_cell)
            body.append(table.to_html(index=False, escape=True, border=0, classes="data"))
        elif kind == "img":
            caption, file = content
            # Embedded, so the HTML file can be mailed or attached on its own.
            data = base64.b64encode((folder / file).read_bytes()).decode("ascii")
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
             "table.data{border-collapse:collapse;font-size:90%}"
             "table.data td,table.data th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
             "img{max-width:100%}figcaption{color:#555;font-size:90%}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>kdtune report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")

