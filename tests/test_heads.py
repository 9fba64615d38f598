"""Tasks, cross-validation folds, the MLP head and few-shot logistic regression."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from eagleflow.h5io import EMBEDDINGS_FORMAT, write_h5
from eagleflow.heads_fewshot import (
    FewshotParams,
    fewshot,
    fewshot_sample,
    run_fewshot,
    usable_shots,
)
from eagleflow.heads_mlp import MLPParams, crossval_folds, mlp_crossval, run_crossval, train_mlp
from eagleflow.sheets import read_clinical_table
from eagleflow.stats import binary_auroc, classification_metrics
from eagleflow.task_data import load_task_data
from eagleflow.tasks import (
    TaskError,
    TaskSpec,
    min_patients_per_class,
    sort_classes,
    validate_tasks,
)

FAST_MLP = {"epochs": 6, "folds": 3, "patience": 3, "lr": 1e-3}


def fabricate_cohort(
    directory: Path, demo: bool = True, seed: int = 0
) -> tuple[Path, Path, pd.DataFrame]:
    """patients.h5 and clinical.csv of 30 internal (INT) and 12 external (EXT) patients.

    BIN (A/B) and MC (1/2/3) labels, one of each missing; `eagle` carries both signals strongly,
    `chief` weakly, `meanpool` not at all. Returns (h5, clinical, slide-sheet-like frame).
    """
    rng = np.random.default_rng(seed)
    patients = [f"INT-{i:03d}" for i in range(1, 31)] + [f"EXT-{i:03d}" for i in range(1, 13)]
    cohorts = ["INT"] * 30 + ["EXT"] * 12
    index = np.arange(len(patients))
    binary = np.where(index % 2 == 0, "A", "B")
    multi = np.array(["1", "2", "3"])[index % 3]
    sign = np.where(binary == "B", 1.0, -1.0)[:, None]
    onehot = np.eye(3)[index % 3]
    eagle = rng.normal(size=(len(patients), 24))
    eagle[:, :6] += 2.5 * sign
    eagle[:, 6:9] += 3.0 * onehot
    chief = rng.normal(size=(len(patients), 16))
    chief[:, :4] += 0.7 * sign
    meanpool = rng.normal(size=(len(patients), 16))
    h5 = directory / "patients.h5"
    write_h5(
        h5,
        {
            "patient": np.array(patients, dtype="S"),
            "cohort": np.array(cohorts, dtype="S"),
            "eagle": eagle.astype(np.float32),
            "chief": chief.astype(np.float32),
            "meanpool_ctranspath": meanpool.astype(np.float32),
            "n_slides": np.ones(len(patients), dtype=np.int64),
        },
        {
            "format": EMBEDDINGS_FORMAT,
            "level": "patient",
            "weights_demo": "true" if demo else "false",
            "demo_weights": "chief,ctranspath,virchow2" if demo else "none",
        },
    )
    binary_cells = binary.astype(object)
    binary_cells[28] = ""  # INT-029: no BIN label
    multi_cells = multi.astype(object)
    multi_cells[5] = ""  # INT-006: no MC label
    clinical = directory / "clinical.csv"
    pd.DataFrame({"PATIENT": patients, "BIN": binary_cells, "MC": multi_cells}).to_csv(
        clinical, index=False
    )
    slides = pd.DataFrame({"PATIENT": patients, "COHORT": cohorts})
    return h5, clinical, slides


def task_config(**overrides) -> dict:
    base = {"label": "BIN", "train_cohorts": ["INT"], "external_cohorts": ["EXT"]}
    return base | overrides


@pytest.fixture
def cohort(tmp_path: Path) -> tuple[Path, Path, pd.DataFrame]:
    return fabricate_cohort(tmp_path)


def test_validate_tasks_returns_specs(cohort):
    _, clinical, slides = cohort
    table = read_clinical_table(clinical)
    specs = validate_tasks(
        {"BIN": task_config(), "MC": task_config(label="MC", embeddings=["eagle"])},
        table,
        slides,
        folds=5,
    )
    assert specs["BIN"].classes == ("A", "B") and specs["BIN"].positive_class == "B"
    assert specs["BIN"].class_counts == {"A": 14, "B": 15}
    assert specs["BIN"].embeddings == ("eagle", "chief", "meanpool_ctranspath")
    assert specs["MC"].classes == ("1", "2", "3") and specs["MC"].positive_class is None
    assert TaskSpec.from_params(specs["BIN"].params()) == specs["BIN"]
    explicit = validate_tasks({"BIN": task_config(positive_class="A")}, table, slides)
    assert explicit["BIN"].positive_index == 0


def test_classes_sort_numerically_when_all_are_numbers():
    assert sort_classes(["10", "9", "2", "9"]) == ("2", "9", "10")
    assert sort_classes(["b", "10", "a", "9"]) == ("10", "9", "a", "b")


@pytest.mark.parametrize(
    ("tasks", "folds", "message"),
    [
        (
            {"T1": task_config(label="NOPE")},
            5,
            r"task 'T1': label column 'NOPE' is not in .*label columns: \['BIN', 'MC'\]",
        ),
        (
            {"T1": task_config(label="MC")},
            11,
            r"task 'T1': class '1' of column 'MC' has 10 patient\(s\) .*fewer than the 11 "
            r"cross-validation folds\. Lower heads\.mlp\.folds or drop the class",
        ),
        (
            {"T1": task_config(train_cohorts=["INT", "NOPE"])},
            5,
            r"task 'T1': train cohort 'NOPE' is not a COHORT of the slide sheet \(cohorts: "
            r"\['EXT', 'INT'\]\)",
        ),
        (
            {"T1": task_config(external_cohorts=["INT"])},
            5,
            r"cohort 'INT' is both a train and an external cohort",
        ),
        ({"T1": task_config(embeddings=["eagle", "uni"])}, 5, r"unknown embedding\(s\) \['uni'\]"),
        ({"T1": task_config(positive_class="C")}, 5, r"positive_class 'C' is not a class"),
        ({"T1": task_config(label="MC", positive_class="1")}, 5, r"positive_class is set, but"),
        ({"bad.name": task_config()}, 5, r"task 'bad.name': task names become file names"),
    ],
)
def test_validate_tasks_errors_name_the_culprit(cohort, tasks, folds, message):
    _, clinical, slides = cohort
    with pytest.raises(TaskError, match=message):
        validate_tasks(tasks, read_clinical_table(clinical), slides, folds=folds)


def test_validate_tasks_label_problems(cohort):
    _, clinical, slides = cohort
    table = read_clinical_table(clinical)
    table["ONE"] = "x"
    table["NUM"] = ["1", "1.0", "2"] * 14
    table["EXTRA"] = table["BIN"].where(~table["PATIENT"].str.startswith("EXT"), "C")
    with pytest.raises(TaskError) as info:
        validate_tasks(
            {
                "one": task_config(label="ONE"),
                "num": task_config(label="NUM"),
                "extra": task_config(label="EXTRA"),
            },
            table,
            slides,
        )
    message = str(info.value)
    assert "3 problem(s)" in message
    assert "task 'one': column 'ONE' has a single class ('x')" in message
    assert "task 'num': column 'NUM' has the labels ['1', '1.0']" in message
    assert "task 'extra': external cohort(s) ['EXT'] have label(s) ['C']" in message


def test_min_patients_per_class_leaves_two_for_the_inner_split():
    assert min_patients_per_class(5) == 5
    assert min_patients_per_class(3) == 3
    assert min_patients_per_class(2) == 4


@pytest.mark.parametrize(("counts", "folds"), [((14, 15), 5), ((5, 5), 5), ((3, 4, 3), 3)])
def test_folds_are_patient_disjoint_and_stratified(counts, folds):
    y = np.concatenate([np.full(c, i) for i, c in enumerate(counts)])
    result = crossval_folds(y, folds, seed=1337, inner_val_fraction=0.2)
    assert len(result) == folds
    tests = np.concatenate([f.test for f in result])
    assert sorted(tests) == list(range(len(y)))  # every patient held out exactly once
    for fold in result:
        parts = [set(fold.train), set(fold.valid), set(fold.test)]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2])
        assert not (parts[1] & parts[2])
        assert parts[0] | parts[1] | parts[2] == set(range(len(y)))
        for c, count in enumerate(counts):
            assert np.sum(y[fold.test] == c) in (count // folds, -(-count // folds))
            assert np.sum(y[fold.train] == c) >= 1
        assert len(fold.valid) >= len(counts)
    again = crossval_folds(y, folds, seed=1337, inner_val_fraction=0.2)
    assert all(np.array_equal(a.test, b.test) for a, b in zip(result, again, strict=True))


def separable(n: int = 60, d: int = 32, classes: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, : 4 * classes] += 2.0 * np.repeat(np.eye(classes)[y], 4, axis=1)
    return x, y


def test_mlp_crossval_is_deterministic_and_learns_a_separable_problem():
    x, y = separable()
    params = MLPParams(folds=3, lr=1e-3, epochs=16)
    first = run_crossval(x, y, x[:7], 2, params)
    second = run_crossval(x, y, x[:7], 2, params)
    assert np.array_equal(first.test_proba, second.test_proba)
    assert np.array_equal(first.external_proba, second.external_proba)
    assert first.history == second.history
    assert binary_auroc(y == 1, first.test_proba[:, 1]) > 0.9
    assert first.external_proba.shape == (3, 7, 2)
    assert set(first.test_fold) == {0, 1, 2}
    np.testing.assert_allclose(first.test_proba.sum(axis=1), 1.0, rtol=1e-6)


def test_mlp_learns_a_multiclass_problem():
    x, y = separable(n=90, classes=3, seed=1)
    result = run_crossval(x, y, x[:0], 3, MLPParams(folds=3, lr=1e-3, epochs=16))
    assert classification_metrics(y, result.test_proba)["auroc"] > 0.9


def test_train_mlp_restores_the_best_epoch_and_stops_early():
    x, y = separable(n=40, seed=2)
    params = MLPParams(lr=3e-2, epochs=40, patience=3)
    model, history = train_mlp(x[:30], y[:30], x[30:], y[30:], 2, params, seed=0)
    best = min(history, key=lambda r: r["valid_loss"])
    assert [r["epoch"] for r in history if r["best"]] == [best["epoch"]]
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(
            model(torch.from_numpy(x[30:])), torch.from_numpy(y[30:])
        )
    assert float(loss) == pytest.approx(best["valid_loss"], rel=1e-5)
    if len(history) < params.epochs:  # stopped early: the last `patience` epochs did not improve
        assert not any(r["improved"] for r in history[-params.patience :])


def test_mlp_crossval_rule_writes_held_out_and_ensemble_predictions(cohort, tmp_path, caplog):
    h5, clinical, slides = cohort
    spec = validate_tasks({"BIN": task_config()}, read_clinical_table(clinical), slides, folds=3)
    out = tmp_path / "mlp"
    caplog.set_level(logging.INFO)
    mlp_crossval(
        str(h5),
        str(clinical),
        "eagle",
        spec["BIN"].params(),
        FAST_MLP,
        predictions=str(out / "predictions.csv"),
        external=str(out / "external.csv"),
        external_folds=str(out / "external_folds.csv"),
        splits=str(out / "splits.json"),
        history=str(out / "history.csv"),
    )
    assert "cohort INT: 29 patients with a BIN label, 1 without (left out)" in caplog.text
    held_out = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert len(held_out) == 29 and held_out["PATIENT"].is_unique
    assert "INT-029" not in set(held_out["PATIENT"])
    assert set(held_out["fold"]) == {0, 1, 2}
    ensemble = pd.read_csv(out / "external.csv")
    per_fold = pd.read_csv(out / "external_folds.csv")
    assert len(ensemble) == 12 and len(per_fold) == 36
    mean = per_fold.groupby("PATIENT")[["prob_A", "prob_B"]].mean()
    np.testing.assert_allclose(
        ensemble.set_index("PATIENT")[["prob_A", "prob_B"]].loc[mean.index], mean, rtol=1e-12
    )
    splits = json.loads((out / "splits.json").read_text())
    tests = [p for f in splits["folds"] for p in f["test"]]
    assert sorted(tests) == sorted(held_out["PATIENT"])
    assert splits["weights_demo"] == "true" and splits["provenance"]["code_version"]


def test_load_task_data_rejects_labels_outside_the_task(cohort):
    h5, clinical, _ = cohort
    spec = TaskSpec("BIN", "BIN", ("A", "C"), "C", ("INT",), ("EXT",), ("eagle",))
    with pytest.raises(TaskError, match=r"task 'BIN': column 'BIN' has label\(s\) \['B'\]"):
        load_task_data(str(h5), str(clinical), spec, "eagle")


def test_fewshot_sampling_is_seeded_and_per_class():
    y = np.array([0] * 10 + [1] * 6 + [2] * 8)
    a = fewshot_sample(y, 3, 4, seed=42)
    assert np.array_equal(a, fewshot_sample(y, 3, 4, seed=42))
    assert not np.array_equal(a, fewshot_sample(y, 3, 4, seed=43))
    assert list(np.bincount(y[a], minlength=3)) == [4, 4, 4]
    assert len(set(a)) == 12


def test_usable_shots_skips_k_that_leaves_no_test_patient(caplog):
    caplog.set_level(logging.INFO)
    y = np.array([0] * 5 + [1] * 9)
    assert usable_shots(y, ["A", "B"], [1, 2, 4, 5, 8], task="T") == [1, 2, 4]
    assert "task T: k=5 skipped: class 'A' has 5 training patient(s)" in caplog.text


def test_fewshot_test_sets_exclude_sampled_patients(cohort, tmp_path, caplog):
    h5, clinical, slides = cohort
    spec = validate_tasks({"BIN": task_config()}, read_clinical_table(clinical), slides)["BIN"]
    params = {"shots": [1, 4, 16], "repeats": 3, "C": 1.0, "max_iter": 1000, "seed": 42}
    caplog.set_level(logging.INFO)
    fewshot(
        str(h5),
        str(clinical),
        "eagle",
        spec.params(),
        params,
        predictions=str(tmp_path / "fewshot.csv"),
        samples=str(tmp_path / "samples.json"),
    )
    assert "k=16 skipped: class 'A' has 14 training patient(s)" in caplog.text
    table = pd.read_csv(tmp_path / "fewshot.csv", keep_default_na=False)
    drawn = json.loads((tmp_path / "samples.json").read_text())["samples"]
    assert [(d["k"], d["repeat"]) for d in drawn] == [(k, r) for k in (1, 4) for r in range(3)]
    labelled = 29
    for sample in drawn:
        rows = table[(table["k"] == sample["k"]) & (table["repeat"] == sample["repeat"])]
        internal = set(rows.loc[rows["set"] == "internal", "PATIENT"])
        assert not internal & set(sample["train"])
        assert len(internal) == labelled - len(sample["train"]) == labelled - 2 * sample["k"]
        assert set(rows.loc[rows["set"] == "external", "PATIENT"]) == {
            f"EXT-{i:03d}" for i in range(1, 13)
        }
    # the same seeds draw the same patients in a second run
    data = load_task_data(str(h5), str(clinical), spec, "eagle")
    again, samples = run_fewshot(
        data.subset(~data.external),
        data.subset(data.external),
        spec.classes,
        FewshotParams.from_params(params),
        "BIN",
    )
    assert [s["train"] for s in samples] == [d["train"] for d in drawn]
    np.testing.assert_allclose(again["prob_B"].to_numpy(), table["prob_B"].to_numpy())
