"""The weights a config points at: the checks that run at workflow start, and what every output
records of them. Where each model's published file comes from is in its card
(`eagleflow.models.catalog`). Pure Python (no torch), so parsing the Snakefile stays cheap.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eagleflow.errors import EagleflowError
from eagleflow.models.card import WeightFile
from eagleflow.models.catalog import catalog, model_names

log = logging.getLogger(__name__)
DEMO = "demo"
# The models EAGLE runs (a config must set all three); every other catalogued model is optional.
EAGLE_MODELS: tuple[str, ...] = ("ctranspath", "chief", "virchow2")
# Every model load_model knows: the cards of eagleflow/models/*.py.
MODEL_NAMES: tuple[str, ...] = model_names()
# Where each model's published file comes from, from its card.
REGISTRY: dict[str, WeightFile] = {name: card.weights for name, card in catalog().cards.items()}


class WeightsError(EagleflowError, ValueError):
    """A weight file is missing, fails its checksum, cannot be read safely or does not fit its model."""


# Files that are often mistaken for a registered one; named in the checksum error.
KNOWN_OTHER_FILES: dict[str, str] = {
    "1646f23001214f74cf432ef0e80b808ee6605143802ae6ed53a87564ddc4924a": (
        "CHIEF_CTransPath.pth (CHIEF's tile encoder: CTransPath architecture, different weights; "
        "EAGLE uses the original ctranspath.pth)"
    ),
}


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a model runs with; stamped into every output that the model produced."""

    name: str
    path: Path | None  # None for demo weights
    sha256: str | None  # "demo" for demo weights; None when the file was not hashed
    is_demo: bool
    source: str
    verified: bool = False  # sha256 compared with a known value and equal


