"""Evaluation figures: ROC and PR curves, few-shot curves and the UMAP of patients.

Every figure made from embeddings with random demo weights carries a red "DEMO WEIGHTS" banner.
PNG files record the code version and parameters in their text chunks.
"""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from eagleflow.encoders import DEFAULT_EMBEDDING_NAMES
from eagleflow.h5io import atomic_path, read_attrs
from eagleflow.predictions import external_sets, read_predictions
from eagleflow.provenance import provenance_attrs
from eagleflow.sheets import read_clinical_table
from eagleflow.stats import METRIC_TITLES, METRICS
from eagleflow.task_data import read_patient_embeddings
from eagleflow.tasks import TaskSpec

log = logging.getLogger(__name__)


DEMO_TEXT = "DEMO WEIGHTS: not a result"


COLORS = dict(zip(DEFAULT_EMBEDDING_NAMES, ("tab:red", "tab:blue", "tab:green"), strict=True))


def _color(embedding: str, index: int) -> str:
    return COLORS.get(embedding, f"C{index % 10}")


def demo_note(fig: Any, attrs: Mapping[str, Any]) -> float:
    """Put the demo-weights banner on top of a figure if the embeddings came from demo weights.

    Returns the banner's height in inches (0 without one).
    """
    if attrs.get("weights_demo") != "true":
        return 0.0
    text = textwrap.fill(
        f"{DEMO_TEXT} (random weights: {attrs.get('demo_weights', '?')})",
        width=int(fig.get_figwidth() * 9),
    )
    fig.text(
        0.5,
        1 - 0.05 / fig.get_figheight(),
        text,
        ha="center",
        va="top",
        fontsize=10,
        fontweight="bold",
        color="white",
        bbox={"facecolor": "#c00000", "edgecolor": "none", "pad": 4},
    )
    return 0.2 * (text.count("\n") + 1) + 0.15


def finish_figure(
    fig: Any,
    title: str,
    attrs: Mapping[str, Any],
    path: str,
    stage: str,
    params: Mapping[str, Any],
) -> None:
    """Title, demo banner and layout; write a PNG atomically with provenance in its metadata."""
    height = fig.get_figheight()
    banner = demo_note(fig, attrs)
    # the panels are laid out below a band that holds the banner and the title
    fig.suptitle(title, y=1 - (banner + 0.08) / height, va="top")
    fig.get_layout_engine().set(rect=(0, 0, 1, 1 - (banner + 0.45) / height))
    prov = provenance_attrs(stage, dict(params))
    metadata = {"Software": prov["code_version"], "Description": json.dumps(prov, sort_keys=True)}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata=metadata)
    plt.close(fig)


def figure_grid(
    nrows: int, ncols: int, width: float = 4.2, height: float = 4.0
) -> tuple[Any, np.ndarray]:
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(max(width * ncols, 6.0), height * nrows + 0.8),
        squeeze=False,
        layout="constrained",
    )
    return fig, axes


def _curve_classes(task: TaskSpec) -> list[int]:
    """Binary: the positive class only; multiclass: one-vs-rest per class."""
    return [task.positive_index] if task.binary else list(range(len(task.classes)))


