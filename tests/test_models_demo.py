"""Demo weights carry the input's signal: different tiles give different embeddings, and the
demo EAGLE embeddings of the two synthetic classes differ more between than within classes.

Seeded random weights with LayerScale at its init value (1e-5) made the demo Virchow2 class token
the same for every tile (spread 2e-4 of its norm), so a broken tile path went unnoticed and EAGLE
sat at chance in the demo report. These tests run the package's own stage functions on a few
small slides of the demo cohort.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_features import run_stages  # the stage chain of the feature tests, reused

from eagleflow.demo import DemoCohort, make_demo_cohort
from eagleflow.features import TileGeometry, iter_tile_batches
from eagleflow.h5io import read_h5
from eagleflow.models.checkpoints import demo_seed, random_state_dict
from eagleflow.models.gigapath_tile import build as build_gigapath_tile
from eagleflow.models.loading import load_model
from eagleflow.models.preprocess import preprocess_tiles
from eagleflow.tiling import TilingParams, run_tiling

torch.set_num_threads(min(2, torch.get_num_threads()))

TOP_K = 1  # Virchow2 costs ~4 s per tile on 2 cores: one per slide keeps the file fast
# Slides without pen, blank or blur artefacts, two per class (one internal, one external).
SLIDES = {"A": ("DEMO-INT-005-S1", "DEMO-EXT-001-S1"), "B": ("DEMO-INT-006-S1", "DEMO-EXT-004-S1")}
# A spread below this fraction of the embeddings' norm means the model ignores its input.
MIN_RELATIVE_SPREAD = 0.05


def relative_spread(embeddings: np.ndarray) -> float:
    """Mean distance to the centroid over the mean norm: 0 when every row is the same."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    centroid = embeddings.mean(0)
    spread = np.linalg.norm(embeddings - centroid, axis=1).mean()
    return float(spread / np.linalg.norm(embeddings, axis=1).mean())


def test_relative_spread_measures_what_it_says() -> None:
    rng = np.random.default_rng(0)
    same = np.tile(rng.normal(size=(1, 16)), (5, 1))
    assert relative_spread(same) == pytest.approx(0.0, abs=1e-12)
    assert relative_spread(same + 1e-4 * rng.normal(size=same.shape)) < 1e-3
    assert relative_spread(rng.normal(size=(50, 16))) > 0.9


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> DemoCohort:
    return make_demo_cohort(tmp_path_factory.mktemp("demo"), seed=0, size_scale=0.6, hostile=False)


