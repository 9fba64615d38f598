"""Slide encoders over a bag of tiles: one slide, or all slides of a patient (one stain).

One stage for every slide encoder (Prov-GigaPath, TITAN, MADELEINE, PRISM, COBRA): it reads the
bag's tile features through the features format, lays the tiles out on one canvas of cells, and
calls the model's `encode_bag(feats, cells, tile_encoder, **options)` (see
`eagleflow.models.card`). Each slide is measured in tiles (level-0 coords / that slide's
level-0 tile size, exact integers: slides scanned at different µm/px share one frame when their
tiles cover the same µm) and moved to the origin of its own bounding box; a patient's slides are
then put side by side on one canvas, left to right with a gap of one empty cell, on shelves 1000
cells wide (a shelf starts below the tallest slide of the one above, after the same gap). No two
tiles share a cell (TITAN's reference would sum them silently), and a model with a bounded grid
(Prov-GigaPath's 1000 x 1000 positions) refuses a bag that does not fit (its reference would
alias rows >= 1000 silently).

Tokens go slide by slide (slides sorted by id), each slide row-major (y, then x), as STAMP's
patient encoder concatenates slides; a canvas-wide row-major order would interleave the rows of
slides on one shelf. The order matters to the order-dependent models (COBRA's Mamba scan,
LongNet's segments) and is recorded in every output.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from eagleflow.batches import digest
from eagleflow.encoders import FUSIONS, SLIDE_ENCODERS, TILE_ENCODERS, slide_encoder_input
from eagleflow.errors import EagleflowError
from eagleflow.feature_files import FEATURES_FORMAT, read_tile_features
from eagleflow.h5io import FormatError, read_attrs
from eagleflow.model_stage import Models, Pending, StageOutput, run_model_stage, upstream_weights

log = logging.getLogger(__name__)

STAGE = "slide_encoders_encode_bags"
SLIDE_EMBEDDING_FORMAT = "eagleflow.slide_embedding/2"
SLIDE_EMBEDDING_SHAPES: dict[str, tuple[int | str | None, ...]] = {
    "embedding": (None,),
    "positions": ("L", 2),
}
SHELF_WIDTH = 1000  # canvas cells per shelf (Prov-GigaPath's grid side)
SLIDE_GAP = 1  # empty cells between two slides of a bag (and between shelves)
# Settings the stage reads itself; the others go to the model's encode_bag.
STAGE_SETTINGS = ("fusion", "tile_encoder", "device")
LAYOUT = (
    f"slides side by side in tile units (level-0 coords / the slide's level-0 tile size), "
    f"each moved to its own origin, in slide_order, gap {SLIDE_GAP} tile, shelves of "
    f"{SHELF_WIDTH} cells"
)
TOKEN_ORDER = "slide by slide in slide_order, row-major (y, then x) within a slide"


class SlideLayoutError(EagleflowError, ValueError):
    """A bag's tiles cannot be placed on the slide encoder's grid."""


@dataclass(frozen=True)
class BagSlide:
    """One slide's tile features, as a slide encoder needs them."""

    feats: np.ndarray | None  # (N, D) float32; None when read without data
    coords_level0: np.ndarray | None  # (N, 2) int64 level-0 (x, y) top-left pixels
    tile_size_level0: int
    attrs: dict[str, Any]


def read_bag_slide(path: str, with_data: bool = True, dim: int | None = None) -> BagSlide:
    """A per-slide tile-feature file (eagleflow.feature_files) with features of width `dim`;
    attributes only if not `with_data` (the up-to-date check reads no patient's features)."""
    feats = coords = None
    if with_data:
        feats, coords, attrs = read_tile_features(path)
        if dim is not None and feats.shape[1] != dim:
            raise FormatError(f"{path}: feats must be (N, {dim}), got {feats.shape}")
    else:
        try:
            attrs = read_attrs(path)
        except OSError as err:
            raise FormatError(f"{path}: unreadable or incomplete file ({err})") from err
        if attrs.get("format") != FEATURES_FORMAT:
            raise FormatError(
                f"{path}: not a {FEATURES_FORMAT} file (format {attrs.get('format')!r})"
            )
    missing = [k for k in ("content_sha256", "tile_size_level0_px") if k not in attrs]
    if missing:
        raise FormatError(f"{path}: attribute(s) {', '.join(missing)} missing")
    return BagSlide(feats, coords, int(attrs["tile_size_level0_px"]), attrs)


