"""The comparison of slide representations: every embedding x task x set, DeLong vs eagle, cost."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eagleflow.evaluation import DELONG_COLUMNS, METRIC_COLUMNS, delong_rows, set_metric_rows
from eagleflow.h5io import COMPUTE_COLUMNS, write_h5
from eagleflow.stats import METRICS, benjamini_hochberg
from eagleflow.summary import (
    comparison_columns,
    comparison_table,
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
                "kind": rows[e][0],
                "description": rows[e][1],
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
