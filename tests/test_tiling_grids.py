"""One tiling job per slide: every grid from one tissue mask, each grid as if tiled alone."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

import eagleflow.h5io as h5io
import eagleflow.tiling as tiling
from eagleflow.demo import make_demo_cohort
from eagleflow.grids import Grid
from eagleflow.h5io import FormatError, read_tiles, validate_tiles
from eagleflow.slides import SlideError
from eagleflow.tiling import TilingParams, qc_image, run_tiling, tile_slide, tile_slide_grids

EAGLE = Grid(224, 2.0)  # CTransPath's grid: the one the QC picture draws
FINE = Grid(256, 0.5)  # Prov-GigaPath's
PATHODUET = Grid(224, 0.5)
# the shared settings as the rule passes them: no tile_px or tile_mpp of their own
MASK_PARAMS = {k: v for k, v in TilingParams().as_dict().items() if k not in tiling.GRID_KEYS}


def grid_dicts(*grids: Grid) -> list[dict[str, float]]:
    return [{"tile_px": g.tile_px, "tile_mpp": g.tile_mpp} for g in grids]


def with_grid(grid: Grid) -> TilingParams:
    return dataclasses.replace(TilingParams(), tile_px=grid.tile_px, tile_mpp=grid.tile_mpp)


def assert_same_tiles(a: tiling.TileTable, b: tiling.TileTable) -> None:
    assert a.params == b.params
    assert (a.tile_size_level0, a.read_level, a.n_grid) == (
        b.tile_size_level0,
        b.read_level,
        b.n_grid,
    )
    for field in ("coords", "tissue_fraction", "edge_fraction", "rejected_coords"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field


@pytest.fixture(scope="module")
def demo_slide(tmp_path_factory: pytest.TempPathFactory) -> str:
    cohort = make_demo_cohort(
        tmp_path_factory.mktemp("demo"), seed=0, size_scale=0.5, hostile=False
    )
    return str(cohort.slide_path(cohort.slides[0].slide))


@pytest.fixture
def count_masks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts tissue masks computed (one entry per call)."""
    calls: list[int] = []
    original = tiling.tissue_mask

    def counting(rgb: np.ndarray, params: TilingParams) -> np.ndarray:
        calls.append(1)
        return original(rgb, params)

    monkeypatch.setattr(tiling, "tissue_mask", counting)
    return calls


@pytest.mark.parametrize("other", [FINE, PATHODUET])
def test_a_grid_tiles_as_if_tiled_alone(make_slide, other: Grid) -> None:
    path = str(make_slide())
    alone = tile_slide(path, "s", with_grid(other), progress=False)
    eagle_alone = tile_slide(path, "s", with_grid(EAGLE), progress=False)
    together = tile_slide_grids(path, "s", TilingParams(), [EAGLE, other], progress=False)
    assert_same_tiles(together[1], alone)
    assert_same_tiles(together[0], eagle_alone)
    # order and company change nothing either
    reversed_ = tile_slide_grids(
        path, "s", TilingParams(), [other, EAGLE], threads=2, progress=False
    )
    assert_same_tiles(reversed_[0], alone)
    assert_same_tiles(reversed_[1], eagle_alone)
    assert together[1].tile_size_level0 != together[0].tile_size_level0  # really two grids


def test_two_grids_on_a_demo_slide_share_one_mask(demo_slide: str, count_masks: list[int]) -> None:
    eagle, fine = tile_slide_grids(demo_slide, "d", TilingParams(), [EAGLE, FINE], progress=False)
    assert len(count_masks) == 1
    assert eagle.mask is fine.mask  # the same array, not an equal copy
    assert (eagle.grid, fine.grid) == (EAGLE, FINE)
    assert (eagle.params.tile_px, eagle.params.tile_mpp) == (224, 2.0)
    assert (fine.params.tile_px, fine.params.tile_mpp) == (256, 0.5)
    # each grid read at its own resolution: 2 µm/px from the 4x level, 0.5 µm/px from level 0
    assert eagle.info.level_mpp(eagle.read_level) == pytest.approx(2.0)
    assert fine.info.level_mpp(fine.read_level) == pytest.approx(0.5)
    assert eagle.effective_mpp == pytest.approx(2.0) and fine.effective_mpp == pytest.approx(0.5)
    for table in (eagle, fine):
        assert len(table.coords) > 0
        assert (table.coords % table.tile_size_level0 == 0).all()
        assert (table.edge_fraction >= TilingParams().min_edge_fraction).all()
    # 16 fine tiles fit in one coarse tile's area: the fine grid yields many more tiles
    assert len(fine.coords) > 4 * len(eagle.coords)
    # and each is tiled as it would be alone
    assert_same_tiles(fine, tile_slide(demo_slide, "d", with_grid(FINE), progress=False))
    assert len(count_masks) == 2


