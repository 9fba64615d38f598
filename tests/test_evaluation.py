"""Evaluation end to end on a fabricated cohort (function level), retrieval and figure details."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from test_heads import FAST_MLP, fabricate_cohort, task_config

from eagleflow.evaluation import delong_rows, evaluate_task
from eagleflow.figures import DEMO_TEXT, demo_note, task_figures, umap_figure
from eagleflow.heads_fewshot import fewshot
from eagleflow.heads_mlp import mlp_crossval
from eagleflow.predictions import EvaluationError, read_predictions
from eagleflow.retrieval import patient_retrieval, retrieval_table
from eagleflow.sheets import read_clinical_table
from eagleflow.stats import benjamini_hochberg
from eagleflow.summary import summarize_run
from eagleflow.tasks import TaskSpec, validate_tasks

FEWSHOT = {"shots": [1, 2, 4], "repeats": 2, "C": 1.0, "max_iter": 1000, "seed": 42}
BOOTSTRAP = {"n": 200, "seed": 0}


def run_heads(h5: Path, clinical: Path, spec: TaskSpec, out: Path) -> dict[str, list[str]]:
    """Both heads for every embedding of a task; the evaluation inputs, by kind."""
    files: dict[str, list[str]] = {"predictions": [], "external": [], "folds": [], "fewshot": []}
    for embedding in spec.embeddings:
        d = out / spec.name / embedding
        mlp_crossval(
            str(h5),
            str(clinical),
            embedding,
            spec.params(),
            FAST_MLP,
            predictions=str(d / "predictions.csv"),
            external=str(d / "external.csv"),
            external_folds=str(d / "external_folds.csv"),
            splits=str(d / "splits.json"),
            history=str(d / "history.csv"),
        )
        fewshot(
            str(h5),
            str(clinical),
            embedding,
            spec.params(),
            FEWSHOT,
            predictions=str(d / "fewshot.csv"),
            samples=str(d / "samples.json"),
        )
        files["predictions"].append(str(d / "predictions.csv"))
        files["external"].append(str(d / "external.csv"))
        files["folds"].append(str(d / "external_folds.csv"))
        files["fewshot"].append(str(d / "fewshot.csv"))
    return files


def test_evaluation_end_to_end(tmp_path: Path):
    h5, clinical, slides = fabricate_cohort(tmp_path)
    specs = validate_tasks(
        {
            "BIN": task_config(),
            "MC": task_config(label="MC", embeddings=["eagle", "meanpool_ctranspath"]),
        },
        read_clinical_table(clinical),
        slides,
        folds=3,
    )
    ev = tmp_path / "evaluation"
    for name, spec in specs.items():
        files = run_heads(h5, clinical, spec, tmp_path / "heads")
        evaluate_task(
            spec.params(),
            files["predictions"],
            files["external"],
            files["folds"],
            files["fewshot"],
            BOOTSTRAP,
            metrics_csv=str(ev / name / "metrics.csv"),
            fewshot_csv=str(ev / name / "fewshot.csv"),
            delong_csv=str(ev / name / "delong.csv"),
            info_json=str(ev / name / "evaluation.json"),
        )
        task_figures(
            spec.params(),
            files["predictions"],
            files["external"],
            str(ev / name / "fewshot.csv"),
            str(h5),
            roc_png=str(ev / name / "roc.png"),
            pr_png=str(ev / name / "pr.png"),
            fewshot_png=str(ev / name / "fewshot.png"),
        )

    metrics = pd.read_csv(ev / "BIN" / "metrics.csv", keep_default_na=False, na_values=[""])
    assert len(metrics) == 3 * 2 * 4  # embeddings x (crossval, external:EXT) x metrics
    assert set(metrics["set"]) == {"crossval", "external:EXT"}
    held_out = pd.read_csv(tmp_path / "heads" / "BIN" / "eagle" / "predictions.csv")
    row = metrics.query("embedding == 'eagle' and set == 'crossval' and metric == 'auroc'").iloc[0]
    assert row["value"] == pytest.approx(
        roc_auc_score(held_out["LABEL"] == "B", held_out["prob_B"]), abs=1e-12
    )
    assert row["value"] > 0.9  # eagle carries the label strongly
    assert row["ci_low"] <= row["value"] <= row["ci_high"]
    assert row["n_folds"] == 3 and row["n_patients"] == 29
    assert row["class_counts"] == "A:14;B:15"

    fewshot_table = pd.read_csv(ev / "BIN" / "fewshot.csv")
    assert sorted(set(fewshot_table["k"])) == [1, 2, 4]
    assert set(fewshot_table["n_repeats"]) == {2}

    delong = pd.read_csv(ev / "BIN" / "delong.csv", keep_default_na=False, na_values=[""])
    assert len(delong) == 3 * 2  # embedding pairs x sets
    assert delong["p"].between(0, 1).all()
    mc_delong = pd.read_csv(ev / "MC" / "delong.csv", keep_default_na=False, na_values=[""])
    assert len(mc_delong) == 1 and "multiclass task (3 classes)" in mc_delong["note"].iloc[0]

    summarize_run(
        [str(ev / n / "metrics.csv") for n in specs],
        [str(ev / n / "fewshot.csv") for n in specs],
        [str(ev / n / "delong.csv") for n in specs],
        str(h5),
        metrics_csv=str(ev / "metrics.csv"),
        fewshot_csv=str(ev / "fewshot.csv"),
        delong_csv=str(ev / "delong.csv"),
        html_path=str(ev / "metrics.html"),
    )
    run_delong = pd.read_csv(ev / "delong.csv", keep_default_na=False, na_values=[""])
    assert len(run_delong) == 7
    np.testing.assert_allclose(
        run_delong["p_adjusted"], benjamini_hochberg(run_delong["p"]), equal_nan=True
    )
    assert len(pd.read_csv(ev / "metrics.csv")) == len(metrics) + 2 * 2 * 4
    page = (ev / "metrics.html").read_text()
    assert "DEMO WEIGHTS: not a result" in page and "MC" in page

    patient_retrieval(
        str(h5),
        {"top": 3, "embeddings": ["eagle", "chief"]},
        table_csv=str(ev / "retrieval.csv"),
        figure_png=str(ev / "retrieval.png"),
    )
    retrieval = pd.read_csv(ev / "retrieval.csv")
    assert len(retrieval) == 2 * 42 * 3
    assert (retrieval["query_patient"] != retrieval["match_patient"]).all()

    umap_figure(
        str(h5),
        str(clinical),
        {"BIN": "BIN", "MC": "MC"},
        {"n_neighbors": 15, "min_dist": 0.1, "seed": 42, "embeddings": ["eagle"]},
        output=str(ev / "umap.png"),
    )
    for png in [
        *(ev / n / f"{f}.png" for n in specs for f in ("roc", "pr", "fewshot")),
        ev / "retrieval.png",
        ev / "umap.png",
    ]:
        with Image.open(png) as image:
            assert image.format == "PNG"
            assert image.text["Software"].startswith("eagleflow")


def test_retrieval_table_ranks_by_cosine_and_skips_self():
    patients = pd.DataFrame({"PATIENT": ["p1", "p2", "p3", "p4"], "COHORT": ["a", "a", "b", "b"]})
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.05]])
    table = retrieval_table(patients, {"e": x * np.array([[1], [5], [2], [3]])}, top=2)
    first = table[table["query_patient"] == "p1"]
    assert list(first["match_patient"]) == ["p2", "p3"]  # scale does not matter: cosine
    assert first["similarity"].iloc[0] == pytest.approx(0.9 / np.hypot(0.9, 0.1))
    assert len(table) == 4 * 2


def test_demo_banner_only_for_demo_weights():
    fig = plt.figure()
    assert demo_note(fig, {"weights_demo": "true", "demo_weights": "virchow2"}) > 0
    assert any(DEMO_TEXT in t.get_text() for t in fig.texts)
    other = plt.figure()
    assert demo_note(other, {"weights_demo": "false"}) == 0
    assert not other.texts
    plt.close("all")


def test_predictions_of_another_task_are_rejected(tmp_path: Path):
    path = tmp_path / "p.csv"
    pd.DataFrame(
        {"PATIENT": ["x"], "COHORT": ["c"], "LABEL": ["NA"], "pred": ["NA"], "prob_NA": [1.0]}
    ).to_csv(path, index=False)
    spec = TaskSpec("T", "L", ("A", "B"), "B", ("c",), (), ("eagle",))
    with pytest.raises(EvaluationError, match=r"do not match task 'T'.*unknown labels \['NA'\]"):
        read_predictions(path, spec)
    # 'NA' stays a label, not a missing value
    na_spec = TaskSpec("T", "L", ("NA", "B"), "B", ("c",), (), ("eagle",))
    frame = pd.DataFrame(
        {"PATIENT": ["x"], "COHORT": ["c"], "LABEL": ["NA"], "pred": ["NA"], "prob_NA": [1.0]}
    ).assign(prob_B=0.0)
    frame.to_csv(path, index=False)
    assert read_predictions(path, na_spec)["y"].tolist() == [0]


def test_delong_rows_flag_sets_too_small_to_test():
    spec = TaskSpec("T", "L", ("A", "B"), "B", ("c",), (), ("eagle", "chief"))
    frame = pd.DataFrame({"PATIENT": ["1", "2", "3"], "y": [0, 1, 1], "prob_B": [0.2, 0.6, 0.9]})
    rows = delong_rows(spec, {"crossval": {"eagle": frame, "chief": frame}})
    assert len(rows) == 1 and rows[0]["note"] == "fewer than two patients of a class: not tested"
    with pytest.raises(EvaluationError, match="different patients"):
        delong_rows(spec, {"crossval": {"eagle": frame, "chief": frame.iloc[:2]}})
