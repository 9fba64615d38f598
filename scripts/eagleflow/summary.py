"""The run's summary: every task's tables in one, DeLong p-values adjusted together, and an HTML page.

The page opens with the comparison of slide representations as the paper shows it: per task and
set, embeddings (rows, by base name) x magnifications (columns, the tile µm/px of compute.csv) with
AUROC, its CI and DeLong's p against EAGLE at the same magnification (`comparison_grid.csv`); then
the figure of AUROC against compute per slide, and the long table (`comparison.csv`): one row per
task, set and embedding with every metric and what the embedding costs per slide.
"""

from __future__ import annotations

import base64
import html
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from eagleflow.evaluation import DELONG_COLUMNS, FEWSHOT_COLUMNS, METRIC_COLUMNS
from eagleflow.figures import efficiency_figure
from eagleflow.h5io import COMPUTE_COLUMNS, atomic_write_bytes, read_attrs, write_csv
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
# the grid of an embedding, from compute.csv (never parsed from its name)
COMPARISON_GRID = ["base", "tile_px", "tile_mpp"]
# per magnification in comparison_grid.csv: `<field>_<mpp>mpp`
GRID_FIELDS = (
    "embedding",
    "auroc",
    "auroc_low",
    "auroc_high",
    "delong_reference",
    "delong_p",
    "delong_p_bh",
)


def comparison_columns(reference: str = "eagle") -> list[str]:
    """The comparison table's columns, in order."""
    metric_columns = [f"{m}{suffix}" for m in METRICS for suffix in ("", "_low", "_high")]
    return [
        "task",
        "set",
        "embedding",
        *COMPARISON_GRID,
        "description",
        *metric_columns,
        "delong_reference",
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
        dtype={
            "embedding": str,
            "base": str,
            "kind": str,
            "description": str,
            "demo_weights": str,
        },
    )
    missing = [c for c in COMPUTE_COLUMNS if c not in compute.columns]
    if missing:
        raise ValueError(
            f"{path}: compute table lacks column(s) {missing}: it was written by an older "
            "embeddings stage; rerun it (snakemake --forcerun embeddings_collect)"
        )
    return compute


def _set_order(sets: Sequence[str]) -> list[str]:
    """Cross-validation first, then the external cohorts in the order the tables hold them."""
    unique = list(dict.fromkeys(sets))
    return sorted(unique, key=lambda s: s != "crossval")


def _delong_pairs(delong: pd.DataFrame) -> dict[tuple[str, str, frozenset[str]], float]:
    """DeLong's p by (task, set, {embedding a, embedding b}); delong.csv holds a pair once."""
    p: dict[tuple[str, str, frozenset[str]], float] = {}
    for row in delong.itertuples(index=False):
        if pd.isna(row.embedding_a) or pd.isna(row.embedding_b) or not row.embedding_a:
            continue  # a note row (multiclass task): nothing tested
        key = (str(row.task), str(row.set), frozenset((str(row.embedding_a), str(row.embedding_b))))
        if key in p:
            raise ValueError(
                f"DeLong table holds {row.embedding_a} vs {row.embedding_b} twice for {key[:2]}"
            )
        p[key] = float(row.p)
    return p


def _finite(value: Any) -> float | None:
    """A grid value as a hashable key: None when unknown, µm/px rounded past float noise."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return round(number, 6) if math.isfinite(number) else None


def embedding_grids(
    embeddings: Sequence[str], cost: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Embedding -> {base, tile_px, tile_mpp}: from compute.csv; the grid unknown without a row."""
    grids = {}
    for embedding in embeddings:
        row = cost.get(embedding, {})
        base = row.get("base")
        grids[embedding] = {
            "base": embedding.split("@", 1)[0] if pd.isna(base) or base == "" else str(base),
            "tile_px": math.nan if _finite(row.get("tile_px")) is None else int(row["tile_px"]),
            "tile_mpp": math.nan
            if _finite(row.get("tile_mpp")) is None
            else float(row["tile_mpp"]),
        }
    return grids


