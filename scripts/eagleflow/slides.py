"""Open a whole-slide image, find its MPP and where it came from, choose pyramid levels, read tiles."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide

from eagleflow.errors import EagleflowError
from eagleflow.mpp import DEFAULT_MPP_RANGE, outside_range
from eagleflow.slidefiles import dicom_instance

log = logging.getLogger(__name__)

# A level counts as "at or finer than" the target if its MPP exceeds the target by at most this factor;
# pyramids store downsamples like 3.9998 for 4, which must not push us to a finer level.
LEVEL_TOLERANCE = 1.01

CM_PER_INCH = 2.54


class SlideError(EagleflowError, RuntimeError):
    """A slide cannot be used; the message names the slide and says what to do."""


@dataclass(frozen=True)
class SlideInfo:
    """What the workflow needs to know about a slide, with the MPP's provenance."""

    path: str
    width: int
    height: int
    mpp: float
    mpp_source: str
    mpp_warning: str
    level_count: int
    level_downsamples: tuple[float, ...]
    level_dimensions: tuple[tuple[int, int], ...]
    vendor: str

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]


def open_slide(path: str | os.PathLike[str], slide_id: str = "") -> openslide.OpenSlide:
    """Open a slide file or DICOM WSI folder; every failure is a SlideError that says what to do."""
    label = f"slide {slide_id!r} ({path})" if slide_id else f"slide {path}"
    path = Path(path)
    if not path.exists():
        raise SlideError(
            f"{label}: file not found. Fix PATH in the slide sheet or restore the file."
        )
    if path.is_dir():
        instance = dicom_instance(path)
        if instance is None:
            raise SlideError(
                f"{label}: a folder without a DICOM whole-slide image instance OpenSlide can "
                "read. Point PATH at a slide file, or at the folder of one DICOM WSI export."
            )
        path = instance
    if path.stat().st_size == 0:
        raise SlideError(f"{label}: file is empty (0 bytes). Re-copy the slide from its source.")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as err:
        problem = _why_unsupported(path)
        what = (
            f"OpenSlide cannot open it: {problem}"
            if problem
            else "not a slide format OpenSlide can read"
        )
        if "truncated" in problem:
            advice = "Re-copy the slide from its source."
        else:
            advice = "Convert it to a tiled pyramidal TIFF/SVS or remove it from the slide sheet."
        raise SlideError(f"{label}: {what} ({err}). {advice}") from err
    except openslide.OpenSlideError as err:
        raise SlideError(
            f"{label}: OpenSlide could not read it ({err}); the file may be truncated or corrupt. "
            "Re-copy the slide from its source."
        ) from err