def curve_figure(
    kind: str,
    task: TaskSpec,
    sets: Mapping[str, Mapping[str, pd.DataFrame]],
    attrs: Mapping[str, Any],
    path: str,
) -> None:
    """ROC (kind 'roc') or precision-recall ('pr') curves: rows = sets, columns = classes."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    classes = _curve_classes(task)
    fig, axes = figure_grid(max(1, len(sets)), len(classes))
    for row, (set_name, frames) in enumerate(sets.items()):
        for col, c in enumerate(classes):
            ax = axes[row, col]
            prevalence = None
            for i, (embedding, frame) in enumerate(frames.items()):
                truth = (frame["y"] == c).to_numpy()
                scores = frame[f"prob_{task.classes[c]}"].to_numpy(dtype=float)
                if truth.all() or not truth.any():
                    continue
                prevalence = truth.mean()
                if kind == "roc":
                    fpr, tpr, _ = roc_curve(truth, scores)
                    ax.plot(
                        fpr,
                        tpr,
                        color=_color(embedding, i),
                        label=f"{embedding} (AUC {auc(fpr, tpr):.3f})",
                    )
                else:
                    precision, recall, _ = precision_recall_curve(truth, scores)
                    area = -np.sum(np.diff(recall) * precision[:-1])
                    ax.step(
                        recall,
                        precision,
                        where="post",
                        color=_color(embedding, i),
                        label=f"{embedding} (AP {area:.3f})",
                    )
            if prevalence is None:
                ax.text(0.5, 0.5, "one class only:\nno curve", ha="center", va="center")
            elif kind == "roc":
                ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
            else:
                ax.axhline(prevalence, ls="--", color="grey", lw=0.8)
            ax.set_xlim(-0.01, 1.01)
            ax.set_ylim(-0.01, 1.01)
            ax.set_aspect("equal")
            ax.set_xlabel("False positive rate" if kind == "roc" else "Recall")
            ax.set_ylabel("True positive rate" if kind == "roc" else "Precision")
            n = len(next(iter(frames.values()))) if frames else 0
            target = task.classes[c] if task.binary else f"{task.classes[c]} vs rest"
            ax.set_title(f"{set_name}: {task.label} = {target} (n={n})", fontsize=9)
            if prevalence is not None:
                ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=8)
    finish_figure(
        fig,
        f"{task.name}: {'ROC' if kind == 'roc' else 'Precision-recall'} curves of the MLP heads",
        attrs,
        path,
        "evaluation_figures",
        {"figure": kind, "task": task.params()},
    )


def fewshot_figure(
    task: TaskSpec, table: pd.DataFrame, attrs: Mapping[str, Any], path: str
) -> None:
    """Metric vs k (patients per class), mean ± SD over repeats: rows = sets, columns = metrics."""
    set_names = sorted(set(table["set"]), key=lambda s: (s != "internal", s)) if len(table) else []
    fig, axes = figure_grid(max(1, len(set_names)), len(METRICS), width=3.6, height=3.2)
    if not set_names:
        axes[0, 0].text(0.5, 0.5, "no few-shot k was possible\n(classes too small)", ha="center")
    for row, set_name in enumerate(set_names):
        for col, metric in enumerate(METRICS):
            ax = axes[row, col]
            for i, embedding in enumerate(task.embeddings):
                part = table[
                    (table["set"] == set_name)
                    & (table["metric"] == metric)
                    & (table["embedding"] == embedding)
                ].sort_values("k")
                if part.empty:
                    continue
                k = part["k"].to_numpy()
                mean = part["mean"].to_numpy(dtype=float)
                std = np.nan_to_num(part["std"].to_numpy(dtype=float))
                ax.plot(k, mean, marker="o", color=_color(embedding, i), label=embedding)
                ax.fill_between(k, mean - std, mean + std, color=_color(embedding, i), alpha=0.2)
            ax.set_xscale("log", base=2)
            shots = sorted(set(table["k"]))
            ax.set_xticks(shots, [str(k) for k in shots])
            ax.minorticks_off()
            ax.set_xlabel("k (patients per class)")
            ax.set_ylabel(METRIC_TITLES[metric])
            ax.set_title(set_name, fontsize=9)
            ax.set_ylim(0, 1.02)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    finish_figure(
        fig,
        f"{task.name}: few-shot logistic regression (mean ± SD over repeats)",
        attrs,
        path,
        "evaluation_figures",
        {"figure": "fewshot", "task": task.params()},
    )


def task_figures(
    task: Mapping[str, Any],
    predictions: Sequence[str],
    external: Sequence[str],
    fewshot_metrics: str,
    patients_h5: str,
    roc_png: str,
    pr_png: str,
    fewshot_png: str,
) -> None:
    """The `evaluation_figures` rule: the inputs are lists in the order of the task's embeddings."""
    spec = TaskSpec.from_params(task)
    attrs = read_attrs(patients_h5)
    sets: dict[str, dict[str, pd.DataFrame]] = {}
    for embedding, pred_path, ext_path in zip(spec.embeddings, predictions, external, strict=True):
        sets.setdefault("crossval", {})[embedding] = read_predictions(pred_path, spec)
        ext = read_predictions(ext_path, spec)
        for set_name, mask in external_sets(ext):
            sets.setdefault(set_name, {})[embedding] = ext[mask]
    curve_figure("roc", spec, sets, attrs, roc_png)
    curve_figure("pr", spec, sets, attrs, pr_png)
    table = pd.read_csv(fewshot_metrics, keep_default_na=False, na_values=[""], dtype={"set": str})
    fewshot_figure(spec, table, attrs, fewshot_png)


