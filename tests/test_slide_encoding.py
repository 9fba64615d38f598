"""The Prov-GigaPath slide encoder stage: bag layout, the embedding it writes, reruns, demo flags."""

from __future__ import annotations

import csv
import runpy
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from model_fixtures import fabricate_state_dict, key_spec_or_skip, save_checkpoint

import eagleflow.models.loading
from eagleflow.encoders import EncoderConfigError
from eagleflow.feature_files import write_tile_features
from eagleflow.h5io import read_attrs, read_h5
from eagleflow.models import gigapath_slide as gs
from eagleflow.provenance import SCRIPTS_DIR
from eagleflow.slide_encoding import (
    SlideLayoutError,
    bag_positions,
    run_slide_encoder_batch,
)

torch.set_num_threads(min(2, torch.get_num_threads()))

DEMO = {"weights": "demo"}
ENCODER = "gigapath_slide"
PARAMS = {"fusion": "early", "layer": 11, "device": "cpu"}


def grid_subset(columns: int, rows: int, keep: float, seed: int) -> np.ndarray:
    """Cells (gx, gy) of a random part of a columns x rows grid, in random order."""
    rng = np.random.default_rng(seed)
    cells = np.stack(np.meshgrid(np.arange(columns), np.arange(rows)), -1).reshape(-1, 2)
    cells = cells[rng.random(len(cells)) < keep]
    return cells[rng.permutation(len(cells))].astype(np.int64)


def slide_coords(cells: np.ndarray, tile_size: int, origin: tuple[int, int]) -> np.ndarray:
    """Level-0 top-left pixels of tiles at `cells`, the grid starting `origin` tiles in."""
    return (cells + np.array(origin)) * tile_size


def write_features(
    path: Path,
    coords: np.ndarray,
    tile_size: int,
    seed: int,
    tile_demo: bool = True,
    mpp: float | None = None,
) -> Path:
    """A per-slide Prov-GigaPath tile-feature file (eagleflow.features/2)."""
    mpp = mpp if mpp is not None else 128 / tile_size  # 256 px at 0.5 µm/px = 128 µm tiles
    feats = np.random.default_rng(seed).normal(size=(len(coords), 1536)).astype(np.float32)
    write_tile_features(
        path,
        feats,
        coords.astype(np.int64),
        mpp=mpp,
        tile_size_px=256,
        tile_size_um=128.0,
        encoder="gigapath_tile",
        attrs={
            "tile_size_level0_px": tile_size,
            "tile_px": 256,
            "tile_mpp": 0.5,
            "gigapath_tile_weights_demo": "true" if tile_demo else "false",
            "gigapath_tile_weights_sha256": "demo" if tile_demo else "ab" * 32,
        },
    )
    return path


def features_of(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data, _ = read_h5(path)
    return data["feats"], data["coords_level0_px"]


@pytest.fixture(scope="module")
def demo_model() -> gs.GigaPathSlideEncoder:
    from eagleflow.models.loading import load_model

    return load_model("gigapath_slide", "demo")


def serve(monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module, calls: list[str]) -> None:
    """load_model serves `model` (built once per module) and records each load in `calls`."""

    def load(name, weights, **kwargs):
        assert weights.is_demo
        calls.append(name)
        return model

    monkeypatch.setattr(eagleflow.models.loading, "load_model", load)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch, demo_model: gs.GigaPathSlideEncoder) -> list[str]:
    calls: list[str] = []
    serve(monkeypatch, demo_model, calls)
    return calls


def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded although every bag is up to date")

    monkeypatch.setattr(eagleflow.models.loading, "load_model", load)


def encode(model: gs.GigaPathSlideEncoder, feats, coords, tile_size, layer=11, **kwargs):
    with torch.inference_mode():
        out = model.encode(torch.from_numpy(feats), torch.from_numpy(coords), tile_size, **kwargs)
    return out.layers[layer].numpy()


def read_manifest_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


# --- layout ------------------------------------------------------------------------------------