_MAGIC = {
    b"\x89PNG": "it is a PNG image, not a whole-slide image",
    b"\xff\xd8\xff": "it is a JPEG image, not a whole-slide image",
    b"%PDF": "it is a PDF document",
    b"PK\x03\x04": "it is a ZIP archive",
}
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _why_unsupported(path: Path) -> str:
    """A guess at why OpenSlide refused a file: truncated TIFF, TIFF in strips, other format."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            return what
    if not head.startswith(_TIFF_MAGIC):
        return ""
    try:
        import tifffile  # only needed to explain a refused TIFF (not in every stage's env)
    except ImportError:
        return ""
    size = path.stat().st_size
    quiet = logging.getLogger("tifffile")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # tifffile warns about the very damage we report
    try:
        with tifffile.TiffFile(path) as tif:
            pages = [page for page in tif.pages if hasattr(page, "dataoffsets")]
            end = max(
                (
                    o + n
                    for page in pages
                    for o, n in zip(page.dataoffsets, page.databytecounts, strict=True)
                ),
                default=0,
            )
            tiled = any(page.is_tiled for page in pages)
    except Exception:  # tifffile cannot parse it either
        return "it is a TIFF whose structure is damaged (truncated or corrupt)"
    finally:
        quiet.setLevel(level)
    if end > size:
        return f"it is a TIFF truncated at {size} bytes (its image data runs to byte {end})"
    if not tiled:
        return "it is a TIFF stored in strips, and OpenSlide reads tiled TIFFs only"
    return ""


def _mpp_from_tiff_resolution(props: dict[str, str]) -> float | None:
    """MPP from TIFF XResolution/ResolutionUnit, as many generic TIFF writers record it."""
    unit = props.get("tiff.ResolutionUnit", "").lower()
    try:
        resolution = float(props["tiff.XResolution"])
    except (KeyError, ValueError):
        return None
    if resolution <= 0:
        return None
    if unit == "centimeter":
        return 1e4 / resolution
    if unit == "inch":
        return CM_PER_INCH * 1e4 / resolution
    return None  # "none" or unknown: the numbers carry no physical unit


def _mpp_from_description(props: dict[str, str]) -> float | None:
    """Aperio-style `MPP = 0.25` or `<PixelSizeMicrons>` in the image description."""
    description = props.get("tiff.ImageDescription", "")
    match = re.search(r"MPP\s*=\s*([0-9.]+)", description) or re.search(
        r"<PixelSizeMicrons>\s*([0-9.]+)", description
    )
    if not match:
        return None
    try:
        return float(match.group(1))
    except ValueError:
        return None


def _where_openslide_found_it(props: dict[str, str]) -> str:
    """The tags behind `openslide.mpp-x` for generic TIFFs (OpenSlide derives it from them)."""
    resolution, unit = props.get("tiff.XResolution"), props.get("tiff.ResolutionUnit")
    if resolution is None or unit is None:
        return openslide.PROPERTY_NAME_MPP_X
    return f"{openslide.PROPERTY_NAME_MPP_X} (from tiff.XResolution = {resolution} per {unit})"


def _metadata_mpp(props: dict[str, str]) -> tuple[float, str, str] | None:
    """(mpp, source, warning) from the slide's own metadata, or None if it records no MPP."""
    try:
        mpp_x = float(props[openslide.PROPERTY_NAME_MPP_X])
        mpp_y = float(props.get(openslide.PROPERTY_NAME_MPP_Y, mpp_x))
    except (KeyError, ValueError):
        mpp_x = mpp_y = math.nan
    if mpp_x > 0:
        warning = ""
        if abs(mpp_x - mpp_y) / mpp_x > 0.01:
            warning = f"non-square pixels (mpp-x {mpp_x}, mpp-y {mpp_y}); using mpp-x"
        return mpp_x, openslide.PROPERTY_NAME_MPP_X, warning
    for source, finder in (
        ("tiff.ImageDescription", _mpp_from_description),
        ("tiff.XResolution", _mpp_from_tiff_resolution),
    ):
        value = finder(props)
        if value is not None and value > 0:
            return value, source, ""
    return None


def resolve_mpp(
    props: dict[str, str],
    sheet_mpp: float | None,
    default_mpp: float | None,
    label: str,
    mpp_range: Sequence[float] = DEFAULT_MPP_RANGE,
) -> tuple[float, str, str]:
    """Return (mpp, source, warning).

    Order: the sheet's MPP column (an explicit override) > OpenSlide's `openslide.mpp-x` > the TIFF
    description or resolution tags > the config's `default_mpp` (with a warning) > SlideError.
    An MPP from the slide or `default_mpp` outside `mpp_range` (a screen default such as 72 dpi)
    is a SlideError, not a fallback. The sheet's MPP is the user's override, checked against the
    configured range when the sheet is read (later stages pass the MPP recorded at tiling here).
    """
    if sheet_mpp is not None and not math.isnan(sheet_mpp):
        return float(sheet_mpp), "sheet MPP column", ""
    if (found := _metadata_mpp(props)) is not None:
        mpp, source, warning = found
    elif default_mpp is not None:
        warning = f"no MPP in the slide or the sheet; assumed tiling.default_mpp = {default_mpp}"
        log.warning("%s: %s", label, warning)
        mpp, source = float(default_mpp), "config tiling.default_mpp"
    else:
        raise SlideError(
            f"{label}: no MPP (microns per pixel) in the slide's metadata or the sheet. Add an MPP "
            "column value for this slide to the slide sheet, or set tiling.default_mpp in the config."
        )
    if problem := outside_range(mpp, mpp_range):
        where = (
            _where_openslide_found_it(props) if source == openslide.PROPERTY_NAME_MPP_X else source
        )
        raise SlideError(
            f"{label}: level-0 MPP {mpp:.4g} µm/px from {where} is {problem}; the file's "
            "resolution is likely a writer's default (72 dpi is 352.8 µm/px), not the scan's. Put "
            "the slide's MPP in the sheet's MPP column (0.25 at 40x, 0.5 at 20x)."
        )
    return mpp, source, warning


