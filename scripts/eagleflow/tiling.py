"""Tissue mask, tile grid and the EAGLE/STAMP Canny edge rejection -> a table of tiles."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide
from tqdm import tqdm

from eagleflow.h5io import atomic_write_bytes
from eagleflow.mpp import DEFAULT_MPP_RANGE, check_mpp_settings
from eagleflow.slides import (
    SlideError,
    SlideInfo,
    best_level,
    level0_tile_size,
    open_slide,
    read_level_downscaled,
    slide_info,
)
from eagleflow.tilereader import SlideTileReader, iter_slide_tiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TilingParams:
    """Every value that changes which tiles a slide yields (all come from config `tiling`)."""

    tile_px: int = 224
    tile_mpp: float = 2.0
    mask_mpp: float = 16.0
    saturation_min: int = 20
    min_tissue_fraction: float = 0.1
    pen_filter: bool = True
    canny_low: int = 40
    canny_high: int = 100
    min_edge_fraction: float = 0.02
    border: str = "drop"
    default_mpp: float | None = None
    # Decides only whether a slide is refused (not its tiles): the rule reads it from the config,
    # outside its params, so widening it reruns no finished slide.
    mpp_range: tuple[float, float] = DEFAULT_MPP_RANGE

    def __post_init__(self) -> None:
        if self.border not in ("drop", "pad"):
            raise ValueError(f"tiling.border must be 'drop' or 'pad', not {self.border!r}")
        object.__setattr__(self, "mpp_range", tuple(self.mpp_range))  # YAML gives a list
        check_mpp_settings(self.mpp_range, self.default_mpp)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class TileTable:
    """Kept tiles (row-major, level-0 (x, y) top-left) and what QC needs to draw the decision."""

    slide_id: str
    info: SlideInfo
    params: TilingParams
    read_level: int
    tile_size_level0: int
    coords: np.ndarray  # (N, 2) int64, level-0 px (x, y)
    tissue_fraction: np.ndarray  # (N,) float32
    edge_fraction: np.ndarray  # (N,) float32
    rejected_coords: np.ndarray  # (M, 2) int64, tissue tiles that failed the edge test
    n_grid: int
    mask: np.ndarray  # (h, w) bool at mask_scale
    mask_thumbnail: np.ndarray  # (h, w, 3) uint8 RGB at mask_scale
    mask_scale: float  # mask px per level-0 px

    @property
    def effective_mpp(self) -> float:
        return self.tile_size_level0 * self.info.mpp / self.params.tile_px


def tissue_mask(rgb: np.ndarray, params: TilingParams) -> np.ndarray:
    """Tissue = saturated pixels (Otsu on HSV saturation, floored), minus pen ink, cleaned up.

    Pen ink (green, blue, black marker) is saturated too; H&E stays in the pink-purple hues, so
    green-to-blue hues and near-black pixels are dropped when `pen_filter` is on.
    """
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    saturation = cv2.medianBlur(hsv[..., 1], 5)
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = saturation > max(otsu, params.saturation_min)
    if params.pen_filter:
        hue, value = hsv[..., 0], hsv[..., 2]
        pen = ((hue >= 35) & (hue <= 115) & (hsv[..., 1] > 60)) | (value < 40)
        mask &= ~pen
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    return mask.astype(bool)


def edge_fraction(tile_rgb: np.ndarray, low: int, high: int) -> float:
    """Fraction of Canny edge pixels on the grayscale tile (the EAGLE/STAMP background test)."""
    gray = cv2.cvtColor(tile_rgb, cv2.COLOR_RGB2GRAY)
    return float(np.count_nonzero(cv2.Canny(gray, low, high))) / gray.size


def grid_origins(width: int, height: int, size: int, border: str) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 x and y origins of the grid; 'drop' keeps only tiles fully inside the slide."""
    if border == "drop":
        nx, ny = width // size, height // size
    else:
        nx, ny = -(-width // size), -(-height // size)
    return np.arange(nx, dtype=np.int64) * size, np.arange(ny, dtype=np.int64) * size


def _box_fractions(mask: np.ndarray, xs: np.ndarray, ys: np.ndarray, size: int, scale: float):
    """Mean of the mask over each grid cell, via an integral image (cheap for 10^5 cells)."""
    integral = cv2.integral(mask.astype(np.uint8)).astype(np.float64)
    h, w = mask.shape
    x0 = np.clip(np.floor(xs * scale).astype(int), 0, w)
    x1 = np.clip(np.ceil((xs + size) * scale).astype(int), 0, w)
    y0 = np.clip(np.floor(ys * scale).astype(int), 0, h)
    y1 = np.clip(np.ceil((ys + size) * scale).astype(int), 0, h)
    area = np.maximum((x1 - x0)[None, :] * (y1 - y0)[:, None], 1)
    total = (
        integral[y1[:, None], x1[None, :]]
        - integral[y0[:, None], x1[None, :]]
        - integral[y1[:, None], x0[None, :]]
        + integral[y0[:, None], x0[None, :]]
    )
    return total / area  # (ny, nx)


def iter_tiles(
    path: str,
    slide_id: str,
    info: SlideInfo,
    coords: np.ndarray,
    level: int,
    size_level0: int,
    tile_px: int,
    threads: int = 1,
) -> Iterator[np.ndarray]:
    """Yield RGB tiles for `coords` in order, read by `threads` threads ahead of the consumer."""
    reader = SlideTileReader(
        path, slide_id, coords, size_level0, level, info.level_downsamples[level], tile_px
    )
    for _, _, tile in iter_slide_tiles([reader], threads):
        yield tile


def _unreadable(label: str, where: str, err: Exception) -> SlideError:
    """Reading pixel data failed although the slide opened: damaged or truncated image data."""
    return SlideError(
        f"{label}: reading {where} failed ({err}); the slide's image data is corrupt or "
        "truncated. Re-copy the slide from its source, or remove it from the slide sheet."
    )


def tile_slide(
    path: str,
    slide_id: str,
    params: TilingParams,
    sheet_mpp: float | None = None,
    threads: int = 1,
    progress: bool = True,
) -> TileTable:
    """Tile one slide: mask on a coarse level, grid at `tile_mpp`, Canny test on each tissue tile."""
    slide = open_slide(path, slide_id)
    info = slide_info(slide, path, slide_id, sheet_mpp, params.default_mpp, params.mpp_range)
    label = f"slide {slide_id!r} ({path})"
    size = level0_tile_size(info.mpp, params.tile_px, params.tile_mpp)
    xs, ys = grid_origins(info.width, info.height, size, params.border)
    if len(xs) == 0 or len(ys) == 0:
        raise SlideError(
            f"{label}: {info.width}x{info.height} px at {info.mpp:g} µm/px is smaller than one "
            f"{params.tile_px * params.tile_mpp:g} µm tile, so it yields no tiles. Remove it from the "
            "sheet, or use tiling.border: pad."
        )
    mask_level = best_level(info, params.mask_mpp)
    scale_in_level = info.level_mpp(mask_level) / params.mask_mpp
    try:
        thumbnail = read_level_downscaled(slide, info, mask_level, min(1.0, scale_in_level))
    except openslide.OpenSlideError as err:
        raise _unreadable(label, f"pyramid level {mask_level}", err) from err
    mask = tissue_mask(thumbnail, params)
    mask_scale = thumbnail.shape[1] / info.width
    fractions = _box_fractions(mask, xs, ys, size, mask_scale)
    rows, cols = np.nonzero(fractions >= params.min_tissue_fraction)  # row-major order
    candidates = np.stack([xs[cols], ys[rows]], axis=1).astype(np.int64)
    candidate_tissue = fractions[rows, cols].astype(np.float32)
    if len(candidates) == 0:
        raise SlideError(
            f"{label}: no tissue found (no tile is {params.min_tissue_fraction:.0%} tissue in the "
            "mask). Check the slide; if it is faint, lower tiling.saturation_min or "
            "tiling.min_tissue_fraction."
        )
    level = best_level(info, params.tile_mpp)
    edges = np.empty(len(candidates), dtype=np.float32)
    # the Canny test runs here, alongside the reader threads (cv2 releases the GIL)
    tiles = iter_tiles(path, slide_id, info, candidates, level, size, params.tile_px, threads)
    done = 0
    try:
        for tile in tqdm(
            tiles, total=len(candidates), desc=f"edges {slide_id}", disable=not progress
        ):
            edges[done] = edge_fraction(tile, params.canny_low, params.canny_high)
            done += 1
    except openslide.OpenSlideError as err:
        x, y = candidates[done]
        where = f"the tile at level-0 ({x}, {y}) on pyramid level {level}"
        raise _unreadable(label, where, err) from err
    keep = edges >= params.min_edge_fraction
    if not keep.any():
        raise SlideError(
            f"{label}: all {len(candidates)} tissue tiles failed the edge test (< "
            f"{params.min_edge_fraction:.0%} Canny edge pixels); the slide may be blurred or empty. "
            "Check it, or lower tiling.min_edge_fraction."
        )
    log.info(
        "%s: %d grid tiles, %d tissue, %d kept after the edge test (level %d, %d px level-0 tiles)",
        slide_id,
        len(xs) * len(ys),
        len(candidates),
        int(keep.sum()),
        level,
        size,
    )
    return TileTable(
        slide_id=slide_id,
        info=info,
        params=params,
        read_level=level,
        tile_size_level0=size,
        coords=candidates[keep],
        tissue_fraction=candidate_tissue[keep],
        edge_fraction=edges[keep],
        rejected_coords=candidates[~keep],
        n_grid=len(xs) * len(ys),
        mask=mask,
        mask_thumbnail=thumbnail,
        mask_scale=mask_scale,
    )


def qc_image(table: TileTable, max_side: int = 1200) -> np.ndarray:
    """RGB QC picture: tissue mask tinted, kept tiles in green, edge-rejected tiles in red."""
    image = table.mask_thumbnail.copy()
    tint = np.zeros_like(image)
    tint[table.mask] = (0, 90, 255)
    image = cv2.addWeighted(image, 1.0, tint, 0.25, 0)
    factor = max_side / max(image.shape[:2])
    if factor > 1:
        image = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
    scale = image.shape[1] / table.info.width
    size = table.tile_size_level0 * scale
    for coords, colour in ((table.rejected_coords, (220, 30, 30)), (table.coords, (20, 170, 20))):
        for x, y in coords:
            top_left = (round(x * scale), round(y * scale))
            bottom_right = (round(x * scale + size) - 1, round(y * scale + size) - 1)
            cv2.rectangle(image, top_left, bottom_right, colour, 1)
    banner = np.full((28, image.shape[1], 3), 255, dtype=np.uint8)
    text = (
        f"{table.slide_id}: {len(table.coords)} tiles kept (green), {len(table.rejected_coords)} "
        f"edge-rejected (red); {table.params.tile_px}px @ {table.params.tile_mpp:g} um/px"
    )
    cv2.putText(banner, text, (6, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([banner, image], axis=0)


def write_qc_png(table: TileTable, path: str | Path) -> None:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(qc_image(table), cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode the QC image for {path}")
    atomic_write_bytes(path, encoded.tobytes())


def run_tiling(
    slide_path: str,
    slide_id: str,
    params: dict[str, object],
    sheet_mpp: float | None,
    tiles_h5: str,
    qc_png: str,
    threads: int = 1,
) -> TileTable:
    """The `tiling_tile_slide` rule: tile a slide, write its tiles file and QC picture."""
    from eagleflow.h5io import write_tiles
    from eagleflow.provenance import provenance_attrs

    tiling_params = TilingParams(**params)  # type: ignore[arg-type]
    table = tile_slide(slide_path, slide_id, tiling_params, sheet_mpp, threads=threads)
    if table.info.mpp_warning:
        log.warning("%s: %s", slide_id, table.info.mpp_warning)
    provenance = provenance_attrs(
        "tiling_tile_slide", {**tiling_params.as_dict(), "sheet_mpp": sheet_mpp}
    )
    write_qc_png(table, qc_png)
    try:
        write_tiles(tiles_h5, table, provenance)
    except BaseException:
        Path(qc_png).unlink(missing_ok=True)  # no QC picture of tiles that were never written
        raise
    return table
