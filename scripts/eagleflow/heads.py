"""Classification heads on patient embeddings: tasks, the EAGLE MLP with cross-validation, few-shot.

Labels are text, as the clinical table stores them ('' = missing): "1" and "1.0" would be two
classes, so `validate_tasks` rejects labels of one column that are the same number written
differently. Classes are sorted numerically when every label of a task is a number, else as text.
Everything runs on the CPU: the heads are tiny, and CPU results repeat exactly.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eagleflow.errors import EagleflowError
from eagleflow.h5io import (
    EMBEDDING_NAMES,
    EMBEDDINGS_FORMAT,
    atomic_path,
    atomic_write_bytes,
    validate_h5,
)
from eagleflow.provenance import provenance_attrs
from eagleflow.sheets import ID_PATTERN, read_clinical_table

log = logging.getLogger(__name__)

MISSING_LIKE = {"na", "n/a", "nan", "none", "null", "missing", "unknown", "-", "."}


class TaskError(EagleflowError, ValueError):
    """A task in the config cannot be run on the tables given; the message says why and what to do."""


@dataclass(frozen=True)
class TaskSpec:
    """A validated task: what reaches the head and evaluation rules through `params:`."""

    name: str
    label: str
    classes: tuple[str, ...]
    positive_class: str | None
    train_cohorts: tuple[str, ...]
    external_cohorts: tuple[str, ...]
    embeddings: tuple[str, ...]
    class_counts: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    @property
    def positive_index(self) -> int | None:
        return self.classes.index(self.positive_class) if self.positive_class else None

    def params(self) -> dict[str, Any]:
        """Plain data for Snakemake's `params:` (a change reruns the task's jobs)."""
        data = asdict(self)
        data.pop("class_counts")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> TaskSpec:
        return cls(
            name=params["name"],
            label=params["label"],
            classes=tuple(params["classes"]),
            positive_class=params.get("positive_class"),
            train_cohorts=tuple(params["train_cohorts"]),
            external_cohorts=tuple(params.get("external_cohorts") or ()),
            embeddings=tuple(params["embeddings"]),
        )


def _dataclass_fields_of(cls: type, params: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a rule's `params` that are fields of dataclass `cls` (others belong elsewhere)."""
    known = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    return {k: v for k, v in params.items() if k in known}


def _as_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def sort_classes(labels: Sequence[str]) -> tuple[str, ...]:
    """Unique labels, numerically sorted if all are numbers (so "2" < "10"), else as text."""
    unique = sorted(set(labels))
    numbers = [_as_number(v) for v in unique]
    if all(n is not None for n in numbers):
        return tuple(v for _, v in sorted(zip(numbers, unique, strict=True)))
    return tuple(unique)


def min_patients_per_class(folds: int) -> int:
    """Patients a class needs so that every outer training split keeps two for the inner split."""
    count = folds
    while count - math.ceil(count / folds) < 2:
        count += 1
    return count