def test_slides_of_different_mpp_are_placed_side_by_side_in_tile_units():
    # 128 µm tiles: 512 level-0 px at 0.25 µm/px, 256 at 0.5, 1024 at 0.125; origins off zero.
    slides = [
        (grid_subset(30, 20, 0.6, 1), 512, (7, 3)),
        (grid_subset(10, 40, 0.5, 2), 256, (100, 55)),
        (grid_subset(8, 8, 0.9, 3), 1024, (1, 0)),
    ]
    positions = bag_positions([(slide_coords(c, ts, o), ts) for c, ts, o in slides])
    x = 0
    expected = []
    for cells, _, _ in slides:
        own = cells - cells.min(0)  # the slide's own layout, moved to its origin
        expected.append(own + np.array([x, 0]))
        x += own[:, 0].max() + 2  # one empty column between two slides
    np.testing.assert_array_equal(positions, np.concatenate(expected))
    assert positions.dtype == np.int64
    assert len(np.unique(positions, axis=0)) == len(positions)


def test_a_slide_that_would_cross_the_limit_starts_a_shelf_below():
    wide = grid_subset(12, 5, 1.0, 0)  # 12 x 5 tiles, all present
    tall = grid_subset(6, 7, 1.0, 0)
    small = grid_subset(4, 2, 1.0, 0)
    positions = bag_positions([(wide * 256, 256), (tall * 256, 256), (small * 256, 256)], 1, 20)
    np.testing.assert_array_equal(positions[: len(wide)], wide)
    # Columns 0-11, one empty, then 13-18: the second slide still fits the 20 columns.
    np.testing.assert_array_equal(
        positions[len(wide) : len(wide) + len(tall)], tall + np.array([13, 0])
    )
    # The third would take columns 20-23: a new shelf below the tallest (7 rows) and a gap row.
    np.testing.assert_array_equal(positions[len(wide) + len(tall) :], small + np.array([0, 8]))
    assert len(np.unique(positions, axis=0)) == len(positions)


def test_bags_that_do_not_fit_the_grid_are_refused():
    assert gs.GRID == 1000  # the table the limit stands for
    too_wide = np.array([[0, 0], [1000 * 256, 0]])
    with pytest.raises(SlideLayoutError, match="slide 0 spans 1001 x 1 tiles"):
        bag_positions([(too_wide, 256)])
    just_fits = np.array([[0, 0], [999 * 256, 999 * 256]])
    assert bag_positions([(just_fits, 256)]).max() == 999
    # Three 400-row slides: the third shelf would reach row 1201 (the reference would alias it).
    tall = np.array([[0, 0], [600 * 256, 399 * 256]])
    with pytest.raises(SlideLayoutError, match=r"C \(601 x 400 tiles\) would reach row 1201"):
        bag_positions([(tall, 256)] * 3, names=["A", "B", "C"])


def test_coordinates_off_the_tile_grid_or_repeated_are_refused():
    with pytest.raises(SlideLayoutError, match="multiples of the tile size"):
        bag_positions([(np.array([[0, 0], [256, 100]]), 256)])
    with pytest.raises(SlideLayoutError, match="same coordinates"):
        bag_positions([(np.array([[0, 0], [256, 0], [0, 0]]), 256)])


# --- the stage ---------------------------------------------------------------------------------


def test_one_slide_bag_is_the_model_on_that_slide_moved_to_the_origin(tmp_path, loads, demo_model):
    cells = grid_subset(25, 12, 0.7, 4)
    coords = slide_coords(cells, 512, (40, 9))
    path = write_features(tmp_path / "s1.h5", coords, 512, seed=4)
    bag = {
        "slide_id": "s1",
        "patient": "P1",
        "slides": [{"slide_id": "s1", "features": str(path)}],
        "output": str(tmp_path / "out" / "s1.h5"),
    }
    run_slide_encoder_batch(
        [bag], ENCODER, DEMO, {**PARAMS, "fusion": "late"}, str(tmp_path / "m.tsv")
    )
    data, attrs = read_h5(bag["output"])
    feats, coords = features_of(path)
    # The model itself, given the slide's level-0 coords moved to the origin and its tile size
    # (it sorts the tiles row-major itself).
    moved = coords - coords.min(0)
    np.testing.assert_allclose(
        data["embedding"], encode(demo_model, feats, moved, 512), rtol=0, atol=1e-6
    )
    # Positions are absolute cells: the same slide left where it was gives another embedding.
    assert np.abs(data["embedding"] - encode(demo_model, feats, coords, 512)).max() > 1e-3
    # Tokens in row-major order, each traced back to its row in the features file.
    expected_cells = moved // 512
    np.testing.assert_array_equal(data["positions"], expected_cells[data["tile_index"]])
    order = np.lexsort((data["positions"][:, 0], data["positions"][:, 1]))
    np.testing.assert_array_equal(order, np.arange(len(order)))
    assert sorted(data["tile_index"]) == list(range(len(feats)))
    assert (
        attrs["fusion"] == "late" and attrs["option_layer"] == 11 and attrs["n_tiles"] == len(feats)
    )
    assert attrs["compute_seconds"] > 0
    assert attrs["tile_forwards"] == 0 and attrs["slide_forwards"] == 1
    assert loads == ["gigapath_slide"]


