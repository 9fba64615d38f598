"""Metrics tables of the heads, DeLong comparisons of embeddings, and patient retrieval.

Sets: `crossval` is the pooled held-out predictions on the training cohorts (one model per fold);
`external:<cohort>` the mean of the fold models' probabilities on an external cohort (ensemble),
with per-fold values for mean and standard deviation. Few-shot sets are `internal` (patients not
sampled) and `external:<cohort>`.
"""

from __future__ import annotations

import html
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eagleflow.errors import EagleflowError
from eagleflow.h5io import EMBEDDINGS_FORMAT, read_attrs, validate_h5
from eagleflow.heads import TaskSpec, write_csv, write_json
from eagleflow.provenance import code_version, provenance_attrs
from eagleflow.stats import (
    METRIC_TITLES,
    METRICS,
    benjamini_hochberg,
    bootstrap_ci,
    classification_metrics,
    delong_test,
    mean_std,
)

log = logging.getLogger(__name__)

METRIC_COLUMNS = [
    "task",
    "embedding",
    "head",
    "set",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "fold_mean",
    "fold_std",
    "n_folds",
    "n_patients",
    "class_counts",
    "bootstrap_valid",
    "note",
]
FEWSHOT_COLUMNS = [
    "task",
    "embedding",
    "head",
    "set",
    "k",
    "metric",
    "mean",
    "std",
    "n_repeats",
    "n_train",
    "n_test",
]
DELONG_COLUMNS = [
    "task",
    "set",
    "embedding_a",
    "embedding_b",
    "auc_a",
    "auc_b",
    "z",
    "p",
    "n_positive",
    "n_negative",
    "note",
]


class EvaluationError(EagleflowError, ValueError):
    """Predictions do not match the task they are evaluated for."""


def read_predictions(path: str | Path, task: TaskSpec) -> pd.DataFrame:
    """A predictions CSV of the heads, labels kept as text, with `y` (class index) added."""
    frame = pd.read_csv(
        path,
        dtype={"PATIENT": str, "COHORT": str, "LABEL": str, "pred": str, "set": str},
        keep_default_na=False,
    )
    columns = [f"prob_{c}" for c in task.classes]
    missing = [c for c in columns if c not in frame.columns]
    unknown = sorted(set(frame["LABEL"]) - set(task.classes))
    if missing or unknown:
        raise EvaluationError(
            f"{path}: predictions do not match task {task.name!r} (classes {list(task.classes)}; "
            f"missing columns {missing}, unknown labels {unknown}). Rerun the heads rules."
        )
    index = {c: i for i, c in enumerate(task.classes)}
    frame["y"] = frame["LABEL"].map(index).astype(np.int64)
    return frame


def probabilities(frame: pd.DataFrame, task: TaskSpec) -> np.ndarray:
    return frame[[f"prob_{c}" for c in task.classes]].to_numpy(dtype=float)


def _class_counts(y: np.ndarray, task: TaskSpec) -> str:
    counts = np.bincount(y, minlength=len(task.classes))
    return ";".join(f"{c}:{n}" for c, n in zip(task.classes, counts, strict=True))


def _missing_note(y: np.ndarray, task: TaskSpec) -> str:
    absent = [c for i, c in enumerate(task.classes) if not np.any(y == i)]
    return f"no patient of class(es) {absent}: AUROC/AUPRC undefined" if absent else ""


