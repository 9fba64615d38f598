"""CHIEF over a slide's CTransPath features -> raw attention, its softmax and the slide embeddings.

Per slide we also keep what patient-level aggregation needs without re-reading features: the
log-sum-exp of the raw scores (to merge softmaxes across slides exactly) and the mean-pooled
CTransPath feature with its tile count.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from eagleflow.batches import slides_to_compute, stage_params_sha256, write_manifest
from eagleflow.features import FEATURES_SHAPES, GEOMETRY_ATTRS, configure_torch
from eagleflow.h5io import (
    ATTENTION_FORMAT,
    FEATURES_FORMAT,
    read_h5,
    validate_h5,
    write_h5,
)
from eagleflow.provenance import provenance_attrs
from eagleflow.weights import resolve_configured

log = logging.getLogger(__name__)

ATTENTION_SHAPES = {
    "attention_raw": ("N",),
    "attention_softmax": ("N",),
    "coords": ("N", 2),
    "chief_embedding": (768,),
    "meanpool_embedding": (768,),
}


def run_chief_batch(
    slides: Sequence[dict[str, str]],
    model_cfg: dict[str, Any],
    manifest: str,
    threads: int = 1,
) -> None:
    """The `attention_chief` rule: for each slide {slide_id, features, output}."""
    from eagleflow.models import load_model, weights_attrs

    configure_torch(threads)
    info = resolve_configured("chief", model_cfg)
    params_sha256 = stage_params_sha256("attention_chief", info.sha256, aggregator="chief")
    todo = slides_to_compute(
        slides,
        "features",
        lambda path: validate_h5(path, FEATURES_FORMAT, FEATURES_SHAPES),
        ATTENTION_FORMAT,
        ATTENTION_SHAPES,
        params_sha256,
        "CHIEF attention",
    )
    if todo:
        model = load_model("chief", info)
    for slide, feature_attrs in todo:
        output = slide["output"]
        data, _ = read_h5(slide["features"])
        feats = torch.from_numpy(data["feats"].astype(np.float32))
        with torch.inference_mode():
            result = model(feats)
        raw = result.attention_raw.numpy().astype(np.float32)
        attrs = {
            "format": ATTENTION_FORMAT,
            "aggregator": "chief",
            "n_tiles": len(raw),
            "attention_logsumexp": float(torch.logsumexp(result.attention_raw, 0)),
            "ctranspath_weights_demo": feature_attrs["ctranspath_weights_demo"],
            "ctranspath_weights_sha256": feature_attrs["ctranspath_weights_sha256"],
            **{key: feature_attrs[key] for key in GEOMETRY_ATTRS},
            **weights_attrs(info),
            "params_sha256": params_sha256,
            "input_sha256": str(feature_attrs["content_sha256"]),
            **provenance_attrs("attention_chief", {}),
        }
        write_h5(
            output,
            {
                "attention_raw": raw,
                "attention_softmax": result.attention_softmax.numpy().astype(np.float32),
                "coords": data["coords"],
                "chief_embedding": result.slide_embedding.numpy().astype(np.float32),
                "meanpool_embedding": feats.mean(0).numpy(),
            },
            attrs,
        )
        log.info("%s: CHIEF over %d tiles -> %s", slide["slide_id"], len(raw), output)
    write_manifest(manifest, slides, info.is_demo)