def validate_tasks(
    tasks: Mapping[str, Mapping[str, Any]] | None,
    clinical: pd.DataFrame,
    slides: pd.DataFrame,
    folds: int = 5,
    clinical_path: str = "the clinical table",
) -> dict[str, TaskSpec]:
    """Check every task against the sheets; return name -> TaskSpec, or raise listing all problems.

    `clinical` is `read_clinical_table`'s frame, `slides` `read_slide_sheet`'s (PATIENT, COHORT).
    A patient belongs to the cohort of its slides; patients without slides are in no cohort.
    """
    problems: list[str] = []
    specs: dict[str, TaskSpec] = {}
    cohort_of = slides.groupby("PATIENT")["COHORT"].first()
    cohorts = sorted(set(slides["COHORT"]))
    needed = min_patients_per_class(folds)
    for name, cfg in (tasks or {}).items():
        where = f"task {name!r}"
        if not re.fullmatch(ID_PATTERN, name) or "." in name:
            problems.append(
                f"{where}: task names become file names; use letters, digits, '_' and '-' only"
            )
            continue
        label = cfg.get("label", name)
        train = list(cfg.get("train_cohorts") or [])
        external = list(cfg.get("external_cohorts") or [])
        embeddings = list(cfg.get("embeddings") or EMBEDDING_NAMES)
        before = len(problems)
        if label == "PATIENT" or label not in clinical.columns:
            columns = [c for c in clinical.columns if c != "PATIENT"]
            problems.append(
                f"{where}: label column {label!r} is not in {clinical_path} (label columns: "
                f"{columns}). Set tasks.{name}.label to one of them."
            )
        if not train:
            problems.append(f"{where}: train_cohorts is empty; name one or more of {cohorts}")
        for kind, names in (("train", train), ("external", external)):
            for cohort in sorted(set(names) - set(cohorts)):
                problems.append(
                    f"{where}: {kind} cohort {cohort!r} is not a COHORT of the slide sheet "
                    f"(cohorts: {cohorts}). Fix tasks.{name}.{kind}_cohorts."
                )
        for cohort in sorted(set(train) & set(external)):
            problems.append(
                f"{where}: cohort {cohort!r} is both a train and an external cohort; an external "
                "cohort must be unseen in training. Remove it from one of the lists."
            )
        unknown = [e for e in embeddings if e not in EMBEDDING_NAMES]
        if unknown:
            problems.append(
                f"{where}: unknown embedding(s) {unknown}; choose from {list(EMBEDDING_NAMES)}"
            )
        if len(set(embeddings)) != len(embeddings):
            problems.append(f"{where}: embeddings {embeddings} lists one twice")
        if len(problems) > before:
            continue
        labels = clinical[label].astype(str)
        patient_cohort = clinical["PATIENT"].map(cohort_of)
        in_train = patient_cohort.isin(train) & (labels != "")
        train_labels = labels[in_train]
        classes = sort_classes(list(train_labels))
        by_number: dict[float, set[str]] = {}
        for value in set(labels[labels != ""]):
            number = _as_number(value)
            if number is not None:
                by_number.setdefault(number, set()).add(value)
        for spellings in by_number.values():
            if len(spellings) > 1:
                problems.append(
                    f"{where}: column {label!r} has the labels {sorted(spellings)}, one number "
                    "written differently; labels are compared as text, so write them the same way."
                )
        odd = sorted(c for c in classes if c.lower() in MISSING_LIKE)
        if odd:
            log.warning(
                "%s: column %r has the class(es) %s, which look like missing values; only empty "
                "cells count as missing. Blank them if they mean 'unknown'.",
                where,
                label,
                odd,
            )
        if len(classes) == 0:
            problems.append(
                f"{where}: no patient of the train cohorts {train} has a {label!r} label in "
                f"{clinical_path}; fill in the column or fix the cohorts."
            )
            continue
        if len(classes) == 1:
            problems.append(
                f"{where}: column {label!r} has a single class ({classes[0]!r}) among the "
                f"{len(train_labels)} labelled patients of cohorts {train}; a classifier needs two "
                "or more. Check the column and the cohorts."
            )
            continue
        counts = train_labels.value_counts()
        for cls in classes:
            count = int(counts.get(cls, 0))
            if count < needed:
                why = (
                    f"fewer than the {folds} cross-validation folds"
                    if count < folds
                    else f"too few to leave two per class for the inner validation split in every "
                    f"fold (needs {needed})"
                )
                problems.append(
                    f"{where}: class {cls!r} of column {label!r} has {count} patient(s) in the "
                    f"train cohorts {train}, {why}. Lower heads.mlp.folds or drop the class "
                    f"(blank its labels in {clinical_path})."
                )
        if external:
            in_external = patient_cohort.isin(external) & (labels != "")
            foreign = sorted(set(labels[in_external]) - set(classes))
            if foreign:
                problems.append(
                    f"{where}: external cohort(s) {external} have label(s) {foreign} in column "
                    f"{label!r} that no training patient has; the model cannot predict them. "
                    "Blank those labels or add the class to the training cohorts."
                )
        positive = cfg.get("positive_class")
        if positive is not None:
            positive = str(positive)
            if len(classes) != 2:
                problems.append(
                    f"{where}: positive_class is set, but column {label!r} has {len(classes)} "
                    f"classes {list(classes)}; remove positive_class (multiclass metrics are macro)."
                )
            elif positive not in classes:
                problems.append(
                    f"{where}: positive_class {positive!r} is not a class of column {label!r} "
                    f"(classes: {list(classes)})"
                )
        elif len(classes) == 2:
            positive = classes[1]
        specs[name] = TaskSpec(
            name=name,
            label=label,
            classes=classes,
            positive_class=positive if len(classes) == 2 else None,
            train_cohorts=tuple(train),
            external_cohorts=tuple(external),
            embeddings=tuple(embeddings),
            class_counts={c: int(counts.get(c, 0)) for c in classes},
        )
    if problems:
        raise TaskError(
            f"the tasks in the config have {len(problems)} problem(s):\n  - "
            + "\n  - ".join(problems)
        )
    return specs


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


# ---------------------------------------------------------------------------------------------
# MLP (EAGLE's classifiers/mlp_classifier.py, fastai fit_one_cycle re-expressed in plain torch)