def umap_coordinates(x: np.ndarray, params: Mapping[str, Any]) -> np.ndarray | None:
    """Seeded 2-d UMAP (None when there are too few patients for a neighbour graph)."""
    if len(x) < 4:
        return None
    import umap

    reducer = umap.UMAP(
        n_neighbors=min(int(params["n_neighbors"]), len(x) - 1),
        min_dist=float(params["min_dist"]),
        metric=str(params.get("metric", "euclidean")),
        random_state=int(params["seed"]),
        n_jobs=1,
    )
    return reducer.fit_transform(x)


def umap_figure(
    patients_h5: str,
    clinical_table: str,
    labels: Mapping[str, str],
    params: Mapping[str, Any],
    output: str,
) -> None:
    """The `evaluation_umap` rule: one column per embedding; rows coloured by cohort, then labels.

    labels: task name -> label column of the clinical table.
    """
    names = list(params["embeddings"])
    patients, arrays, attrs = read_patient_embeddings(patients_h5, names)
    clinical = read_clinical_table(clinical_table)
    columns = list(dict.fromkeys(labels.values()))
    colourings = {"cohort": patients["COHORT"].to_numpy()}
    for column in columns:
        values = clinical[column].reindex(patients["PATIENT"]).fillna("").to_numpy(dtype=str)
        colourings[column] = np.where(values == "", "(missing)", values)
    fig, axes = figure_grid(len(colourings), len(names), width=4.0, height=3.6)
    for col, name in enumerate(names):
        coords = umap_coordinates(arrays[name], params)
        log.info(
            "UMAP of %d patients, %s embeddings (%d-d)%s",
            len(patients),
            name,
            arrays[name].shape[1],
            "" if coords is not None else ": too few patients, panel left empty",
        )
        for row, (title, values) in enumerate(colourings.items()):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}: {title}", fontsize=9)
            if coords is None:
                ax.text(0.5, 0.5, f"{len(patients)} patients:\ntoo few for UMAP", ha="center")
                continue
            for i, value in enumerate(sorted(set(values))):
                mask = values == value
                colour = "lightgrey" if value == "(missing)" else f"C{i % 10}"
                ax.scatter(coords[mask, 0], coords[mask, 1], s=18, color=colour, label=value)
            if col == len(names) - 1:
                ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    finish_figure(
        fig,
        f"UMAP of patient embeddings (n={len(patients)}, seed {params['seed']})",
        attrs,
        output,
        "evaluation_umap",
        {"umap": dict(params), "labels": dict(labels)},
    )


# the efficiency plot's x axes: compute.csv's measures per slide
COMPUTE_MEASURES = {
    "tile_forwards_per_slide": "tile-encoder forwards per slide",
    "seconds_per_slide": "measured model seconds per slide",
}
GRID_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
EFFICIENCY_COLUMNS = [
    "task",
    "set",
    "measure",
    "embedding",
    "base",
    "tile_px",
    "tile_mpp",
    "compute",
    "auroc",
    "auroc_low",
    "auroc_high",
    "label",
]


def _grid_text(tile_px: Any, tile_mpp: Any) -> str:
    if pd.isna(tile_mpp):
        return "grid unknown"
    return f"{int(tile_px)} px at {float(tile_mpp):g} µm/px" if pd.notna(tile_px) else "?"


def efficiency_points(comparison: pd.DataFrame) -> pd.DataFrame:
    """What the efficiency figure plots: one row per task, set, compute measure and embedding
    (an embedding is one base at one grid) with an AUROC and a positive compute (log axis)."""
    rows = []
    for row in comparison.to_dict("records"):
        for measure in COMPUTE_MEASURES:
            compute, auroc = row[measure], row["auroc"]
            if pd.isna(auroc) or pd.isna(compute) or float(compute) <= 0:
                continue
            mpp = row["tile_mpp"]
            rows.append(
                {
                    **{k: row[k] for k in ("task", "set", "embedding", "base", "tile_px")},
                    "tile_mpp": mpp,
                    "measure": measure,
                    "compute": float(compute),
                    **{k: row[k] for k in ("auroc", "auroc_low", "auroc_high")},
                    # the grid is in the label: names at their configured grid carry no '@'
                    "label": row["embedding"] if pd.isna(mpp) else f"{row['base']} {mpp:g} µm/px",
                }
            )
    return pd.DataFrame(rows, columns=EFFICIENCY_COLUMNS)


