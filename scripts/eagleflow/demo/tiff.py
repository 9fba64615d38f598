"""Pyramidal tiled-JPEG TIFFs that OpenSlide opens: Aperio-style SVS or generic TIFF with the MPP in the tags."""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from eagleflow.demo.specs import JPEG_QUALITY, TILE, SlideFormat, SlideSpec, pyramid_downsamples
from eagleflow.h5io import atomic_write_bytes

_APERIO_HEADER = "Aperio Image Library v12.0.15 \r\n"


def _aperio_description(spec: SlideSpec, w: int, h: int, level_w: int, level_h: int) -> str:
    base = f"{_APERIO_HEADER}{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE})"
    if (level_w, level_h) != (w, h):
        return f"{base} -> {level_w}x{level_h} JPEG/RGB Q={JPEG_QUALITY}"
    fields = [
        f"{base} JPEG/RGB Q={JPEG_QUALITY}",
        f"AppMag = {round(10 / spec.mpp)}",
        "StripeWidth = 2048",
        "ScanScope ID = EAGLEFLOW-DEMO",
        f"Filename = {spec.slide}",
        "Date = 01/01/25",
        "Time = 00:00:00",
        "User = eagleflow-demo",
        f"MPP = {spec.mpp:g}",
        "Left = 0",
        "Top = 0",
        f"OriginalWidth = {w}",
        f"OriginalHeight = {h}",
    ]
    return "|".join(fields)


def scanner_level(image: np.ndarray, d: int, rounding: str) -> np.ndarray:
    """`image` shrunk by exactly `d` as a scanner does (pixel i = the mean of pixels d*i to
    d*i + d - 1), its size W / d rounded ``"ceil"`` (the last pixel averages what is left) or
    ``"floor"`` (the remainder dropped)."""
    h, w = image.shape[:2]
    if rounding == "floor":
        return cv2.resize(
            image[: h // d * d, : w // d * d], (w // d, h // d), interpolation=cv2.INTER_AREA
        )
    if rounding != "ceil":
        raise ValueError(f"level rounding must be 'ceil' or 'floor', not {rounding!r}")
    pad_h, pad_w = -(-h // d) * d - h, -(-w // d) * d - w
    big = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_REPLICATE)
    return cv2.resize(big, (-(-w // d), -(-h // d)), interpolation=cv2.INTER_AREA)


def write_pyramid_tiff(
    dest: io.BytesIO | Path,
    image: np.ndarray,
    mpp: float | None,
    fmt: SlideFormat,
    spec: SlideSpec | None = None,
    downsamples: list[int] | None = None,
    rounding: str | None = None,
) -> list[tuple[int, int]]:
    """Write a tiled JPEG pyramid (levels as successive IFDs); return the level sizes (w, h).

    ``fmt="aperio"`` stores MPP in the Aperio ImageDescription and adds a stripped thumbnail as
    the second IFD, as real SVS files have; ``"generic-tiff"`` stores it in the resolution tags.
    ``mpp=None`` with ``"generic-tiff"`` writes no scale at all. ``rounding`` ("ceil" or
    "floor") builds each level from level 0 as a scanner does (`scanner_level`), so its size
    is rounded and OpenSlide's downsample is fractional (4.0002 instead of 4) when W is not a
    multiple; None resizes to W // d (the demo's slides).
    """
    h, w = image.shape[:2]
    downsamples = downsamples or pyramid_downsamples(w, h)
    levels = [image]
    for prev, d in itertools.pairwise(downsamples):
        if rounding is not None:
            levels.append(scanner_level(image, d, rounding))
            continue
        size = (max(1, w // d), max(1, h // d))
        source = levels[-1] if d % prev == 0 else image
        levels.append(cv2.resize(source, size, interpolation=cv2.INTER_AREA))
    common: dict[str, Any] = {
        "compression": "jpeg",
        "compressionargs": {"level": JPEG_QUALITY},
        "photometric": "rgb",
        "metadata": None,
        "maxworkers": min(4, os.cpu_count() or 1),
    }
    with tifffile.TiffWriter(dest) as tif:
        for i, (d, level) in enumerate(zip(downsamples, levels, strict=True)):
            extra: dict[str, Any] = {}
            if fmt == "aperio":
                if spec is None or mpp is None:
                    raise ValueError("an Aperio file needs the slide spec and its MPP")
                desc = _aperio_description(spec, w, h, level.shape[1], level.shape[0])
                extra["description"] = desc
            elif mpp is not None:
                extra["resolution"] = (1e4 / (mpp * d), 1e4 / (mpp * d))
                extra["resolutionunit"] = "CENTIMETER"
            # Aperio marks pyramid levels as full images (tifffile's SVS reader relies on it);
            # generic TIFFs mark them as reduced-resolution.
            subfiletype = 0 if i == 0 or fmt == "aperio" else 1
            tif.write(level, tile=(TILE, TILE), subfiletype=subfiletype, **common, **extra)
            if i == 0 and fmt == "aperio":
                scale = 768 / max(w, h)
                size = (max(1, round(w * scale)), max(1, round(h * scale)))
                thumb = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
                thumb_desc = f"{_APERIO_HEADER}{w}x{h} -> {size[0]}x{size[1]} - "
                tif.write(thumb, rowsperstrip=16, description=thumb_desc, **common)
    return [(level.shape[1], level.shape[0]) for level in levels]


def write_if_changed(path: Path, data: bytes) -> bool:
    """Atomically write unless the file already has these bytes (keeps mtimes for Snakemake)."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True
