"""Tissue mask, tile grid and the EAGLE/STAMP Canny edge rejection -> a table of tiles."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import overload

import cv2
import numpy as np
import openslide
from tqdm import tqdm

from eagleflow.grids import Grid
from eagleflow.h5io import atomic_write_bytes
from eagleflow.mpp import DEFAULT_MPP_RANGE, check_mpp_settings
from eagleflow.slides import (
    SlideError,
    SlideInfo,
    best_level,
    grid_tile_size,
    level_factor,
    level_origins,
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
    def grid(self) -> Grid:
        return Grid(self.params.tile_px, self.params.tile_mpp)

    @property
    def effective_mpp(self) -> float:
        return self.tile_size_level0 * self.info.mpp / self.params.tile_px

    def placement_attrs(self) -> dict[str, object]:
        """How the tiles were placed on the read level, for the tiles file's attributes."""
        info = self.info
        factor = level_factor(info.level_dimensions, info.level_downsamples, self.read_level)
        coords = np.concatenate([self.coords, self.rejected_coords]).reshape(-1, 2)
        read_at = level_origins(coords, factor) * factor  # level-0 point of each tile's pixels
        offset = float(np.abs(read_at - coords).max(initial=0.0))
        # where OpenSlide's read_region (x / its downsample) would have put the same pixels
        openslide_at = read_at / factor * info.level_downsamples[self.read_level]
        return {
            "coord_placement": (
                "each tile is the read level's pixels from the nearest whole pixel to "
                "(x, y) / read_level_factor, never interpolated (eagleflow.tilereader)"
            ),
            "read_level_factor": factor,
            "coords_max_offset_level0_px": offset,
            "coords_max_offset_openslide_level0_px": float(
                np.abs(openslide_at - coords).max(initial=0.0)
            ),
        }


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


def _too_small(label: str, info: SlideInfo, grid: Grid) -> SlideError:
    return SlideError(
        f"{label}: {info.width}x{info.height} px at {info.mpp:g} µm/px is smaller than one "
        f"{grid.tile_size_um:g} µm tile (grid {grid.name}), so it yields no tiles. Remove it from "
        "the sheet, or use tiling.border: pad."
    )


@dataclass
class _GridCandidates:
    """One grid's tissue tiles, before the edge test."""

    params: TilingParams  # the shared settings with this grid's tile_px and tile_mpp
    size: int  # level-0 tile side
    n_grid: int
    coords: np.ndarray  # (N, 2) int64, row-major
    tissue_fraction: np.ndarray  # (N,) float32

    @property
    def grid(self) -> Grid:
        return Grid(self.params.tile_px, self.params.tile_mpp)


def _edge_test(
    path: str,
    slide_id: str,
    label: str,
    info: SlideInfo,
    tissue: _GridCandidates,
    threads: int,
    progress: bool,
) -> tuple[int, np.ndarray]:
    """(read level, edge fraction of each candidate), each tile read at this grid's resolution."""
    params, candidates = tissue.params, tissue.coords
    level = best_level(info, params.tile_mpp)
    edges = np.empty(len(candidates), dtype=np.float32)
    # the Canny test runs here, alongside the reader threads (cv2 releases the GIL)
    tiles = iter_tiles(
        path, slide_id, info, candidates, level, tissue.size, params.tile_px, threads
    )
    done = 0
    try:
        for tile in tqdm(
            tiles,
            total=len(candidates),
            desc=f"edges {slide_id} {tissue.grid.name}",
            disable=not progress,
        ):
            edges[done] = edge_fraction(tile, params.canny_low, params.canny_high)
            done += 1
    except openslide.OpenSlideError as err:
        x, y = candidates[done]
        where = f"the tile at level-0 ({x}, {y}) on pyramid level {level}"
        raise _unreadable(label, where, err) from err
    return level, edges


