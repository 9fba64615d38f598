"""Tissue mask, grid, Canny rejection and the tiles file."""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest

from eagleflow.h5io import TILES_FORMAT, FormatError, read_tiles, validate_tiles
from eagleflow.slides import SlideError
from eagleflow.tiling import (
    TilingParams,
    edge_fraction,
    grid_origins,
    run_tiling,
    tile_slide,
)


def test_canny_rejects_flat_and_keeps_textured_tiles():
    rng = np.random.default_rng(0)
    flat = np.full((224, 224, 3), 240, dtype=np.uint8)
    gradient = np.tile(np.linspace(100, 200, 224, dtype=np.uint8)[None, :, None], (224, 1, 3))
    texture = rng.integers(60, 230, size=(224, 224, 3), dtype=np.uint8)
    assert edge_fraction(flat, 40, 100) == 0.0
    assert edge_fraction(gradient, 40, 100) < 0.02  # smooth: no edges although not white
    assert edge_fraction(texture, 40, 100) > 0.02


def test_grid_border_policy():
    xs, ys = grid_origins(1000, 500, 300, "drop")
    assert xs.tolist() == [0, 300, 600] and ys.tolist() == [0]
    xs, ys = grid_origins(1000, 500, 300, "pad")
    assert xs.tolist() == [0, 300, 600, 900] and ys.tolist() == [0, 300]


def test_tile_slide_keeps_tissue_tiles_in_row_major_order(make_slide):
    path = make_slide(width=4096, height=3072, mpp=0.5)
    table = tile_slide(str(path), "s", TilingParams(), progress=False)
    assert table.tile_size_level0 == 896 and table.read_level == 1
    assert len(table.coords) > 0
    # kept tiles lie within the tissue block (middle third) and sit on the 896 px grid
    assert (table.coords % 896 == 0).all()
    xs, ys = table.coords[:, 0], table.coords[:, 1]
    assert xs.min() >= 4096 // 3 - 896 and xs.max() <= 2 * 4096 // 3
    order = np.lexsort((xs, ys))
    assert (order == np.arange(len(order))).all()
    assert (table.edge_fraction >= 0.02).all()


def test_edge_threshold_rejects_smooth_tissue(make_slide):
    image = np.full((3072, 4096, 3), 245, dtype=np.uint8)
    image[1000:2500, 1000:3000] = (200, 110, 190)  # saturated but flat: tissue mask, no edges
    path = make_slide(image=image)
    with pytest.raises(SlideError, match="failed the edge test"):
        tile_slide(str(path), "flat", TilingParams(), progress=False)


def test_no_tissue_and_too_small_are_clear_errors(make_slide):
    blank = make_slide(name="blank.tif", image=np.full((3072, 4096, 3), 245, dtype=np.uint8))
    with pytest.raises(SlideError, match="no tissue"):
        tile_slide(str(blank), "blank", TilingParams(), progress=False)
    small = make_slide(name="small.tif", width=600, height=600, downsamples=(1, 4))
    with pytest.raises(SlideError, match="smaller than one"):
        tile_slide(str(small), "small", TilingParams(), progress=False)


def test_tiles_file_has_geometry_and_provenance(make_slide, tmp_path):
    path = make_slide(mpp=0.5)
    out, qc = tmp_path / "t.h5", tmp_path / "t.png"
    params = TilingParams().as_dict()
    table = run_tiling(str(path), "s", params, None, str(out), str(qc), threads=2)
    coords, attrs = read_tiles(out)
    assert np.array_equal(coords, table.coords)
    assert attrs["coord_unit"] == "level-0 pixels"
    assert attrs["tile_size_level0_px"] * attrs["mpp"] == pytest.approx(448.0)
    assert attrs["tile_size_um"] == pytest.approx(448.0)
    assert attrs["mpp_source"] == "openslide.mpp-x"
    assert attrs["code_version"].startswith("eagleflow ")
    assert '"canny_low": 40' in attrs["params_json"]
    assert qc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left


def test_threads_do_not_change_the_result(make_slide):
    path = make_slide()
    one = tile_slide(str(path), "s", TilingParams(), threads=1, progress=False)
    two = tile_slide(str(path), "s", TilingParams(), threads=2, progress=False)
    assert np.array_equal(one.coords, two.coords)
    assert np.array_equal(one.edge_fraction, two.edge_fraction)


def test_truncated_tiles_file_is_rejected(make_slide, tmp_path):
    path = make_slide()
    out = tmp_path / "t.h5"
    run_tiling(str(path), "s", TilingParams().as_dict(), None, str(out), str(tmp_path / "q.png"))
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError):
        validate_tiles(out)
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["coords"] = np.zeros((2, 2), dtype=np.int64)
    with pytest.raises(FormatError, match=rf"not a {re.escape(TILES_FORMAT)} file"):
        validate_tiles(tmp_path / "other.h5")


def test_a_72_dpi_tiff_is_refused_before_any_tile_is_cut(tmp_path):
    """Issue 13: such a TIFF was tiled into tiles of ~1.3 level-0 px each, upsampled to 224 px."""
    from conftest import tissue_image, write_pyramid

    path = write_pyramid(tmp_path / "screen.tif", tissue_image(1024, 768), 2.54e4 / 72, (1, 4))
    out, qc = tmp_path / "t.h5", tmp_path / "t.png"
    with pytest.raises(SlideError, match=r"level-0 MPP 352\.8 µm/px from openslide\.mpp-x"):
        run_tiling(str(path), "s", TilingParams().as_dict(), None, str(out), str(qc))
    assert not out.exists() and not qc.exists()
    # an MPP in the sheet is the way out
    run_tiling(str(path), "s", TilingParams().as_dict(), 2.0, str(out), str(qc))
    assert read_tiles(out)[1]["mpp_source"] == "sheet MPP column"


def test_default_mpp_outside_the_plausible_range_is_a_config_error():
    from eagleflow.mpp import MppConfigError

    with pytest.raises(MppConfigError, match=r"tiling\.default_mpp: 352\.8 µm/px is outside"):
        TilingParams(default_mpp=352.8)
    with pytest.raises(MppConfigError, match=r"tiling\.mpp_range must be \[low, high\]"):
        TilingParams(mpp_range=(5.0, 1.0))
    assert TilingParams(default_mpp=0.5).default_mpp == 0.5