def slide_cells(coords_level0: np.ndarray, tile_size_level0: int) -> np.ndarray:
    """Level-0 (x, y) tile origins -> cells in tile units, moved so that min gx = min gy = 0.

    Raises SlideLayoutError for coords that are not multiples of the tile size (our tilings'
    are; flooring others could put two tiles into one cell) or for two tiles in one cell.
    """
    coords = np.asarray(coords_level0, dtype=np.int64).reshape(-1, 2)
    if tile_size_level0 <= 0:
        raise SlideLayoutError(f"tile size must be positive, got {tile_size_level0}")
    if len(coords) == 0:
        return coords.copy()
    off_grid = coords % tile_size_level0 != 0
    if off_grid.any():
        worst = coords[off_grid.any(1)][0].tolist()
        raise SlideLayoutError(
            f"tile at level-0 (x, y) = {tuple(worst)} is not on the grid of its "
            f"{tile_size_level0}-px tiles (coordinates must be multiples of the tile size)"
        )
    cells = coords // tile_size_level0
    cells -= cells.min(0)
    if len(np.unique(cells, axis=0)) != len(cells):
        raise SlideLayoutError("two tiles of one slide have the same coordinates")
    return cells


def bag_positions(
    slides: Sequence[tuple[np.ndarray, int]],
    gap: int = SLIDE_GAP,
    grid_limit: int | None = SHELF_WIDTH,
    *,
    names: Sequence[str] | None = None,
    shelf_width: int = SHELF_WIDTH,
) -> np.ndarray:
    """Grid cells (gx, gy) [L, 2] int64 of a bag's tiles, slide after slide in the given order.

    `slides` are (level-0 coords [N, 2], level-0 tile size) pairs. Each slide keeps its own
    tile layout, moved to its bounding box's origin, and is placed by shelf packing: left to
    right with `gap` empty cells between slides, a new shelf (below the tallest slide so far
    on the current one, after `gap` empty rows) when the next slide would reach gx >= shelf_width.
    Slides without tiles take no space. Raises SlideLayoutError (naming the slide by `names`,
    else its index) if a cell would reach `grid_limit` (the model's grid; None: unbounded) on
    either axis.
    """
    if grid_limit is not None:
        shelf_width = min(shelf_width, grid_limit)
    names = list(names) if names is not None else [f"slide {i}" for i in range(len(slides))]
    placed = []
    x = y = shelf_height = 0
    for name, (coords, tile_size) in zip(names, slides, strict=True):
        try:
            cells = slide_cells(coords, int(tile_size))
        except SlideLayoutError as err:
            raise SlideLayoutError(f"{name}: {err}") from err
        if len(cells) == 0:
            placed.append(cells)
            continue
        width, height = (int(v) + 1 for v in cells.max(0))
        if grid_limit is not None and (width > grid_limit or height > grid_limit):
            raise SlideLayoutError(
                f"{name} spans {width} x {height} tiles; the slide encoder's grid is "
                f"{grid_limit} x {grid_limit} tiles"
            )
        if x > 0 and x + width > shelf_width:
            x, y, shelf_height = 0, y + shelf_height + gap, 0
        if grid_limit is not None and y + height > grid_limit:
            raise SlideLayoutError(
                f"the bag's slides do not fit the slide encoder's {grid_limit} x {grid_limit} "
                f"grid of tiles: {name} ({width} x {height} tiles) would reach row "
                f"{y + height - 1}; encode slides one by one instead "
                f"(slide_encoders.<name>.fusion: late)"
            )
        placed.append(cells + np.array([x, y], dtype=np.int64))
        x += width + gap
        shelf_height = max(shelf_height, height)
    positions = np.concatenate(placed) if placed else np.zeros((0, 2), dtype=np.int64)
    # Distinct slides occupy disjoint boxes, so this cannot fail; it guards the packing itself.
    assert len(np.unique(positions, axis=0)) == len(positions), "two tiles share a cell"
    assert len(positions) == 0 or grid_limit is None or positions.max() < grid_limit
    return positions.astype(np.int64, copy=False)