def test_run_tiling_writes_every_grid_and_one_qc_picture(
    demo_slide: str, tmp_path: Path, count_masks: list[int]
) -> None:
    grids = [EAGLE, FINE, PATHODUET]
    tiles = [str(tmp_path / "tiles" / g.name / "d.h5") for g in grids]
    qc = tmp_path / "qc" / "d.png"
    tables = run_tiling(demo_slide, "d", MASK_PARAMS, None, tiles, str(qc), 2, grid_dicts(*grids))
    assert len(count_masks) == 1
    assert [t.grid for t in tables] == grids
    for grid, path, table in zip(grids, tiles, tables, strict=True):
        coords, attrs = read_tiles(path, grid)
        assert np.array_equal(coords, table.coords)
        assert attrs["grid"] == grid.name
        assert (attrs["tile_px"], attrs["tile_mpp"]) == (grid.tile_px, grid.tile_mpp)
        assert attrs["tile_size_um"] == pytest.approx(grid.tile_size_um)
        recorded = json.loads(attrs["params_json"])
        assert (recorded["tile_px"], recorded["tile_mpp"]) == (grid.tile_px, grid.tile_mpp)
        assert recorded["mask_mpp"] == 16.0 and recorded["sheet_mpp"] is None
        with pytest.raises(FormatError, match=r"not 224px_0\.25mpp"):
            read_tiles(path, Grid(224, 0.25))
    picture = cv2.imread(str(qc))
    assert picture is not None and picture.shape[1] >= 1000
    assert not list(tmp_path.rglob(".*tmp*"))


def test_a_grid_tiled_alone_writes_the_same_file_as_among_others(
    demo_slide: str, tmp_path: Path
) -> None:
    run_tiling(
        demo_slide,
        "d",
        MASK_PARAMS,
        None,
        [str(tmp_path / "alone.h5")],
        str(tmp_path / "a.png"),
        grids=grid_dicts(FINE),
    )
    run_tiling(
        demo_slide,
        "d",
        MASK_PARAMS,
        None,
        [str(tmp_path / "e.h5"), str(tmp_path / "f.h5")],
        str(tmp_path / "b.png"),
        grids=grid_dicts(EAGLE, FINE),
    )
    alone, together = h5io.read_attrs(tmp_path / "alone.h5"), h5io.read_attrs(tmp_path / "f.h5")
    assert alone["content_sha256"] == together["content_sha256"]
    assert json.loads(alone["params_json"]) == json.loads(together["params_json"])


def test_qc_picture_draws_the_first_grid_and_counts_every_grid(demo_slide: str) -> None:
    eagle, fine = tile_slide_grids(demo_slide, "d", TilingParams(), [EAGLE, FINE], progress=False)
    one, two = qc_image([eagle]), qc_image([eagle, fine])
    extra = two.shape[0] - one.shape[0]
    assert extra > 0  # a banner line for the second grid
    assert np.array_equal(two[extra + 40 :], one[40:])  # the same drawing below the banners
    assert not np.array_equal(qc_image([fine])[40:], one[40:])  # which grid is drawn shows


