"""Tile-feature H5 files that our stages and STAMP v2 both read correctly as they are.

Layout (format `eagleflow.features/3`), one file per slide and tile encoder:

- `feats` (N, D) float32: one embedding per tile, rows in the tiles file's order.
- `coords` (N, 2) float64: top-left corner (x, y) of each tile in µm at level 0
  (= `coords_level0_px` * `mpp`), STAMP v2's convention (attribute `unit = "um"`).
- `coords_level0_px` (N, 2) int64: the same corners in level-0 pixels, for our own stages.
- `feats_mean` (D,) float32: the mean over tiles (computed in float64), so that mean pooling over
  a whole cohort reads one small dataset per slide.

Why µm under `coords`: STAMP v2's loader (`stamp.modeling.data.get_coords`) takes the `coords` of
any file with a `tile_size_um` attribute to be micrometres. A file holding level-0 pixels there
(format 1) is misread silently, by a factor 1/mpp (x4 on a 0.25 µm/px scan).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np

from eagleflow.h5io import FormatError, validate_h5, write_h5

FEATURES_FORMAT = "eagleflow.features/3"
FEATURES_SHAPES: dict[str, tuple[int | str | None, ...]] = {
    "feats": ("N", "D"),
    "coords": ("N", 2),
    "coords_level0_px": ("N", 2),
    "feats_mean": ("D",),
}
# coords (µm) must equal coords_level0_px * mpp to this relative tolerance
COORDS_RTOL = 1e-6

# STAMP v2's extractor name (`stamp.preprocessing.config.ExtractorName`) for each of our encoders
# that runs the same weights. STAMP's slide encoders accept a file only if its `extractor`
# attribute names the tile model they need (GigaPath's slide encoder: "gigapath"; EAGLE:
# "ctranspath" or "chief-ctranspath", with "virchow2"). Encoders without a STAMP twin keep their
# own name.
STAMP_EXTRACTOR_NAMES: dict[str, str] = {
    "ctranspath": "ctranspath",
    "virchow2": "virchow2",
    "gigapath_tile": "gigapath",
}

# Attributes that describe this layout: the writer's values replace any the caller passes (a tiles
# file's attributes say coord_unit "level-0 pixels", which is not true of `coords` here).
_LAYOUT_ATTRS = ("format", "unit", "coord_unit", "feat_type")
# Attributes the writer derives from its arguments: a caller's differing value is a bug, not a
# preference, so it raises instead of being overwritten.
_VALUE_ATTRS = (
    "tile_size_um",
    "tile_size_px",
    "mpp",
    "encoder",
    "extractor",
    "n_tiles",
    "feature_dim",
)
COORD_UNIT = "um (coords); level-0 pixels (coords_level0_px)"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float, np.integer, np.floating)) and isinstance(
        b, (int, float, np.integer, np.floating)
    ):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _positive_finite(name: str, value: float) -> float:
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return number


def write_tile_features(
    path: str | os.PathLike[str],
    feats: np.ndarray,
    coords_level0: np.ndarray,
    *,
    mpp: float,
    tile_size_px: int,
    tile_size_um: float,
    encoder: str,
    attrs: Mapping[str, Any],
    extractor: str | None = None,
) -> str:
    """Write one slide's tile features; return the content digest (`content_sha256`) it records.

    `coords_level0` are the tiles' top-left corners (x, y) in level-0 pixels, `mpp` the slide's
    level-0 µm/px, `tile_size_px`/`tile_size_um` the encoder's tile (nominal, as STAMP records
    it). `extractor` defaults to STAMP's name for the same model (STAMP_EXTRACTOR_NAMES), else
    `encoder`. Everything in `attrs` (provenance, geometry) is stored too.
    """
    feats = np.asarray(feats)
    coords_level0 = np.asarray(coords_level0)
    if feats.ndim != 2:
        raise ValueError(f"feats must be (N, D), got shape {feats.shape}")
    if len(feats) == 0:
        # a slide without tiles has no features; the tiling stage reports it, not an empty file
        raise ValueError(f"{path}: no tiles: a features file needs at least one")
    if coords_level0.shape != (len(feats), 2):
        raise ValueError(
            f"coords_level0 must be ({len(feats)}, 2) to match feats, got {coords_level0.shape}"
        )
    if not np.issubdtype(coords_level0.dtype, np.integer):
        raise ValueError(f"coords_level0 must be integer level-0 pixels, got {coords_level0.dtype}")
    mpp = _positive_finite("mpp", mpp)
    tile_size_um = _positive_finite("tile_size_um", tile_size_um)
    if int(tile_size_px) != tile_size_px or tile_size_px <= 0:
        raise ValueError(f"tile_size_px must be a positive integer, got {tile_size_px!r}")
    feats32 = feats.astype(np.float32)
    if not np.isfinite(feats32).all():
        raise ValueError(f"{path}: feats hold NaN or infinite values")

    level0 = coords_level0.astype(np.int64)
    derived: dict[str, Any] = {
        "tile_size_um": tile_size_um,
        "tile_size_px": int(tile_size_px),
        "mpp": mpp,
        "encoder": encoder,
        "extractor": extractor or STAMP_EXTRACTOR_NAMES.get(encoder, encoder),
        "n_tiles": len(feats32),
        "feature_dim": feats32.shape[1],
    }
    for key in _VALUE_ATTRS:
        if key in attrs and not _same(attrs[key], derived[key]):
            raise ValueError(
                f"attrs[{key!r}] = {attrs[key]!r} disagrees with the value written ({derived[key]!r})"
            )
    return write_h5(
        path,
        {
            "feats": feats32,
            "coords": level0.astype(np.float64) * mpp,
            "coords_level0_px": level0,
            "feats_mean": feats32.astype(np.float64).mean(axis=0).astype(np.float32),
        },
        {
            **attrs,
            "format": FEATURES_FORMAT,
            "unit": "um",
            "coord_unit": COORD_UNIT,
            "feat_type": "tile",
            **derived,
        },
    )


def _attrs_of(h5: h5py.File) -> dict[str, Any]:
    return {
        key: value.decode() if isinstance(value, bytes) else value
        for key, value in h5.attrs.items()
    }


def _check_format(h5: h5py.File, path: str | os.PathLike[str]) -> None:
    if h5.attrs.get("format") != FEATURES_FORMAT:
        raise FormatError(
            f"{path}: not a {FEATURES_FORMAT} file (format {h5.attrs.get('format')!r})"
        )


def validate_tile_features(path: str | os.PathLike[str], dim: int | None = None) -> dict[str, Any]:
    """Check a features file completely (every byte is read); return its attributes.

    Beyond the shapes: the width is `dim` (if given) and `feature_dim`, n_tiles matches,
    `coords_level0_px` is int64, `coords` equals `coords_level0_px * mpp`, `feats_mean` is the
    mean of `feats`. Raises FormatError for anything a later stage should not trust.
    """
    attrs = validate_h5(path, FEATURES_FORMAT, FEATURES_SHAPES)
    try:
        with h5py.File(path, "r") as h5:
            feats = h5["feats"][()]
            coords = h5["coords"][()]
            level0 = h5["coords_level0_px"][()]
            mean = h5["feats_mean"][()]
    except (OSError, KeyError) as err:
        raise FormatError(f"{path}: unreadable or incomplete file ({err})") from err
    n, width = feats.shape
    if dim is not None and width != dim:
        raise FormatError(f"{path}: features are {width}-d, expected {dim}-d")
    for key, actual in (("feature_dim", width), ("n_tiles", n)):
        if key not in attrs or int(attrs[key]) != actual:
            raise FormatError(f"{path}: attribute {key}={attrs.get(key)!r}, datasets say {actual}")
    if feats.dtype != np.float32 or level0.dtype != np.int64:
        raise FormatError(
            f"{path}: feats must be float32 and coords_level0_px int64 "
            f"(are {feats.dtype}, {level0.dtype})"
        )
    if n == 0:
        raise FormatError(f"{path}: no tiles")
    if attrs.get("unit") != "um" or attrs.get("feat_type") != "tile":
        raise FormatError(f"{path}: unit must be 'um' and feat_type 'tile'")
    try:
        mpp = float(attrs["mpp"])
        tile_size_um = float(attrs["tile_size_um"])
        tile_size_px = int(attrs["tile_size_px"])
    except (KeyError, TypeError, ValueError) as err:
        raise FormatError(f"{path}: mpp, tile_size_um or tile_size_px missing ({err})") from err
    if not (mpp > 0 and tile_size_um > 0 and tile_size_px > 0):
        raise FormatError(f"{path}: mpp, tile_size_um and tile_size_px must be positive")
    if not np.allclose(coords, level0 * mpp, rtol=COORDS_RTOL, atol=0.0):
        raise FormatError(
            f"{path}: coords (µm) are not coords_level0_px * mpp ({mpp}): the two disagree"
        )
    if not np.allclose(mean, feats.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-6):
        raise FormatError(f"{path}: feats_mean is not the mean of feats")
    return attrs


def read_tile_features(
    path: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(feats (N, D) float32, level-0 corners (N, 2) int64, attributes) of a features file.

    Checks the format and shapes of what it reads, not every dataset (validate_tile_features).
    """
    try:
        with h5py.File(path, "r") as h5:
            _check_format(h5, path)
            feats = h5["feats"][()]
            level0 = h5["coords_level0_px"][()]
            attrs = _attrs_of(h5)
    except (OSError, KeyError) as err:
        raise FormatError(f"{path}: unreadable or incomplete file ({err})") from err
    if feats.ndim != 2 or level0.shape != (len(feats), 2):
        raise FormatError(
            f"{path}: feats {feats.shape} and coords_level0_px {level0.shape} do not match"
        )
    if feats.dtype != np.float32 or level0.dtype != np.int64:
        raise FormatError(f"{path}: feats must be float32 and coords_level0_px int64")
    return feats, level0, attrs


def read_feats_mean(path: str | os.PathLike[str]) -> tuple[np.ndarray, int, dict[str, Any]]:
    """(mean feature over tiles (D,) float32, number of tiles, attributes); no other dataset is
    read (the cohort tables open every slide's file of every encoder once)."""
    try:
        with h5py.File(path, "r") as h5:
            _check_format(h5, path)
            mean = h5["feats_mean"][()]
            attrs = _attrs_of(h5)
            n_tiles = int(attrs["n_tiles"])
    except (OSError, KeyError) as err:
        raise FormatError(f"{path}: unreadable or incomplete file ({err})") from err
    if mean.ndim != 1 or mean.dtype != np.float32 or n_tiles < 1:
        raise FormatError(f"{path}: feats_mean {mean.shape} {mean.dtype}, n_tiles {n_tiles}")
    return mean, n_tiles, attrs