def patient_bag(
    tmp_path: Path, patient: str, seed: int, tile_demo: tuple[bool, bool] = (True, True)
) -> dict:
    """A patient with two slides scanned at 0.25 and 0.5 µm/px, given in reverse id order."""
    a = write_features(
        tmp_path / f"{patient}_a.h5",
        slide_coords(grid_subset(20, 15, 0.6, seed), 512, (3, 8)),
        512,
        seed,
        tile_demo[0],
    )
    b = write_features(
        tmp_path / f"{patient}_b.h5",
        slide_coords(grid_subset(14, 22, 0.6, seed + 1), 256, (60, 2)),
        256,
        seed + 1,
        tile_demo[1],
    )
    return {
        "slide_id": patient,
        "patient": patient,
        "slides": [
            {"slide_id": f"{patient}_b", "features": str(b)},
            {"slide_id": f"{patient}_a", "features": str(a)},
        ],
        "output": str(tmp_path / "out" / f"{patient}.h5"),
    }


def test_patient_bag_goes_slide_by_slide_on_one_canvas(tmp_path, loads, demo_model):
    bag = patient_bag(tmp_path, "P1", seed=10)
    run_slide_encoder_batch([bag], ENCODER, DEMO, PARAMS, str(tmp_path / "m.tsv"))
    data, attrs = read_h5(bag["output"])
    # Written out independently: slides by id, each moved to its origin and sorted row-major,
    # the second placed right of the first after one empty column.
    feats, cells, x = [], [], 0
    for slide_id, tile_size in (("P1_a", 512), ("P1_b", 256)):
        f, c = features_of(tmp_path / f"{slide_id}.h5")
        own = c // tile_size - (c // tile_size).min(0)
        order = np.lexsort((own[:, 0], own[:, 1]))
        feats.append(f[order])
        cells.append(own[order] + np.array([x, 0]))
        x += own[:, 0].max() + 2
    feats, cells = np.concatenate(feats), np.concatenate(cells)
    np.testing.assert_array_equal(data["positions"], cells)
    expected = encode(demo_model, feats, cells * 256, 256, row_major=False)
    np.testing.assert_allclose(data["embedding"], expected, rtol=0, atol=1e-6)
    # The order matters: the model's canvas-wide row-major order would interleave the slides.
    canvas_order = encode(demo_model, feats, cells * 256, 256, row_major=True)
    assert np.abs(canvas_order - expected).max() > 1e-4
    assert [s.decode() for s in data["slide_order"]] == ["P1_a", "P1_b"]
    assert data["slide_tiles"].sum() == len(cells) == attrs["n_tiles"]
    assert attrs["n_slides"] == 2 and attrs["patient"] == "P1" and attrs["bag"] == "P1"
    assert "gap 1 tile" in attrs["layout"] and "shelves of 1000 cells" in attrs["layout"]


