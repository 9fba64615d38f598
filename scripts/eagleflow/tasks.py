"""Tasks: which label, classes, cohorts and embeddings each classification task uses.

Validated at planning time, so a sheet or config mistake stops the run before any slide does.
Labels are text, as the clinical table stores them ('' = missing): "1" and "1.0" would be two
classes, so `validate_tasks` rejects labels of one column that are the same number written
differently. Classes are sorted numerically when every label of a task is a number, else as text.
A task with a `stain` uses only the patients with a slide of that stain, and their embeddings
built from those slides alone (table `TaskSpec.embeddings_table`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from eagleflow.encoders import DEFAULT_EMBEDDING_NAMES, DEFAULT_STAIN, STAINS
from eagleflow.errors import EagleflowError
from eagleflow.sheets import ID_PATTERN, normalise_stain

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
    stain: str | None = None
    class_counts: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    @property
    def positive_index(self) -> int | None:
        return self.classes.index(self.positive_class) if self.positive_class else None

    @property
    def embeddings_table(self) -> str:
        """Stem of the patient embeddings file the task reads: 'patients' or 'patients_<stain>'."""
        return "patients" if self.stain is None else f"patients_{self.stain}"

    def params(self) -> dict[str, Any]:
        """Plain data for Snakemake's `params:` (a change reruns the task's jobs).

        `stain` is left out while unset, so tasks written before it existed keep their params
        (and their results); setting it changes them.
        """
        data = asdict(self)
        data.pop("class_counts")
        if data["stain"] is None:
            data.pop("stain")
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
            stain=params.get("stain"),
        )


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
    embedding_names: Sequence[str] = DEFAULT_EMBEDDING_NAMES,
) -> dict[str, TaskSpec]:
    """Check every task against the sheets; return name -> TaskSpec, or raise listing all problems.

    `clinical` is `read_clinical_table`'s frame, `slides` `read_slide_sheet`'s (PATIENT, COHORT
    and STAIN; a frame without STAIN is all DEFAULT_STAIN). A patient belongs to the cohort of its
    slides; patients without slides are in no cohort. A task with a `stain` sees only the slides
    of that stain, so patients without one are in none of its cohorts.
    """
    problems: list[str] = []
    specs: dict[str, TaskSpec] = {}
    slide_stain = (
        slides["STAIN"]
        if "STAIN" in slides.columns
        else pd.Series(DEFAULT_STAIN, index=slides.index)
    )
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
        embeddings = list(cfg.get("embeddings") or embedding_names)
        stain = cfg.get("stain")
        before = len(problems)
        if stain is not None:
            stain = normalise_stain(str(stain)) if str(stain).strip() else None
            if stain is None:
                problems.append(
                    f"{where}: stain {cfg['stain']!r} is not one of {list(STAINS)}; set "
                    f"tasks.{name}.stain to one of them, or remove it to use every slide."
                )
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
        unknown = [e for e in embeddings if e not in embedding_names]
        if unknown:
            problems.append(
                f"{where}: unknown embedding(s) {unknown}; this config makes {list(embedding_names)}"
                + (" ('meanpool' is now 'meanpool_ctranspath')" if "meanpool" in unknown else "")
            )
        if len(set(embeddings)) != len(embeddings):
            problems.append(f"{where}: embeddings {embeddings} lists one twice")
        if len(problems) > before:
            continue
        task_cohort_of = cohort_of
        scope = ""  # what the messages below add about the patients a stain leaves
        if stain is not None:
            stained = slides[slide_stain == stain]
            task_cohort_of = stained.groupby("PATIENT")["COHORT"].first()
            scope = f" with {stain} slides"
            present = sorted(set(slide_stain))
            for kind, names in (("train", train), ("external", external)):
                for cohort in names:
                    if not (stained["COHORT"] == cohort).any():
                        problems.append(
                            f"{where}: no patient of {kind} cohort {cohort!r} has a slide with "
                            f"STAIN {stain} in the slide sheet (stains there: {present}). Add "
                            f"{stain} slides, drop the cohort from tasks.{name}.{kind}_cohorts, "
                            f"or change tasks.{name}.stain."
                        )
            if len(problems) > before:
                continue
        labels = clinical[label].astype(str)
        patient_cohort = clinical["PATIENT"].map(task_cohort_of)
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
                f"{where}: no patient{scope} of the train cohorts {train} has a {label!r} label "
                f"in {clinical_path}; fill in the column or fix the cohorts."
            )
            continue
        if len(classes) == 1:
            problems.append(
                f"{where}: column {label!r} has a single class ({classes[0]!r}) among the "
                f"{len(train_labels)} labelled patients{scope} of cohorts {train}; a classifier "
                f"needs two or more. Check the column and the cohorts{scope and ' (or the stain)'}."
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
                    f"{where}: class {cls!r} of column {label!r} has {count} patient(s){scope} "
                    f"in the train cohorts {train}, {why}. Lower heads.mlp.folds or drop the class "
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
            stain=stain,
            class_counts={c: int(counts.get(c, 0)) for c in classes},
        )
    if problems:
        raise TaskError(
            f"the tasks in the config have {len(problems)} problem(s):\n  - "
            + "\n  - ".join(problems)
        )
    return specs
