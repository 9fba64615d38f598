"""One placement rule on every level geometry: tiles are the read level's stored pixels.

Scanners round level sizes (ceil or floor of W / 4^k), so OpenSlide reports downsamples such as
4.0024 and `read_region` interpolates between pixels. Our tiles must be the stored pixels at the
nearest whole read-level pixel, and the same array in tiling's edge pass, the tile encoders'
reader and the top-k re-read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import tissue_image

from eagleflow import tilereader, tiling
from eagleflow.demo import SlideSpec, write_pyramid_tiff
from eagleflow.features import TileGeometry, iter_tile_batches
from eagleflow.h5io import read_tiles
from eagleflow.slides import grid_tile_size, level_factor, open_slide, read_tile, slide_info
from eagleflow.tilereader import SlideTileReader, iter_slide_tiles
from eagleflow.tiling import TilingParams, run_tiling

WIDTH, HEIGHT = 4101, 3079  # not multiples of 4 or 16: every level is rounded


@pytest.fixture(scope="module", params=[("generic-tiff", "ceil"), ("aperio", "floor")])
def rounded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    fmt, rounding = request.param
    path = tmp_path_factory.mktemp("rounded") / ("r.svs" if fmt == "aperio" else "r.tif")
    spec = SlideSpec("R", "P", "C", "A", 1, 0.5, WIDTH * 0.5, HEIGHT * 0.5, fmt)
    image = tissue_image(WIDTH, HEIGHT, seed=5)
    write_pyramid_tiff(path, image, 0.5, fmt, spec, [1, 4, 16], rounding=rounding)
    return path


def stored_level(path: Path, level: int) -> np.ndarray:
    """The whole level through OpenSlide at level-0 (0, 0): whole pixels whatever the downsample."""
    slide = open_slide(path)
    region = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]))
    assert (region[..., 3] == 255).all()
    return region[..., :3]


def expected_tiles(path: Path, coords: np.ndarray, size: int, level: int) -> list[np.ndarray]:
    """Written apart from the reader: level px i holds level-0 px [n*i, n*i + n) for n = 4^level,
    a tile starts at the nearest level pixel, white beyond the level, INTER_AREA to 224 px."""
    n = 4**level
    side = round(size / n)
    pixels = stored_level(path, level)
    padded = cv2.copyMakeBorder(
        pixels, 0, 2 * side, 0, 2 * side, cv2.BORDER_CONSTANT, value=(255, 255, 255)
    )
    out = []
    for x, y in coords.tolist():
        lx, ly = (x + n // 2) // n, (y + n // 2) // n
        region = padded[ly : ly + side, lx : lx + side]
        out.append(cv2.resize(region, (224, 224), interpolation=cv2.INTER_AREA))
    return out


def grid(path: Path, tile_mpp: float = 2.0) -> tuple[np.ndarray, int, int, float]:
    slide = open_slide(path)
    info = slide_info(slide, path, "s")
    level, size = grid_tile_size(info, 224, tile_mpp)
    xs = np.arange(info.width // size + 1) * size
    ys = np.arange(info.height // size + 1) * size
    coords = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2).astype(np.int64)
    return coords, size, level, info.level_downsamples[level]


def read_all(reader: SlideTileReader, threads: int = 2) -> list[np.ndarray]:
    return [tile for _, _, tile in iter_slide_tiles([reader], threads)]


def assert_same(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for index, (a, b) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == np.uint8 and a.shape == (224, 224, 3)
        assert np.array_equal(a, b), f"tile {index} differs"


@pytest.mark.parametrize("tile_mpp", [2.0, 8.0])
def test_rounded_levels_are_cut_from_stored_pixels(rounded, tile_mpp):
    coords, size, level, ds = grid(rounded, tile_mpp)
    assert level > 0 and ds != round(ds)  # OpenSlide's downsample is fractional
    reader = SlideTileReader(str(rounded), "s", coords, size, level, ds, 224)
    assert reader.mode == "jpeg" and reader.factor == 4**level
    tiles = read_all(reader)
    assert_same(tiles, expected_tiles(rounded, coords, size, level))
    # read_region places x at x / ds and interpolates: a sub-pixel shift, not other pixels
    slide = open_slide(rounded)
    interpolated = [read_tile(slide, x, y, size, level, ds, 224) for x, y in coords.tolist()]
    diffs = [np.abs(a.astype(int) - b).mean() for a, b in zip(tiles, interpolated, strict=True)]
    assert max(diffs) < 8
    if level == 1:  # (level 2 holds just two tiles, both at a whole position of OpenSlide's)
        assert max(diffs) > 0


def test_positions_off_the_grid_snap_to_the_nearest_level_pixel(rounded):
    coords, size, level, ds = grid(rounded)
    shifted = coords[:12] + np.array([[1, 3]])  # 1 px rounds down, 3 px up (factor 4)
    reader = SlideTileReader(str(rounded), "s", shifted, size, level, ds, 224)
    assert_same(read_all(reader, 0), expected_tiles(rounded, shifted, size, level))


def test_tiling_records_that_its_coordinates_are_the_pixels_read(rounded, tmp_path):
    out = tmp_path / "t.h5"
    table = run_tiling(
        str(rounded), "s", TilingParams().as_dict(), None, str(out), str(tmp_path / "q.png")
    )
    coords, attrs = read_tiles(out)
    assert attrs["read_level"] == 1 and attrs["read_level_factor"] == 4.0
    assert attrs["read_level_downsample"] != 4.0
    assert table.tile_size_level0 % 4 == 0 and (coords % table.tile_size_level0 == 0).all()
    assert attrs["coords_max_offset_level0_px"] == 0.0
    # where read_region would have read the same pixels: off by the rounding, under 1 level px
    assert 0 < attrs["coords_max_offset_openslide_level0_px"] < 4


def test_one_tile_is_the_same_array_in_every_stage(rounded, tmp_path, monkeypatch):
    """Tiling's edge pass, a tile encoder's reader and the top-k re-read: one placement rule."""
    seen: list[np.ndarray] = []
    canny = tiling.edge_fraction

    def recording(tile: np.ndarray, low: int, high: int) -> float:
        seen.append(tile.copy())
        return canny(tile, low, high)

    monkeypatch.setattr(tiling, "edge_fraction", recording)
    out = tmp_path / "t.h5"
    table = run_tiling(
        str(rounded), "s", TilingParams().as_dict(), None, str(out), str(tmp_path / "q.png")
    )
    candidates = np.concatenate([table.coords, table.rejected_coords])
    candidates = candidates[np.lexsort((candidates[:, 0], candidates[:, 1]))]  # tiling's order
    edge_pass = {tuple(xy): tile for xy, tile in zip(candidates.tolist(), seen, strict=True)}
    geometry = TileGeometry.from_tiles_file(str(out))
    encoder = np.concatenate([b.numpy() for *_, b in iter_tile_batches([geometry], 7, 2)])
    chosen = np.array([len(table.coords) - 1, 0, len(table.coords) // 2])  # a top-k selection
    topk = np.concatenate(
        [b.numpy() for *_, b in iter_tile_batches([geometry.subset(chosen)], 64, 0)]
    )
    expected = expected_tiles(rounded, table.coords, table.tile_size_level0, table.read_level)
    for i, xy in enumerate(table.coords.tolist()):
        assert np.array_equal(edge_pass[tuple(xy)], encoder[i])
        assert np.array_equal(encoder[i], expected[i])
    for rank, i in enumerate(chosen):
        assert np.array_equal(topk[rank], encoder[i])


def test_a_format_we_cannot_decode_is_read_through_openslide_with_a_warning(
    rounded, monkeypatch, caplog
):
    monkeypatch.setattr(tilereader, "_jpeg_tiff_source", lambda *args: None)
    monkeypatch.setattr(tilereader, "_dicom_source", lambda *args: None)
    coords, size, level, ds = grid(rounded)
    with caplog.at_level(logging.WARNING):
        reader = SlideTileReader(str(rounded), "s", coords, size, level, ds, 224)
    assert reader.mode == "per-tile" and "interpolated" in caplog.text
    tiles = read_all(reader)
    expected = expected_tiles(rounded, coords, size, level)
    # read_region at the level-0 point nearest the snapped pixel: less than 1/8 px away
    assert max(np.abs(a.astype(int) - b).mean() for a, b in zip(tiles, expected, strict=True)) < 2


def test_decoders_that_disagree_on_a_rounded_level_hand_it_to_openslide(
    rounded, monkeypatch, caplog
):
    original = tilereader._StoredTiles.load
    monkeypatch.setattr(tilereader._StoredTiles, "load", lambda self, key: original(self, key) // 2)
    coords, size, level, ds = grid(rounded)
    reader = SlideTileReader(str(rounded), "s", coords, size, level, ds, 224)
    read_all(reader)
    assert reader.mode == "per-tile" and "decode this slide differently" in caplog.text


def test_a_scan_mpp_off_the_round_values_reads_whole_pixels(make_slide):
    """0.2527 µm/px: 448 µm is 1772.9 level-0 px; the grid side 1772 is 443 level-1 px, so an
    exact-size slide is cut from its JPEG tiles, byte-identical to read_region."""
    path = make_slide(width=8192, height=4096, mpp=0.2527)
    coords, size, level, ds = grid(path)
    assert (level, size, ds) == (1, 1772, 4.0)
    reader = SlideTileReader(str(path), "s", coords, size, level, ds, 224)
    assert reader.mode == "jpeg"
    slide = open_slide(path)
    expected = [read_tile(slide, x, y, size, level, ds, 224) for x, y in coords.tolist()]
    assert_same(read_all(reader), expected)


def test_the_level_factor_is_the_scanner_s_integer_downsample_when_sizes_are_rounded():
    # OpenSlide's Aperio sample CMU-1.svs: level 1 is 11,500 x 8,228 px, downsample 4.00012
    dims = ((46000, 32914), (11500, 8228), (2875, 2057))
    assert level_factor(dims, (1.0, 4.000121536217793, 16.000486), 1) == 4.0
    assert level_factor(dims, (1.0, 4.000121536217793, 16.000486), 2) == 16.0
    # a level that is not level 0 / n rounded (4,000 -> 3,000 px): OpenSlide's downsample
    assert level_factor(((4000, 3000), (3000, 2250)), (1.0, 4 / 3), 1) == 4 / 3
