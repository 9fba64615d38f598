"""Cohort tables of slide and patient embeddings (EAGLE, CHIEF, mean-pooled CTransPath)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from eagleflow.batches import read_manifest
from eagleflow.eagle import SlideEmbeddings, load_slide_embeddings, patient_embeddings
from eagleflow.h5io import EMBEDDING_NAMES, EMBEDDINGS_FORMAT, read_attrs, write_h5  # noqa: F401
from eagleflow.provenance import provenance_attrs

log = logging.getLogger(__name__)


def _demo_models(paths: Sequence[str]) -> list[str]:
    """Models that ran with demo weights for any of these files."""
    demo = set()
    for path in paths:
        attrs = read_attrs(path)
        for model in ("ctranspath", "chief", "virchow2"):
            if attrs.get(f"{model}_weights_demo") == "true":
                demo.add(model)
    return sorted(demo)


def build_cohort_embeddings(
    slides: Sequence[dict[str, str]],
    attention_manifests: Sequence[str],
    topk_manifests: Sequence[str],
    params: dict[str, Any],
    slides_h5: str,
    patients_h5: str,
) -> None:
    """The `embeddings_collect` rule: slides = [{slide_id, patient, cohort}] from the sheet."""
    attention = {k: v for m in attention_manifests for k, v in read_manifest(m).items()}
    topk = {k: v for m in topk_manifests for k, v in read_manifest(m).items()}
    aggregation = params["aggregation"]
    per_slide: dict[str, SlideEmbeddings] = {}
    for slide in sorted(slides, key=lambda s: s["slide_id"]):
        sid = slide["slide_id"]
        per_slide[sid] = load_slide_embeddings(sid, attention[sid], topk[sid])
    demo = _demo_models([topk[s] for s in per_slide])
    if demo:
        log.warning("embeddings made with random DEMO weights of %s: not results", ", ".join(demo))
    common = {
        "format": EMBEDDINGS_FORMAT,
        "eagle_aggregation": aggregation,
        "top_k": int(params["top_k"]),
        "demo_weights": ",".join(demo) if demo else "none",
        "weights_demo": "true" if demo else "false",
        **provenance_attrs("embeddings_collect", params),
    }
    ordered = sorted(slides, key=lambda s: s["slide_id"])
    slide_data: dict[str, np.ndarray] = {
        "slide": np.array([s["slide_id"] for s in ordered], dtype="S"),
        "patient": np.array([s["patient"] for s in ordered], dtype="S"),
        "cohort": np.array([s["cohort"] for s in ordered], dtype="S"),
        "eagle": np.stack(
            [
                per_slide[s["slide_id"]].eagle_mean
                if aggregation == "mean"
                else per_slide[s["slide_id"]].eagle_softmax
                for s in ordered
            ]
        ),
        "chief": np.stack([per_slide[s["slide_id"]].chief for s in ordered]),
        "meanpool": np.stack([per_slide[s["slide_id"]].meanpool for s in ordered]),
        "n_tiles": np.array([per_slide[s["slide_id"]].n_tiles for s in ordered], dtype=np.int64),
    }
    write_h5(slides_h5, slide_data, {**common, "level": "slide"})
    patients = sorted({s["patient"] for s in ordered})
    rows = []
    for patient in patients:
        members = [per_slide[s["slide_id"]] for s in ordered if s["patient"] == patient]
        rows.append(patient_embeddings(members, int(params["top_k"])))
    cohort_of = {s["patient"]: s["cohort"] for s in ordered}
    patient_data: dict[str, np.ndarray] = {
        "patient": np.array(patients, dtype="S"),
        "cohort": np.array([cohort_of[p] for p in patients], dtype="S"),
        "eagle": np.stack([r["eagle" if aggregation == "mean" else "eagle_softmax"] for r in rows]),
        "chief": np.stack([r["chief"] for r in rows]),
        "meanpool": np.stack([r["meanpool"] for r in rows]),
        "n_slides": np.array(
            [sum(s["patient"] == p for s in ordered) for p in patients], dtype=np.int64
        ),
    }
    write_h5(patients_h5, patient_data, {**common, "level": "patient"})
    log.info(
        "%d slides, %d patients -> %s, %s", len(ordered), len(patients), slides_h5, patients_h5
    )