def test_rerun_skips_and_a_changed_input_recomputes_its_bag_only(
    tmp_path, loads, monkeypatch, demo_model
):
    bags = [patient_bag(tmp_path, "P1", seed=20), patient_bag(tmp_path, "P2", seed=30)]
    manifest = tmp_path / "m.tsv"
    run_slide_encoder_batch(bags, ENCODER, DEMO, PARAMS, str(manifest))
    assert loads == ["gigapath_slide"]  # one load for the two bags
    first = {b["slide_id"]: Path(b["output"]).read_bytes() for b in bags}
    first_p2 = read_h5(bags[1]["output"])[0]["embedding"]
    first_manifest = manifest.read_bytes()

    no_load(monkeypatch)  # and the slides' order in a bag does not change its inputs
    reordered = [{**b, "slides": b["slides"][::-1]} for b in bags]
    run_slide_encoder_batch(reordered, ENCODER, DEMO, PARAMS, str(manifest))
    assert {b["slide_id"]: Path(b["output"]).read_bytes() for b in bags} == first
    assert manifest.read_bytes() == first_manifest

    calls: list[str] = []
    serve(monkeypatch, demo_model, calls)
    _, coords = features_of(tmp_path / "P2_a.h5")  # same tiles, other features
    write_features(tmp_path / "P2_a.h5", coords, 512, seed=99)
    run_slide_encoder_batch(bags, ENCODER, DEMO, PARAMS, str(manifest))
    assert calls == ["gigapath_slide"]
    assert Path(bags[0]["output"]).read_bytes() == first["P1"]
    assert not np.array_equal(read_h5(bags[1]["output"])[0]["embedding"], first_p2)
    rows = {row["slide"]: row for row in read_manifest_rows(manifest)}
    assert rows["P2"]["content_sha256"] == read_attrs(bags[1]["output"])["content_sha256"]
    assert rows["P2"]["content_sha256"] != read_manifest_rows_of(first_manifest)["P2"]


def read_manifest_rows_of(content: bytes) -> dict[str, str]:
    """Bag -> content_sha256 of a manifest's bytes."""
    rows = csv.DictReader(content.decode().splitlines(), delimiter="\t")
    return {row["slide"]: row["content_sha256"] for row in rows}


def test_another_layer_recomputes_and_takes_that_layer(tmp_path, loads, demo_model):
    bag = patient_bag(tmp_path, "P1", seed=40)
    run_slide_encoder_batch([bag], ENCODER, DEMO, PARAMS, str(tmp_path / "m.tsv"))
    sha11 = read_attrs(bag["output"])["params_sha256"]
    run_slide_encoder_batch([bag], ENCODER, DEMO, {**PARAMS, "layer": 5}, str(tmp_path / "m.tsv"))
    data, attrs = read_h5(bag["output"])
    assert attrs["option_layer"] == 5 and attrs["params_sha256"] != sha11 and len(loads) == 2
    feats = np.concatenate(
        [
            features_of(tmp_path / f"P1_{s}.h5")[0][i]
            for s, i in zip("ab", split_index(data), strict=True)
        ]
    )
    expected = encode(demo_model, feats, data["positions"] * 256, 256, layer=5, row_major=False)
    np.testing.assert_allclose(data["embedding"], expected, rtol=0, atol=1e-6)


def split_index(data: dict[str, np.ndarray]) -> list[np.ndarray]:
    """tile_index split into the slides' parts (slide_order, slide_tiles)."""
    return np.split(data["tile_index"], np.cumsum(data["slide_tiles"])[:-1])


def test_demo_flags_and_manifest_rows(tmp_path, loads):
    bags = [
        patient_bag(tmp_path, "P1", seed=50, tile_demo=(False, False)),
        patient_bag(tmp_path, "P2", seed=60, tile_demo=(False, True)),
    ]
    run_slide_encoder_batch(bags, ENCODER, DEMO, PARAMS, str(tmp_path / "m.tsv"))
    p1, p2 = (read_attrs(b["output"]) for b in bags)
    assert p1["gigapath_slide_weights_demo"] == p2["gigapath_slide_weights_demo"] == "true"
    assert p1["gigapath_tile_weights_demo"] == "false" and p1["gigapath_tile_weights_sha256"] == (
        "ab" * 32
    )
    # One demo slide makes the patient's embedding demo.
    assert p2["gigapath_tile_weights_demo"] == "true"
    assert p2["gigapath_tile_weights_sha256"] == ",".join(sorted(["demo", "ab" * 32]))
    rows = read_manifest_rows(tmp_path / "m.tsv")
    assert [(r["slide"], r["path"], r["status"]) for r in rows] == [
        ("P1", bags[0]["output"], "demo weights"),
        ("P2", bags[1]["output"], "demo weights"),
    ]
    assert [r["content_sha256"] for r in rows] == [p1["content_sha256"], p2["content_sha256"]]
    assert p1["eagleflow_stage"] == "slide_encoders_encode_bags" and "params_json" in p1


