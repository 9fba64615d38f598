"""EAGLE: the top-k tiles by raw CHIEF attention, re-read from the slide and embedded by the
second-stage encoder (Virchow2 by default; any tile encoder, as the paper's `eaglefm` variants).

Per slide we store the K = max(top_k) tile embeddings, sorted by score, with their scores and
coordinates, so every k <= K (the paper's 5/10/25/50/100 ablation) is the first k rows. A tile's
raw score depends on that tile only, so a patient's top-k lies within the union of its slides'
top-K lists: patient embeddings are built from the per-slide files without another forward.

Ties are broken deterministically: higher raw score first, then (for patients) the slide id, then
the tile's row in the tiles file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from eagleflow.attention import ATTENTION_SHAPES
from eagleflow.encoders import DEFAULT_STAIN, TILE_ENCODERS
from eagleflow.features import GEOMETRY_ATTRS, TileGeometry, embed_slides, warn_untrained_stains
from eagleflow.h5io import ATTENTION_FORMAT, TOPK_FORMAT, read_h5, validate_h5
from eagleflow.model_stage import Models, Pending, StageOutput, run_model_stage

log = logging.getLogger(__name__)


def topk_shapes(dim: int | None) -> dict[str, tuple[int | str | None, ...]]:
    return {
        "tile_embeddings": ("K", dim),
        "coords_level0_px": ("K", 2),
        "tile_index": ("K",),
        "attention_raw": ("K",),
        "embedding_mean": (dim,),
        "embedding_softmax": (dim,),
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


def run_topk_batch(
    encoder: str,
    slides: Sequence[dict[str, str]],
    models_cfg: Mapping[str, Mapping[str, Any]],
    params: dict[str, Any],
    manifest: str,
    threads: int = 1,
) -> None:
    """The `eagle_embed_topk` rule for one second-stage encoder.

    slides: {slide_id, slide_path, tiles, attention, output, stain}; params: top_k (the largest
    k), reference_transpose and the runtime settings.
    """
    spec = TILE_ENCODERS[encoder]
    top_k = int(params["top_k"])
    transpose = bool(params["reference_transpose"])

    def compute(todo: list[Pending], models: Models):
        warn_untrained_stains(encoder, todo)
        for model_name in dict.fromkeys(p.model for p in todo):
            group = []
            for p in (p for p in todo if p.model == model_name):
                data, _ = read_h5(p.slide["attention"])
                selected = top_k_indices(data["attention_raw"], top_k)
                geometry = TileGeometry.from_tiles_file(p.slide["tiles"], p.slide["slide_path"])
                if not np.array_equal(
                    geometry.coords[selected], data["coords_level0_px"][selected]
                ):
                    raise ValueError(
                        f"{p.slide['slide_id']}: tiles and attention files disagree on coords"
                    )
                if len(selected) < top_k:
                    log.warning(
                        "%s: only %d tiles, fewer than top_k = %d: all are used",
                        p.slide["slide_id"],
                        len(selected),
                        top_k,
                    )
                group.append(
                    (p, selected, data["attention_raw"][selected], geometry.subset(selected))
                )
            for index, embeddings, seconds in embed_slides(
                models[model_name],
                model_name,
                [item[3] for item in group],
                models.device,
                int(params["batch_size"]),
                int(params["num_workers"]),
                transpose=transpose,
                desc=f"{encoder} top-{top_k}",
            ):
                p, selected, scores, geometry = group[index]
                embeddings = embeddings.reshape(-1, spec.dim)
                mean, weighted = aggregate(embeddings, scores)
                attrs = {
                    "format": TOPK_FORMAT,
                    "encoder": encoder,
                    "embedding": f"{encoder} tile embedding ({spec.dim})",
                    "top_k": top_k,
                    "k_used": len(selected),
                    "tile_source": "re-read from the slide (same geometry as the tiles file)",
                    "reference_transpose": transpose,
                    **{key: p.input_attrs[key] for key in GEOMETRY_ATTRS},
                    "stain": p.slide.get("stain", DEFAULT_STAIN),
                    "tile_forwards": len(selected),
                    "compute_seconds": seconds,
                }
                datasets = {
                    "tile_embeddings": embeddings,
                    "coords_level0_px": geometry.coords,
                    "tile_index": selected.astype(np.int64),
                    "attention_raw": scores.astype(np.float32),
                    "embedding_mean": mean,
                    "embedding_softmax": weighted,
                }
                yield p, datasets, attrs

    run_model_stage(
        "eagle_embed_topk",
        slides,
        input_key="attention",
        read_input=lambda path: validate_h5(path, ATTENTION_FORMAT, ATTENTION_SHAPES),
        model_of=lambda slide: spec.model_for(slide.get("stain", DEFAULT_STAIN)),
        models_cfg=models_cfg,
        settings={"encoder": encoder, "top_k": top_k, "reference_transpose": transpose},
        output=StageOutput(TOPK_FORMAT, topk_shapes(spec.dim)),
        compute=compute,
        manifest=manifest,
        device=params["device"],
        threads=threads,
        what=f"top-{top_k} {encoder} embeddings",
    )
