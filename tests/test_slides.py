"""MPP resolution, level choice, tile geometry and reading."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eagleflow.slides import (
    SlideError,
    best_level,
    level0_tile_size,
    open_slide,
    read_tile,
    resolve_mpp,
    slide_info,
)


def test_mpp_from_openslide_property_wins_over_tiff_tags():
    props = {"openslide.mpp-x": "0.2527", "openslide.mpp-y": "0.2527", "tiff.XResolution": "1"}
    assert resolve_mpp(props, None, None, "s") == (0.2527, "openslide.mpp-x", "")


def test_sheet_mpp_overrides_the_slide():
    mpp, source, _ = resolve_mpp({"openslide.mpp-x": "0.25"}, 0.5, None, "s")
    assert (mpp, source) == (0.5, "sheet MPP column")


def test_mpp_from_aperio_description_and_tiff_resolution():
    assert resolve_mpp({"tiff.ImageDescription": "Aperio|MPP = 0.499"}, None, None, "s")[0] == 0.499
    inch = resolve_mpp(
        {"tiff.XResolution": "50800", "tiff.ResolutionUnit": "inch"}, None, None, "s"
    )
    assert inch[0] == pytest.approx(0.5) and inch[1] == "tiff.XResolution"


def test_default_mpp_is_used_with_a_warning_and_missing_mpp_is_an_error():
    mpp, source, warning = resolve_mpp({}, math.nan, 0.5, "s")
    assert (mpp, source) == (0.5, "config tiling.default_mpp") and "default_mpp" in warning
    with pytest.raises(SlideError, match=r"no MPP.*MPP column.*default_mpp"):
        resolve_mpp({"tiff.ResolutionUnit": "none", "tiff.XResolution": "72"}, None, None, "s")


def test_level0_tile_covers_448_microns(make_slide):
    for mpp in (0.25, 0.2527, 0.5, 0.9):
        size = level0_tile_size(mpp, 224, 2.0)
        # whole level-0 pixels: within half a pixel of 448 µm
        assert abs(size * mpp - 448.0) <= mpp / 2


def test_best_level_is_the_coarsest_at_or_finer_than_the_target(make_slide):
    path = make_slide(mpp=0.25, downsamples=(1, 4, 16))  # levels at 0.25, 1.0, 4.0 µm/px
    slide = open_slide(path)
    info = slide_info(slide, path, "s")
    assert info.mpp == pytest.approx(0.25) and info.mpp_source == "openslide.mpp-x"
    assert best_level(info, 2.0) == 1  # 1.0 µm/px: never level 0 when a coarser level serves
    assert best_level(info, 4.0) == 2
    assert best_level(info, 0.5) == 0
    assert best_level(info, 0.1) == 0  # nothing fine enough: level 0 (upsampled)


def test_read_tile_returns_the_box_resampled_to_tile_px(make_slide):
    width, height = 4096, 3072
    image = np.full((height, width, 3), 250, dtype=np.uint8)
    image[1000:1896, 1000:1896] = (40, 40, 160)  # one 896 px square = one 448 µm tile at 0.5
    path = make_slide(image=image, mpp=0.5)
    slide = open_slide(path)
    info = slide_info(slide, path, "s")
    size = level0_tile_size(info.mpp, 224, 2.0)
    assert size == 896
    level = best_level(info, 2.0)
    inside = read_tile(slide, 1000, 1000, size, level, info.level_downsamples[level], 224)
    assert inside.shape == (224, 224, 3) and inside.dtype == np.uint8
    assert np.abs(inside[8:-8, 8:-8].astype(int) - (40, 40, 160)).max() < 25
    half = read_tile(
        slide, 1448, 1000, size, 1, info.level_downsamples[1], 224
    )  # half blue, half background
    assert half[:, :100].mean() < 150 and half[:, 130:].mean() > 200


def test_unreadable_files_raise_slide_errors(tmp_path):
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    text = tmp_path / "text.svs"
    text.write_text("not a slide\n" * 100)
    with pytest.raises(SlideError, match="empty"):
        open_slide(empty, "e")
    with pytest.raises(SlideError, match="OpenSlide"):
        open_slide(text, "t")
    with pytest.raises(SlideError, match="not found"):
        open_slide(tmp_path / "gone.svs", "g")


SCREEN_DEFAULT = {  # a 72 dpi TIFF as OpenSlide reports it
    "openslide.mpp-x": "352.77777777777777",
    "openslide.mpp-y": "352.77777777777777",
    "tiff.XResolution": "72",
    "tiff.ResolutionUnit": "inch",
}


def test_screen_default_resolution_is_refused_naming_value_source_and_fix():
    with pytest.raises(SlideError) as refused:
        resolve_mpp(SCREEN_DEFAULT, None, None, "slide 's' (s.tif)")
    message = str(refused.value)
    assert message.startswith("slide 's' (s.tif): level-0 MPP 352.8 µm/px")
    assert "openslide.mpp-x (from tiff.XResolution = 72 per inch)" in message
    assert "outside the plausible range 0.05-10 µm/px" in message
    assert "Put the slide's MPP in the sheet's MPP column" in message
    # the advice works: the sheet's MPP is used instead
    assert resolve_mpp(SCREEN_DEFAULT, 0.5, None, "s")[:2] == (0.5, "sheet MPP column")
    # the sheet's MPP is bounded by the sheet check (with the configured range), not again here:
    # later stages pass the MPP recorded at tiling, which a widened tiling.mpp_range let through
    assert resolve_mpp(SCREEN_DEFAULT, 20.0, None, "s")[0] == 20.0


@pytest.mark.parametrize(
    ("props", "source"),
    [
        ({"tiff.ImageDescription": "Aperio|MPP = 0.001"}, "tiff.ImageDescription"),
        ({"tiff.XResolution": "10", "tiff.ResolutionUnit": "centimeter"}, "tiff.XResolution"),
    ],
)
def test_implausible_mpp_from_any_source_is_refused_unless_the_range_allows_it(props, source):
    with pytest.raises(SlideError, match=rf"from {source}.*outside the plausible range"):
        resolve_mpp(props, None, None, "s")
    wide = resolve_mpp(props, None, None, "s", mpp_range=(0.0001, 2000.0))
    assert wide[1] == source
