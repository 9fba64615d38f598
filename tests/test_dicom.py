"""DICOM whole-slide images: a folder of instances (one per level), as hospitals export them.

The slide is an Aperio SVS converted by a real converter (wsidicomizer, which needs Debian's
libturbojpeg0: installed with apt-get when missing, as the SLURM test installs its packages).
Tiles are cut from the instances' JPEG frames, also on rounded levels (fractional downsamples).
"""

from __future__ import annotations

import ctypes.util
from pathlib import Path

import numpy as np
import pytest
from conftest import tissue_image
from debian_packages import DebianPackagesUnavailableError, apt_install
from hostile_helpers import make_tiling_workdir
from test_read_geometry import assert_same, expected_tiles, grid, read_all
from workflow_helpers import job_counts, run

from eagleflow.demo import SlideSpec, write_pyramid_tiff
from eagleflow.h5io import read_tiles
from eagleflow.sheets import SheetError, read_slide_sheet
from eagleflow.slides import SlideError, open_slide, read_tile
from eagleflow.tilereader import SlideTileReader
from eagleflow.tiling import TilingParams, run_tiling

PARAMS = TilingParams().as_dict()


def ensure_turbojpeg() -> None:
    if ctypes.util.find_library("turbojpeg") is not None:
        return
    try:
        apt_install(["libturbojpeg0"], "libturbojpeg (needed by wsidicomizer)")
    except DebianPackagesUnavailableError as reason:
        pytest.skip(str(reason))


def convert(root: Path, width: int, height: int, rounding: str | None) -> tuple[Path, Path]:
    """(an Aperio SVS, the DICOM WSI folder wsidicomizer makes of it)."""
    ensure_turbojpeg()
    from wsidicomizer import WsiDicomizer

    spec = SlideSpec("DCM-1", "P1", "C", "A", 1, 0.5, width / 2, height / 2, "aperio")
    svs = root / "slide.svs"
    image = tissue_image(width, height)
    write_pyramid_tiff(svs, image, 0.5, "aperio", spec, [1, 4, 16], rounding=rounding)
    folder = root / "slide_dicom"
    WsiDicomizer.convert(svs, folder)
    assert len(list(folder.glob("*.dcm"))) >= 3  # one instance per level (and a thumbnail)
    return svs, folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return convert(tmp_path_factory.mktemp("dicom"), 4096, 3072, None)


@pytest.fixture(scope="module")
def converted_rounded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Level sizes rounded up as a scanner writes them: OpenSlide's downsample is 3.9979."""
    return convert(tmp_path_factory.mktemp("dicom_rounded"), 4101, 3079, "ceil")


def test_dicom_tiles_are_cut_from_its_frames_as_read_region_reads_them(converted):
    _, folder = converted
    coords, size, level, ds = grid(folder)
    assert ds == 4.0
    reader = SlideTileReader(str(folder), "s", coords, size, level, ds, 224)
    assert reader.mode == "dicom"
    slide = open_slide(folder)
    assert_same(read_all(reader), [read_tile(slide, x, y, size, level, ds, 224) for x, y in coords])


def test_rounded_dicom_levels_are_cut_from_their_frames(converted_rounded):
    svs, folder = converted_rounded
    coords, size, level, ds = grid(folder)
    assert ds != round(ds)
    tiles = {}
    for name, path in (("svs", svs), ("dicom", folder)):
        reader = SlideTileReader(str(path), "s", coords, size, level, ds, 224)
        assert reader.mode == ("jpeg" if name == "svs" else "dicom")
        tiles[name] = read_all(reader)
    # the stored pixels (OpenSlide's whole level read at (0, 0)), and the same as the SVS's
    assert_same(tiles["dicom"], expected_tiles(folder, coords, size, level))
    assert_same(tiles["dicom"], tiles["svs"])


def test_a_dicom_folder_tiles_exactly_like_the_svs_it_came_from(converted, tmp_path):
    svs, folder = converted
    tables = {}
    for name, path in (("svs", svs), ("folder", folder)):
        out = tmp_path / f"{name}.h5"
        tables[name] = run_tiling(str(path), "S1", PARAMS, None, str(out), str(tmp_path / "q.png"))
        assert read_tiles(out)[1]["mpp_source"] == "openslide.mpp-x"
    assert len(tables["folder"].coords) > 0
    assert np.array_equal(tables["folder"].coords, tables["svs"].coords)
    assert np.array_equal(tables["folder"].edge_fraction, tables["svs"].edge_fraction)
    assert tables["folder"].info.level_count == 3


def test_the_sheet_accepts_a_dicom_folder_and_names_one_without_a_slide(converted, tmp_path):
    _, folder = converted
    not_dicom = tmp_path / "scans"
    not_dicom.mkdir()
    (not_dicom / "readme.txt").write_text("no slide here\n")
    sheet = tmp_path / "slides.csv"
    sheet.write_text(f"PATIENT,SLIDE,PATH\nP1,S1,{folder}\n")
    assert read_slide_sheet(sheet).at["S1", "PATH"] == str(folder)
    sheet.write_text(f"PATIENT,SLIDE,PATH\nP1,S1,{folder}\nP2,S2,scans\n")
    with pytest.raises(
        SheetError, match=r"line 3, column PATH: 'scans' is a folder without a DICOM"
    ):
        read_slide_sheet(sheet)
    with pytest.raises(SlideError, match=r"'S2'.*a folder without a DICOM whole-slide image"):
        run_tiling(str(not_dicom), "S2", PARAMS, None, str(tmp_path / "t.h5"), str(tmp_path / "q"))


@pytest.mark.workflow
def test_a_dicom_folder_goes_through_the_workflow_tiling(converted, tmp_path):
    svs, folder = converted
    work = tmp_path / "work"
    args = make_tiling_workdir(work, {"DCM-1": folder, "SVS-1": svs})
    run([*args, "--cores", "2"], cwd=work)
    dicom, _ = read_tiles(work / "results" / "tiles" / "224px_2mpp" / "DCM-1.h5")
    from_svs, _ = read_tiles(work / "results" / "tiles" / "224px_2mpp" / "SVS-1.h5")
    assert len(dicom) > 0 and np.array_equal(dicom, from_svs)
    assert (work / "results" / "qc" / "tiles" / "DCM-1.png").is_file()
    assert "tiling_tile_slide" not in job_counts(run([*args, "-n"], cwd=work).stdout)