def published(name: str) -> WeightFile:
    """The registry entry of `name`, or a WeightsError listing the known models."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise WeightsError(
            f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}"
        ) from None


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks so large checkpoints never sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _missing_message(name: str, path: Path, config_key: str, reason: str) -> str:
    entry = published(name)
    return (
        f"{config_key}: weight file {str(path)!r} {reason}. "
        f"Expected the {name} checkpoint {entry.file_name!r}, obtained from {entry.source}. "
        f"To run without it, set `{config_key}: demo`: the model then runs with random DEMO "
        f"weights and its outputs are not results."
    )


def resolve_weights(
    name: str,
    weights: str | os.PathLike[str],
    expected_sha256: str | None = None,
    verify_sha256: bool = True,
    config_key: str | None = None,
    *,
    hash_file: bool = True,
) -> WeightsInfo:
    """Check that the weights for `name` exist (and match their sha256) and describe them.

    `weights` is a file path or "demo". `expected_sha256` overrides the registry's known hash; with
    `verify_sha256=False` the hash is recorded but not compared. With `hash_file=False` the file is
    only checked to exist (fast, for workflow start-up).
    """
    entry = published(name)
    key = config_key or f"models.{name}.weights"
    if isinstance(weights, str) and weights.strip().lower() == DEMO:
        return WeightsInfo(
            name=name,
            path=None,
            sha256=DEMO,
            is_demo=True,
            source=f"seeded random DEMO weights (eagleflow), not {entry.file_name}",
        )
    if weights is None or (isinstance(weights, str) and not weights.strip()):
        raise WeightsError(
            f"{key}: no weight file given for {name}. Expected the checkpoint "
            f"{entry.file_name!r}, obtained from {entry.source}. To run without it, set "
            f"`{key}: demo`: the model then runs with random DEMO weights and its outputs are not "
            f"results."
        )
    path = Path(weights).expanduser()
    if not path.exists():
        raise WeightsError(_missing_message(name, path, key, "does not exist"))
    if not path.is_file():
        raise WeightsError(_missing_message(name, path, key, "is not a regular file"))
    if not os.access(path, os.R_OK):
        raise WeightsError(_missing_message(name, path, key, "is not readable"))

    section = key.removesuffix(".weights")
    expected = (expected_sha256 or entry.sha256 or "").strip().lower() or None
    source = f"{path.name} ({entry.source})"
    if not hash_file:
        return WeightsInfo(name=name, path=path, sha256=None, is_demo=False, source=source)
    actual = sha256_file(path)
    verified = False
    if verify_sha256 and expected is not None:
        if actual != expected:
            other = KNOWN_OTHER_FILES.get(actual)
            hint = f" This file is {other}." if other else ""
            raise WeightsError(
                f"{key}: sha256 mismatch for {name} weight file {str(path)!r}: expected "
                f"{expected}, actual {actual}.{hint} Use the published {entry.file_name!r} from "
                f"{entry.source}; if you deliberately use other weights, set "
                f"`{section}.sha256` to {actual} or `{section}.verify_sha256: false` "
                f"(the hash is then recorded, not checked)."
            )
        verified = True
    return WeightsInfo(
        name=name, path=path, sha256=actual, is_demo=False, source=source, verified=verified
    )


def check_weights_config(
    models_cfg: Mapping[str, Any],
    *,
    hash_files: bool = False,
    required: Iterable[str] = EAGLE_MODELS,
) -> dict[str, WeightsInfo]:
    """Check the `models:` config section at workflow start, before any slide is touched.

    `models_cfg` maps a model name to {"weights": path or "demo", "sha256": optional,
    "verify_sha256": bool}. Only existence is checked unless `hash_files` is set, because hashing a
    2.5 GB checkpoint at every Snakemake parse is too slow; the hash is checked when a job loads it.
    """
    if not isinstance(models_cfg, Mapping):
        raise WeightsError(
            f"models: expected a mapping of model name to settings, got {models_cfg!r}"
        )
    unknown = sorted(set(models_cfg) - set(MODEL_NAMES))
    if unknown:
        raise WeightsError(
            f"models: unknown model(s) {', '.join(unknown)}; known: {', '.join(MODEL_NAMES)}"
        )
    absent = [n for n in required if n not in models_cfg]
    if absent:
        raise WeightsError(
            "models: no settings for "
            + ", ".join(absent)
            + "; give each `weights:` (a file path, or `demo` for random DEMO weights)"
        )
    infos: dict[str, WeightsInfo] = {}
    for name, settings in models_cfg.items():
        if not isinstance(settings, Mapping) or "weights" not in settings:
            raise WeightsError(
                f"models.{name}: expected a mapping with `weights:` (a file path or `demo`), "
                f"got {settings!r}"
            )
        verify = settings.get("verify_sha256", True)
        if not isinstance(verify, bool):
            raise WeightsError(
                f"models.{name}.verify_sha256: expected true or false, got {verify!r}"
            )
        infos[name] = resolve_weights(
            name,
            settings["weights"],
            expected_sha256=settings.get("sha256"),
            verify_sha256=verify,
            config_key=f"models.{name}.weights",
            hash_file=hash_files,
        )
        if infos[name].is_demo:
            log.warning("%s uses random DEMO weights: outputs are not results", name)
    return infos


def weights_attrs(info: WeightsInfo) -> dict[str, str]:
    """HDF5-attribute-ready strings describing the weights a model ran with."""
    prefix = f"{info.name}_weights"
    return {
        f"{prefix}_sha256": info.sha256 or "not computed",
        f"{prefix}_demo": "true" if info.is_demo else "false",
        f"{prefix}_file": info.path.name if info.path is not None else DEMO,
        f"{prefix}_verified": "true" if info.verified else "false",
    }


def resolve_configured(name: str, settings: Mapping[str, Any]) -> WeightsInfo:
    """resolve_weights for one `models.<name>` config section (hashes and checks the file)."""
    return resolve_weights(
        name,
        settings["weights"],
        expected_sha256=settings.get("sha256"),
        verify_sha256=settings.get("verify_sha256", True),
        config_key=f"models.{name}.weights",
    )