def slide_info(
    slide: openslide.OpenSlide,
    path: str | os.PathLike[str],
    slide_id: str,
    sheet_mpp: float | None = None,
    default_mpp: float | None = None,
    mpp_range: Sequence[float] = DEFAULT_MPP_RANGE,
) -> SlideInfo:
    props = dict(slide.properties)
    label = f"slide {slide_id!r} ({path})"
    mpp, source, warning = resolve_mpp(props, sheet_mpp, default_mpp, label, mpp_range)
    width, height = slide.dimensions
    return SlideInfo(
        path=str(path),
        width=int(width),
        height=int(height),
        mpp=mpp,
        mpp_source=source,
        mpp_warning=warning,
        level_count=slide.level_count,
        level_downsamples=tuple(float(d) for d in slide.level_downsamples),
        level_dimensions=tuple((int(w), int(h)) for w, h in slide.level_dimensions),
        vendor=props.get(openslide.PROPERTY_NAME_VENDOR, "unknown"),
    )


def best_level(info: SlideInfo, target_mpp: float) -> int:
    """The coarsest pyramid level whose MPP is at or finer than `target_mpp` (level 0 if none is)."""
    fine_enough = [
        level
        for level in range(info.level_count)
        if info.level_mpp(level) <= target_mpp * LEVEL_TOLERANCE
    ]
    return max(fine_enough, key=lambda level: info.level_downsamples[level], default=0)


def level0_tile_size(mpp: float, tile_px: int, tile_mpp: float) -> int:
    """Level-0 side of a tile that covers `tile_px * tile_mpp` microns, rounded to whole pixels."""
    return max(1, round(tile_px * tile_mpp / mpp))


