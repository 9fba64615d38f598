"""The run's summary: every task's tables in one, DeLong p-values adjusted together, and an HTML page.

The page opens with the comparison of slide representations: one row per task, set and embedding with
the MLP head's metrics, DeLong's p against the reference embedding (`eagle`) and what the embedding
costs per slide (from the embeddings stage's compute.csv).
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from eagleflow.evaluation import DELONG_COLUMNS, FEWSHOT_COLUMNS, METRIC_COLUMNS
from eagleflow.h5io import COMPUTE_COLUMNS, read_attrs, write_csv
from eagleflow.provenance import code_version
from eagleflow.stats import (
    METRIC_TITLES,
    METRICS,
    benjamini_hochberg,
)

log = logging.getLogger(__name__)

# what the comparison carries over from compute.csv, joined by embedding
COMPARISON_COMPUTE = [
    "tile_forwards_per_slide",
    "slide_forwards_per_slide",
    "seconds_per_slide",
    "demo_weights",
]


def comparison_columns(reference: str = "eagle") -> list[str]:
    """The comparison table's columns, in order."""
    metric_columns = [f"{m}{suffix}" for m in METRICS for suffix in ("", "_low", "_high")]
    return [
        "task",
        "set",
        "embedding",
        "description",
        *metric_columns,
        f"delong_p_vs_{reference}",
        "delong_p_bh",
        *COMPARISON_COMPUTE,
    ]


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


def read_compute(path: str) -> pd.DataFrame:
    """compute.csv of the embeddings stage: one row per embedding, in report order."""
    compute = pd.read_csv(
        path,
        keep_default_na=False,
        na_values=[""],
        dtype={"embedding": str, "kind": str, "description": str, "demo_weights": str},
    )
    missing = [c for c in COMPUTE_COLUMNS if c not in compute.columns]
    if missing:
        raise ValueError(f"{path}: compute table lacks column(s) {missing}")
    return compute


def _set_order(sets: Sequence[str]) -> list[str]:
    """Cross-validation first, then the external cohorts in the order the tables hold them."""
    unique = list(dict.fromkeys(sets))
    return sorted(unique, key=lambda s: s != "crossval")


def _delong_vs_reference(delong: pd.DataFrame, reference: str) -> dict[tuple[str, str, str], float]:
    """DeLong's p between `reference` and each other embedding, by (task, set, other embedding).

    delong.csv holds every pair once, in either order; pairs without the reference are not read.
    """
    p: dict[tuple[str, str, str], float] = {}
    for row in delong.itertuples(index=False):
        if row.embedding_a == reference:
            other = row.embedding_b
        elif row.embedding_b == reference:
            other = row.embedding_a
        else:
            continue
        key = (str(row.task), str(row.set), str(other))
        if key in p:
            raise ValueError(f"DeLong table holds {reference} vs {other} twice for {key[:2]}")
        p[key] = float(row.p)
    return p


def comparison_table(
    metrics: pd.DataFrame,
    delong: pd.DataFrame,
    compute: pd.DataFrame | None,
    reference: str = "eagle",
) -> pd.DataFrame:
    """Every task x set x embedding of the MLP head: metrics with CIs, DeLong p vs `reference`, cost.

    `delong_p_bh` adjusts (Benjamini-Hochberg) the family of every DeLong test against the reference
    in this table, over all tasks and sets. Embeddings follow compute.csv (report order), any others
    their order in the metrics; without compute.csv (None) the compute columns stay empty.
    """
    columns = comparison_columns(reference)
    mlp = metrics[metrics["head"] == "mlp"]
    if mlp.empty:
        return pd.DataFrame(columns=columns)
    cost: dict[str, dict[str, Any]] = {}
    if compute is not None:
        duplicated = compute["embedding"][compute["embedding"].duplicated()].tolist()
        if duplicated:
            raise ValueError(f"compute table lists embedding(s) {duplicated} more than once")
        cost = {str(r["embedding"]): r for r in compute.to_dict("records")}
    values: dict[tuple[str, str, str], dict[str, float]] = {}
    for row in mlp.itertuples(index=False):
        entry = values.setdefault((str(row.task), str(row.set), str(row.embedding)), {})
        entry[row.metric] = row.value
        entry[f"{row.metric}_low"] = row.ci_low
        entry[f"{row.metric}_high"] = row.ci_high
    embedding_order = list(dict.fromkeys([*cost, *(str(e) for e in mlp["embedding"])]))
    uncosted = [e for e in embedding_order if e not in cost]
    if compute is not None and uncosted:
        log.warning("compute table lacks embedding(s) %s: their cost stays empty", uncosted)
    p_vs_reference = _delong_vs_reference(delong, reference)
    rows = []
    for task in dict.fromkeys(str(t) for t in mlp["task"]):
        in_task = mlp[mlp["task"].astype(str) == task]
        for set_name in _set_order([str(s) for s in in_task["set"]]):
            for embedding in embedding_order:
                entry = values.get((task, set_name, embedding))
                if entry is None:
                    continue
                compute_row = cost.get(embedding, {})
                rows.append(
                    {
                        "task": task,
                        "set": set_name,
                        "embedding": embedding,
                        "description": compute_row.get("description", math.nan),
                        **entry,
                        f"delong_p_vs_{reference}": (
                            math.nan
                            if embedding == reference
                            else p_vs_reference.get((task, set_name, embedding), math.nan)
                        ),
                        **{c: compute_row.get(c, math.nan) for c in COMPARISON_COMPUTE},
                    }
                )
    table = pd.DataFrame(rows).reindex(columns=columns)
    table["delong_p_bh"] = benjamini_hochberg(table[f"delong_p_vs_{reference}"].to_numpy(float))
    return table