def same_magnification_reference(
    embedding: str,
    candidates: Sequence[str],
    grids: Mapping[str, Mapping[str, Any]],
    reference: str = "eagle",
) -> str | None:
    """The `reference` embedding (base name) an embedding is tested against: the one at its
    magnification (tile µm/px), at its tile px if there are several.

    Where no `reference` ran at that magnification (a model at its native grid), or the grid is
    unknown (not in compute.csv), it is `reference` itself, at its configured grid; None if that
    did not run either.
    """
    mpp = _finite(grids[embedding]["tile_mpp"])
    at_mpp = [
        c
        for c in candidates
        if mpp is not None
        and grids[c]["base"] == reference
        and _finite(grids[c]["tile_mpp"]) == mpp
    ]
    same_px = [c for c in at_mpp if grids[c]["tile_px"] == grids[embedding]["tile_px"]]
    configured = [reference] if reference in candidates else []
    return (same_px or at_mpp or configured or [None])[0]


def comparison_table(
    metrics: pd.DataFrame,
    delong: pd.DataFrame,
    compute: pd.DataFrame | None,
    reference: str = "eagle",
) -> pd.DataFrame:
    """Every task x set x embedding of the MLP head: metrics with CIs, DeLong p vs `reference`, cost.

    The DeLong test of an embedding is against `reference` at the same magnification (the
    embedding named in `delong_reference`, e.g. `eagle@0.5mpp` for `chief@0.5mpp`). `delong_p_bh`
    adjusts (Benjamini-Hochberg) the family of every such test in this table, over all tasks and
    sets. Embeddings follow compute.csv (report order), any others their order in the metrics;
    without compute.csv (None) the grid and compute columns stay empty.
    """
    columns = comparison_columns(reference)
    p_column = f"delong_p_vs_{reference}"
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
        log.warning("compute table lacks embedding(s) %s: their grid and cost stay empty", uncosted)
    grids = embedding_grids(embedding_order, cost)
    pairs = _delong_pairs(delong)
    rows = []
    for task in dict.fromkeys(str(t) for t in mlp["task"]):
        in_task = mlp[mlp["task"].astype(str) == task]
        for set_name in _set_order([str(s) for s in in_task["set"]]):
            present = [e for e in embedding_order if (task, set_name, e) in values]
            for embedding in present:
                compute_row = cost.get(embedding, {})
                against = same_magnification_reference(embedding, present, grids, reference)
                tested = against is not None and against != embedding
                if against is None:
                    log.warning(
                        "%s, %s: no %s ran, at %s's magnification or at all: not tested",
                        task,
                        set_name,
                        reference,
                        embedding,
                    )
                rows.append(
                    {
                        "task": task,
                        "set": set_name,
                        "embedding": embedding,
                        **grids[embedding],
                        "description": compute_row.get("description", math.nan),
                        **values[(task, set_name, embedding)],
                        "delong_reference": against if tested else math.nan,
                        p_column: (
                            pairs.get((task, set_name, frozenset((embedding, against))), math.nan)
                            if tested
                            else math.nan
                        ),
                        **{c: compute_row.get(c, math.nan) for c in COMPARISON_COMPUTE},
                    }
                )
    table = pd.DataFrame(rows).reindex(columns=columns)
    table["delong_p_bh"] = benjamini_hochberg(table[p_column].to_numpy(float))
    return table


def grid_label(mpp: float) -> str:
    """A magnification's column suffix: `0.5mpp`, `1.14mpp`; `unknown_mpp` without a grid."""
    return "unknown_mpp" if _finite(mpp) is None else f"{float(mpp):g}mpp"