def _efficiency_panel(ax: Any, points: pd.DataFrame, colours: Mapping[str, str], markers) -> None:
    """One task, set and measure: a labelled point per embedding, a base's grids joined."""
    for base, part in points.groupby("base", sort=False):
        part = part.sort_values("compute")
        if len(part) > 1:
            ax.plot(part["compute"], part["auroc"], color=colours[base], lw=0.8, alpha=0.5)
    for point in points.to_dict("records"):
        colour = colours[point["base"]]
        x, y = point["compute"], point["auroc"]
        if pd.notna(point["auroc_low"]) and pd.notna(point["auroc_high"]):
            ax.errorbar(
                [x],
                [y],
                yerr=[[y - point["auroc_low"]], [point["auroc_high"] - y]],
                fmt="none",
                ecolor=colour,
                alpha=0.4,
                lw=0.8,
            )
        dots = ax.scatter(
            [x],
            [y],
            s=40,
            color=colour,
            marker=markers[_grid_text(point["tile_px"], point["tile_mpp"])],
            edgecolors="black",
            linewidths=0.5,
            zorder=3,
        )
        dots.set_gid(point["embedding"])  # the figure's data, checked by the tests
        ax.annotate(
            point["label"],
            (x, y),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=7,
            color=colour,
        )


def efficiency_figure(
    comparison: pd.DataFrame,
    attrs: Mapping[str, Any],
    path: str,
    params: Mapping[str, Any] | None = None,
) -> tuple[pd.DataFrame, Any]:
    """AUROC of the MLP head against compute per slide (log x), as the paper's efficiency plot.

    Rows: each task's cross-validation, then its external sets; columns: tile forwards and
    measured seconds per slide. Colour: the embedding's base name; marker: its grid. Returns the
    points plotted and the (closed) figure; writes a PNG with the demo banner when `attrs` say so.
    """
    points = efficiency_points(comparison)
    panels = list(dict.fromkeys(zip(comparison["task"], comparison["set"], strict=True)))
    bases = list(dict.fromkeys(comparison["base"]))
    colours = {base: _color(base, i) for i, base in enumerate(bases)}
    grids = list(
        dict.fromkeys(
            _grid_text(px, mpp)
            for px, mpp in zip(comparison["tile_px"], comparison["tile_mpp"], strict=True)
        )
    )
    markers = {g: GRID_MARKERS[i % len(GRID_MARKERS)] for i, g in enumerate(grids)}
    fig, axes = figure_grid(max(1, len(panels)), len(COMPUTE_MEASURES), width=5.5, height=4.2)
    for row, (task, set_name) in enumerate(panels):
        for col, (measure, title) in enumerate(COMPUTE_MEASURES.items()):
            ax = axes[row, col]
            shown = points[
                (points["task"] == task)
                & (points["set"] == set_name)
                & (points["measure"] == measure)
            ]
            ax.set_title(f"{task}, {set_name}", fontsize=9)
            ax.set_xlabel(f"{title} (log scale)")
            ax.set_ylabel("AUROC (95% CI)")
            if shown.empty:
                ax.text(0.5, 0.5, "no AUROC with a positive\ncompute to plot", ha="center")
                continue
            ax.set_xscale("log")
            # labelled minor ticks of short log ranges cost seconds in the layout, say little
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            # limits first (a lone point has no range); room on the right for the labels
            ax.set_xlim(shown["compute"].min() / 2, shown["compute"].max() * 4)
            _efficiency_panel(ax, shown, colours, markers)
            ax.margins(y=0.15)
    if len(grids) > 1:
        handles = [
            plt.Line2D([], [], ls="", marker=markers[g], color="grey", label=g) for g in grids
        ]
        axes[0, -1].legend(handles=handles, title="tile grid", fontsize=7, title_fontsize=7)
    skipped = len(comparison) * len(COMPUTE_MEASURES) - len(points)
    if skipped:
        log.info("efficiency figure: %d points without AUROC or positive compute left out", skipped)
    finish_figure(
        fig,
        "AUROC against compute per slide (MLP head)",
        attrs,
        path,
        "evaluation_summary",
        {"figure": "efficiency", **dict(params or {})},
    )
    return points, fig
