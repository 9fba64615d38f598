"""The tile reader gives read_tile's bytes wherever OpenSlide reads whole pixels (JPEG tiles,
OpenSlide regions), and the stored pixels themselves on rounded levels (tests/test_read_geometry.py)."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from test_read_geometry import assert_same, read_all

from eagleflow import tilereader
from eagleflow.demo import write_pyramid_tiff
from eagleflow.features import TileGeometry, iter_tile_batches
from eagleflow.slides import grid_tile_size, open_slide, read_tile, slide_info
from eagleflow.tilereader import SlideTileReader


def grid_coords(path: Path, tile_mpp: float, pad: int = 1) -> tuple[np.ndarray, int, int, float]:
    """Every grid tile of the slide, plus `pad` extra columns and rows beyond its edges."""
    slide = open_slide(path)
    info = slide_info(slide, path, "s")
    level, size = grid_tile_size(info, 224, tile_mpp)
    xs = np.arange(info.width // size + pad) * size
    ys = np.arange(info.height // size + pad) * size
    coords = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2).astype(np.int64)
    return coords, size, level, info.level_downsamples[level]


def expected_tiles(path: Path, coords: np.ndarray, size: int, level: int, ds: float) -> list:
    slide = open_slide(path)
    return [read_tile(slide, int(x), int(y), size, level, ds, 224) for x, y in coords]


@pytest.mark.parametrize(
    ("tile_mpp", "threads"), [(2.0, 2), (2.0, 1), (2.0, 0), (0.5, 2), (4.0, 2)]
)
def test_jpeg_path_equals_read_tile_inside_and_beyond_the_edges(make_slide, tile_mpp, threads):
    path = make_slide(width=3000, height=2200, mpp=0.5)  # edge JPEG tiles are partly outside
    coords, size, level, ds = grid_coords(path, tile_mpp)
    reader = SlideTileReader(str(path), "s", coords, size, level, ds, 224)
    assert reader.mode == "jpeg"
    assert_same(read_all(reader, threads), expected_tiles(path, coords, size, level, ds))


def test_aperio_svs_is_read_from_its_jpeg_tiles(tmp_path):
    from conftest import tissue_image

    path = tmp_path / "a.svs"
    image = tissue_image(2560, 2048, seed=3)
    from eagleflow.demo import SlideSpec

    spec = SlideSpec("A", "P", "C", "A", 1, 0.5, 1280.0, 1024.0, "aperio")
    write_pyramid_tiff(path, image, 0.5, "aperio", spec, downsamples=[1, 4, 16])
    assert open_slide(path).properties["openslide.vendor"] == "aperio"
    coords, size, level, ds = grid_coords(path, 2.0)
    reader = SlideTileReader(str(path), "s", coords, size, level, ds, 224)
    assert reader.mode == "jpeg"
    assert_same(read_all(reader, 2), expected_tiles(path, coords, size, level, ds))


@pytest.mark.parametrize("block", [256, 1024])
def test_region_fallback_equals_read_tile(make_slide, monkeypatch, block):
    """Formats without addressable JPEG tiles: aligned OpenSlide regions, cut in memory."""
    monkeypatch.setattr(tilereader, "_jpeg_tiff_source", lambda *args: None)
    monkeypatch.setattr(tilereader, "REGION_BLOCK_PX", block)
    path = make_slide(width=3000, height=2200, mpp=0.5)
    coords, size, level, ds = grid_coords(path, 2.0)
    reader = SlideTileReader(str(path), "s", coords, size, level, ds, 224)
    assert reader.mode == "region"
    assert_same(read_all(reader, 2), expected_tiles(path, coords, size, level, ds))


def test_each_stored_tile_is_decoded_once_and_released(make_slide, monkeypatch):
    path = make_slide(width=4096, height=3072, mpp=0.5)
    coords, size, level, ds = grid_coords(path, 2.0, pad=0)
    loads: Counter = Counter()
    original = tilereader._StoredTiles.load

    def counting(self, key):
        loads[key] += 1
        return original(self, key)

    monkeypatch.setattr(tilereader._StoredTiles, "load", counting)
    reader = SlideTileReader(str(path), "s", coords, size, level, ds, 224)
    read_all(reader, 2)
    needed = {key for keys in reader._keys for key in keys}
    # level 1 is 1024 x 768 = 4 x 3 JPEG tiles; 224 px tiles straddle them, so read_tile would
    # decode some of them several times
    assert set(loads) == needed and sum(len(keys) for keys in reader._keys) > len(needed)
    assert max(loads.values()) <= 2  # once, plus once for the first tile's cross-check at most
    assert sum(loads.values()) <= len(needed) + len(reader._keys[0])
    assert reader._cache == {}  # nothing left behind once every tile was read


def test_decoder_disagreement_switches_to_openslide(make_slide, monkeypatch, caplog):
    original = tilereader._StoredTiles.load
    monkeypatch.setattr(tilereader._StoredTiles, "load", lambda self, key: original(self, key) // 2)
    path = make_slide(width=3000, height=2200, mpp=0.5)
    coords, size, level, ds = grid_coords(path, 2.0)
    reader = SlideTileReader(str(path), "s", coords, size, level, ds, 224)
    tiles = read_all(reader, 2)
    assert reader.mode == "region" and "decode this slide differently" in caplog.text
    assert_same(tiles, expected_tiles(path, coords, size, level, ds))


def zeroed(path: Path, page_index: int, tiles: slice) -> bytes:
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        page = tif.pages[page_index]
        spans = list(zip(page.dataoffsets, page.databytecounts, strict=True))[tiles]
    for offset, count in spans:
        data[offset : offset + count] = bytes(count)
    return bytes(data)


def test_a_damaged_stored_tile_fails_as_openslide_fails(make_slide, tmp_path):
    path = make_slide(width=4096, height=3072, mpp=0.5)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(zeroed(path, 1, slice(5, 6)))  # level 1: one JPEG tile in the middle
    coords, size, level, ds = grid_coords(broken, 2.0, pad=0)
    reader = SlideTileReader(str(broken), "s", coords, size, level, ds, 224)
    assert reader.mode == "jpeg"
    with pytest.raises(openslide.OpenSlideError):
        read_all(reader, 2)


def test_batches_cross_slides_in_order_and_equal_read_tile(make_slide):
    paths = [
        make_slide(name="a.tif", width=3000, height=2200, mpp=0.5),
        make_slide(name="b.tif", width=4096, height=3072, mpp=0.5),
    ]
    geometries, expected = [], []
    for i, path in enumerate(paths):
        coords, size, level, ds = grid_coords(path, 2.0)
        coords = coords[::-1] if i == 0 else coords  # any order, not only row-major
        geometries.append(TileGeometry(f"S{i}", str(path), coords, size, level, ds, 224))
        expected += [
            (i, t, tile) for t, tile in enumerate(expected_tiles(path, coords, size, level, ds))
        ]
    got = [
        (int(s), int(t), tile)
        for slide_index, tile_index, batch in iter_tile_batches(geometries, 5, num_workers=2)
        for s, t, tile in zip(slide_index, tile_index, batch.numpy(), strict=True)
    ]
    assert [(s, t) for s, t, _ in got] == [(s, t) for s, t, _ in expected]
    assert_same([tile for *_, tile in got], [tile for *_, tile in expected])
    transposed = next(iter_tile_batches(geometries, 5, num_workers=0, transpose=True))[2]
    assert np.array_equal(transposed[0].numpy(), expected[0][2].transpose(1, 0, 2))
