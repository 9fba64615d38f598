"""The comparison of slide representations: every embedding x task x set, DeLong vs eagle, cost;
and its pivot, embeddings x magnifications, with DeLong against eagle at the same magnification."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eagleflow.evaluation import (
    DELONG_COLUMNS,
    FEWSHOT_COLUMNS,
    METRIC_COLUMNS,
    delong_rows,
    set_metric_rows,
)
from eagleflow.h5io import COMPUTE_COLUMNS, write_h5
from eagleflow.stats import METRICS, benjamini_hochberg
from eagleflow.summary import (
    comparison_columns,
    comparison_grid,
    comparison_table,
    grid_html,
    read_compute,
    summarize_run,
)
from eagleflow.tasks import TaskSpec

BOOTSTRAP = {"n": 50, "seed": 0}
# task order lists eagle second, so delong.csv holds (chief, eagle): the pair in either order
EMBEDDINGS = ("chief", "eagle", "meanpool_virchow2", "gigapath_slide")
# report order, as the embeddings stage writes compute.csv: eagle first
COMPUTE_ORDER = ("eagle", "chief", "meanpool_virchow2", "gigapath_slide")
SIGNAL = {"eagle": 2.0, "chief": 1.0, "meanpool_virchow2": 0.5, "gigapath_slide": 0.0}


def _predictions(spec: TaskSpec, embedding: str, n: int, cohort: str, seed: int) -> pd.DataFrame:
    """Class probabilities that follow the label by the embedding's signal strength."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(spec.classes)
    logits = rng.normal(size=(n, len(spec.classes)))
    logits[np.arange(n), y] += SIGNAL[embedding]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    frame = pd.DataFrame(
        {
            "PATIENT": [f"{cohort}{i}" for i in range(n)],
            "COHORT": cohort,
            "y": y,
            "fold": np.arange(n) % 3,
        }
    )
    for c, name in enumerate(spec.classes):
        frame[f"prob_{name}"] = proba[:, c]
    return frame


