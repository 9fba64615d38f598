"""CHIEF over a slide's CTransPath features -> raw attention, its softmax and the slide embedding.

Per slide we also keep what patient-level aggregation needs without re-reading features: the
log-sum-exp of the raw scores (to merge softmaxes across slides exactly).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from eagleflow.encoders import SELECTION_ENCODER, TILE_ENCODERS
from eagleflow.feature_files import read_tile_features, validate_tile_features
from eagleflow.features import GEOMETRY_ATTRS
from eagleflow.h5io import ATTENTION_FORMAT
from eagleflow.model_stage import Models, Pending, StageOutput, run_model_stage

log = logging.getLogger(__name__)

ATTENTION_SHAPES = {
    "attention_raw": ("N",),
    "attention_softmax": ("N",),
    "coords_level0_px": ("N", 2),
    "chief_embedding": (768,),
}


def run_chief_batch(
    slides: Sequence[dict[str, str]],
    model_cfg: dict[str, Any],
    manifest: str,
    threads: int = 1,
) -> None:
    """The `attention_chief` rule: for each slide {slide_id, features, output}."""
    dim = TILE_ENCODERS[SELECTION_ENCODER].dim

    def compute(todo: list[Pending], models: Models):
        for p in todo:
            feats_np, coords, _ = read_tile_features(p.slide["features"])
            started = time.perf_counter()
            feats = torch.from_numpy(feats_np.astype(np.float32))
            with torch.inference_mode():
                result = models["chief"](feats)
            raw = result.attention_raw.numpy().astype(np.float32)
            attrs = {
                "format": ATTENTION_FORMAT,
                "aggregator": "chief",
                "n_tiles": len(raw),
                "attention_logsumexp": float(torch.logsumexp(result.attention_raw, 0)),
                **{key: p.input_attrs[key] for key in GEOMETRY_ATTRS},
                "slide_forwards": 1,
                "compute_seconds": time.perf_counter() - started,
            }
            datasets = {
                "attention_raw": raw,
                "attention_softmax": result.attention_softmax.numpy().astype(np.float32),
                "coords_level0_px": coords,
                "chief_embedding": result.slide_embedding.numpy().astype(np.float32),
            }
            yield p, datasets, attrs

    run_model_stage(
        "attention_chief",
        slides,
        input_key="features",
        read_input=lambda path: validate_tile_features(path, dim),
        model_of=lambda slide: "chief",
        models_cfg={"chief": model_cfg},
        settings={"aggregator": "chief"},
        output=StageOutput(ATTENTION_FORMAT, ATTENTION_SHAPES),
        compute=compute,
        manifest=manifest,
        threads=threads,
        what="CHIEF attention",
    )