def comparison_grid(comparison: pd.DataFrame, reference: str = "eagle") -> pd.DataFrame:
    """The comparison pivoted as the paper shows it: per task and set, one row per embedding (its
    base name, and tile px) and per magnification (tile µm/px, ascending) the embedding there, its
    AUROC with 95% CI and DeLong's p (raw and BH, the comparison table's family) against
    `reference` at that magnification (or at its configured grid where none ran there: the
    embedding tested against is `delong_reference`).

    Columns: task, set, embedding (base), tile_px, then `<field>_<mpp>mpp` for each field of
    GRID_FIELDS. Rows keep report order; an embedding whose cell is taken by another of the same
    base and grid keeps its own row, under its full name.
    """
    p_column = f"delong_p_vs_{reference}"
    mpps = sorted({_finite(m) for m in comparison["tile_mpp"]}, key=lambda m: (m is None, m or 0.0))
    labels = [grid_label(math.nan if m is None else m) for m in mpps]
    value_columns = [f"{f}_{label}" for label in labels for f in GRID_FIELDS]
    columns = ["task", "set", "embedding", "tile_px", *value_columns]
    cells: dict[tuple[str, str, str, int | None], dict[str, Any]] = {}
    for row in comparison.to_dict("records"):
        mpp = _finite(row["tile_mpp"])
        label = grid_label(math.nan if mpp is None else mpp)
        px = None if _finite(row["tile_px"]) is None else int(row["tile_px"])
        name = row["base"] if mpp is not None else row["embedding"]
        key = (row["task"], row["set"], name, px)
        if f"embedding_{label}" in cells.get(key, {}):
            log.warning(
                "%s and %s share a base name and grid: %s keeps its own row",
                cells[key][f"embedding_{label}"],
                row["embedding"],
                row["embedding"],
            )
            key = (row["task"], row["set"], row["embedding"], px)
        cell = cells.setdefault(key, {})
        cell[f"embedding_{label}"] = row["embedding"]
        for field in ("auroc", "auroc_low", "auroc_high", "delong_reference", "delong_p_bh"):
            cell[f"{field}_{label}"] = row[field]
        cell[f"delong_p_{label}"] = row[p_column]
    rows = [
        {"task": task, "set": set_name, "embedding": name, "tile_px": px, **values}
        for (task, set_name, name, px), values in cells.items()
    ]
    grid = pd.DataFrame(rows).reindex(columns=columns)
    grid["tile_px"] = grid["tile_px"].astype("Int64")
    return grid


def comparison_demo_models(comparison: pd.DataFrame) -> list[str]:
    """Models whose demo (random) weights made some embedding of the comparison."""
    models: list[str] = []
    for text in comparison.get("demo_weights", pd.Series(dtype=object)).dropna():
        if str(text).strip() not in ("", "none"):
            models += [m.strip() for m in str(text).split(",") if m.strip()]
    return list(dict.fromkeys(models))


def run_demo_models(attrs: Mapping[str, Any], comparison: pd.DataFrame | None) -> list[str]:
    """Models with demo weights, whether the patients file (attrs) or compute.csv says so."""
    models: list[str] = []
    if attrs.get("weights_demo") == "true":
        models += [m.strip() for m in str(attrs.get("demo_weights", "?")).split(",")]
    if comparison is not None:
        models += comparison_demo_models(comparison)
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


def _format_px(value: Any) -> str:
    return "" if _finite(value) is None else f"{int(value)}"


def _format_mpp(value: Any) -> str:
    return "" if _finite(value) is None else f"{float(value):g}"


def _grid_cell(row: Mapping[str, Any], label: str, column_of: Mapping[str, str]) -> str:
    """AUROC [95% CI], and under it DeLong's p (raw, BH) against the reference at this grid;
    the reference and its column are named where it is not in this one (none ran at this grid)."""
    if pd.isna(row.get(f"embedding_{label}")):
        return ""
    text = _format_estimate(
        row[f"auroc_{label}"], row[f"auroc_low_{label}"], row[f"auroc_high_{label}"]
    )
    p, p_bh = row[f"delong_p_{label}"], row[f"delong_p_bh_{label}"]
    if not pd.isna(p):
        against = row[f"delong_reference_{label}"]
        elsewhere = (
            ""
            if column_of.get(against) == column_of[row[f"embedding_{label}"]]
            else f" vs {html.escape(str(against))} at {column_of.get(against, '?')}"
        )
        text += f"<br><small>p {p:.3g}, BH {p_bh:.3g}{elsewhere}</small>"
    return text


def grid_html(grid: pd.DataFrame) -> str:
    """The pivoted comparison as HTML: per task and set, embeddings x magnifications (AUROC)."""
    labels = [c.removeprefix("embedding_") for c in grid.columns if c.startswith("embedding_")]
    titles = {
        label: "grid unknown" if label == "unknown_mpp" else f"{label.removesuffix('mpp')} µm/px"
        for label in labels
    }
    records = grid.to_dict("records")
    column_of = {e: titles[lb] for lb in labels for e in grid[f"embedding_{lb}"].dropna()}
    shown = pd.DataFrame(
        {
            "task": [html.escape(str(r["task"])) for r in records],
            "set": [html.escape(str(r["set"])) for r in records],
            "embedding": [html.escape(str(r["embedding"])) for r in records],
            "tile px": [_format_px(r["tile_px"]) for r in records],
            **{
                titles[label]: [_grid_cell(r, label, column_of) for r in records]
                for label in labels
            },
        }
    )
    return shown.set_index(["task", "set", "embedding", "tile px"]).to_html(escape=False)