def task_tables(spec: TaskSpec, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """metrics.csv and delong.csv of one task, made by the evaluation stage's own functions."""
    rows: list[dict] = []
    pooled: dict[str, dict[str, pd.DataFrame]] = {}
    for i, embedding in enumerate(spec.embeddings):
        for set_name, n, cohort in (("crossval", 36, "INT"), ("external:EXT", 24, "EXT")):
            frame = _predictions(spec, embedding, n, cohort, seed + 10 * i + n)
            folds = [part for _, part in frame.groupby("fold")]
            rows += set_metric_rows(spec, embedding, set_name, frame, folds, BOOTSTRAP)
            pooled.setdefault(set_name, {})[embedding] = frame
    metrics = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    delong = pd.DataFrame(delong_rows(spec, pooled), columns=DELONG_COLUMNS)
    return metrics, delong


def compute_fixture(
    embeddings: tuple[str, ...] = COMPUTE_ORDER, demo: bool = False
) -> pd.DataFrame:
    rows = {
        "eagle": ("eagle", "CHIEF top-25 by virchow2", 1000.0 + 25, 1.0, 12.5),
        "chief": ("chief", "CHIEF slide embedding", 1000.0, 1.0, 8.0),
        "meanpool_virchow2": ("meanpool", "mean of virchow2 tiles", 16000.0, 0.0, 40.0),
        "gigapath_slide": ("slide_encoder", "LongNet over gigapath tiles", 15000.0, 1.0, 55.0),
    }
    return pd.DataFrame(
        [
            {
                "embedding": e,
                "base": e,
                "kind": rows[e][0],
                "description": rows[e][1],
                "tile_px": 224,
                "tile_mpp": 2.0,
                "tile_forwards_per_slide": rows[e][2],
                "slide_forwards_per_slide": rows[e][3],
                "seconds_per_slide": rows[e][4],
                "demo_weights": "virchow2"
                if demo and e in ("eagle", "meanpool_virchow2")
                else "none",
            }
            for e in embeddings
        ],
        columns=COMPUTE_COLUMNS,
    )


@pytest.fixture(scope="module")
def run_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    binary = TaskSpec("BIN", "L", ("A", "B"), "B", ("INT",), ("EXT",), EMBEDDINGS)
    multi = TaskSpec("MC", "M", ("1", "2", "3"), None, ("INT",), ("EXT",), EMBEDDINGS[:2])
    tables = [task_tables(binary, 0), task_tables(multi, 100)]
    metrics = pd.concat([m for m, _ in tables], ignore_index=True)
    delong = pd.concat([d for _, d in tables], ignore_index=True)
    return metrics, delong


def test_every_embedding_task_and_set_in_report_order(run_tables):
    metrics, delong = run_tables
    table = comparison_table(metrics, delong, compute_fixture())
    assert list(table.columns) == comparison_columns("eagle")
    expected = {
        (t, s, e) for t, s, e in metrics[["task", "set", "embedding"]].itertuples(index=False)
    }
    keys = list(table[["task", "set", "embedding"]].itertuples(index=False, name=None))
    assert len(keys) == len(set(keys)) == len(expected) == 4 * 2 + 2 * 2
    assert set(keys) == expected
    for (_, _), part in table.groupby(["task", "set"], sort=False):
        order = [e for e in COMPUTE_ORDER if e in set(part["embedding"])]
        assert list(part["embedding"]) == order
    assert list(dict.fromkeys(table["set"])) == ["crossval", "external:EXT"]
    # every metric and bound is the metrics table's own number
    for row in table.itertuples(index=False):
        rows = metrics[
            (metrics["task"] == row.task)
            & (metrics["set"] == row.set)
            & (metrics["embedding"] == row.embedding)
        ].set_index("metric")
        for metric in METRICS:
            assert getattr(row, metric) == rows.loc[metric, "value"]
            assert getattr(row, f"{metric}_low") == rows.loc[metric, "ci_low"]
            assert getattr(row, f"{metric}_high") == rows.loc[metric, "ci_high"]


def test_delong_against_reference_and_bh_over_the_table(run_tables):
    metrics, delong = run_tables
    table = comparison_table(metrics, delong, compute_fixture())
    p = table["delong_p_vs_eagle"]
    assert p[table["embedding"] == "eagle"].isna().all()
    assert p[table["task"] == "MC"].isna().all()  # multiclass: DeLong not tested
    binary_others = table[(table["task"] == "BIN") & (table["embedding"] != "eagle")]
    assert len(binary_others) == 3 * 2 and binary_others["delong_p_vs_eagle"].notna().all()
    for row in binary_others.itertuples(index=False):
        pair = delong[
            (delong["task"] == row.task)
            & (delong["set"] == row.set)
            & (
                ((delong["embedding_a"] == "eagle") & (delong["embedding_b"] == row.embedding))
                | ((delong["embedding_b"] == "eagle") & (delong["embedding_a"] == row.embedding))
            )
        ]
        assert len(pair) == 1
        assert row.delong_p_vs_eagle == pair["p"].iloc[0]
        # the test's AUROC of the embedding is the one the table reports
        side = "a" if pair["embedding_a"].iloc[0] == row.embedding else "b"
        assert pair[f"auc_{side}"].iloc[0] == pytest.approx(row.auroc, abs=1e-12)
    # the family is the tests against eagle, not every pair of delong.csv
    np.testing.assert_allclose(
        table["delong_p_bh"], benjamini_hochberg(p.to_numpy(float)), equal_nan=True
    )
    assert table["delong_p_bh"].notna().sum() == 6
    finite = table["delong_p_bh"].dropna()
    assert (finite >= binary_others["delong_p_vs_eagle"].to_numpy()).all()


def test_another_reference(run_tables):
    metrics, delong = run_tables
    table = comparison_table(metrics, delong, compute_fixture(), reference="chief")
    assert "delong_p_vs_chief" in table.columns and "delong_p_vs_eagle" not in table.columns
    binary = table[table["task"] == "BIN"]
    assert binary.loc[binary["embedding"] == "chief", "delong_p_vs_chief"].isna().all()
    assert binary.loc[binary["embedding"] != "chief", "delong_p_vs_chief"].notna().all()


def test_compute_joined_by_embedding(run_tables):
    metrics, delong = run_tables
    compute = compute_fixture(demo=True)
    # the compute table's row order is not the join: shuffle it, keep the report order aside
    table = comparison_table(metrics, delong, compute.iloc[::-1].reset_index(drop=True))
    by_name = compute.set_index("embedding")
    for row in table.itertuples(index=False):
        for column in (
            "description",
            "tile_forwards_per_slide",
            "slide_forwards_per_slide",
            "seconds_per_slide",
            "demo_weights",
        ):
            assert getattr(row, column) == by_name.loc[row.embedding, column]


def test_without_compute_the_table_is_still_built(run_tables):
    metrics, delong = run_tables
    table = comparison_table(metrics, delong, None)
    full = comparison_table(metrics, delong, compute_fixture())
    assert len(table) == len(full)
    for column in ("description", "tile_forwards_per_slide", "seconds_per_slide", "demo_weights"):
        assert table[column].isna().all()
    # metrics and p values do not depend on the compute table (only the row order does)
    keys = ["task", "set", "embedding"]
    aligned = table.merge(full, on=keys, suffixes=("", "_full"))
    assert len(aligned) == len(full)
    for column in ["auroc", "auprc_low", "delong_p_vs_eagle", "delong_p_bh"]:
        np.testing.assert_array_equal(aligned[column], aligned[f"{column}_full"])
    # without compute.csv the embeddings keep the metrics' order
    assert list(dict.fromkeys(table["embedding"])) == list(EMBEDDINGS)


def test_embedding_missing_from_compute_keeps_its_rows(run_tables):
    metrics, delong = run_tables
    table = comparison_table(metrics, delong, compute_fixture(COMPUTE_ORDER[:3]))
    orphan = table[table["embedding"] == "gigapath_slide"]
    assert len(orphan) == 2 and orphan["seconds_per_slide"].isna().all()
    assert list(dict.fromkeys(table["embedding"]))[-1] == "gigapath_slide"


def test_duplicate_compute_rows_are_rejected(run_tables):
    metrics, delong = run_tables
    compute = pd.concat([compute_fixture(), compute_fixture().iloc[:1]], ignore_index=True)
    with pytest.raises(ValueError, match="eagle"):
        comparison_table(metrics, delong, compute)


def _write_run(tmp: Path, run_tables, demo_attrs: bool) -> dict[str, list[str]]:
    metrics, delong = run_tables
    files: dict[str, list[str]] = {"metrics": [], "fewshot": [], "delong": []}
    for task in ("BIN", "MC"):
        d = tmp / task
        d.mkdir(parents=True)
        metrics[metrics["task"] == task].to_csv(d / "metrics.csv", index=False)
        delong[delong["task"] == task].to_csv(d / "delong.csv", index=False)
        pd.DataFrame(columns=["task", "embedding", "head", "set", "k", "metric", "mean"]).to_csv(
            d / "fewshot.csv", index=False
        )
        for kind in files:
            files[kind].append(str(d / f"{kind}.csv"))
    attrs = (
        {"weights_demo": "true", "demo_weights": "chief"}
        if demo_attrs
        else {
            "weights_demo": "false",
            "demo_weights": "none",
        }
    )
    write_h5(tmp / "patients.h5", {"x": np.zeros(1)}, attrs)
    return files


def _summarize(tmp: Path, files: dict[str, list[str]], compute_csv: str | None) -> str:
    out = tmp / "out"
    summarize_run(
        files["metrics"],
        files["fewshot"],
        files["delong"],
        str(tmp / "patients.h5"),
        metrics_csv=str(out / "metrics.csv"),
        fewshot_csv=str(out / "fewshot.csv"),
        delong_csv=str(out / "delong.csv"),
        html_path=str(out / "metrics.html"),
        compute_csv=compute_csv,
        comparison_csv=str(out / "comparison.csv"),
    )
    return (out / "metrics.html").read_text()


@pytest.mark.parametrize("demo", [False, True])
def test_summary_writes_the_comparison_first(tmp_path: Path, run_tables, demo: bool):
    files = _write_run(tmp_path, run_tables, demo_attrs=False)
    compute_fixture(demo=demo).to_csv(tmp_path / "compute.csv", index=False)
    page = _summarize(tmp_path, files, str(tmp_path / "compute.csv"))
    written = pd.read_csv(
        tmp_path / "out" / "comparison.csv", keep_default_na=False, na_values=[""]
    )
    assert list(written.columns) == comparison_columns("eagle")
    expected = comparison_table(*run_tables, compute_fixture(demo=demo))
    pd.testing.assert_frame_equal(
        written[["task", "set", "embedding"]], expected[["task", "set", "embedding"]]
    )
    np.testing.assert_allclose(written["delong_p_bh"], expected["delong_p_bh"], equal_nan=True)
    assert (written["demo_weights"] != "none").any() == demo
    heading = page.index("Comparison of slide representations")
    assert heading < page.index("MLP heads") < page.index("DeLong's test between")
    assert ("DEMO WEIGHTS: not a result" in page) == demo
    if demo:
        assert page.index("DEMO WEIGHTS") < heading and "virchow2" in page[:heading]
    # a p value to three significant digits and a metric with its interval
    p = expected["delong_p_vs_eagle"].dropna().iloc[0]
    assert f"{p:.3g}" in page
    row = expected.iloc[0]
    assert f"{row['auroc']:.3f} [{row['auroc_low']:.3f}, {row['auroc_high']:.3f}]" in page


def test_summary_without_compute_and_demo_from_patients(tmp_path: Path, run_tables):
    files = _write_run(tmp_path, run_tables, demo_attrs=True)
    page = _summarize(tmp_path, files, None)
    written = pd.read_csv(tmp_path / "out" / "comparison.csv")
    assert len(written) == 12 and written["seconds_per_slide"].isna().all()
    assert "Comparison of slide representations" in page
    banner = page[page.index("DEMO WEIGHTS") :].split("</p>")[0]
    assert "chief" in banner  # the patients file's demo weights still raise the banner


# --- the paper's grid: embeddings x magnifications, with hand-computed inputs ---------------------

# compute.csv of a run with the configured grid (224 px at 2 µm/px, names without '@'), the same
# embeddings at 0.5 µm/px, and titan at its native 512 px at 0.5 µm/px; in report order
GRID_COMPUTE = [
    # embedding, base, kind, tile_px, tile_mpp, tile forwards, seconds, demo weights
    ("eagle", "eagle", "eagle", 224, 2.0, 525.0, 5.0, "none"),
    ("chief", "chief", "chief", 224, 2.0, 500.0, 4.0, "none"),
    ("meanpool_ctranspath", "meanpool_ctranspath", "meanpool", 224, 2.0, 500.0, 2.0, "none"),
    ("eagle@0.5mpp", "eagle", "eagle", 224, 0.5, 8025.0, 60.0, "none"),
    ("chief@0.5mpp", "chief", "chief", 224, 0.5, 8000.0, 50.0, "none"),
    ("meanpool_ctranspath@0.5mpp", "meanpool_ctranspath", "meanpool", 224, 0.5, 8000, 0.0, "none"),
    ("titan", "titan", "slide_encoder", 512, 0.5, 2000.0, 30.0, "titan"),
]
# AUROC [low, high] per set; the external cohort ran four of the embeddings
GRID_AUROC = {
    "crossval": {
        "eagle": (0.90, 0.85, 0.95),
        "chief": (0.80, 0.74, 0.86),
        "meanpool_ctranspath": (0.70, 0.62, 0.78),
        "eagle@0.5mpp": (0.88, 0.82, 0.94),
        "chief@0.5mpp": (0.84, 0.78, 0.90),
        "meanpool_ctranspath@0.5mpp": (0.75, 0.68, 0.82),
        "titan": (0.86, 0.80, 0.92),
    },
    "external:EXT": {
        "eagle": (0.85, 0.78, 0.92),
        "chief": (0.79, 0.70, 0.88),
        "eagle@0.5mpp": (0.83, 0.75, 0.91),
        "chief@0.5mpp": (0.81, 0.72, 0.90),
    },
}
# DeLong p of the pairs each embedding is tested in: against eagle at its magnification ...
GRID_TESTED = {
    ("crossval", "eagle", "chief"): 0.001,
    ("crossval", "chief@0.5mpp", "eagle@0.5mpp"): 0.004,  # either order in delong.csv
    ("crossval", "eagle", "meanpool_ctranspath"): 0.006,
    ("crossval", "eagle@0.5mpp", "meanpool_ctranspath@0.5mpp"): 0.04,
    ("crossval", "eagle@0.5mpp", "titan"): 0.5,  # titan's 0.5 µm/px: eagle@0.5mpp (other px)
    ("external:EXT", "eagle", "chief"): 0.03,
    ("external:EXT", "eagle@0.5mpp", "chief@0.5mpp"): 0.9,
}
# ... and pairs across magnifications, which the comparison must not read
GRID_UNTESTED = {
    ("crossval", "eagle", "chief@0.5mpp"): 0.0001,
    ("crossval", "eagle", "eagle@0.5mpp"): 0.0002,
    ("crossval", "eagle", "titan"): 0.0003,
    ("crossval", "chief", "eagle@0.5mpp"): 0.0004,
    ("crossval", "chief", "meanpool_ctranspath"): 0.0005,
    ("external:EXT", "eagle", "chief@0.5mpp"): 0.0006,
}
# raw p of the table (its order) and Benjamini-Hochberg over these 7 tests, by hand:
# sorted .001 .004 .006 .03 .04 .5 .9 -> x 7/rank: .007 .014 .014 .0525 .056 .5833 .9, monotone
GRID_P = {
    ("crossval", "chief"): (0.001, 0.007, "eagle"),
    ("crossval", "meanpool_ctranspath"): (0.006, 0.014, "eagle"),
    ("crossval", "chief@0.5mpp"): (0.004, 0.014, "eagle@0.5mpp"),
    ("crossval", "meanpool_ctranspath@0.5mpp"): (0.04, 0.056, "eagle@0.5mpp"),
    ("crossval", "titan"): (0.5, 0.5 * 7 / 6, "eagle@0.5mpp"),
    ("external:EXT", "chief"): (0.03, 0.0525, "eagle"),
    ("external:EXT", "chief@0.5mpp"): (0.9, 0.9, "eagle@0.5mpp"),
}


def grid_inputs(demo: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """metrics.csv, delong.csv and compute.csv of one binary task BIN at two magnifications."""
    metrics = pd.DataFrame(
        [
            {
                "task": "BIN",
                "embedding": embedding,
                "head": "mlp",
                "set": set_name,
                "metric": "auroc",
                "value": value,
                "ci_low": low,
                "ci_high": high,
            }
            for set_name, values in GRID_AUROC.items()
            for embedding, (value, low, high) in values.items()
        ],
        columns=METRIC_COLUMNS,
    )
    delong = pd.DataFrame(
        [
            {"task": "BIN", "set": s, "embedding_a": a, "embedding_b": b, "p": p}
            for (s, a, b), p in {**GRID_UNTESTED, **GRID_TESTED}.items()
        ],
        columns=DELONG_COLUMNS,
    )
    compute = pd.DataFrame(
        [
            {
                "embedding": e,
                "base": base,
                "kind": kind,
                "description": f"{e} described",
                "tile_px": px,
                "tile_mpp": mpp,
                "tile_forwards_per_slide": forwards,
                "slide_forwards_per_slide": 1.0,
                "seconds_per_slide": seconds,
                "demo_weights": weights if demo else "none",
            }
            for e, base, kind, px, mpp, forwards, seconds, weights in GRID_COMPUTE
        ],
        columns=COMPUTE_COLUMNS,
    )
    return metrics, delong, compute


def test_delong_against_eagle_at_the_same_magnification_bh_over_the_table():
    table = comparison_table(*grid_inputs())
    assert len(table) == 7 + 4
    tested = table[table["delong_p_vs_eagle"].notna()]
    got = {
        (r.set, r.embedding): (r.delong_p_vs_eagle, r.delong_p_bh, r.delong_reference)
        for r in tested.itertuples(index=False)
    }
    assert got.keys() == GRID_P.keys()
    for key, (p, p_bh, reference) in GRID_P.items():
        assert got[key][0] == p and got[key][2] == reference, key
        assert got[key][1] == pytest.approx(p_bh, abs=1e-12), key
    # the references themselves are not tested (nor listed as their own reference)
    references = table[table["base"] == "eagle"]
    assert references["delong_p_vs_eagle"].isna().all()
    assert references["delong_reference"].isna().all()
    # the grid comes from compute.csv, one column each
    titan = table[table["embedding"] == "titan"].iloc[0]
    assert (titan["base"], titan["tile_px"], titan["tile_mpp"]) == ("titan", 512, 0.5)


def test_without_eagle_at_a_magnification_the_configured_eagle_is_named():
    metrics, delong, compute = grid_inputs()
    metrics = metrics[metrics["embedding"] != "eagle@0.5mpp"]
    table = comparison_table(metrics, delong, compute)
    # the 0.5 µm/px embeddings fall back to eagle at its configured grid (2 µm/px), named
    at_half = table[table["tile_mpp"] == 0.5].set_index(["set", "embedding"])
    assert set(at_half["delong_reference"]) == {"eagle"}
    assert at_half.loc[("crossval", "chief@0.5mpp"), "delong_p_vs_eagle"] == 0.0001
    assert at_half.loc[("crossval", "titan"), "delong_p_vs_eagle"] == 0.0003
    assert at_half.loc[("external:EXT", "chief@0.5mpp"), "delong_p_vs_eagle"] == 0.0006
    # a pair delong.csv lacks stays untested, and out of the family
    assert pd.isna(at_half.loc[("crossval", "meanpool_ctranspath@0.5mpp"), "delong_p_vs_eagle"])
    # BH over the 6 tests, by hand: p x 6 / rank, monotone
    tested = table.dropna(subset=["delong_p_vs_eagle"]).sort_values("delong_p_vs_eagle")
    assert list(tested["delong_p_vs_eagle"]) == [0.0001, 0.0003, 0.0006, 0.001, 0.006, 0.03]
    np.testing.assert_allclose(
        tested["delong_p_bh"], [0.0006, 0.0009, 0.0012, 0.0015, 0.0072, 0.03], rtol=1e-12
    )
    # the page names the reference where it is not in the cell's column
    page = grid_html(comparison_grid(table))
    assert "BH 0.0009 vs eagle at 2 µm/px</small>" in page and "BH 0.0015</small>" in page


def test_grid_pivots_embeddings_by_magnification():
    comparison = comparison_table(*grid_inputs())
    grid = comparison_grid(comparison)
    fields = ["embedding", "auroc", "auroc_low", "auroc_high"]
    fields += ["delong_reference", "delong_p", "delong_p_bh"]
    assert list(grid.columns) == [
        "task",
        "set",
        "embedding",
        "tile_px",
        *(f"{f}_0.5mpp" for f in fields),
        *(f"{f}_2mpp" for f in fields),
    ]
    rows = list(grid[["set", "embedding", "tile_px"]].itertuples(index=False, name=None))
    assert rows == [
        ("crossval", "eagle", 224),
        ("crossval", "chief", 224),
        ("crossval", "meanpool_ctranspath", 224),
        ("crossval", "titan", 512),
        ("external:EXT", "eagle", 224),
        ("external:EXT", "chief", 224),
    ]
    cell = grid.set_index(["set", "embedding"])
    for set_name, values in GRID_AUROC.items():
        for embedding, (value, low, high) in values.items():
            base, _, mpp = embedding.partition("@")
            label = "0.5mpp" if mpp or embedding == "titan" else "2mpp"
            row = cell.loc[(set_name, base)]
            assert row[f"embedding_{label}"] == embedding
            assert (row[f"auroc_{label}"], row[f"auroc_low_{label}"]) == (value, low)
            assert row[f"auroc_high_{label}"] == high
            p, p_bh, against = GRID_P.get((set_name, embedding), (math.nan, math.nan, math.nan))
            np.testing.assert_equal(row[f"delong_p_{label}"], p)
            np.testing.assert_equal(row[f"delong_reference_{label}"], against)
            np.testing.assert_allclose(row[f"delong_p_bh_{label}"], p_bh, atol=1e-12)
    # titan ran at 0.5 µm/px only; meanpool_ctranspath's external cell is empty
    assert pd.isna(cell.loc[("crossval", "titan"), "embedding_2mpp"])
    assert ("external:EXT", "meanpool_ctranspath") not in cell.index


def test_old_compute_table_is_refused_clearly(tmp_path: Path):
    _, _, compute = grid_inputs()
    compute.drop(columns=["tile_px", "tile_mpp"]).to_csv(tmp_path / "compute.csv", index=False)
    with pytest.raises(ValueError, match=r"tile_px.*rerun.*embeddings_collect"):
        read_compute(str(tmp_path / "compute.csv"))


def test_summary_writes_the_grid_and_the_figure_first(tmp_path: Path):
    metrics, delong, compute = grid_inputs(demo=True)
    files = {}
    for name, table in (("metrics", metrics), ("delong", delong), ("compute", compute)):
        table.to_csv(tmp_path / f"{name}.csv", index=False)
        files[name] = str(tmp_path / f"{name}.csv")
    pd.DataFrame(columns=FEWSHOT_COLUMNS).to_csv(tmp_path / "fewshot.csv", index=False)
    write_h5(tmp_path / "p.h5", {"x": np.zeros(1)}, {"weights_demo": "false"})
    out = tmp_path / "out"
    summarize_run(
        [files["metrics"]],
        [str(tmp_path / "fewshot.csv")],
        [files["delong"]],
        str(tmp_path / "p.h5"),
        metrics_csv=str(out / "metrics.csv"),
        fewshot_csv=str(out / "fewshot.csv"),
        delong_csv=str(out / "delong.csv"),
        html_path=str(out / "metrics.html"),
        compute_csv=files["compute"],
        comparison_csv=str(out / "comparison.csv"),
        grid_csv=str(out / "comparison_grid.csv"),
        efficiency_png=str(out / "efficiency.png"),
    )
    written = pd.read_csv(out / "comparison_grid.csv", keep_default_na=False, na_values=[""])
    expected = comparison_grid(comparison_table(metrics, delong, compute))
    pd.testing.assert_frame_equal(written, expected, check_dtype=False)
    long = pd.read_csv(out / "comparison.csv")
    assert {"base", "tile_px", "tile_mpp", "delong_reference"} <= set(long.columns)
    assert (out / "efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "metrics.html").read_text()
    grid_at = page.index("embeddings x magnifications")
    figure_at = page.index("data:image/png;base64,")
    assert page.index("DEMO WEIGHTS") < grid_at < figure_at < page.index("<h2>MLP heads")
    assert "0.5 µm/px" in page[grid_at:figure_at] and "2 µm/px" in page[grid_at:figure_at]
    # a cell: AUROC [CI], then DeLong p and BH against eagle at its magnification
    assert "0.840 [0.780, 0.900]<br><small>p 0.004, BH 0.014</small>" in page
