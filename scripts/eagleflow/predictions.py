"""The heads' prediction tables: one row per patient and set, one probability column per class.

Written by the heads, read by the metrics and the figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from eagleflow.errors import EagleflowError
from eagleflow.task_data import TaskData
from eagleflow.tasks import TaskSpec


class EvaluationError(EagleflowError, ValueError):
    """Predictions do not match the task they are evaluated for."""


def prediction_frame(data: TaskData, proba: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "PATIENT": data.patients,
            "COHORT": data.cohorts,
            "LABEL": data.labels,
            "pred": np.asarray(classes, dtype=object)[np.argmax(proba, axis=1)]
            if len(proba)
            else np.array([], dtype=object),
        }
    )
    for i, cls in enumerate(classes):
        frame[f"prob_{cls}"] = proba[:, i]
    return frame


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


def external_sets(frame: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """(set name, row mask) per external cohort, in cohort order."""
    return [(f"external:{c}", frame["COHORT"] == c) for c in sorted(set(frame["COHORT"]))]