def comparison_demo_models(comparison: pd.DataFrame) -> list[str]:
    """Models whose demo (random) weights made some embedding of the comparison."""
    models: list[str] = []
    for text in comparison.get("demo_weights", pd.Series(dtype=object)).dropna():
        if str(text).strip() not in ("", "none"):
            models += [m.strip() for m in str(text).split(",") if m.strip()]
    return list(dict.fromkeys(models))


def _format_estimate(value: float, low: float, high: float) -> str:
    if pd.isna(value):
        return "n/a"
    if pd.isna(low) or pd.isna(high):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _text(value: Any) -> str:
    return "" if pd.isna(value) else str(value)


def _format_count(value: float) -> str:
    if pd.isna(value):
        return ""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def comparison_html(comparison: pd.DataFrame, reference: str = "eagle") -> str:
    """The comparison as an HTML table: value [95% CI] per metric, p to 3 significant digits."""
    p_column = f"delong_p_vs_{reference}"
    shown = pd.DataFrame(
        {
            "task": comparison["task"],
            "set": comparison["set"],
            "embedding": comparison["embedding"],
            "description": comparison["description"].map(_text),
        }
    )
    for metric in METRICS:
        shown[METRIC_TITLES[metric]] = [
            _format_estimate(v, lo, hi)
            for v, lo, hi in zip(
                comparison[metric],
                comparison[f"{metric}_low"],
                comparison[f"{metric}_high"],
                strict=True,
            )
        ]
    for column, title in ((p_column, f"DeLong p vs {reference}"), ("delong_p_bh", "p (BH)")):
        shown[title] = ["" if pd.isna(p) else f"{p:.3g}" for p in comparison[column]]
    shown["tile forwards / slide"] = comparison["tile_forwards_per_slide"].map(_format_count)
    shown["slide forwards / slide"] = comparison["slide_forwards_per_slide"].map(_format_count)
    shown["seconds / slide"] = [
        "" if pd.isna(s) else f"{s:.3g}" for s in comparison["seconds_per_slide"]
    ]
    shown["demo weights"] = comparison["demo_weights"].map(_text)
    return shown.to_html(index=False, escape=True)


def summary_html(
    metrics: pd.DataFrame,
    delong: pd.DataFrame,
    fewshot: pd.DataFrame,
    attrs: Mapping[str, Any],
    comparison: pd.DataFrame | None = None,
    reference: str = "eagle",
    note: str | None = None,
) -> str:
    """One self-contained page with the run's tables (for the Snakemake report).

    The comparison comes first; the demo banner names every model with demo weights, whether the
    patients file (attrs) or the compute table (comparison) says so.
    """
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>EAGLE heads: metrics</title>",
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;"
        "margin-bottom:2em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#eee}.demo{color:#fff;background:#c00;padding:8px;font-weight:bold}"
        "</style></head><body>",
    ]
    demo_models: list[str] = []
    if attrs.get("weights_demo") == "true":
        demo_models += [m.strip() for m in str(attrs.get("demo_weights", "?")).split(",")]
    if comparison is not None:
        demo_models += comparison_demo_models(comparison)
    if demo_models:
        parts.append(
            "<p class='demo'>DEMO WEIGHTS: not a result (random weights for "
            f"{html.escape(', '.join(dict.fromkeys(demo_models)))})</p>"
        )
    if note:
        parts.append(f"<p class='demo'>{html.escape(note)}</p>")
    if comparison is not None:
        parts.append(
            "<h2>Comparison of slide representations</h2><p>MLP head, per task, set and "
            "embedding: value with its bootstrap 95% CI; DeLong's two-sided p against "
            f"{html.escape(reference)} (binary tasks), Benjamini-Hochberg-adjusted over every test "
            f"against {html.escape(reference)} in this table; compute per slide: mean tile-encoder "
            "and slide-encoder forwards, and measured model seconds.</p>"
        )
        parts.append(comparison_html(comparison, reference))
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
    compute_csv: str | None = None,
    comparison_csv: str | None = None,
    reference: str = "eagle",
    note: str | None = None,
) -> None:
    """The `evaluation_summary` rule: concatenated tables; BH over all DeLong tests of the run.

    Also the comparison of slide representations (comparison_csv, first on the page); without
    compute_csv its compute columns stay empty.
    """
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
    compute = read_compute(compute_csv) if compute_csv is not None else None
    comparison = comparison_table(metric_table, delong_table, compute, reference)
    if comparison_csv is not None:
        write_csv(comparison, comparison_csv)
    attrs = read_attrs(patients_h5) | {"code_version": code_version()}
    page = summary_html(
        metric_table, delong_table, fewshot_table, attrs, comparison, reference, note
    )
    atomic_write_bytes(html_path, page.encode())