def row_major(cells: np.ndarray) -> np.ndarray:
    """Indices that sort cells by y, then x (the model's row-major order)."""
    return np.lexsort((cells[:, 0], cells[:, 1]))


def _check_params(params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The fusion, and the model's own options (what is not the stage's)."""
    fusion = str(params.get("fusion", "early"))
    if fusion not in FUSIONS:
        raise SlideLayoutError(f"slide_encoder.fusion must be one of {FUSIONS}, got {fusion!r}")
    return fusion, {k: v for k, v in params.items() if k not in STAGE_SETTINGS}


def _one_value(values: Sequence[Any], what: str, bag: str) -> Any:
    unique = sorted({str(v) for v in values})
    if len(unique) != 1:
        raise SlideLayoutError(f"{bag}: the slides' {what} differ ({', '.join(unique)})")
    return values[0]


def _tile_weights(attrs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The tile encoders' demo flags and sha256s from the inputs (demo if any input is demo)."""
    merged: dict[str, set[str]] = {}
    for a in attrs:
        for key, value in upstream_weights(a).items():
            merged.setdefault(key, set()).add(str(value))
    return {
        key: ("true" if "true" in values else "false")
        if key.endswith("_demo")
        else ",".join(sorted(values))
        for key, values in merged.items()
    }


def bag_tokens(
    slides: Sequence[BagSlide],
    names: Sequence[str] | None = None,
    grid_limit: int | None = SHELF_WIDTH,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A bag's tiles in token order: (feats [L, D], cells [L, 2], row in its slide's file [L]).

    Cells from bag_positions (slides in the given order); within a slide, row-major.
    """
    positions = bag_positions(
        [(s.coords_level0, s.tile_size_level0) for s in slides], names=names, grid_limit=grid_limit
    )
    feats, cells, rows, start = [], [], [], 0
    for slide in slides:
        own = positions[start : start + len(slide.feats)]
        start += len(slide.feats)
        order = row_major(own)
        feats.append(slide.feats[order])
        cells.append(own[order])
        rows.append(order)
    return np.concatenate(feats), np.concatenate(cells), np.concatenate(rows).astype(np.int64)


def encode_tokens(
    model: torch.nn.Module,
    feats: np.ndarray,
    cells: np.ndarray,
    tile_encoder: str,
    options: Mapping[str, Any],
    device: torch.device,
) -> tuple[np.ndarray, float]:
    """The model's embedding of tiles in this order at these cells, and its seconds."""
    from eagleflow.models.loading import autocast_context

    began = time.perf_counter()
    tokens = torch.from_numpy(feats).to(device)
    positions = torch.from_numpy(cells).to(device)
    with torch.inference_mode(), autocast_context(device):
        output = model.encode_bag(tokens, positions, tile_encoder, **options)
        embedding = output.float().cpu().numpy()  # .cpu() waits for the GPU
    return embedding, time.perf_counter() - began


@dataclass(frozen=True)
class _BagInputs:
    """A bag's slides (sorted by id) and what its output must have been made from."""

    bag_id: str
    slide_ids: list[str]
    paths: list[str]
    tile_weights: dict[str, str]
    input_sha256: str


def _bag_inputs(bag: Mapping[str, Any], fusion: str) -> _BagInputs:
    """Check a bag's slide list and read its inputs' attributes (not their data)."""
    bag_id = str(bag["slide_id"])
    members = sorted(bag["slides"], key=lambda s: str(s["slide_id"]))
    slide_ids = [str(s["slide_id"]) for s in members]
    if not members or len(set(slide_ids)) != len(slide_ids):
        raise SlideLayoutError(f"{bag_id}: a bag needs slides with distinct ids, got {slide_ids}")
    if fusion == "late" and len(members) != 1:
        raise SlideLayoutError(f"{bag_id}: late fusion takes one slide per bag, got {slide_ids}")
    paths = [str(s["features"]) for s in members]
    attrs = [read_bag_slide(path, with_data=False).attrs for path in paths]
    contents = [(sid, str(a["content_sha256"])) for sid, a in zip(slide_ids, attrs, strict=True)]
    return _BagInputs(bag_id, slide_ids, paths, _tile_weights(attrs), digest(contents))


