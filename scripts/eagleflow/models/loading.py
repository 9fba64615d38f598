"""Load any catalogued model exactly from its published checkpoint (or demo weights).

`load_model(name, weights)` imports the model's own file (found through its card), builds the
architecture, reads the file safely, applies only that file's documented container unwrap and key
remap, loads with strict=True and returns an eval-mode module that carries its provenance in
`model.eagleflow_weights`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from eagleflow.models.catalog import catalog, model_module
from eagleflow.models.checkpoints import (
    demo_seed,
    load_state_dict_exact,
    random_state_dict,
    read_checkpoint,
)
from eagleflow.weights import DEMO, WeightsError, WeightsInfo, resolve_weights

log = logging.getLogger(__name__)


def model_code(name: str) -> ModuleType:
    """The module that implements model `name` (imported at first use)."""
    try:
        module = model_module(name)
    except ValueError as exc:
        raise WeightsError(str(exc)) from None
    return importlib.import_module(module)


def model_function(name: str, function: str) -> Callable[..., Any] | None:
    """A model file's function for model `name`; a file with several cards whose architectures
    differ (COBRA-II and COBRA-I) takes the card's name as `name=`."""
    found = getattr(model_code(name), function, None)
    if found is not None and "name" in inspect.signature(found).parameters:
        return functools.partial(found, name=name)
    return found


def build_model(name: str) -> nn.Module:
    """The architecture of `name` without weights (on meta where possible; load before use)."""
    on_meta = catalog().card(name).on_meta
    return model_function(name, "build")(device="meta" if on_meta else "cpu")


def identify_checkpoint(checkpoint: Any) -> str | None:
    """Which of our models a loaded checkpoint is: of the models whose signature keys it has,
    the first whose architecture it fits exactly (Virchow's keys are a subset of Virchow2's),
    else the first by signature; None if none."""
    if not isinstance(checkpoint, dict):
        return None
    by_signature = []
    for name, card in catalog().cards.items():
        candidates = [checkpoint]
        key = card.weights.state_dict_key
        if key is not None and isinstance(checkpoint.get(key), dict):
            candidates.append(checkpoint[key])
        signature = model_code(name).SIGNATURE_KEYS
        if any(all(k in sd for k in signature) for sd in candidates):
            by_signature.append(name)
    for name in by_signature:
        try:
            state_dict = model_function(name, "prepare_state_dict")(checkpoint, None)
            expected = build_model(name).state_dict()
        except (WeightsError, ValueError, KeyError, TypeError):
            continue
        if set(state_dict) == set(expected) and all(
            state_dict[k].shape == expected[k].shape for k in expected
        ):
            return name
    return by_signature[0] if by_signature else None


def load_model(
    name: str,
    weights: str | os.PathLike[str] | WeightsInfo,
    *,
    expected_sha256: str | None = None,
    verify_sha256: bool = True,
    device: torch.device | str = "cpu",
    config_key: str | None = None,
) -> nn.Module:
    """Build `name` (a catalogued model) with `weights` (a file path or "demo").

    `weights` may also be the WeightsInfo of an earlier `resolve_weights` call, so the file is
    not hashed twice. Returns an eval-mode fp32 module on `device` with `model.eagleflow_weights`;
    what it computes is the model's card's role (see `eagleflow.models.card`). Raises WeightsError
    for a missing file, a checksum mismatch, an unsafe or unreadable file, or a file whose keys or
    shapes do not fit the model.
    """
    key = config_key or f"models.{name}.weights"
    if isinstance(weights, WeightsInfo) and weights.name == name and weights.sha256 is not None:
        info = weights
    else:
        info = resolve_weights(
            name,
            (weights.path or DEMO) if isinstance(weights, WeightsInfo) else weights,
            expected_sha256=expected_sha256,
            verify_sha256=verify_sha256,
            config_key=key,
        )
    model = build_model(name)
    if info.is_demo:
        log.warning("%s uses random DEMO weights: outputs are not results", name)
        demo = model_function(name, "demo_state_dict") or random_state_dict
        load_state_dict_exact(model, demo(model, demo_seed(name)), name, None)
    else:
        checkpoint = read_checkpoint(info.path, name)
        try:
            state_dict = model_function(name, "prepare_state_dict")(checkpoint, info.path)
            load_state_dict_exact(
                model, state_dict, name, info.path, model_function(name, "published_key")
            )
        except WeightsError as exc:
            other = identify_checkpoint(checkpoint)
            if other is not None and other != name:
                raise WeightsError(
                    f"{name}: weight file {str(info.path)!r} looks like a {other} checkpoint, "
                    f"not {name}: check `{key}`. ({exc})"
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
