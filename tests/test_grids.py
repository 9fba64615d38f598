"""An encoder at several grids: presets, instance names and the embeddings each grid makes."""

from __future__ import annotations

import pytest

from eagleflow.encoders import (
    PAPER_GRIDS,
    TILE_ENCODERS,
    EncoderConfigError,
    Grid,
    configured_embeddings,
    encoder_grids,
    tile_encoder_instances,
)


def test_one_grid_is_the_reference_or_the_configured_one():
    assert encoder_grids("ctranspath", None) == [TILE_ENCODERS["ctranspath"].default_grid]
    assert encoder_grids("virchow2", {"tile_mpp": 2.0}) == [Grid(224, 2.0)]


def test_presets_and_mappings_combine_in_order_without_repeats():
    assert encoder_grids("virchow2", {"grids": "paper"}) == list(PAPER_GRIDS)
    assert PAPER_GRIDS[0] == Grid(224, 2.0)  # EAGLE's own grid keeps the plain names
    assert encoder_grids("gigapath_tile", {"grids": ["native", "paper"]}) == [
        Grid(256, 0.5),
        *PAPER_GRIDS,
    ]
    # a base config's tile_px fills in what a mapping leaves out; the paper's 2 µm/px only once
    given = {"tile_px": 256, "grids": [{"tile_mpp": 1.0}, "paper", {"tile_px": 224, "tile_mpp": 2}]}
    assert encoder_grids("ctranspath", given) == [Grid(256, 1.0), *PAPER_GRIDS]
    with pytest.raises(EncoderConfigError, match="grids: 'fast' is not paper or native"):
        encoder_grids("ctranspath", {"grids": ["fast"]})


def test_instance_names_say_the_grid_except_the_first():
    instances = tile_encoder_instances(
        {
            "ctranspath": {"grids": "paper"},
            "gigapath_tile": {"grids": ["native", {"tile_px": 224, "tile_mpp": 0.5}]},
        }
    )
    assert list(instances) == [
        "ctranspath",
        "ctranspath@1.14mpp",
        "ctranspath@0.5mpp",
        "gigapath_tile",
        "gigapath_tile@224px_0.5mpp",  # two grids at 0.5 µm/px: the suffix names the px too
    ]
    assert instances["ctranspath@0.5mpp"].grid == Grid(224, 0.5)
    assert instances["ctranspath@0.5mpp"].encoder == "ctranspath"
    with pytest.raises(EncoderConfigError, match="ctranspath must be configured"):
        tile_encoder_instances({"virchow2": {}})


def test_every_embedding_is_made_at_every_grid_of_what_it_reads():
    instances = tile_encoder_instances(
        {"ctranspath": {"grids": [{"tile_mpp": 2.0}, {"tile_mpp": 0.5}]}, "gigapath_tile": {}}
    )
    specs = configured_embeddings(instances, ["virchow2"], [25, 5], {"gigapath_slide": {}})
    names = [spec.name for spec in specs]
    assert names == [
        "eagle",
        "eagle_k5",
        "chief",
        "eagle@0.5mpp",
        "eagle_k5@0.5mpp",
        "chief@0.5mpp",
        "meanpool_ctranspath",
        "meanpool_ctranspath@0.5mpp",
        "meanpool_gigapath_tile",
        "gigapath_slide",
    ]
    by_name = {spec.name: spec for spec in specs}
    eagle = by_name["eagle_k5@0.5mpp"]
    assert (eagle.base, eagle.top_k, eagle.stage_key) == ("eagle_k5", 5, "virchow2@0.5mpp")
    assert (eagle.attention_key, eagle.features_key) == ("chief@0.5mpp", "ctranspath@0.5mpp")
    assert by_name["meanpool_ctranspath@0.5mpp"].features_key == "ctranspath@0.5mpp"
    assert by_name["gigapath_slide"].features_key == "gigapath_tile"


@pytest.mark.parametrize("grid", [Grid(224, 2.0), Grid(224, 1.14), Grid(256, 0.5), Grid(64, 8.0)])
def test_a_grid_is_read_back_from_its_folder_name(grid):
    assert Grid.from_name(grid.name) == grid


def test_eagle_over_all_tiles_needs_its_encoder_at_chiefs_grid():
    instances = tile_encoder_instances({"ctranspath": {}, "virchow2": {}})  # virchow2 at 0.5
    with pytest.raises(EncoderConfigError, match=r"add it to tile_encoders at that grid.*224"):
        configured_embeddings(instances, ["virchow2"], [25], eagle_all=True)
    instances = tile_encoder_instances(
        {"ctranspath": {"grids": "paper"}, "virchow2": {"grids": ["native", "paper"]}}
    )
    specs = configured_embeddings(instances, ["virchow2"], [25], eagle_all=True)
    all_tiles = {s.name: s.features_key for s in specs if s.kind == "eagle_all"}
    assert all_tiles == {
        "eagle_all": "virchow2@2mpp",
        "eagle_all@1.14mpp": "virchow2@1.14mpp",
        "eagle_all@0.5mpp": "virchow2",  # its first grid (native = paper's 0.5, once)
    }