def test_real_weights_say_ok_unless_the_tile_features_are_demo(tmp_path):
    spec = key_spec_or_skip("gigapath_slide")
    weights = save_checkpoint(
        spec, fabricate_state_dict(spec, seed=3, compact=True), tmp_path / "slide_encoder.pth"
    )
    model_cfg = {"weights": str(weights), "verify_sha256": False}
    real = patient_bag(tmp_path, "P1", seed=70, tile_demo=(False, False))
    run_slide_encoder_batch([real], ENCODER, model_cfg, PARAMS, str(tmp_path / "ok.tsv"))
    attrs = read_attrs(real["output"])
    assert attrs["gigapath_slide_weights_demo"] == "false"
    assert attrs["gigapath_slide_weights_file"] == "slide_encoder.pth"
    assert [r["status"] for r in read_manifest_rows(tmp_path / "ok.tsv")] == ["ok"]
    mixed = patient_bag(tmp_path, "P2", seed=80, tile_demo=(False, True))
    run_slide_encoder_batch([real, mixed], ENCODER, model_cfg, PARAMS, str(tmp_path / "mixed.tsv"))
    statuses = [r["status"] for r in read_manifest_rows(tmp_path / "mixed.tsv")]
    assert statuses == ["demo weights", "demo weights"]  # the manifest's flag is per batch


def test_bad_bags_and_params_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    no_load(monkeypatch)
    bag = patient_bag(tmp_path, "P1", seed=90)
    with pytest.raises(SlideLayoutError, match="one slide per bag"):
        run_slide_encoder_batch(
            [bag], ENCODER, DEMO, {**PARAMS, "fusion": "late"}, str(tmp_path / "m")
        )
    with pytest.raises(SlideLayoutError, match="fusion"):
        run_slide_encoder_batch(
            [bag], ENCODER, DEMO, {**PARAMS, "fusion": "x"}, str(tmp_path / "m")
        )
    with pytest.raises(EncoderConfigError, match="trained on gigapath_tile"):
        run_slide_encoder_batch(
            [bag], ENCODER, DEMO, {**PARAMS, "tile_encoder": "virchow2"}, str(tmp_path / "m")
        )
    # Three slides of 601 x 400 tiles take three shelves, 1202 rows: named, nothing loaded.
    wide = np.array([[0, 0], [600 * 256, 399 * 256]])
    paths = [write_features(tmp_path / f"w{i}.h5", wide, 256, i) for i in range(3)]
    big = {
        "slide_id": "BIG",
        "patient": "BIG",
        "slides": [{"slide_id": f"w{i}", "features": str(p)} for i, p in enumerate(paths)],
        "output": str(tmp_path / "out" / "BIG.h5"),
    }
    with pytest.raises(SlideLayoutError, match=r"BIG \(slides w0, w1, w2\).*w2 .*fusion: late"):
        run_slide_encoder_batch([big], ENCODER, DEMO, PARAMS, str(tmp_path / "m"))
    assert not Path(big["output"]).exists() and not (tmp_path / "m").exists()


def test_rule_script_passes_the_rule_params_and_the_device(tmp_path, loads):
    bag = patient_bag(tmp_path, "P1", seed=95)
    rule = SimpleNamespace(
        log=[str(tmp_path / "job.log")],
        params=SimpleNamespace(
            bags=[bag], model={"weights": "demo"}, slide_encoder={"fusion": "early", "layer": 4}
        ),
        config={"features": {"device": "cpu"}},
        wildcards=SimpleNamespace(slide_encoder=ENCODER),
        output=SimpleNamespace(manifest=str(tmp_path / "batch.tsv")),
        threads=1,
    )
    sigterm = signal.getsignal(signal.SIGTERM)  # run_rule installs its own handler
    try:
        runpy.run_path(str(SCRIPTS_DIR / "slide_encoders_encode_bags.py"), {"snakemake": rule})
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    attrs = read_attrs(bag["output"])
    assert attrs["option_layer"] == 4 and attrs["device"] == "cpu" and loads == ["gigapath_slide"]
    assert [r["slide"] for r in read_manifest_rows(tmp_path / "batch.tsv")] == ["P1"]
    assert "gigapath_slide over" in (tmp_path / "job.log").read_text()
