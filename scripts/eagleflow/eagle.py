"""EAGLE: the top-k tiles by raw CHIEF attention, re-read from the slide and embedded by Virchow2.

Per slide we store the k tile embeddings with their scores and coordinates. A tile's raw score
depends on that tile only, so a patient's top-k lies within the union of its slides' top-k lists:
patient embeddings are built from the per-slide files without running Virchow2 again.

Ties are broken deterministically: higher raw score first, then (for patients) the slide id, then
the tile's row in the tiles file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from eagleflow.attention import ATTENTION_SHAPES
from eagleflow.batches import slides_to_compute, stage_params_sha256, write_manifest
from eagleflow.features import (
    GEOMETRY_ATTRS,
    TileGeometry,
    configure_torch,
    embed_slides,
    resolve_device,
)
from eagleflow.h5io import ATTENTION_FORMAT, TOPK_FORMAT, read_h5, validate_h5, write_h5
from eagleflow.provenance import provenance_attrs
from eagleflow.weights import resolve_configured

log = logging.getLogger(__name__)

EMBED_DIM = 1280
TOPK_SHAPES = {
    "tile_embeddings": ("K", EMBED_DIM),
    "coords": ("K", 2),
    "tile_index": ("K",),
    "attention_raw": ("K",),
    "embedding_mean": (EMBED_DIM,),
    "embedding_softmax": (EMBED_DIM,),
}


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k = min(k, N) highest scores; ties go to the lower index."""
    order = np.lexsort((np.arange(len(scores)), -scores.astype(np.float64)))
    return order[: min(k, len(scores))]


def softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values.astype(np.float64) - values.max())
    return shifted / shifted.sum()