def comparison_html(comparison: pd.DataFrame, reference: str = "eagle") -> str:
    """The comparison as an HTML table: value [95% CI] per metric, p to 3 significant digits."""
    p_column = f"delong_p_vs_{reference}"
    shown = pd.DataFrame(
        {
            "task": comparison["task"],
            "set": comparison["set"],
            "embedding": comparison["embedding"],
            "tile px": comparison["tile_px"].map(_format_px),
            "µm/px": comparison["tile_mpp"].map(_format_mpp),
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
    shown[f"DeLong vs {reference} at its µm/px"] = comparison["delong_reference"].map(_text)
    for column, title in ((p_column, "DeLong p"), ("delong_p_bh", "p (BH)")):
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
    grid: pd.DataFrame | None = None,
    efficiency_png: bytes | None = None,
) -> str:
    """One self-contained page with the run's tables (for the Snakemake report).

    The comparison comes first: its grid (embeddings x magnifications), the efficiency figure
    (inlined PNG, so the page stands alone in the report) and the long table. The demo banner
    names every model with demo weights, whether the patients file (attrs) or the compute table
    (comparison) says so.
    """
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>EAGLE heads: metrics</title>",
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;"
        "margin-bottom:2em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#eee}.demo{color:#fff;background:#c00;padding:8px;font-weight:bold}"
        "</style></head><body>",
    ]
    demo_models = run_demo_models(attrs, comparison)
    if demo_models:
        parts.append(
            "<p class='demo'>DEMO WEIGHTS: not a result (random weights for "
            f"{html.escape(', '.join(demo_models))})</p>"
        )
    if note:
        parts.append(f"<p class='demo'>{html.escape(note)}</p>")
    ref = html.escape(reference)
    if grid is not None:
        n_tests = int(grid.filter(like="delong_p_bh_").notna().to_numpy().sum())
        parts.append(
            "<h2>Comparison of slide representations: embeddings x magnifications</h2><p>MLP "
            "head, AUROC with its bootstrap 95% CI per task, set, embedding (rows) and tile grid "
            f"(columns: tile µm/px; tile px per row); below it DeLong's two-sided p against {ref} "
            f"at the same magnification (binary tasks) and the p Benjamini-Hochberg-adjusted over "
            f"the {n_tests} tests of this table.</p>"
        )
        parts.append(grid_html(grid))
    if efficiency_png is not None:
        parts.append(
            "<h2>AUROC against compute per slide</h2><p>One point per embedding and grid "
            "(cross-validation and each external set); x: tile-encoder forwards and measured "
            "model seconds per slide, log scale.</p>"
            f"<img alt='AUROC against compute per slide' style='max-width:100%' "
            f"src='data:image/png;base64,{base64.b64encode(efficiency_png).decode()}'>"
        )
    if comparison is not None:
        parts.append(
            "<h2>Comparison of slide representations</h2><p>MLP head, per task, set and "
            "embedding: value with its bootstrap 95% CI; DeLong's two-sided p against "
            f"{ref} at the embedding's magnification (binary tasks), Benjamini-Hochberg-adjusted "
            f"over every test against {ref} in this table; compute per slide: mean tile-encoder "
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
    grid_csv: str | None = None,
    efficiency_png: str | None = None,
) -> None:
    """The `evaluation_summary` rule: concatenated tables; BH over all DeLong tests of the run.

    Also the comparison of slide representations, first on the page: pivoted (grid_csv), as the
    efficiency figure (efficiency_png) and long (comparison_csv); without compute_csv its grid and
    compute columns stay empty.
    """

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
    grid = comparison_grid(comparison, reference)
    if grid_csv is not None:
        write_csv(grid, grid_csv)
    attrs = read_attrs(patients_h5) | {"code_version": code_version()}
    figure = None
    if efficiency_png is not None:
        demo = run_demo_models(attrs, comparison)
        banner = {"weights_demo": "true" if demo else "false", "demo_weights": ", ".join(demo)}
        efficiency_figure(comparison, banner, efficiency_png, {"reference": reference})
        figure = Path(efficiency_png).read_bytes()
    page = summary_html(
        metric_table,
        delong_table,
        fewshot_table,
        attrs,
        comparison,
        reference,
        note,
        grid=grid,
        efficiency_png=figure,
    )
    atomic_write_bytes(html_path, page.encode())
