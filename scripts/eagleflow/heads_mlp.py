"""EAGLE's MLP head: stratified cross-validation on the training cohorts, fold models deployed externally.

Runs on the CPU: the head is tiny, and CPU results repeat exactly.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from eagleflow.h5io import write_csv, write_json
from eagleflow.predictions import prediction_frame
from eagleflow.provenance import provenance_attrs
from eagleflow.task_data import embedding_provenance, known_fields, load_task_data
from eagleflow.tasks import TaskSpec

log = logging.getLogger(__name__)


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
        return cls(**known_fields(cls, params))


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
    held_out = prediction_frame(train, result.test_proba, spec.classes)
    held_out.insert(3, "fold", result.test_fold)
    write_csv(held_out, predictions)
    write_csv(prediction_frame(ext, result.external_proba.mean(axis=0), spec.classes), external)
    per_fold = [
        prediction_frame(ext, result.external_proba[f.fold], spec.classes).assign(fold=f.fold)
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
            **embedding_provenance(data),
            "provenance": provenance_attrs("heads_mlp_crossval", {"mlp": asdict(mlp)}),
        },
        splits,
    )