def aggregate(tile_embeddings: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unweighted mean, softmax-over-selected-scores weighted mean) of the selected tiles."""
    mean = tile_embeddings.astype(np.float64).mean(0)
    weighted = (softmax(scores)[:, None] * tile_embeddings.astype(np.float64)).sum(0)
    return mean.astype(np.float32), weighted.astype(np.float32)


def run_virchow2_batch(
    slides: Sequence[dict[str, str]],
    model_cfg: dict[str, Any],
    params: dict[str, Any],
    manifest: str,
    threads: int = 1,
) -> None:
    """The `eagle_virchow2_topk` rule: for each slide {slide_id, slide_path, tiles, attention, output}."""
    from eagleflow.models import load_model, weights_attrs

    configure_torch(threads)
    info = resolve_configured("virchow2", model_cfg)
    top_k = int(params["top_k"])
    transpose = bool(params["reference_transpose"])
    params_sha256 = stage_params_sha256(
        "eagle_virchow2_topk", info.sha256, top_k=top_k, reference_transpose=transpose
    )
    stale = slides_to_compute(
        slides,
        "attention",
        lambda path: validate_h5(path, ATTENTION_FORMAT, ATTENTION_SHAPES),
        TOPK_FORMAT,
        TOPK_SHAPES,
        params_sha256,
        f"top-{top_k} embeddings",
    )
    todo = []
    for slide, attention_attrs in stale:
        data, _ = read_h5(slide["attention"])
        selected = top_k_indices(data["attention_raw"], top_k)
        geometry = TileGeometry.from_tiles_file(slide["tiles"], slide["slide_path"])
        if not np.array_equal(geometry.coords[selected], data["coords"][selected]):
            raise ValueError(f"{slide['slide_id']}: tiles and attention files disagree on coords")
        if len(selected) < top_k:
            log.warning(
                "%s: only %d tiles, fewer than top_k = %d: all are used",
                slide["slide_id"],
                len(selected),
                top_k,
            )
        todo.append((slide, attention_attrs, selected, data, geometry.subset(selected)))
    if todo:
        device = resolve_device(params["device"])
        model = load_model("virchow2", info, device=device)  # info: already hashed and checked
        for index, embeddings in embed_slides(
            model,
            "virchow2",
            [item[4] for item in todo],
            device,
            int(params["batch_size"]),
            int(params["num_workers"]),
            transpose=transpose,
            desc="Virchow2",
        ):
            slide, attention_attrs, selected, data, geometry = todo[index]
            scores = data["attention_raw"][selected]
            mean, weighted = aggregate(embeddings, scores)
            attrs = {
                "format": TOPK_FORMAT,
                "encoder": "virchow2",
                "embedding": "class token (1280)",
                "top_k": top_k,
                "k_used": len(selected),
                "tile_source": "re-read from the slide (same geometry as the tiles file)",
                "reference_transpose": transpose,
                "device": str(device),
                "precision": "fp32" if device.type == "cpu" else "bf16 autocast",
                **{key: attention_attrs[key] for key in GEOMETRY_ATTRS},
                **{
                    key: attention_attrs[key]
                    for key in attention_attrs
                    if key.startswith(("ctranspath_weights", "chief_weights"))
                },
                **weights_attrs(info),
                "params_sha256": params_sha256,
                "input_sha256": str(attention_attrs["content_sha256"]),
                **provenance_attrs("eagle_virchow2_topk", params),
            }
            write_h5(
                slide["output"],
                {
                    "tile_embeddings": embeddings.reshape(-1, EMBED_DIM),
                    "coords": geometry.coords,
                    "tile_index": selected.astype(np.int64),
                    "attention_raw": scores.astype(np.float32),
                    "embedding_mean": mean,
                    "embedding_softmax": weighted,
                },
                attrs,
            )
            log.info(
                "%s: top-%d tiles embedded -> %s", slide["slide_id"], len(selected), slide["output"]
            )
    write_manifest(manifest, slides, info.is_demo)


@dataclass
class SlideEmbeddings:
    """What the per-slide files hold for one slide, for patient aggregation."""

    slide_id: str
    chief: np.ndarray
    meanpool: np.ndarray
    n_tiles: int
    logsumexp: float
    topk_embeddings: np.ndarray
    topk_scores: np.ndarray
    topk_tile_index: np.ndarray
    eagle_mean: np.ndarray
    eagle_softmax: np.ndarray


def load_slide_embeddings(slide_id: str, attention_path: str, topk_path: str) -> SlideEmbeddings:
    attention, attention_attrs = read_h5(attention_path)
    topk, _ = read_h5(topk_path)
    return SlideEmbeddings(
        slide_id=slide_id,
        chief=attention["chief_embedding"],
        meanpool=attention["meanpool_embedding"],
        n_tiles=int(attention_attrs["n_tiles"]),
        logsumexp=float(attention_attrs["attention_logsumexp"]),
        topk_embeddings=topk["tile_embeddings"],
        topk_scores=topk["attention_raw"],
        topk_tile_index=topk["tile_index"],
        eagle_mean=topk["embedding_mean"],
        eagle_softmax=topk["embedding_softmax"],
    )


def patient_embeddings(slides: Sequence[SlideEmbeddings], top_k: int) -> dict[str, np.ndarray]:
    """A patient's embeddings from its slides, as if all its tiles formed one bag.

    eagle: top-k over all the patient's tiles (within the slides' top-k lists), mean and softmax
    variants; chief: softmax over all tiles (slides' softmaxes merged through their log-sum-exp);
    meanpool: tile-count-weighted mean.
    """
    slides = sorted(slides, key=lambda s: s.slide_id)
    scores = np.concatenate([s.topk_scores for s in slides])
    slide_rank = np.concatenate([np.full(len(s.topk_scores), i) for i, s in enumerate(slides)])
    tile_index = np.concatenate([s.topk_tile_index for s in slides])
    embeddings = np.concatenate([s.topk_embeddings for s in slides])
    order = np.lexsort((tile_index, slide_rank, -scores.astype(np.float64)))[:top_k]
    eagle_mean, eagle_softmax = aggregate(embeddings[order], scores[order])
    lse = np.array([s.logsumexp for s in slides])
    slide_weight = softmax(lse)  # share of the patient-level softmax mass held by each slide
    chief = (slide_weight[:, None] * np.stack([s.chief for s in slides]).astype(np.float64)).sum(0)
    counts = np.array([s.n_tiles for s in slides], dtype=np.float64)
    meanpool = (counts[:, None] * np.stack([s.meanpool for s in slides])).sum(0) / counts.sum()
    return {
        "eagle": eagle_mean,
        "eagle_softmax": eagle_softmax,
        "chief": chief.astype(np.float32),
        "meanpool": meanpool.astype(np.float32),
        "selected_slides": np.array([slides[i].slide_id for i in slide_rank[order]], dtype="S"),
        "selected_tile_index": tile_index[order],
    }