def test_failure_on_one_grid_leaves_no_output(
    demo_slide: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiles = [str(tmp_path / "tiles" / g.name / "d.h5") for g in (EAGLE, FINE)]
    qc = tmp_path / "qc" / "d.png"
    run_tiling(demo_slide, "d", MASK_PARAMS, None, tiles, str(qc), grids=grid_dicts(EAGLE, FINE))
    assert all(Path(p).exists() for p in [*tiles, qc])  # an earlier run's outputs
    original = tiling.edge_fraction
    # every 256 px tile (the fine grid's) is flat: that grid fails the edge test
    monkeypatch.setattr(
        tiling,
        "edge_fraction",
        lambda tile, low, high: 0.0 if tile.shape[0] == 256 else original(tile, low, high),
    )
    with pytest.raises(SlideError, match=r"failed the edge test on grid 256px_0\.5mpp"):
        run_tiling(
            demo_slide, "d", MASK_PARAMS, None, tiles, str(qc), grids=grid_dicts(EAGLE, FINE)
        )
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_failed_write_removes_the_files_already_written(
    demo_slide: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original, written = h5io.write_tiles, []

    def fail_second(path, table, provenance) -> None:
        if written:
            raise OSError("simulated write failure")
        original(path, table, provenance)
        written.append(path)

    monkeypatch.setattr(h5io, "write_tiles", fail_second)
    tiles = [str(tmp_path / "e.h5"), str(tmp_path / "f.h5")]
    with pytest.raises(OSError, match="simulated"):
        run_tiling(
            demo_slide,
            "d",
            MASK_PARAMS,
            None,
            tiles,
            str(tmp_path / "q.png"),
            grids=grid_dicts(EAGLE, FINE),
        )
    assert written == [tiles[0]]  # the first file was written, then removed
    assert list(tmp_path.iterdir()) == []


def test_a_slide_too_small_for_one_grid_fails_before_its_mask(
    make_slide, count_masks: list[int]
) -> None:
    path = str(make_slide(width=2048, height=1536))
    coarse = Grid(224, 8.0)  # 3584 level-0 px at 0.5 µm/px: larger than the slide
    with pytest.raises(SlideError, match=r"smaller than one 1792 µm tile \(grid 224px_8mpp\)"):
        tile_slide_grids(path, "s", TilingParams(), [EAGLE, coarse], progress=False)
    assert count_masks == []


def test_no_tissue_names_the_grid(make_slide) -> None:
    image = np.full((3072, 4096, 3), 245, dtype=np.uint8)
    path = str(make_slide(image=image))
    with pytest.raises(SlideError, match="no tissue found on grid 224px_2mpp"):
        tile_slide_grids(path, "s", TilingParams(), [EAGLE, FINE], progress=False)


def test_grids_and_files_must_match(demo_slide: str, tmp_path: Path) -> None:
    qc = str(tmp_path / "q.png")
    with pytest.raises(ValueError, match="2 grids but 1 tiles files"):
        run_tiling(
            demo_slide,
            "d",
            MASK_PARAMS,
            None,
            [str(tmp_path / "a.h5")],
            qc,
            grids=grid_dicts(EAGLE, FINE),
        )
    with pytest.raises(ValueError, match="tile_px, tile_mpp although grids are given"):
        run_tiling(
            demo_slide,
            "d",
            TilingParams().as_dict(),
            None,
            [str(tmp_path / "a.h5")],
            qc,
            grids=grid_dicts(FINE),
        )
    with pytest.raises(ValueError, match="grids listed twice"):
        tile_slide_grids(demo_slide, "d", TilingParams(), [FINE, FINE], progress=False)
    with pytest.raises(ValueError, match="at least one grid"):
        tile_slide_grids(demo_slide, "d", TilingParams(), [], progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_tiles_file_whose_grid_attribute_disagrees_is_refused(
    demo_slide: str, tmp_path: Path
) -> None:
    out = tmp_path / "t.h5"
    run_tiling(demo_slide, "d", TilingParams().as_dict(), None, str(out), str(tmp_path / "q.png"))
    assert validate_tiles(out, EAGLE)["grid"] == EAGLE.name
    with h5py.File(out, "a") as h5:
        h5.attrs["grid"] = FINE.name
    with pytest.raises(FormatError, match=r"attribute grid '256px_0\.5mpp' disagrees"):
        validate_tiles(out)
    with h5py.File(out, "a") as h5:
        del h5.attrs["grid"]  # a file written before grids had names: tile_px and tile_mpp say it
    assert validate_tiles(out, EAGLE)["tile_px"] == 224
    with pytest.raises(FormatError, match=r"holds tiles of grid 224px_2mpp, not 256px_0\.5mpp"):
        validate_tiles(out, FINE)