def tile_slide_grids(
    path: str,
    slide_id: str,
    params: TilingParams,
    grids: Sequence[Grid],
    sheet_mpp: float | None = None,
    threads: int = 1,
    progress: bool = True,
) -> list[TileTable]:
    """Tile one slide on every grid from ONE tissue mask; one table per grid, in `grids` order.

    `params` gives the mask and edge settings all grids share (its tile_px and tile_mpp are
    ignored); each table's params carry its grid's. A grid's tiles depend only on the slide, the
    shared settings and that grid: the other grids change none of them.
    """
    grids = list(grids)
    if not grids:
        raise ValueError("tile_slide_grids needs at least one grid")
    if len(set(grids)) != len(grids):
        raise ValueError(f"grids listed twice: {[grid.name for grid in grids]}")
    slide = open_slide(path, slide_id)
    info = slide_info(slide, path, slide_id, sheet_mpp, params.default_mpp, params.mpp_range)
    label = f"slide {slide_id!r} ({path})"
    # every grid's geometry first: a slide too small for any grid fails before a pixel is read
    geometry = []
    for grid in grids:
        _, size = grid_tile_size(info, grid.tile_px, grid.tile_mpp)
        xs, ys = grid_origins(info.width, info.height, size, params.border)
        if len(xs) == 0 or len(ys) == 0:
            raise _too_small(label, info, grid)
        geometry.append((grid, size, xs, ys))

    mask_level = best_level(info, params.mask_mpp)
    # the level's true µm per pixel (its integer factor on a rounded level: 64, not 63.97)
    factor = level_factor(info.level_dimensions, info.level_downsamples, mask_level)
    scale_in_level = info.mpp * factor / params.mask_mpp
    try:
        thumbnail = read_level_downscaled(slide, info, mask_level, min(1.0, scale_in_level))
    except openslide.OpenSlideError as err:
        raise _unreadable(label, f"pyramid level {mask_level}", err) from err
    mask = tissue_mask(thumbnail, params)
    mask_scale = thumbnail.shape[1] / info.width

    # every grid's tissue tiles from that one mask, before the (slow) edge pass of any grid
    candidates = []
    for grid, size, xs, ys in geometry:
        fractions = _box_fractions(mask, xs, ys, size, mask_scale)
        rows, cols = np.nonzero(fractions >= params.min_tissue_fraction)  # row-major order
        if len(rows) == 0:
            raise SlideError(
                f"{label}: no tissue found on grid {grid.name} (no tile is "
                f"{params.min_tissue_fraction:.0%} tissue in the mask). Check the slide; if it is "
                "faint, lower tiling.saturation_min or tiling.min_tissue_fraction."
            )
        candidates.append(
            _GridCandidates(
                params=replace(params, tile_px=grid.tile_px, tile_mpp=grid.tile_mpp),
                size=size,
                n_grid=len(xs) * len(ys),
                coords=np.stack([xs[cols], ys[rows]], axis=1).astype(np.int64),
                tissue_fraction=fractions[rows, cols].astype(np.float32),
            )
        )

    tables = []
    for tissue in candidates:
        level, edges = _edge_test(path, slide_id, label, info, tissue, threads, progress)
        keep = edges >= params.min_edge_fraction
        if not keep.any():
            raise SlideError(
                f"{label}: all {len(tissue.coords)} tissue tiles failed the edge test on grid "
                f"{tissue.grid.name} (< {params.min_edge_fraction:.0%} Canny edge pixels); the slide "
                "may be blurred or empty. Check it, or lower tiling.min_edge_fraction."
            )
        log.info(
            "%s, grid %s: %d grid tiles, %d tissue, %d kept after the edge test "
            "(level %d, %d px level-0 tiles)",
            slide_id,
            tissue.grid.name,
            tissue.n_grid,
            len(tissue.coords),
            int(keep.sum()),
            level,
            tissue.size,
        )
        tables.append(
            TileTable(
                slide_id=slide_id,
                info=info,
                params=tissue.params,
                read_level=level,
                tile_size_level0=tissue.size,
                coords=tissue.coords[keep],
                tissue_fraction=tissue.tissue_fraction[keep],
                edge_fraction=edges[keep],
                rejected_coords=tissue.coords[~keep],
                n_grid=tissue.n_grid,
                mask=mask,
                mask_thumbnail=thumbnail,
                mask_scale=mask_scale,
            )
        )
    return tables


def tile_slide(
    path: str,
    slide_id: str,
    params: TilingParams,
    sheet_mpp: float | None = None,
    threads: int = 1,
    progress: bool = True,
) -> TileTable:
    """Tile one slide: mask on a coarse level, grid at `tile_mpp`, Canny test on each tissue tile."""
    grid = Grid(params.tile_px, params.tile_mpp)
    (table,) = tile_slide_grids(path, slide_id, params, [grid], sheet_mpp, threads, progress)
    return table


