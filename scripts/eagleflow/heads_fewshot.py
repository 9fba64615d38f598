"""Few-shot logistic regression: k patients per class, seeded repeats, the rest held out."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from eagleflow.h5io import write_csv, write_json
from eagleflow.predictions import prediction_frame
from eagleflow.provenance import provenance_attrs
from eagleflow.task_data import TaskData, embedding_provenance, known_fields, load_task_data
from eagleflow.tasks import TaskSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FewshotParams:
    shots: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    repeats: int = 10
    C: float = 1.0
    max_iter: int = 10000
    seed: int = 42

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> FewshotParams:
        values = known_fields(cls, params)
        if "shots" in values:
            values["shots"] = tuple(int(k) for k in values["shots"])
        return cls(**values)


def fewshot_sample(y: np.ndarray, n_classes: int, k: int, seed: int) -> np.ndarray:
    """Indices of k patients per class, drawn without replacement (sorted)."""
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(y == c), size=k, replace=False) for c in range(n_classes)]
    return np.sort(np.concatenate(chosen))


def usable_shots(
    y: np.ndarray, classes: Sequence[str], shots: Sequence[int], task: str = "?"
) -> list[int]:
    """The k values that leave every class at least one test patient; the rest are logged."""
    counts = np.bincount(y, minlength=len(classes))
    usable = []
    for k in shots:
        short = [(classes[c], int(n)) for c, n in enumerate(counts) if n <= k]
        if short:
            cls, n = short[0]
            log.info(
                "task %s: k=%d skipped: class %r has %d training patient(s), so no test patient "
                "of it would remain",
                task,
                k,
                cls,
                n,
            )
        else:
            usable.append(int(k))
    return usable


def run_fewshot(
    train: TaskData, external: TaskData, classes: Sequence[str], params: FewshotParams, task: str
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Every (k, repeat): fit on the sample, predict the unsampled and the external patients."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    frames, samples = [], []
    for k in usable_shots(train.y, classes, params.shots, task):
        for repeat in range(params.repeats):
            seed = params.seed + repeat
            chosen = fewshot_sample(train.y, len(classes), k, seed)
            test = np.setdiff1d(np.arange(len(train.y)), chosen)
            model = LogisticRegression(
                solver="lbfgs",
                C=params.C,
                max_iter=params.max_iter,
                class_weight="balanced",
                random_state=seed,
            )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                model.fit(train.x[chosen], train.y[chosen])
            if any(issubclass(w.category, ConvergenceWarning) for w in caught):
                log.warning(
                    "k=%d, repeat %d: lbfgs did not converge in %d steps",
                    k,
                    repeat,
                    params.max_iter,
                )
            for set_name, part in (("internal", train.subset(test)), ("external", external)):
                if len(part.y) == 0:
                    continue
                frame = prediction_frame(part, model.predict_proba(part.x), classes)
                frame.insert(0, "set", set_name)
                frame.insert(0, "repeat", repeat)
                frame.insert(0, "k", k)
                frames.append(frame)
            samples.append(
                {"k": k, "repeat": repeat, "seed": seed, "train": train.patients[chosen].tolist()}
            )
    columns = ["k", "repeat", "set", "PATIENT", "COHORT", "LABEL", "pred"] + [
        f"prob_{c}" for c in classes
    ]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    return table, samples


def fewshot(
    patients_h5: str,
    clinical_table: str,
    embedding: str,
    task: Mapping[str, Any],
    params: Mapping[str, Any],
    predictions: str,
    samples: str,
) -> None:
    """The `heads_fewshot` rule: seeded few-shot logistic regression predictions."""
    spec = TaskSpec.from_params(task)
    fewshot_params = FewshotParams.from_params(params)
    data = load_task_data(patients_h5, clinical_table, spec, embedding)
    train, ext = data.subset(~data.external), data.subset(data.external)
    table, drawn = run_fewshot(train, ext, spec.classes, fewshot_params, spec.name)
    log.info(
        "task %s, %s embeddings: %d few-shot models (k = %s), %d training and %d external patients",
        spec.name,
        embedding,
        len(drawn),
        sorted({d["k"] for d in drawn}),
        len(train.y),
        len(ext.y),
    )
    if table.empty:
        log.warning(
            "task %s: no few-shot k is possible (smallest class has %d patients); the table is empty",
            spec.name,
            int(np.bincount(train.y).min()),
        )
    write_csv(table, predictions)
    write_json(
        {
            "task": spec.params(),
            "embedding": embedding,
            "samples": drawn,
            **embedding_provenance(data),
            "provenance": provenance_attrs("heads_fewshot", {"fewshot": asdict(fewshot_params)}),
        },
        samples,
    )
