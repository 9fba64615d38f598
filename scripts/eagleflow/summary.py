"""The run's summary: every task's tables in one, DeLong p-values adjusted together, and an HTML page."""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from eagleflow.evaluation import DELONG_COLUMNS, FEWSHOT_COLUMNS, METRIC_COLUMNS
from eagleflow.h5io import read_attrs, write_csv
from eagleflow.provenance import code_version
from eagleflow.stats import (
    METRIC_TITLES,
    METRICS,
    benjamini_hochberg,
)

log = logging.getLogger(__name__)


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
