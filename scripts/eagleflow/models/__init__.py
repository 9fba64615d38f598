"""EAGLE's three models and the alternatives, loaded exactly from their published checkpoints
(or demo weights).

`load_model(name, weights)` builds the architecture, reads the file safely, applies only the
documented container unwrap and key remap, loads with strict=True and returns an eval-mode module
that carries its provenance in `model.eagleflow_weights`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eagleflow.models import chief, ctranspath, gigapath_slide, gigapath_tile, pathoduet, virchow2
from eagleflow.models.checkpoints import (
    demo_seed,
    load_state_dict_exact,
    random_state_dict,
    read_checkpoint,
)
from eagleflow.models.chief import Chief, ChiefOutput
from eagleflow.models.gigapath_slide import GigaPathSlideEncoder, SlideEncoderOutput
from eagleflow.models.gigapath_tile import GigaPathTile
from eagleflow.models.pathoduet import PathoDuet
from eagleflow.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess_tiles
from eagleflow.models.virchow2 import Virchow2, cls_mean_embedding
from eagleflow.weights import (
    DEMO,
    MODEL_NAMES,
    REGISTRY,
    WeightsError,
    WeightsInfo,
    check_weights_config,
    resolve_weights,
    sha256_file,
    weights_attrs,
)

__all__ = [
    "DEMO",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_NAMES",
    "REGISTRY",
    "Chief",
    "ChiefOutput",
    "GigaPathSlideEncoder",
    "GigaPathTile",
    "ModelSpec",
    "PathoDuet",
    "SlideEncoderOutput",
    "Virchow2",
    "WeightsError",
    "WeightsInfo",
    "autocast_context",
    "build_model",
    "check_weights_config",
    "cls_mean_embedding",
    "identify_checkpoint",
    "load_model",
    "preprocess_tiles",
    "resolve_weights",
    "sha256_file",
    "weights_attrs",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model and turn its published file into a loadable state dict."""

    name: str
    build: Callable[..., nn.Module]
    prepare_state_dict: Callable[[Any, Path | None], dict[str, torch.Tensor]]
    signature_keys: tuple[str, ...]
    on_meta: bool  # False where non-persistent buffers must be computed by the constructor
    published_key: Callable[[str], str] | None = None  # model key -> its name in the file
    demo_state_dict: Callable[[nn.Module, int], dict[str, torch.Tensor]] = random_state_dict


SPECS: dict[str, ModelSpec] = {
    "ctranspath": ModelSpec(
        "ctranspath",
        ctranspath.build_ctranspath,
        ctranspath.prepare_state_dict,
        ctranspath.SIGNATURE_KEYS,
        on_meta=False,
        published_key=ctranspath.published_key,
    ),
    "chief": ModelSpec(
        "chief",
        chief.build_chief,
        chief.prepare_state_dict,
        chief.SIGNATURE_KEYS,
        on_meta=True,
        demo_state_dict=chief.demo_state_dict,
    ),
    "virchow2": ModelSpec(
        "virchow2",
        virchow2.build_virchow2,
        virchow2.prepare_state_dict,
        virchow2.SIGNATURE_KEYS,
        on_meta=True,
    ),
    "gigapath_tile": ModelSpec(
        "gigapath_tile",
        gigapath_tile.build_gigapath_tile,
        gigapath_tile.prepare_state_dict,
        gigapath_tile.SIGNATURE_KEYS,
        on_meta=True,
    ),
    "gigapath_slide": ModelSpec(
        "gigapath_slide",
        gigapath_slide.build_gigapath_slide,
        gigapath_slide.prepare_state_dict,
        gigapath_slide.SIGNATURE_KEYS,
        on_meta=True,
    ),
    **{
        name: ModelSpec(
            name,
            pathoduet.build_pathoduet,
            pathoduet.prepare_state_dict,
            pathoduet.SIGNATURE_KEYS,
            on_meta=True,
        )
        for name in ("pathoduet_he", "pathoduet_ihc")  # one architecture, two weight files
    },
}


def _spec(name: str) -> ModelSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise WeightsError(
            f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}"
        ) from None


def build_model(name: str) -> nn.Module:
    """The architecture of `name` without weights (on meta where possible; load before use)."""
    spec = _spec(name)
    return spec.build(device="meta" if spec.on_meta else "cpu")


def identify_checkpoint(checkpoint: Any) -> str | None:
    """Which of our models a loaded checkpoint looks like (by signature keys), or None."""
    if not isinstance(checkpoint, dict):
        return None
    inner = checkpoint.get(ctranspath.CONTAINER_KEY)
    candidates = [checkpoint] + ([inner] if isinstance(inner, dict) else [])
    for spec in SPECS.values():
        if any(all(k in sd for k in spec.signature_keys) for sd in candidates):
            return spec.name
    return None


def load_model(
    name: str,
    weights: str | os.PathLike[str] | WeightsInfo,
    *,
    expected_sha256: str | None = None,
    verify_sha256: bool = True,
    device: torch.device | str = "cpu",
    config_key: str | None = None,
) -> nn.Module:
    """Build `name` (one of MODEL_NAMES) with `weights` (a file path or "demo").

    `weights` may also be the WeightsInfo of an earlier `resolve_weights` call, so the file is
    not hashed twice.

    Returns an eval-mode fp32 module on `device` with `model.eagleflow_weights` (a WeightsInfo).
    ctranspath: normalized [B,3,224,224] -> [B,768]; virchow2: -> class token [B,1280]
    (`forward_tokens` -> [B,261,1280]); chief: features [N,768] -> ChiefOutput;
    gigapath_tile: -> class token [B,1536]; pathoduet_he / pathoduet_ihc: RGB in [0, 1] -> mean
    of the patch tokens after fc_norm [B,768] (`forward_tokens` -> [B,198,768]);
    gigapath_slide: tile embeddings [L,1536], level-0 coords [L,2], tile size -> [768]
    (`encode` -> SlideEncoderOutput with all 13 pooled layers).
    Raises WeightsError for a missing file, a checksum mismatch, an unsafe or unreadable file, or
    a file whose keys or shapes do not fit the model.
    """
    spec = _spec(name)
    if isinstance(weights, WeightsInfo) and weights.name == name and weights.sha256 is not None:
        info = weights
    else:
        info = resolve_weights(
            name,
            (weights.path or DEMO) if isinstance(weights, WeightsInfo) else weights,
            expected_sha256=expected_sha256,
            verify_sha256=verify_sha256,
            config_key=config_key or f"models.{name}.weights",
        )
    model = build_model(name)
    if info.is_demo:
        log.warning("%s uses random DEMO weights: outputs are not results", name)
        load_state_dict_exact(model, spec.demo_state_dict(model, demo_seed(name)), name, None)
    else:
        checkpoint = read_checkpoint(info.path, name)
        try:
            state_dict = spec.prepare_state_dict(checkpoint, info.path)
            load_state_dict_exact(model, state_dict, name, info.path, spec.published_key)
        except WeightsError as exc:
            other = identify_checkpoint(checkpoint)
            if other is not None and other != name:
                raise WeightsError(
                    f"{name}: weight file {str(info.path)!r} looks like a {other} checkpoint, "
                    f"not {name}: check `{config_key or f'models.{name}.weights'}`. ({exc})"
                ) from exc
            raise
    model.eval()
    model.to(device)
    model.eagleflow_weights = info
    return model


def autocast_context(
    device: torch.device | str,
) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA; nothing on CPU, where the models run in fp32."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