@dataclass(frozen=True)
class MLPParams:
    hidden: int = 256
    dropout: float = 0.5
    lr: float = 1e-4
    weight_decay: float = 1e-2
    epochs: int = 32
    patience: int = 8
    batch_size: int = 64
    folds: int = 5
    seed: int = 1337
    inner_val_fraction: float = 0.2
    # fastai's fit_one_cycle defaults, which EAGLE does not override
    div: float = 25.0
    div_final: float = 1e5
    pct_start: float = 0.25

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> MLPParams:
        return cls(**_dataclass_fields_of(cls, params))


def make_mlp(in_features: int, n_classes: int, hidden: int = 256, dropout: float = 0.5) -> Any:
    """Linear(d, hidden) -> SiLU -> Dropout -> Linear(hidden, classes), as in EAGLE."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.SiLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, n_classes),
    )


def train_mlp(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_valid: np.ndarray,
    y_valid: np.ndarray,
    n_classes: int,
    params: MLPParams,
    seed: int,
) -> tuple[Any, list[dict[str, float]]]:
    """Train one head; return the model of the best validation epoch and the per-epoch history."""
    import torch
    from sklearn.utils.class_weight import compute_class_weight
    from torch import nn

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = make_mlp(x_train.shape[1], n_classes, params.hidden, params.dropout)
    weights = compute_class_weight("balanced", classes=np.arange(n_classes), y=y_train)
    train_loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32))
    # EAGLE validates with batch size 1, where the weighted mean of one sample is its plain loss:
    # its validation loss (early stopping, best epoch) is the unweighted mean.
    valid_loss_fn = nn.CrossEntropyLoss()
    xt = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    xv = torch.from_numpy(np.ascontiguousarray(x_valid, dtype=np.float32))
    yv = torch.from_numpy(np.asarray(y_valid, dtype=np.int64))
    n = len(xt)
    # fastai drops the last incomplete training batch; a cohort smaller than one batch keeps all
    steps = max(1, n // params.batch_size)
    size = params.batch_size if n >= params.batch_size else n
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=params.lr, weight_decay=params.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=params.lr,
        total_steps=params.epochs * steps,
        pct_start=params.pct_start,
        div_factor=params.div,
        final_div_factor=params.div_final,
        anneal_strategy="cos",
        cycle_momentum=True,
        base_momentum=0.85,
        max_momentum=0.95,
    )
    best_loss, best_state, best_epoch, wait = math.inf, None, -1, 0
    history: list[dict[str, float]] = []
    for epoch in range(params.epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        losses = []
        for step in range(steps):
            batch = order[step * size : (step + 1) * size]
            optimizer.zero_grad()
            loss = train_loss_fn(model(xt[batch]), yt[batch])
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            valid_loss = float(valid_loss_fn(model(xv), yv))
        improved = valid_loss < best_loss
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "valid_loss": valid_loss,
                "lr": float(scheduler.get_last_lr()[0]),
                "improved": improved,
            }
        )
        if improved:
            best_loss, best_epoch, wait = valid_loss, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            wait += 1
            if wait >= params.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    for row in history:
        row["best"] = row["epoch"] == best_epoch
    return model, history


def predict_proba(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    if len(x) == 0:
        return np.zeros((0, model[-1].out_features))
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return torch.softmax(logits, dim=1).double().numpy()


@dataclass
class Fold:
    fold: int
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


def crossval_folds(y: np.ndarray, folds: int, seed: int, inner_val_fraction: float) -> list[Fold]:
    """Stratified outer folds over patients, each with a stratified inner train/validation split.

    The inner validation set holds at least one patient per class, and the inner training set
    keeps at least one per class; fewer would be a validation error raised earlier.
    """
    from sklearn.model_selection import StratifiedKFold, train_test_split

    n_classes = int(y.max()) + 1
    outer = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    result = []
    for k, (train_idx, test_idx) in enumerate(outer.split(np.zeros(len(y)), y)):
        n_valid = max(math.ceil(inner_val_fraction * len(train_idx)), n_classes)
        inner_train, inner_valid = train_test_split(
            train_idx, test_size=n_valid, stratify=y[train_idx], random_state=seed
        )
        result.append(Fold(k, np.sort(inner_train), np.sort(inner_valid), np.sort(test_idx)))
    return result


@dataclass
class CrossvalResult:
    folds: list[Fold]
    test_proba: np.ndarray  # (N, C): held-out prediction of each patient by its fold's model
    test_fold: np.ndarray  # (N,)
    external_proba: np.ndarray  # (folds, M, C): every fold model on the external patients
    history: list[dict[str, Any]]


def run_crossval(
    x: np.ndarray, y: np.ndarray, x_external: np.ndarray, n_classes: int, params: MLPParams
) -> CrossvalResult:
    """EAGLE's protocol: stratified k-fold over patients, one head per fold, per-fold deployment."""
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    folds = crossval_folds(y, params.folds, params.seed, params.inner_val_fraction)
    test_proba = np.full((len(y), n_classes), math.nan)
    test_fold = np.full(len(y), -1)
    external = np.zeros((len(folds), len(x_external), n_classes))
    history: list[dict[str, Any]] = []
    for fold in folds:
        model, fold_history = train_mlp(
            x[fold.train],
            y[fold.train],
            x[fold.valid],
            y[fold.valid],
            n_classes,
            params,
            seed=params.seed + fold.fold,
        )
        test_proba[fold.test] = predict_proba(model, x[fold.test])
        test_fold[fold.test] = fold.fold
        external[fold.fold] = predict_proba(model, x_external)
        history.extend({"fold": fold.fold, **row} for row in fold_history)
        best = next(r for r in fold_history if r["best"])
        log.info(
            "fold %d: %d train, %d valid, %d test patients; best epoch %d of %d (valid loss %.4f)",
            fold.fold,
            len(fold.train),
            len(fold.valid),
            len(fold.test),
            best["epoch"],
            len(fold_history),
            best["valid_loss"],
        )
    return CrossvalResult(folds, test_proba, test_fold, external, history)