def level_factor(
    level_dimensions: Sequence[tuple[int, int]], level_downsamples: Sequence[float], level: int
) -> float:
    """Level-0 pixels per pixel of `level` along each axis: the placement rule's one factor.

    Scanners build each level by an integer downsample n and round its size (an Aperio level 1
    of 46,000 x 32,914 px is 11,500 x 8,228 px), so OpenSlide reports a downsample such as
    4.00012 (the mean of the two size ratios) although level pixel i covers level-0 pixels
    [n*i, n*i + n). When both sides of the level are W0 / n rounded down or up, the factor is
    that n; otherwise (a pyramid with a genuinely fractional ratio) OpenSlide's downsample.
    """
    if level == 0:
        return 1.0
    (w0, h0), (w, h) = level_dimensions[0], level_dimensions[level]
    n = round(level_downsamples[level])
    if n >= 1 and w in (w0 // n, -(-w0 // n)) and h in (h0 // n, -(-h0 // n)):
        return float(n)
    return float(level_downsamples[level])


def level_origins(coords: np.ndarray, factor: float) -> np.ndarray:
    """The placement rule: level-0 (x, y) -> the nearest whole pixel of a level of `factor`.

    Where x is a multiple of an integer factor (every grid tile of our tilings) this is exact;
    elsewhere the tile moves by at most factor / 2 level-0 px, and is read, not interpolated.
    """
    return np.floor(np.asarray(coords, dtype=np.float64) / factor + 0.5).astype(np.int64)


def level_tile_side(size_level0: int, factor: float) -> int:
    """Read-level side of a level-0 tile side (the region resampled to tile_px)."""
    return max(1, round(size_level0 / factor))


def grid_tile_size(info: SlideInfo, tile_px: int, tile_mpp: float) -> tuple[int, int]:
    """(read level, level-0 tile side) of a grid: the side is a whole number of read-level px.

    So every grid origin (a multiple of the side) is a whole read-level pixel and a tile is cut
    from stored pixels, never interpolated; the side is within factor / 2 level-0 px (half a
    read-level pixel) of `tile_px * tile_mpp` µm, and the effective MPP is recorded.
    """
    level = best_level(info, tile_mpp)
    factor = level_factor(info.level_dimensions, info.level_downsamples, level)
    nominal = tile_px * tile_mpp / info.mpp
    if factor != round(factor):  # a fractional pyramid: whole level-0 px, positions snapped
        return level, max(1, round(nominal))
    n = round(factor)
    return level, n * max(1, round(nominal / n))


def rgba_to_rgb(region: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's premultiplied RGBA on white (transparent = outside the scanned area)."""
    rgb = region[..., :3].astype(np.uint16)
    alpha = region[..., 3:4].astype(np.uint16)
    return (rgb + (255 - alpha)).clip(0, 255).astype(np.uint8)


def read_tile(
    slide: openslide.OpenSlide,
    x: int,
    y: int,
    size_level0: int,
    level: int,
    downsample: float,
    tile_px: int,
) -> np.ndarray:
    """Read the level-0 box (x, y, size_level0) from `level` and resample it to tile_px (RGB uint8).

    The filter is cv2.INTER_AREA (pixel-area averaging) when shrinking and INTER_CUBIC when the
    chosen level is coarser than the target (only when the slide has no finer level).
    """
    size_level = max(1, round(size_level0 / downsample))
    region = np.asarray(slide.read_region((int(x), int(y)), level, (size_level, size_level)))
    return resize_to_tile(rgba_to_rgb(region), tile_px)


def resize_to_tile(rgb: np.ndarray, tile_px: int) -> np.ndarray:
    """A square RGB region resampled to tile_px: INTER_AREA when shrinking, INTER_CUBIC when not."""
    side = rgb.shape[0]
    if side == tile_px:
        return rgb
    interpolation = cv2.INTER_AREA if side > tile_px else cv2.INTER_CUBIC
    return cv2.resize(rgb, (tile_px, tile_px), interpolation=interpolation)


def read_level_downscaled(
    slide: openslide.OpenSlide,
    info: SlideInfo,
    level: int,
    scale: float,
    chunk: int = 4096,
) -> np.ndarray:
    """Read a whole level in chunks and shrink each by `scale` (<= 1), so memory stays bounded.

    The chunks come from the level's stored tiles where eagleflow.tilereader can decode them:
    on a rounded level OpenSlide would interpolate every chunk but the first (and it is slower).
    """
    from eagleflow.tilereader import LevelPixels

    level_w, level_h = info.level_dimensions[level]
    downsample = info.level_downsamples[level]
    out_w, out_h = max(1, round(level_w * scale)), max(1, round(level_h * scale))
    out = np.full((out_h, out_w, 3), 255, dtype=np.uint8)
    pixels = LevelPixels.open(info.path, slide, level)

    def read(left: int, top: int, w: int, h: int) -> np.ndarray:
        if pixels is not None:
            return pixels.region(left, top, w, h)
        origin = (round(left * downsample), round(top * downsample))
        return rgba_to_rgb(np.asarray(slide.read_region(origin, level, (w, h))))

    try:
        for top in range(0, level_h, chunk):
            for left in range(0, level_w, chunk):
                w, h = min(chunk, level_w - left), min(chunk, level_h - top)
                x0, y0 = round(left * scale), round(top * scale)
                x1 = min(out_w, round((left + w) * scale))
                y1 = min(out_h, round((top + h) * scale))
                if x1 <= x0 or y1 <= y0:
                    continue
                region = read(left, top, w, h)
                if (x1 - x0, y1 - y0) != (w, h):
                    region = cv2.resize(region, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
                out[y0:y1, x0:x1] = region
    finally:
        if pixels is not None:
            pixels.close()
    return out