def _banner(lines: list[str], width: int) -> np.ndarray:
    """White strip with one text line each, the font shrunk until the longest line fits."""
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.45
    widest = max(cv2.getTextSize(line, font, scale, 1)[0][0] for line in lines)
    scale *= min(1.0, (width - 12) / max(widest, 1))
    banner = np.full((10 + 18 * len(lines), width, 3), 255, dtype=np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(banner, line, (6, 19 + 18 * i), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return banner


def qc_image(tables: Sequence[TileTable], max_side: int = 1200) -> np.ndarray:
    """RGB QC picture of the first grid (mask tinted, kept tiles green, edge-rejected red).

    The banner gives every grid's count of kept tiles: all grids share the mask drawn here.
    """
    table = tables[0]
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
    lines = [
        f"{table.slide_id}: {len(table.coords)} tiles kept (green), {len(table.rejected_coords)} "
        f"edge-rejected (red); {table.params.tile_px}px @ {table.params.tile_mpp:g} um/px"
    ]
    lines += [
        f"grid {other.grid.name}: {len(other.coords)} tiles kept, "
        f"{len(other.rejected_coords)} edge-rejected"
        for other in tables[1:]
    ]
    return np.concatenate([_banner(lines, image.shape[1]), image], axis=0)


def write_qc_png(tables: Sequence[TileTable], path: str | Path) -> None:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(qc_image(tables), cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode the QC image for {path}")
    atomic_write_bytes(path, encoded.tobytes())


GRID_KEYS = ("tile_px", "tile_mpp")


def _shared_params_and_grids(
    params: Mapping[str, object], grids: Sequence[Mapping[str, object]] | None
) -> tuple[TilingParams, list[Grid]]:
    """The settings all grids share, and the grids (from `grids`, or the one inside `params`)."""
    if grids is None:
        shared = TilingParams(**params)  # type: ignore[arg-type]
        return shared, [Grid(shared.tile_px, shared.tile_mpp)]
    given = [key for key in GRID_KEYS if key in params]
    if given:  # two sources for one value: say which wins rather than pick one silently
        raise ValueError(
            f"tiling params hold {', '.join(given)} although grids are given: each grid's "
            "tile_px and tile_mpp come from `grids` only"
        )
    shared = TilingParams(**params)  # type: ignore[arg-type]
    return shared, [Grid(int(g["tile_px"]), float(g["tile_mpp"])) for g in grids]  # type: ignore[arg-type]


@overload
def run_tiling(
    slide_path: str,
    slide_id: str,
    params: Mapping[str, object],
    sheet_mpp: float | None,
    tiles_h5: str | os.PathLike[str],
    qc_png: str | os.PathLike[str],
    threads: int = 1,
    grids: None = None,
) -> TileTable: ...


@overload
def run_tiling(
    slide_path: str,
    slide_id: str,
    params: Mapping[str, object],
    sheet_mpp: float | None,
    tiles_h5: Sequence[str | os.PathLike[str]],
    qc_png: str | os.PathLike[str],
    threads: int = 1,
    grids: Sequence[Mapping[str, object]] | None = None,
) -> list[TileTable]: ...


def run_tiling(
    slide_path: str,
    slide_id: str,
    params: Mapping[str, object],
    sheet_mpp: float | None,
    tiles_h5: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    qc_png: str | os.PathLike[str],
    threads: int = 1,
    grids: Sequence[Mapping[str, object]] | None = None,
) -> TileTable | list[TileTable]:
    """The `tiling_tile_slide` rule: tile a slide on every grid, write each grid's tiles file
    (`tiles_h5[i]` for `grids[i]`) and one QC picture (the first grid's tiles).

    `params` holds the shared mask and edge settings; `grids` ({"tile_px", "tile_mpp"} each) the
    grids. Without `grids`, the one grid is params' tile_px and tile_mpp, and a single path in
    `tiles_h5` returns a single table. On any failure none of the outputs remain.
    """
    from eagleflow.h5io import write_tiles
    from eagleflow.provenance import provenance_attrs

    single = isinstance(tiles_h5, (str, os.PathLike))
    paths = [tiles_h5] if single else list(tiles_h5)  # type: ignore[list-item]
    shared, grid_list = _shared_params_and_grids(params, grids)
    if len(paths) != len(grid_list):
        raise ValueError(f"{len(grid_list)} grids but {len(paths)} tiles files: {paths}")
    try:
        tables = tile_slide_grids(
            slide_path, slide_id, shared, grid_list, sheet_mpp, threads=threads
        )
        if tables[0].info.mpp_warning:
            log.warning("%s: %s", slide_id, tables[0].info.mpp_warning)
        write_qc_png(tables, qc_png)
        for table, path in zip(tables, paths, strict=True):
            # the same record as a one-grid run: every setting, this grid's tile_px and tile_mpp
            provenance = provenance_attrs(
                "tiling_tile_slide", {**table.params.as_dict(), "sheet_mpp": sheet_mpp}
            )
            write_tiles(path, table, {**provenance, **table.placement_attrs()})
    except BaseException:
        # a slide is tiled on every grid or on none: later stages never see a partial set
        for output in (*paths, qc_png):
            Path(output).unlink(missing_ok=True)
        raise
    return tables[0] if single else tables