def _prediction_frame(data: TaskData, proba: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
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


def write_csv(frame: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_json(data: Any, path: str | Path) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1, default=str) + "\n").encode())


def _embedding_provenance(data: TaskData) -> dict[str, Any]:
    return {
        "embeddings_sha256": data.attrs.get("content_sha256"),
        "weights_demo": data.attrs.get("weights_demo", "false"),
        "demo_weights": data.attrs.get("demo_weights", "none"),
    }


def mlp_crossval(
    patients_h5: str,
    clinical_table: str,
    embedding: str,
    task: Mapping[str, Any],
    params: Mapping[str, Any],
    predictions: str,
    external: str,
    external_folds: str,
    splits: str,
    history: str,
    threads: int = 1,
) -> None:
    """The `heads_mlp_crossval` rule: held-out, per-fold external and ensemble predictions."""
    import torch

    torch.set_num_threads(max(1, threads))
    spec = TaskSpec.from_params(task)
    mlp = MLPParams.from_params(params)
    data = load_task_data(patients_h5, clinical_table, spec, embedding)
    train, ext = data.subset(~data.external), data.subset(data.external)
    log.info(
        "task %s, %s embeddings (%d-d): %d training and %d external patients, %d folds",
        spec.name,
        embedding,
        data.x.shape[1],
        len(train.y),
        len(ext.y),
        mlp.folds,
    )
    result = run_crossval(train.x, train.y, ext.x, len(spec.classes), mlp)
    held_out = _prediction_frame(train, result.test_proba, spec.classes)
    held_out.insert(3, "fold", result.test_fold)
    write_csv(held_out, predictions)
    write_csv(_prediction_frame(ext, result.external_proba.mean(axis=0), spec.classes), external)
    per_fold = [
        _prediction_frame(ext, result.external_proba[f.fold], spec.classes).assign(fold=f.fold)
        for f in result.folds
    ]
    write_csv(pd.concat(per_fold, ignore_index=True), external_folds)
    write_csv(pd.DataFrame(result.history), history)
    write_json(
        {
            "task": spec.params(),
            "embedding": embedding,
            "folds": [
                {
                    "fold": f.fold,
                    "train": train.patients[f.train].tolist(),
                    "valid": train.patients[f.valid].tolist(),
                    "test": train.patients[f.test].tolist(),
                }
                for f in result.folds
            ],
            "external_patients": ext.patients.tolist(),
            **_embedding_provenance(data),
            "provenance": provenance_attrs("heads_mlp_crossval", {"mlp": asdict(mlp)}),
        },
        splits,
    )


# ---------------------------------------------------------------------------------------------
# Few-shot logistic regression (EAGLE's classifiers/lp_classifier.py)


@dataclass(frozen=True)
class FewshotParams:
    shots: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    repeats: int = 10
    C: float = 1.0
    max_iter: int = 10000
    seed: int = 42

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> FewshotParams:
        values = _dataclass_fields_of(cls, params)
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
                frame = _prediction_frame(part, model.predict_proba(part.x), classes)
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
            **_embedding_provenance(data),
            "provenance": provenance_attrs("heads_fewshot", {"fewshot": asdict(fewshot_params)}),
        },
        samples,
    )