def external_sets(frame: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """(set name, row mask) per external cohort, in cohort order."""
    return [(f"external:{c}", frame["COHORT"] == c) for c in sorted(set(frame["COHORT"]))]


def set_metric_rows(
    task: TaskSpec,
    embedding: str,
    set_name: str,
    pooled: pd.DataFrame,
    per_fold: Sequence[pd.DataFrame],
    bootstrap: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """One row per metric: pooled/ensemble value with a bootstrap CI, and mean ± std over folds."""
    y = pooled["y"].to_numpy()
    proba = probabilities(pooled, task)
    value = classification_metrics(y, proba, task.positive_index)
    ci = bootstrap_ci(
        y, proba, task.positive_index, n=int(bootstrap["n"]), seed=int(bootstrap["seed"])
    )
    folds = [
        classification_metrics(f["y"].to_numpy(), probabilities(f, task), task.positive_index)
        for f in per_fold
    ]
    note = _missing_note(y, task)
    if ci.n_valid < int(bootstrap["n"]):
        note = "; ".join(
            filter(None, [note, f"{int(bootstrap['n']) - ci.n_valid} resamples lacked a class"])
        )
    rows = []
    for metric in METRICS:
        fold_mean, fold_std, n_folds = mean_std([f[metric] for f in folds])
        rows.append(
            {
                "task": task.name,
                "embedding": embedding,
                "head": "mlp",
                "set": set_name,
                "metric": metric,
                "value": value[metric],
                "ci_low": ci.low[metric],
                "ci_high": ci.high[metric],
                "fold_mean": fold_mean,
                "fold_std": fold_std,
                "n_folds": n_folds,
                "n_patients": len(y),
                "class_counts": _class_counts(y, task),
                "bootstrap_valid": ci.n_valid,
                "note": note,
            }
        )
    return rows


def mlp_metric_rows(
    task: TaskSpec,
    embedding: str,
    predictions: pd.DataFrame,
    external: pd.DataFrame,
    external_folds: pd.DataFrame,
    bootstrap: Mapping[str, Any],
) -> list[dict[str, Any]]:
    rows = set_metric_rows(
        task,
        embedding,
        "crossval",
        predictions,
        [part for _, part in predictions.groupby("fold")],
        bootstrap,
    )
    for set_name, mask in external_sets(external):
        cohort = set_name.split(":", 1)[1]
        folds = external_folds[external_folds["COHORT"] == cohort]
        rows += set_metric_rows(
            task,
            embedding,
            set_name,
            external[mask],
            [part for _, part in folds.groupby("fold")],
            bootstrap,
        )
    return rows


def fewshot_metric_rows(
    task: TaskSpec, embedding: str, predictions: pd.DataFrame
) -> list[dict[str, Any]]:
    """Per k and set: mean and std over the repeats of each metric."""
    if predictions.empty:
        return []
    predictions = predictions.copy()
    external = predictions["set"] == "external"
    predictions.loc[external, "set"] = "external:" + predictions.loc[external, "COHORT"]
    rows = []
    for (set_name, k), part in predictions.groupby(["set", "k"], sort=True):
        per_repeat = [
            classification_metrics(r["y"].to_numpy(), probabilities(r, task), task.positive_index)
            for _, r in part.groupby("repeat")
        ]
        n_test = int(part.groupby("repeat").size().iloc[0])
        for metric in METRICS:
            mean, std, n = mean_std([r[metric] for r in per_repeat])
            rows.append(
                {
                    "task": task.name,
                    "embedding": embedding,
                    "head": "fewshot",
                    "set": set_name,
                    "k": int(k),
                    "metric": metric,
                    "mean": mean,
                    "std": std,
                    "n_repeats": n,
                    "n_train": int(k) * len(task.classes),
                    "n_test": n_test,
                }
            )
    return rows


def delong_rows(task: TaskSpec, pooled: Mapping[str, Mapping[str, pd.DataFrame]]) -> list[dict]:
    """DeLong's test between every pair of embeddings per set; pooled[set][embedding] = frame."""
    base = dict.fromkeys(DELONG_COLUMNS, math.nan) | {"task": task.name, "note": ""}
    if not task.binary:
        return [
            base
            | {
                "set": "",
                "embedding_a": "",
                "embedding_b": "",
                "note": f"multiclass task ({len(task.classes)} classes): DeLong's test compares "
                "binary ROC curves; not tested",
            }
        ]
    rows = []
    positive = task.positive_index
    for set_name, frames in pooled.items():
        for a, b in itertools.combinations(task.embeddings, 2):
            merged = frames[a].merge(frames[b], on=["PATIENT", "y"], suffixes=("_a", "_b"))
            if len(merged) != len(frames[a]) or len(merged) != len(frames[b]):
                raise EvaluationError(
                    f"task {task.name!r}, set {set_name}: embeddings {a} and {b} were evaluated "
                    "on different patients; rerun the heads rules of this task."
                )
            column = f"prob_{task.classes[positive]}"
            truth = (merged["y"] == positive).to_numpy()
            row = base | {
                "set": set_name,
                "embedding_a": a,
                "embedding_b": b,
                "n_positive": int(truth.sum()),
                "n_negative": int((~truth).sum()),
            }
            if truth.sum() < 2 or (~truth).sum() < 2:
                row["note"] = "fewer than two patients of a class: not tested"
            else:
                result = delong_test(
                    truth, merged[f"{column}_a"].to_numpy(), merged[f"{column}_b"].to_numpy()
                )
                row |= result._asdict()
                if math.isnan(result.p):
                    row["note"] = (
                        "DeLong variance estimate is zero (perfect, reversed or constant scores): "
                        "not tested"
                    )
            rows.append(row)
    return rows


def evaluate_task(
    task: Mapping[str, Any],
    predictions: Sequence[str],
    external: Sequence[str],
    external_folds: Sequence[str],
    fewshot: Sequence[str],
    bootstrap: Mapping[str, Any],
    metrics_csv: str,
    fewshot_csv: str,
    delong_csv: str,
    info_json: str,
) -> None:
    """The `evaluation_metrics` rule: inputs are lists in the order of the task's embeddings."""
    spec = TaskSpec.from_params(task)
    metric_rows: list[dict] = []
    fewshot_rows: list[dict] = []
    pooled: dict[str, dict[str, pd.DataFrame]] = {}
    files = zip(spec.embeddings, predictions, external, external_folds, fewshot, strict=True)
    for embedding, pred_path, ext_path, folds_path, fewshot_path in files:
        held_out = read_predictions(pred_path, spec)
        ext = read_predictions(ext_path, spec)
        ext_folds = read_predictions(folds_path, spec)
        metric_rows += mlp_metric_rows(spec, embedding, held_out, ext, ext_folds, bootstrap)
        fewshot_rows += fewshot_metric_rows(spec, embedding, read_predictions(fewshot_path, spec))
        pooled.setdefault("crossval", {})[embedding] = held_out
        for set_name, mask in external_sets(ext):
            pooled.setdefault(set_name, {})[embedding] = ext[mask]
        auroc = next(
            r for r in metric_rows[::-1] if r["set"] == "crossval" and r["metric"] == "auroc"
        )
        log.info(
            "task %s, %s: cross-validated AUROC %.3f (95%% CI %.3f-%.3f), folds %.3f ± %.3f",
            spec.name,
            embedding,
            auroc["value"],
            auroc["ci_low"],
            auroc["ci_high"],
            auroc["fold_mean"],
            auroc["fold_std"],
        )
    delong = delong_rows(spec, pooled)
    write_csv(pd.DataFrame(metric_rows, columns=METRIC_COLUMNS), metrics_csv)
    write_csv(pd.DataFrame(fewshot_rows, columns=FEWSHOT_COLUMNS), fewshot_csv)
    write_csv(pd.DataFrame(delong, columns=DELONG_COLUMNS), delong_csv)
    write_json(
        {
            "task": spec.params(),
            "inputs": list(predictions) + list(external) + list(external_folds) + list(fewshot),
            "provenance": provenance_attrs("evaluation_metrics", {"bootstrap": dict(bootstrap)}),
        },
        info_json,
    )


# ---------------------------------------------------------------------------------------------
# Run summary: every task's tables, DeLong p-values adjusted over all comparisons of the run


def _read_tables(paths: Sequence[str], columns: Sequence[str]) -> pd.DataFrame:
    frames = [
        pd.read_csv(p, keep_default_na=False, na_values=[""], dtype={"task": str, "set": str})
        for p in paths
    ]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _format_value(row: pd.Series) -> str:
    if pd.isna(row["value"]):
        return "n/a"
    text = f"{row['value']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
    if not pd.isna(row["fold_mean"]):
        std = "" if pd.isna(row["fold_std"]) else f" ± {row['fold_std']:.3f}"
        text += f"<br><small>folds {row['fold_mean']:.3f}{std}</small>"
    return text


def summary_html(
    metrics: pd.DataFrame, delong: pd.DataFrame, fewshot: pd.DataFrame, attrs: Mapping[str, Any]
) -> str:
    """One self-contained page with the run's tables (for the Snakemake report)."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>EAGLE heads: metrics</title>",
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;"
        "margin-bottom:2em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#eee}.demo{color:#fff;background:#c00;padding:8px;font-weight:bold}"
        "</style></head><body>",
    ]
    if attrs.get("weights_demo") == "true":
        parts.append(
            "<p class='demo'>DEMO WEIGHTS: not a result (random weights for "
            f"{html.escape(str(attrs.get('demo_weights')))})</p>"
        )
    parts.append(
        "<h2>MLP heads</h2><p>Value on the pooled held-out (crossval) or fold-ensemble (external) "
        "predictions with a bootstrap 95% CI; below it mean ± SD over the folds.</p>"
    )
    if not metrics.empty:
        shown = metrics.assign(text=metrics.apply(_format_value, axis=1))
        table = shown.pivot_table(
            index=["task", "set", "embedding", "n_patients"],
            columns="metric",
            values="text",
            aggfunc="first",
            sort=False,
        )
        table = table[[m for m in METRICS if m in table.columns]].rename(columns=METRIC_TITLES)
        parts.append(table.to_html(escape=False))
    parts.append(
        "<h2>DeLong's test between embeddings</h2><p>Two-sided; p_adjusted: Benjamini-Hochberg "
        "over every comparison of the run.</p>"
    )
    parts.append(delong.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep=""))
    parts.append("<h2>Few-shot logistic regression (AUROC, mean ± SD over repeats)</h2>")
    auroc = fewshot[fewshot["metric"] == "auroc"] if not fewshot.empty else fewshot
    if not auroc.empty:
        auroc = auroc.assign(
            text=[
                "n/a" if pd.isna(m) else f"{m:.3f}" + ("" if pd.isna(s) else f" ± {s:.3f}")
                for m, s in zip(auroc["mean"], auroc["std"], strict=True)
            ]
        )
        table = auroc.pivot_table(
            index=["task", "set", "embedding"], columns="k", values="text", aggfunc="first"
        )
        table.columns = [f"k={k}" for k in table.columns]
        parts.append(table.to_html())
    parts.append(f"<p><small>{html.escape(str(attrs.get('code_version', '')))}</small></p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def summarize_run(
    metrics: Sequence[str],
    fewshot: Sequence[str],
    delong: Sequence[str],
    patients_h5: str,
    metrics_csv: str,
    fewshot_csv: str,
    delong_csv: str,
    html_path: str,
) -> None:
    """The `evaluation_summary` rule: concatenated tables; BH over all DeLong tests of the run."""
    from eagleflow.h5io import atomic_write_bytes

    metric_table = _read_tables(metrics, METRIC_COLUMNS)
    fewshot_table = _read_tables(fewshot, FEWSHOT_COLUMNS)
    delong_table = _read_tables(delong, DELONG_COLUMNS)
    delong_table["p_adjusted"] = benjamini_hochberg(delong_table["p"].to_numpy(dtype=float))
    log.info(
        "%d DeLong comparisons tested, adjusted together (Benjamini-Hochberg)",
        int(delong_table["p"].notna().sum()),
    )
    write_csv(metric_table, metrics_csv)
    write_csv(fewshot_table, fewshot_csv)
    write_csv(delong_table, delong_csv)
    attrs = read_attrs(patients_h5) | {"code_version": code_version()}
    page = summary_html(metric_table, delong_table, fewshot_table, attrs)
    atomic_write_bytes(html_path, page.encode())


# ---------------------------------------------------------------------------------------------
# Patient retrieval (EAGLE's slide_search.py): cosine similarity over all cohorts pooled


def read_patient_embeddings(
    patients_h5: str, names: Sequence[str]
) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, Any]]:
    """(PATIENT/COHORT frame, name -> (P, d) array, attributes) of a patients.h5 file."""
    attrs = validate_h5(
        patients_h5,
        EMBEDDINGS_FORMAT,
        {"patient": ("P",), "cohort": ("P",), **{n: ("P", None) for n in names}},
    )
    import h5py

    with h5py.File(patients_h5, "r") as h5:
        frame = pd.DataFrame(
            {"PATIENT": h5["patient"][()].astype(str), "COHORT": h5["cohort"][()].astype(str)}
        )
        arrays = {n: h5[n][()].astype(np.float64) for n in names}
    return frame, arrays, attrs


def cosine_similarity_matrix(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norms == 0, 1.0, norms)
    return unit @ unit.T


def retrieval_table(
    patients: pd.DataFrame, arrays: Mapping[str, np.ndarray], top: int
) -> pd.DataFrame:
    """Every patient as a query: its `top` most similar other patients per embedding."""
    rows = []
    for name, x in arrays.items():
        similarity = cosine_similarity_matrix(x)
        np.fill_diagonal(similarity, -np.inf)
        for q in range(len(patients)):
            # stable sort on the negated row: equal similarities keep patient order
            order = np.argsort(-similarity[q], kind="stable")[: min(top, len(patients) - 1)]
            for rank, match in enumerate(order, start=1):
                rows.append(
                    {
                        "embedding": name,
                        "query_patient": patients["PATIENT"].iat[q],
                        "query_cohort": patients["COHORT"].iat[q],
                        "rank": rank,
                        "match_patient": patients["PATIENT"].iat[match],
                        "match_cohort": patients["COHORT"].iat[match],
                        "similarity": float(similarity[q, match]),
                    }
                )
    return pd.DataFrame(rows)


def patient_retrieval(
    patients_h5: str, params: Mapping[str, Any], table_csv: str, figure_png: str
) -> None:
    """The `evaluation_retrieval` rule: top matches per query patient, and similarity matrices."""
    from eagleflow.figures import retrieval_figure

    names = list(params["embeddings"])
    patients, arrays, attrs = read_patient_embeddings(patients_h5, names)
    table = retrieval_table(patients, arrays, int(params["top"]))
    write_csv(table, table_csv)
    retrieval_figure(patients, arrays, attrs, figure_png, dict(params))
    for name in names:
        same = table[table["embedding"] == name]
        if not same.empty:
            log.info(
                "%s: %.0f%% of top-%d matches are from the query's cohort",
                name,
                100 * np.mean(same["query_cohort"] == same["match_cohort"]),
                int(params["top"]),
            )
