"""A task's data: patient embeddings with their labels, read from the cohort embeddings table."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from eagleflow.h5io import (
    EMBEDDINGS_FORMAT,
    validate_h5,
)
from eagleflow.sheets import read_clinical_table
from eagleflow.tasks import TaskError, TaskSpec

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    """One task's labelled patients and one embedding, ordered by patient id."""

    patients: np.ndarray
    cohorts: np.ndarray
    labels: np.ndarray
    y: np.ndarray
    x: np.ndarray
    external: np.ndarray
    attrs: dict[str, Any]

    def subset(self, mask: np.ndarray) -> TaskData:
        return TaskData(
            self.patients[mask],
            self.cohorts[mask],
            self.labels[mask],
            self.y[mask],
            self.x[mask],
            self.external[mask],
            self.attrs,
        )


def load_task_data(
    patients_h5: str, clinical_table: str, task: TaskSpec, embedding: str
) -> TaskData:
    """Patients of the task's cohorts with a label; counts of those left out go to the log."""
    attrs = validate_h5(
        patients_h5,
        EMBEDDINGS_FORMAT,
        {"patient": ("P",), "cohort": ("P",), embedding: ("P", None)},
    )
    import h5py

    with h5py.File(patients_h5, "r") as h5:
        patients = h5["patient"][()].astype(str)
        cohorts = h5["cohort"][()].astype(str)
        x = h5[embedding][()].astype(np.float32)
    clinical = read_clinical_table(clinical_table)
    if task.label not in clinical.columns:
        raise TaskError(
            f"task {task.name!r}: label column {task.label!r} is not in {clinical_table} "
            f"(columns: {list(clinical.columns)})"
        )
    labels = clinical[task.label].reindex(patients).fillna("").to_numpy(dtype=str)
    in_task = np.isin(cohorts, task.train_cohorts + task.external_cohorts)
    for cohort in task.train_cohorts + task.external_cohorts:
        members = cohorts == cohort
        if not members.any():
            raise TaskError(
                f"task {task.name!r}: cohort {cohort!r} has no patient in {patients_h5}; rerun the "
                "embedding stage or fix the task's cohorts."
            )
        missing = int(np.sum(members & (labels == "")))
        log.info(
            "task %s, cohort %s: %d patients with a %s label, %d without (left out)",
            task.name,
            cohort,
            int(members.sum()) - missing,
            task.label,
            missing,
        )
    keep = in_task & (labels != "")
    unknown = sorted({str(v) for v in labels[keep]} - set(task.classes))
    if unknown:
        raise TaskError(
            f"task {task.name!r}: column {task.label!r} has label(s) {unknown} that are not among "
            f"the task's classes {list(task.classes)}; the clinical table changed since the "
            "workflow started. Rerun Snakemake."
        )
    index = {c: i for i, c in enumerate(task.classes)}
    return TaskData(
        patients=patients[keep],
        cohorts=cohorts[keep],
        labels=labels[keep],
        y=np.array([index[v] for v in labels[keep]], dtype=np.int64),
        x=x[keep],
        external=np.isin(cohorts[keep], task.external_cohorts),
        attrs=attrs,
    )


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


def embedding_provenance(data: TaskData) -> dict[str, Any]:
    return {
        "embeddings_sha256": data.attrs.get("content_sha256"),
        "weights_demo": data.attrs.get("weights_demo", "false"),
        "demo_weights": data.attrs.get("demo_weights", "none"),
    }


def known_fields(cls: type, params: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a rule's `params` that are fields of dataclass `cls` (others belong elsewhere)."""
    known = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    return {k: v for k, v in params.items() if k in known}
