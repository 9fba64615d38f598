"""Every catalogued model through its real stage with demo weights: the tile encoders the
workflow tests do not run, and every slide encoder over a two-slide patient."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tissue_image, write_pyramid

from eagleflow.encoders import SLIDE_ENCODERS, TILE_ENCODERS
from eagleflow.feature_files import write_tile_features
from eagleflow.features import run_tile_encoder_batch
from eagleflow.h5io import read_attrs, read_h5
from eagleflow.slide_encoding import run_slide_encoder_batch
from eagleflow.tiling import TilingParams, run_tiling

torch.set_num_threads(min(2, torch.get_num_threads()))

DEMO = {"weights": "demo"}
EXTRACTION = {"device": "cpu", "batch_size": 4, "num_workers": 0}
# ctranspath, virchow2, gigapath_tile and pathoduet run in test_features and the workflow tests
NEW_TILE_ENCODERS = ("conch_v1", "conch_v15", "virchow")


@pytest.fixture(scope="module")
def tiny_slide(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A slide with a handful of 224 px tiles at 2 µm/px."""
    root = tmp_path_factory.mktemp("tiny")
    path = write_pyramid(root / "T1.tif", tissue_image(2400, 1400, 1, margin=12), 0.5)
    tiles = root / "T1.tiles.h5"
    run_tiling(str(path), "T1", TilingParams().as_dict(), None, str(tiles), str(root / "q.png"))
    return {"slide_id": "T1", "slide_path": str(path), "tiles": str(tiles)}


@pytest.mark.parametrize("encoder", NEW_TILE_ENCODERS)
def test_a_tile_encoder_runs_through_the_features_stage(encoder, tiny_slide, tmp_path):
    spec = TILE_ENCODERS[encoder]
    output = tmp_path / f"{encoder}.h5"
    run_tile_encoder_batch(
        encoder,
        [{**tiny_slide, "output": str(output)}],
        {model: DEMO for _stain, model in spec.models},
        EXTRACTION,
        str(tmp_path / "m.tsv"),
    )
    data, attrs = read_h5(output)
    n_tiles = len(read_h5(tiny_slide["tiles"])[0]["coords"])
    assert 2 <= n_tiles <= 12
    assert data["feats"].shape == (n_tiles, spec.dim)
    assert np.isfinite(data["feats"]).all()
    assert np.ptp(data["feats"], axis=0).max() > 1e-3  # different tiles, different embeddings
    assert attrs["encoder"] == encoder and attrs["weights_demo"] == "true"


def fabricated_bag(root: Path, tile_encoder: str, patient: str = "P1") -> dict:
    """A patient with two slides of tile features on 512 px grids (level-0 coordinates)."""
    rng = np.random.default_rng(0)
    dim = TILE_ENCODERS[tile_encoder].dim
    slides = []
    for i, n in enumerate((7, 5)):
        cells = np.stack([np.arange(n) % 4, np.arange(n) // 4], axis=1) + i
        path = root / tile_encoder / f"S{i}.h5"
        write_tile_features(
            path,
            rng.normal(size=(n, dim)).astype(np.float32),
            (cells * 512).astype(np.int64),
            mpp=0.25,
            tile_size_px=256,
            tile_size_um=128.0,
            encoder=tile_encoder,
            attrs={
                "tile_size_level0_px": 512,
                "tile_px": 256,
                "tile_mpp": 0.5,
                f"{tile_encoder}_weights_demo": "true",
                f"{tile_encoder}_weights_sha256": "demo",
            },
        )
        slides.append({"slide_id": f"S{i}", "features": str(path)})
    return {"slide_id": patient, "patient": patient, "slides": slides}


@pytest.mark.parametrize("encoder", sorted(SLIDE_ENCODERS))
def test_a_slide_encoder_runs_through_the_stage(encoder, tmp_path):
    spec = SLIDE_ENCODERS[encoder]
    bag = {**fabricated_bag(tmp_path, spec.tile_encoder), "output": str(tmp_path / "P1.h5")}
    params = {"fusion": "early", "device": "cpu"}
    run_slide_encoder_batch([bag], encoder, DEMO, params, str(tmp_path / "m.tsv"))
    data, attrs = read_h5(bag["output"])
    # COBRA's embedding is a weighted mean of its input features: the tile encoder's width
    dim = TILE_ENCODERS[spec.tile_encoder].dim if encoder.startswith("cobra") else spec.dim
    assert data["embedding"].shape == (dim,) and np.isfinite(data["embedding"]).all()
    assert attrs["n_tiles"] == 12 and attrs["n_slides"] == 2
    assert attrs["tile_encoder"] == spec.tile_encoder and attrs["encoder"] == encoder
    assert attrs[f"{spec.model}_weights_demo"] == "true"
    assert attrs[f"{spec.tile_encoder}_weights_demo"] == "true"  # carried from the features
    assert len(np.unique(data["positions"], axis=0)) == 12  # one cell per tile
    stamp = Path(bag["output"]).stat().st_mtime_ns
    run_slide_encoder_batch([bag], encoder, DEMO, params, str(tmp_path / "m.tsv"))
    assert Path(bag["output"]).stat().st_mtime_ns == stamp  # up to date: kept
    assert read_attrs(bag["output"])["params_sha256"] == attrs["params_sha256"]
