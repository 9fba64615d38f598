"""Synthetic TCGA-sized slides for the benchmarks: 40x (0.25 µm/px) pyramidal JPEG TIFFs.

A slide is W x H level-0 px with four levels (downsamples 1, 4, 16, 64), 256 px JPEG tiles at
quality 80, the MPP in the resolution tags (OpenSlide's generic-tiff driver), and tissue blobs
from the demo's tissue model covering about a third of the area.

Level 1 (1 µm/px, the level read for 2 µm/px tiles) carries an H&E-like texture (eosin stroma,
hematoxylin nuclei, grain) cut from a per-slide atlas; levels 2 and 3 are its exact area
averages. Level 0 is never read at 2 µm/px: its tissue tiles are drawn from a few pre-encoded
textured tiles, so that writing a 10^10-pixel level stays a matter of seconds while its size,
tiling and file layout are those of a real scan. Slides are cached: same size and seed, same file.

Level sizes are W // 4^k by default; `rounding="ceil"` stores ceil(W / 4^k) x ceil(H / 4^k), as
an Aperio SVS does, so OpenSlide's downsamples are fractional (3.99997 for 120,001 px).
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import tifffile

from eagleflow.demo.render import _smooth_noise, _tissue_field
from eagleflow.demo.specs import SlideSpec

GENERATOR_VERSION = 1
MPP = 0.25
TILE = 256
QUALITY = 80
DOWNSAMPLES = (1, 4, 16, 64)
MASK_UM = 16.0  # µm per cell of the tissue map (one cell = 64 level-0 px = 16 level-1 px)
ATLAS_PX = 2048
BACKGROUND = 244


def he_atlas(rng: np.random.Generator) -> np.ndarray:
    """An H&E-like RGB texture at 1 µm/px: stroma, fibre grain and nuclei (Beer-Lambert mix)."""
    side = ATLAS_PX
    eosin = np.clip(0.75 + 0.2 * _smooth_noise(rng, (side, side), 12.0), 0.3, 1.0)
    eosin += 0.08 * _smooth_noise(rng, (side, side), 1.0)
    nuclei = np.zeros((side, side), np.uint8)
    n = int(3000 * (side / 1000) ** 2)  # ~3,000 nuclei per mm²
    xy = rng.uniform(0, side, (n, 2)).astype(int).tolist()
    radius = rng.lognormal(np.log(3.2), 0.2, (n, 2)).astype(int).clip(1, 8).tolist()
    angle = rng.uniform(0, 180, n).tolist()
    value = rng.integers(140, 230, n).tolist()
    for (x, y), (a, b), ang, v in zip(xy, radius, angle, value, strict=True):
        cv2.ellipse(nuclei, (x, y), (a, b), ang, 0, 360, v, -1)
    nuclei = cv2.GaussianBlur(nuclei, (3, 3), 0).astype(np.float32) / 255
    grain = rng.normal(0, 4, (side, side, 3)).astype(np.float32)
    e_vec, h_vec = np.array([12.0, 105.0, 55.0]), np.array([150.0, 175.0, 100.0])
    rgb = BACKGROUND - eosin[..., None] * e_vec - nuclei[..., None] * h_vec + grain
    return rgb.clip(0, 255).astype(np.uint8)


def encoded_tiles(tiles: list[np.ndarray]) -> list[bytes]:
    """Each tile JPEG-encoded exactly as tifffile encodes a tile of the pages written below."""
    buffer = io.BytesIO()
    tifffile.imwrite(
        buffer,
        np.concatenate(tiles, axis=0),
        tile=(TILE, TILE),
        compression="jpeg",
        compressionargs={"level": QUALITY},
        photometric="rgb",
        metadata=None,
    )
    with tifffile.TiffFile(io.BytesIO(buffer.getvalue())) as tif:
        page = tif.pages[0]
        spans = zip(page.dataoffsets, page.databytecounts, strict=True)
        data = buffer.getvalue()
        return [data[o : o + n] for o, n in spans]


def make_slide(path: Path, width: int, height: int, seed: int, rounding: str = "floor") -> Path:
    """Write one synthetic slide to `path` (atomically) unless it is already there."""
    if rounding not in ("floor", "ceil"):
        raise ValueError(f"rounding must be 'floor' or 'ceil', not {rounding!r}")

    def shrink(size: int, d: int) -> int:  # a level's side: W / d rounded as asked
        return size // d if rounding == "floor" else -(-size // d)

    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    spec = SlideSpec(
        path.stem, "P", "BENCH", "A", 1, MPP, width * MPP, height * MPP, "generic-tiff"
    )
    tissue = _tissue_field(spec, rng, MASK_UM)  # uint8, > 127 is tissue, one cell per 64 px
    atlas = he_atlas(rng)
    level_w, level_h = shrink(width, 4), shrink(height, 4)
    columns, rows = -(-level_w // TILE), -(-level_h // TILE)
    padded = cv2.copyMakeBorder(tissue, 0, rows * 16 + 1, 0, columns * 16 + 1, cv2.BORDER_CONSTANT)
    level2 = np.full((shrink(level_h, 4), shrink(level_w, 4), 3), BACKGROUND, np.uint8)
    white = np.full((TILE, TILE, 3), BACKGROUND, np.uint8)

    def level1_tiles():
        for row in range(rows):
            for column in range(columns):
                cells = padded[row * 16 : row * 16 + 17, column * 16 : column * 16 + 17]
                if cells.max() <= 127:
                    tile = white
                else:
                    # tissue outline at 1 px: the soft map upsampled 16x and thresholded
                    soft = cv2.resize(cells, (TILE + 16, TILE + 16), interpolation=cv2.INTER_LINEAR)
                    inside = soft[8 : 8 + TILE, 8 : 8 + TILE] > 127
                    ox = (column * 733 + row * 197) % (ATLAS_PX - TILE)
                    oy = (row * 571 + column * 389) % (ATLAS_PX - TILE)
                    tile = np.where(inside[..., None], atlas[oy : oy + TILE, ox : ox + TILE], white)
                y0, x0 = row * 64, column * 64
                small = cv2.resize(tile, (64, 64), interpolation=cv2.INTER_AREA)
                part = level2[y0 : y0 + 64, x0 : x0 + 64]
                part[:] = small[: part.shape[0], : part.shape[1]]
                yield tile

    # level 0: pre-encoded tiles (textured where the tissue map says tissue, else background)
    variants = [
        cv2.resize(atlas[y : y + 64, x : x + 64], (TILE, TILE), interpolation=cv2.INTER_CUBIC)
        for x, y in rng.integers(0, ATLAS_PX - 64, (8, 2)).tolist()
    ]
    encoded = encoded_tiles([white, *variants])
    columns0, rows0 = -(-width // TILE), -(-height // TILE)
    choice = rng.integers(1, len(encoded), (rows0, columns0))

    def level0_bytes():
        for row in range(rows0):
            cells = padded[row * TILE // 64]
            for column in range(columns0):
                yield encoded[choice[row, column] if cells[column * TILE // 64] > 127 else 0]

    common = {
        "tile": (TILE, TILE),
        "compression": "jpeg",
        "compressionargs": {"level": QUALITY},
        "photometric": "rgb",
        "metadata": None,
        "resolutionunit": "CENTIMETER",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with tifffile.TiffWriter(partial, bigtiff=True) as tif:
        sizes = [(height, width), (level_h, level_w), level2.shape[:2]]
        sources = [level0_bytes(), level1_tiles(), level2]
        for i, (shape, data) in enumerate(zip(sizes, sources, strict=True)):
            extra = {"shape": (*shape, 3), "dtype": np.uint8} if i < 2 else {}
            resolution = 1e4 / (MPP * DOWNSAMPLES[i])
            tif.write(
                data, resolution=(resolution, resolution), subfiletype=int(i > 0), **common, **extra
            )
        level3 = cv2.resize(
            level2,
            (shrink(level2.shape[1], 4), shrink(level2.shape[0], 4)),
            interpolation=cv2.INTER_AREA,
        )
        resolution = 1e4 / (MPP * DOWNSAMPLES[3])
        tif.write(level3, resolution=(resolution, resolution), subfiletype=1, **common)
    partial.replace(path)
    return path


def make_cohort(
    cache: Path, n_slides: int, width: int, height: int, rounding: str = "floor"
) -> list[Path]:
    """`n_slides` slides of width x height px in `cache` (made once, then reused)."""
    name = f"v{GENERATOR_VERSION}_{width}x{height}" + ("_ceil" if rounding == "ceil" else "")
    return [
        make_slide(cache / f"{name}_s{i}.tif", width, height, seed=i, rounding=rounding)
        for i in range(n_slides)
    ]
