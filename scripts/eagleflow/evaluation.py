"""Metrics of one task: per embedding, head and set, with bootstrap CIs; DeLong between embeddings.

Sets: `crossval` is the pooled held-out predictions on the training cohorts (one model per fold);
`external:<cohort>` the mean of the fold models' probabilities on an external cohort (ensemble),
with per-fold values for mean and standard deviation. Few-shot sets are `internal` (patients not
sampled) and `external:<cohort>`.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from eagleflow.h5io import write_csv, write_json
from eagleflow.predictions import EvaluationError, external_sets, probabilities, read_predictions
from eagleflow.provenance import provenance_attrs
from eagleflow.stats import (
    METRICS,
    bootstrap_ci,
    classification_metrics,
    delong_test,
    mean_std,
)
from eagleflow.tasks import TaskSpec

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


def _class_counts(y: np.ndarray, task: TaskSpec) -> str:
    counts = np.bincount(y, minlength=len(task.classes))
    return ";".join(f"{c}:{n}" for c, n in zip(task.classes, counts, strict=True))


def _missing_note(y: np.ndarray, task: TaskSpec) -> str:
    absent = [c for i, c in enumerate(task.classes) if not np.any(y == i)]
    return f"no patient of class(es) {absent}: AUROC/AUPRC undefined" if absent else ""


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
