"""Figures: the top-k tiles of a slide, boxed and ranked on its thumbnail, with a mosaic."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from eagleflow.features import TileGeometry, iter_tile_batches
from eagleflow.h5io import atomic_write_bytes, read_h5
from eagleflow.slides import best_level, open_slide, read_level_downscaled, slide_info

SCALE_BAR_CHOICES_UM = (100, 200, 500, 1000, 2000, 5000, 10000)


def _scale_bar(image: np.ndarray, um_per_px: float) -> None:
    """Draw a scale bar of a round length, about a fifth of the width, bottom left."""
    target = image.shape[1] / 5 * um_per_px
    length_um = min(SCALE_BAR_CHOICES_UM, key=lambda v: abs(math.log(v / target)))
    length_px = round(length_um / um_per_px)
    h = image.shape[0]
    x0, y0 = 12, h - 16
    cv2.rectangle(image, (x0 - 4, y0 - 20), (x0 + length_px + 4, y0 + 8), (255, 255, 255), -1)
    cv2.line(image, (x0, y0), (x0 + length_px, y0), (0, 0, 0), 3)
    label = f"{length_um / 1000:g} mm" if length_um >= 1000 else f"{length_um} um"
    cv2.putText(
        image, label, (x0, y0 - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA
    )


def topk_figure(
    slide_path: str,
    slide_id: str,
    topk_path: str,
    tiles_path: str,
    max_side: int = 1000,
    mosaic_columns: int = 5,
    mosaic_tile_px: int = 112,
) -> np.ndarray:
    """RGB figure: thumbnail with the top-k boxes (rank 1 = highest raw attention) and a mosaic."""
    topk, attrs = read_h5(topk_path)
    slide = open_slide(slide_path, slide_id)
    info = slide_info(slide, slide_path, slide_id, float(attrs["mpp"]))
    level = best_level(info, info.mpp * max(info.width, info.height) / max_side)
    scale_in_level = max_side / max(info.level_dimensions[level])
    thumb = read_level_downscaled(slide, info, level, min(1.0, scale_in_level))
    scale = thumb.shape[1] / info.width
    size = int(attrs["tile_size_level0_px"]) * scale
    for rank, (x, y) in enumerate(topk["coords_level0_px"], start=1):
        p0 = (round(x * scale), round(y * scale))
        p1 = (round(x * scale + size), round(y * scale + size))
        cv2.rectangle(thumb, p0, p1, (230, 0, 0), 2)
        cv2.putText(
            thumb, str(rank), (p0[0] + 2, p0[1] + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (230, 0, 0), 1
        )
    _scale_bar(thumb, info.mpp / scale)
    geometry = TileGeometry.from_tiles_file(tiles_path, slide_path)
    chosen = geometry.subset(topk["tile_index"])
    tiles = np.concatenate(
        [t.numpy() for _, _, t in iter_tile_batches([chosen], batch_size=64, num_workers=0)]
    )
    rows = max(1, math.ceil(len(tiles) / mosaic_columns))
    mosaic = np.full((rows * mosaic_tile_px, mosaic_columns * mosaic_tile_px, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, mosaic_columns)
        small = cv2.resize(tile, (mosaic_tile_px, mosaic_tile_px), interpolation=cv2.INTER_AREA)
        cv2.putText(small, str(i + 1), (3, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 2)
        cv2.putText(small, str(i + 1), (3, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
        mosaic[
            r * mosaic_tile_px : (r + 1) * mosaic_tile_px,
            c * mosaic_tile_px : (c + 1) * mosaic_tile_px,
        ] = small
    width = max(thumb.shape[1], mosaic.shape[1])

    def pad(image: np.ndarray) -> np.ndarray:
        out = np.full((image.shape[0], width, 3), 255, np.uint8)
        out[:, : image.shape[1]] = image
        return out

    demo = any(
        attrs.get(f"{m}_weights_demo") == "true" for m in ("ctranspath", "chief", "virchow2")
    )
    banner = np.full((30, width, 3), 255, np.uint8)
    text = f"{slide_id}: top-{len(tiles)} tiles by raw CHIEF attention"
    if demo:
        text += "  [DEMO WEIGHTS: not a result]"
    cv2.putText(banner, text, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([banner, pad(thumb), pad(mosaic)], axis=0)


def write_topk_figures(slides: list[dict[str, str]], manifest: str, output_dir: str) -> None:
    """The `eagle_topk_thumbnails` rule: one figure per slide of a batch, `<slide>.png`."""
    from eagleflow.batches import read_manifest

    topk_files = read_manifest(manifest)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    for slide in slides:
        slide_id = slide["slide_id"]
        figure = topk_figure(slide["slide_path"], slide_id, topk_files[slide_id], slide["tiles"])
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(figure, cv2.COLOR_RGB2BGR))
        if not ok:
            raise OSError(f"could not encode the top-k figure of {slide_id}")
        atomic_write_bytes(Path(output_dir) / f"{slide_id}.png", encoded.tobytes())