def run_slide_encoder_batch(
    bags: Sequence[dict[str, Any]],
    encoder: str,
    model_cfg: dict[str, Any],
    params: dict[str, Any],
    manifest: str,
    threads: int = 1,
) -> None:
    """The `slide_encoders_encode_bags` rule for slide encoder `encoder`: for each bag
    {slide_id (the bag id), patient, slides: [{slide_id, features}], output}, the model's
    embedding of all its tiles.

    params: fusion ("early": a patient's slides in one bag, or "late": one slide per bag;
    recorded, the rule makes the bags), tile_encoder (what made the features), device, and the
    model's own options (gigapath_slide: layer).
    """
    spec = SLIDE_ENCODERS[encoder]
    tile_encoder = slide_encoder_input(encoder, params)
    tile_dim = TILE_ENCODERS[tile_encoder].dim
    fusion, options = _check_params(params)
    inputs: dict[str, _BagInputs] = {}

    def read_input(bag: Mapping[str, Any]) -> dict[str, Any]:
        inputs[str(bag["slide_id"])] = found = _bag_inputs(bag, fusion)
        return {"content_sha256": found.input_sha256, **found.tile_weights}

    def compute(todo: list[Pending], models: Models):
        for p in todo:
            bag = inputs[str(p.slide["slide_id"])]
            slides = [read_bag_slide(path, dim=tile_dim) for path in bag.paths]
            if sum(len(s.feats) for s in slides) == 0:
                raise SlideLayoutError(f"{bag.bag_id}: no tiles in its slides {bag.slide_ids}")
            # Tile units are one frame only if every slide's tiles cover the same µm.
            grid = {
                key: _one_value([s.attrs.get(key) for s in slides], key, bag.bag_id)
                for key in ("tile_px", "tile_mpp", "tile_size_um")
            }
            try:
                feats, positions, tile_index = bag_tokens(slides, bag.slide_ids, spec.grid_limit)
            except SlideLayoutError as err:
                raise SlideLayoutError(
                    f"{bag.bag_id} (slides {', '.join(bag.slide_ids)}): {err}"
                ) from err
            embedding, seconds = encode_tokens(
                models[spec.model], feats, positions, tile_encoder, options, models.device
            )
            slide_tiles = np.array([len(s.feats) for s in slides], dtype=np.int64)
            attrs = {
                "format": SLIDE_EMBEDDING_FORMAT,
                "encoder": encoder,
                "tile_encoder": tile_encoder,
                "embedding_output": spec.embedding,
                "bag": bag.bag_id,
                "patient": str(p.slide["patient"]),
                "fusion": fusion,
                **{f"option_{k}": v for k, v in options.items()},
                "n_tiles": int(slide_tiles.sum()),
                "n_slides": len(slides),
                "layout": LAYOUT,
                "token_order": TOKEN_ORDER,
                **grid,
                "compute_seconds": seconds,
                "tile_forwards": 0,
                "slide_forwards": 1,
            }
            datasets = {
                "embedding": embedding.astype(np.float32),
                "positions": positions,
                "tile_index": tile_index,
                "slide_order": np.array([sid.encode() for sid in bag.slide_ids]),
                "slide_tiles": slide_tiles,
            }
            log.info(
                "%s: %s over %d tiles of %d slide(s) in %.2f s",
                bag.bag_id,
                encoder,
                len(positions),
                len(slides),
                seconds,
            )
            yield p, datasets, attrs

    run_model_stage(
        STAGE,
        bags,
        input_key=None,
        read_input=read_input,
        model_of=lambda bag: spec.model,
        models_cfg={spec.model: model_cfg},
        settings={"fusion": fusion, "tile_encoder": tile_encoder, **options},
        output=StageOutput(SLIDE_EMBEDDING_FORMAT, SLIDE_EMBEDDING_SHAPES),
        compute=compute,
        manifest=manifest,
        device=str(params.get("device", "cpu")),
        threads=threads,
        what=f"{encoder} embedding",
    )