@pytest.fixture(scope="module")
def stage_outputs(cohort: DemoCohort, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """tiling -> CTransPath -> CHIEF -> Virchow2 top-k on the chosen slides, all demo weights."""
    out = tmp_path_factory.mktemp("stages")
    slides = []
    for label, slide_ids in SLIDES.items():
        for slide_id in slide_ids:
            path = str(cohort.slide_path(slide_id))
            tiles = out / "tiles" / f"{slide_id}.h5"
            params = TilingParams().as_dict()
            run_tiling(path, slide_id, params, None, str(tiles), str(out / "qc.png"))
            slides.append({"slide_id": slide_id, "slide_path": path, "tiles": str(tiles)})
            slides[-1]["label"] = label
    return run_stages({"slides": slides}, out, top_k=TOP_K)


def test_demo_ctranspath_features_differ_between_tiles(stage_outputs: list[dict]) -> None:
    feats = np.concatenate([read_h5(s["features"])[0]["feats"] for s in stage_outputs])
    assert len(feats) >= 12
    assert relative_spread(feats) > MIN_RELATIVE_SPREAD


def test_demo_chief_scores_and_embeddings_differ(stage_outputs: list[dict]) -> None:
    for slide in stage_outputs:
        raw = read_h5(slide["attention"])[0]["attention_raw"]
        # the ranking must depend on the tiles: scores are not all (nearly) equal
        assert raw.std() > 0.1, slide["slide_id"]  # unit-gain scorer: ~0.007
    chief = np.stack([read_h5(s["attention"])[0]["chief_embedding"] for s in stage_outputs])
    assert relative_spread(chief) > MIN_RELATIVE_SPREAD / 2


def test_demo_virchow2_class_tokens_differ_between_tiles(stage_outputs: list[dict]) -> None:
    tokens = np.concatenate([read_h5(s["topk"])[0]["tile_embeddings"] for s in stage_outputs])
    assert len(tokens) == TOP_K * len(stage_outputs)
    assert relative_spread(tokens) > MIN_RELATIVE_SPREAD


def test_demo_eagle_embeddings_separate_the_two_classes(stage_outputs: list[dict]) -> None:
    """Between-class distances exceed within-class ones (seeded: ~1.12x here), and the classes
    differ by a real fraction of the embeddings' norm (LayerScale 1e-5 demo weights: 3e-4)."""
    eagle = np.stack([read_h5(s["topk"])[0]["embedding_mean"] for s in stage_outputs])
    eagle = eagle.astype(np.float64)
    labels = np.array([s["label"] for s in stage_outputs])
    distances = np.linalg.norm(eagle[:, None] - eagle[None], axis=-1)
    same = labels[:, None] == labels[None]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    within = distances[same & off_diagonal].mean()
    between = distances[~same].mean()
    norm = np.linalg.norm(eagle, axis=1).mean()
    assert between > within, (between, within)
    assert between > 0.02 * norm, (between, norm)  # the classes differ by a real fraction


def demo_tiles(stage_outputs: list[dict], per_slide: int = 2) -> torch.Tensor:
    """uint8 tiles [B, 224, 224, 3]: the first tiles of each slide, as the tiles files give them."""
    geometries = [TileGeometry.from_tiles_file(s["tiles"], s["slide_path"]) for s in stage_outputs]
    subsets = [g.subset(np.arange(min(per_slide, len(g.coords)))) for g in geometries]
    return torch.cat([batch for _, _, batch in iter_tile_batches(subsets, 16, 0)])


@pytest.mark.parametrize("name", ["pathoduet_he", "pathoduet_ihc"])
def test_demo_pathoduet_embeddings_differ_between_tiles(stage_outputs: list[dict], name) -> None:
    tiles = demo_tiles(stage_outputs)
    model = load_model(name, "demo")
    with torch.inference_mode():
        embeddings = model(preprocess_tiles(name, tiles)).numpy()
    assert embeddings.shape == (len(tiles), 768)
    assert relative_spread(embeddings) > MIN_RELATIVE_SPREAD


def test_demo_gigapath_tile_embeddings_differ_between_tiles(stage_outputs: list[dict]) -> None:
    """The demo scheme on a 4-block twin (the 40-block model costs ~20 s per tile on 2 cores)."""
    twin = build_gigapath_tile("meta", depth=4)
    twin.load_state_dict(random_state_dict(twin, demo_seed("gigapath_tile")), assign=True)
    twin.eval()
    tiles = demo_tiles(stage_outputs, per_slide=1)
    with torch.inference_mode():
        embeddings = twin(preprocess_tiles("gigapath_tile", tiles)).numpy()
    assert relative_spread(embeddings) > MIN_RELATIVE_SPREAD


def test_demo_gigapath_slide_embeddings_follow_tiles_and_coordinates() -> None:
    model = load_model("gigapath_slide", "demo")
    gen = torch.Generator().manual_seed(0)
    slides = []
    for n in (30, 45, 60, 80):
        columns = 9
        coords = torch.stack([torch.arange(n) % columns, torch.arange(n) // columns], 1) * 256
        slides.append((torch.randn(n, 1536, generator=gen), coords))
    with torch.inference_mode():
        embeddings = torch.stack([model(x, c, 256) for x, c in slides]).numpy()
        x, coords = slides[0]
        moved = model(x, coords.flip(1), 256).numpy()  # the same tiles, x and y exchanged
    assert relative_spread(embeddings) > MIN_RELATIVE_SPREAD
    # wrong coordinates change the embedding visibly
    assert relative_spread(np.stack([embeddings[0], moved])) > MIN_RELATIVE_SPREAD / 5
