"""Cohort tables from fabricated per-slide files: stain tables, slide-encoder bags, compute rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eagleflow.batches import write_manifest
from eagleflow.embeddings import build_cohort_embeddings
from eagleflow.encoders import Grid, TileInstance, configured_embeddings
from eagleflow.feature_files import write_tile_features
from eagleflow.h5io import read_h5, write_h5

# (slide, patient, stain, tiles)
SLIDES = [("A1", "PA", "HE", 5), ("A2", "PA", "IHC", 3), ("B1", "PB", "HE", 4)]


def _fabricate(root: Path) -> dict:
    rng = np.random.default_rng(0)
    manifests: dict[str, list] = {
        "attention": [],
        "ctranspath": [],
        "gigapath_tile": [],
        "virchow2": [],
    }
    rows = {key: [] for key in manifests}
    feats = {}
    for slide, _patient, _stain, n in SLIDES:
        coords = np.stack([np.arange(n) * 448, np.zeros(n)], axis=1).astype(np.int64)
        geometry = {"slide_id": slide, "tile_size_level0_px": 448, "compute_seconds": 1.0}
        for encoder, dim in (("ctranspath", 768), ("gigapath_tile", 1536)):
            feats[slide, encoder] = rng.normal(size=(n, dim)).astype(np.float32)
            path = root / encoder / f"{slide}.h5"
            write_tile_features(
                path,
                feats[slide, encoder],
                coords,
                mpp=0.5,
                tile_size_px=224,
                tile_size_um=112.0,
                encoder=encoder,
                attrs={**geometry, "tile_forwards": n, f"{encoder}_weights_demo": "true"},
            )
            rows[encoder].append({"slide_id": slide, "output": str(path)})
        raw = rng.normal(size=n).astype(np.float32)
        path = root / "attention" / f"{slide}.h5"
        write_h5(
            path,
            {"chief_embedding": rng.normal(size=768).astype(np.float32), "attention_raw": raw},
            {"n_tiles": n, "attention_logsumexp": float(np.log(np.exp(raw).sum())), **geometry},
        )
        rows["attention"].append({"slide_id": slide, "output": str(path)})
        order = np.argsort(-raw, kind="stable")[:2]
        path = root / "virchow2" / f"{slide}.h5"
        write_h5(
            path,
            {
                "tile_embeddings": rng.normal(size=(len(order), 1280)).astype(np.float32),
                "attention_raw": raw[order],
                "tile_index": order.astype(np.int64),
            },
            {"tile_forwards": len(order), "compute_seconds": 4.0},
        )
        rows["virchow2"].append({"slide_id": slide, "output": str(path)})
    for key, listed in rows.items():
        manifests[key] = [str(root / f"{key}.tsv")]
        write_manifest(manifests[key][0], listed, True)
    # slide-encoder bags: one per patient and stain
    bags = {"PA.HE": ["A1"], "PA.IHC": ["A2"], "PB.HE": ["B1"]}
    bag_rows = []
    for bag, members in bags.items():
        path = root / "bags" / f"{bag}.h5"
        write_h5(
            path,
            {
                "embedding": rng.normal(size=768).astype(np.float32),
                "slide_order": np.array([m.encode() for m in members]),
            },
            {"n_tiles": sum(n for s, _, _, n in SLIDES if s in members), "compute_seconds": 2.0},
        )
        bag_rows.append({"slide_id": bag, "output": str(path)})
    manifests["gigapath_slide"] = [str(root / "bags.tsv")]
    write_manifest(manifests["gigapath_slide"][0], bag_rows, True)
    return {"manifests": manifests, "feats": feats}


@pytest.fixture()
def tables(tmp_path: Path) -> dict:
    made = _fabricate(tmp_path)
    m = made["manifests"]
    specs = configured_embeddings(
        ["ctranspath", "gigapath_tile"], ["virchow2"], [2], ["gigapath_slide"]
    )
    build_cohort_embeddings(
        [{"slide_id": s, "patient": p, "cohort": "C", "stain": st} for s, p, st, _ in SLIDES],
        [vars(spec) for spec in specs],
        m["attention"],
        {"ctranspath": m["ctranspath"], "gigapath_tile": m["gigapath_tile"]},
        {"virchow2": m["virchow2"]},
        {"gigapath_slide": m["gigapath_slide"]},
        {"aggregation": "mean", "slide_encoder_fusion": {"gigapath_slide": "early"}},
        str(tmp_path / "slides.h5"),
        str(tmp_path / "patients.h5"),
        str(tmp_path / "compute.csv"),
        {"IHC": str(tmp_path / "patients_IHC.h5")},
    )
    return {"dir": tmp_path, **made}


def test_a_stain_table_holds_that_stains_slides_only(tables):
    ihc, attrs = read_h5(tables["dir"] / "patients_IHC.h5")
    assert ihc["patient"].tolist() == [b"PA"] and attrs["stain"] == "IHC"
    np.testing.assert_allclose(
        ihc["meanpool_ctranspath"][0], tables["feats"]["A2", "ctranspath"].mean(0), rtol=1e-5
    )
    bag, _ = read_h5(tables["dir"] / "bags" / "PA.IHC.h5")
    np.testing.assert_array_equal(ihc["gigapath_slide"][0], bag["embedding"])


def test_a_patients_slide_encoder_embedding_weights_its_stain_bags_by_tiles(tables):
    patients, _ = read_h5(tables["dir"] / "patients.h5")
    he, _ = read_h5(tables["dir"] / "bags" / "PA.HE.h5")
    ihc, _ = read_h5(tables["dir"] / "bags" / "PA.IHC.h5")
    expected = (5 * he["embedding"].astype(np.float64) + 3 * ihc["embedding"]) / 8
    np.testing.assert_allclose(patients["gigapath_slide"][0], expected, rtol=1e-5)
    both = np.concatenate(
        [tables["feats"]["A1", "ctranspath"], tables["feats"]["A2", "ctranspath"]]
    )
    np.testing.assert_allclose(
        patients["meanpool_ctranspath"][0], both.mean(0), rtol=1e-5, atol=1e-6
    )
    slides, _ = read_h5(tables["dir"] / "slides.h5")
    assert "gigapath_slide" not in slides  # bags are patients: no slide-level embedding
    assert slides["stain"].tolist() == [b"HE", b"IHC", b"HE"]


def test_compute_rows_count_forwards_and_seconds_per_slide(tables):
    compute = pd.read_csv(tables["dir"] / "compute.csv").set_index("embedding")
    tiles = np.mean([n for *_, n in SLIDES])
    assert compute.loc["meanpool_gigapath_tile", "tile_forwards_per_slide"] == pytest.approx(tiles)
    assert compute.loc["eagle", "tile_forwards_per_slide"] == pytest.approx(tiles + 2)
    assert compute.loc["chief", "seconds_per_slide"] == pytest.approx(2.0)  # CTransPath + CHIEF
    assert compute.loc["eagle", "seconds_per_slide"] == pytest.approx(6.0)
    # the slide encoder: its tile encoder's seconds, plus 3 bags x 2 s over 3 slides
    assert compute.loc["gigapath_slide", "seconds_per_slide"] == pytest.approx(3.0)
    assert compute.loc["gigapath_slide", "slide_forwards_per_slide"] == pytest.approx(1.0)
    assert compute.loc["meanpool_gigapath_tile", "demo_weights"] == "gigapath_tile"


def test_late_fusion_is_the_plain_mean_of_slides_and_early_the_patients_bag(tmp_path: Path):
    """Two slide encoders in one table: bag ids repeat between them, fusions differ."""
    made = _fabricate(tmp_path)
    m = made["manifests"]
    rng = np.random.default_rng(7)
    slide_rows, slide_bags = [], {}
    for slide, *_ in SLIDES:  # late fusion: one bag per slide, named by the slide
        slide_bags[slide] = rng.normal(size=768).astype(np.float32)
        path = tmp_path / "late" / f"{slide}.h5"
        write_h5(
            path,
            {"embedding": slide_bags[slide], "slide_order": np.array([slide.encode()])},
            {"n_tiles": 1, "compute_seconds": 1.0},
        )
        slide_rows.append({"slide_id": slide, "output": str(path)})
    write_manifest(tmp_path / "late.tsv", slide_rows, True)
    specs = configured_embeddings(
        ["ctranspath", "gigapath_tile"],
        ["virchow2"],
        [2],
        {"gigapath_slide": {}, "late_encoder": {"tile_encoder": "gigapath_tile"}},
    )
    build_cohort_embeddings(
        [{"slide_id": s, "patient": p, "cohort": "C", "stain": st} for s, p, st, _ in SLIDES],
        [vars(spec) for spec in specs],
        m["attention"],
        {"ctranspath": m["ctranspath"], "gigapath_tile": m["gigapath_tile"]},
        {"virchow2": m["virchow2"]},
        {"gigapath_slide": m["gigapath_slide"], "late_encoder": [str(tmp_path / "late.tsv")]},
        {
            "aggregation": "mean",
            "slide_encoder_fusion": {"gigapath_slide": "early", "late_encoder": "late"},
        },
        str(tmp_path / "slides.h5"),
        str(tmp_path / "patients.h5"),
        str(tmp_path / "compute.csv"),
    )
    patients, _ = read_h5(tmp_path / "patients.h5")
    slides, _ = read_h5(tmp_path / "slides.h5")
    # late: PA's two slides (5 and 3 tiles) count alike, not by their tiles
    expected = (slide_bags["A1"].astype(np.float64) + slide_bags["A2"]) / 2
    np.testing.assert_allclose(patients["late_encoder"][0], expected, rtol=1e-5)
    np.testing.assert_allclose(patients["late_encoder"][1], slide_bags["B1"], rtol=1e-6)
    np.testing.assert_array_equal(slides["late_encoder"][2], slide_bags["B1"])
    # early: the patient's bag (per stain), unaffected by the other encoder's bags
    pb, _ = read_h5(tmp_path / "bags" / "PB.HE.h5")
    np.testing.assert_array_equal(patients["gigapath_slide"][1], pb["embedding"])
    assert "gigapath_slide" not in slides


def test_eagle_all_is_one_chief_softmax_over_every_tile_of_the_patient(tmp_path: Path):
    """The paper's `all` ablation: CHIEF's softmax over all of a patient's tiles weights the
    second-stage encoder's embedding of each tile (here virchow2 on the selection grid)."""
    made = _fabricate(tmp_path)
    m = made["manifests"]
    rng = np.random.default_rng(3)
    rows, virchow = [], {}
    for slide, _patient, _stain, n in SLIDES:
        virchow[slide] = rng.normal(size=(n, 1280)).astype(np.float32)
        coords = np.stack([np.arange(n) * 448, np.zeros(n)], axis=1).astype(np.int64)
        path = tmp_path / "virchow2_all" / f"{slide}.h5"
        write_tile_features(
            path,
            virchow[slide],
            coords,
            mpp=0.5,
            tile_size_px=224,
            tile_size_um=112.0,
            encoder="virchow2",
            attrs={"slide_id": slide, "tile_size_level0_px": 448, "tile_forwards": n},
        )
        rows.append({"slide_id": slide, "output": str(path)})
    write_manifest(tmp_path / "virchow2_all.tsv", rows, True)
    instances = {
        "ctranspath": TileInstance("ctranspath", "ctranspath", Grid(224, 2.0), ""),
        "virchow2": TileInstance("virchow2", "virchow2", Grid(224, 2.0), ""),
    }
    specs = configured_embeddings(instances, ["virchow2"], [2], eagle_all=True)
    assert [s.name for s in specs][:3] == ["eagle", "eagle_all", "chief"]
    build_cohort_embeddings(
        [{"slide_id": s, "patient": p, "cohort": "C", "stain": st} for s, p, st, _ in SLIDES],
        [vars(spec) for spec in specs],
        m["attention"],
        {"ctranspath": m["ctranspath"], "virchow2": [str(tmp_path / "virchow2_all.tsv")]},
        {"virchow2": m["virchow2"]},
        {},
        {"aggregation": "mean"},
        str(tmp_path / "slides.h5"),
        str(tmp_path / "patients.h5"),
        str(tmp_path / "compute.csv"),
    )
    raw = {s: read_h5(tmp_path / "attention" / f"{s}.h5")[0]["attention_raw"] for s, *_ in SLIDES}
    scores = np.concatenate([raw["A1"], raw["A2"]]).astype(np.float64)
    weights = np.exp(scores - scores.max())
    weights /= weights.sum()
    expected = weights @ np.concatenate([virchow["A1"], virchow["A2"]]).astype(np.float64)
    patients, _ = read_h5(tmp_path / "patients.h5")
    np.testing.assert_allclose(patients["eagle_all"][0], expected, rtol=1e-4, atol=1e-6)
    compute = pd.read_csv(tmp_path / "compute.csv").set_index("embedding")
    # every tile through virchow2 (5 + 3 + 4 tiles over 3 slides) plus CTransPath's
    assert compute.loc["eagle_all", "tile_forwards_per_slide"] == pytest.approx(2 * 12 / 3)
