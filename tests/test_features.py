"""Model stages on CPU with demo weights: tile encoders -> CHIEF -> top-k -> cohort tables."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import tissue_image, write_pyramid

from eagleflow.attention import run_chief_batch
from eagleflow.batches import assign_batches, batch_of, read_manifest
from eagleflow.eagle import run_topk_batch, top_k_indices
from eagleflow.embeddings import (
    SlideRecord,
    build_cohort_embeddings,
    chief_embedding,
    eagle_embedding,
    weighted_mean,
)
from eagleflow.encoders import configured_embeddings
from eagleflow.features import TileGeometry, iter_tile_batches, run_tile_encoder_batch
from eagleflow.h5io import read_attrs, read_h5, validate_tiles
from eagleflow.models.loading import load_model
from eagleflow.models.preprocess import preprocess_tiles
from eagleflow.tiling import TilingParams, iter_tiles, run_tiling, tile_slide

DEMO = {"weights": "demo", "sha256": None, "verify_sha256": True}
EXTRACTION = {"device": "cpu", "batch_size": 8, "num_workers": 0}


def test_top_k_matches_brute_force_with_ties():
    rng = np.random.default_rng(1)
    for n, k in ((50, 25), (10, 25), (1, 25), (40, 1)):
        scores = rng.integers(0, 5, size=n).astype(np.float32)  # many ties
        brute = sorted(range(n), key=lambda i: (-scores[i], i))[: min(k, n)]
        assert top_k_indices(scores, k).tolist() == brute


def test_batches_depend_only_on_the_slide_id():
    ids = [f"S{i}" for i in range(200)]
    before = assign_batches(ids, 8)
    after = assign_batches([*ids, "NEW"], 8)
    changed = [b for b in after if after[b] != before.get(b)]
    assert changed == [batch_of("NEW", 8)]
    assert sum(len(v) for v in before.values()) == 200


def _record(rng: np.random.Generator, name: str, n: int, k: int, dim: int = 6) -> tuple:
    """A slide's top-k file contents as the stage writes them (sorted by score)."""
    scores = rng.normal(size=n).astype(np.float32)
    embeddings = rng.normal(size=(n, dim)).astype(np.float32)
    return name, scores, embeddings


def _as_record(name, scores, embeddings, k):
    chosen = top_k_indices(scores, k)
    record = SlideRecord(name, "P", "C", "HE")
    record.topk["enc"] = {
        "attention_raw": scores[chosen],
        "tile_index": chosen,
        "tile_embeddings": embeddings[chosen],
    }
    return record


def test_patient_top_k_spans_slides_and_equals_ranking_all_tiles():
    rng = np.random.default_rng(2)
    k = 5
    slides = [_record(rng, "S2", 12, k), _record(rng, "S1", 9, k), _record(rng, "S3", 3, k)]
    slides[0][1][3] = slides[1][1][0] = 10.0  # a tie across slides: slide id decides
    records = [_as_record(*slide, k) for slide in slides]
    union = [(-float(s[i]), name, i, e[i]) for name, s, e in slides for i in range(len(s))]
    for kk in (1, 3, k):  # every k up to the stored K is the best kk of all tiles
        best = sorted(union, key=lambda t: t[:3])[:kk]
        expected = np.mean([t[3] for t in best], axis=0)
        np.testing.assert_allclose(eagle_embedding(records, "enc", kk, "mean"), expected, rtol=1e-6)
    # the tie at 10.0 goes to S1 (slide id) before S2
    s1 = slides[1][2][0]
    np.testing.assert_allclose(eagle_embedding(records, "enc", 1, "mean"), s1, rtol=1e-6)
    assert len({t[1] for t in sorted(union, key=lambda t: t[:3])[:k]}) > 1


def test_chief_patient_merge_equals_chief_on_all_tiles():
    model = load_model("chief", "demo")
    rng = np.random.default_rng(3)
    bags = [torch.from_numpy(rng.normal(size=(n, 768)).astype(np.float32)) for n in (7, 30)]
    with torch.inference_mode():
        whole = model(torch.cat(bags))
        parts = [model(b) for b in bags]
    records = []
    for i, part in enumerate(parts):
        record = SlideRecord(f"S{i}", "P", "C", "HE")
        record.chief["chief"] = part.slide_embedding.numpy()
        record.logsumexp["chief"] = float(torch.logsumexp(part.attention_raw, 0))
        records.append(record)
    np.testing.assert_allclose(chief_embedding(records), whole.slide_embedding.numpy(), atol=1e-5)
    means = weighted_mean([b.mean(0).numpy() for b in bags], [len(b) for b in bags])
    np.testing.assert_allclose(means, torch.cat(bags).mean(0).numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three tiled slides (one with only a couple of tiles) on disk."""
    root = tmp_path_factory.mktemp("cohort")
    specs = {"S1": (4096, 3072, 6), "S2": (3584, 3584, 4), "SMALL": (1800, 900, 5)}
    slides = []
    for i, (slide_id, (w, h, margin)) in enumerate(specs.items()):
        path = write_pyramid(root / f"{slide_id}.tif", tissue_image(w, h, i, margin), 0.5)
        tiles = root / "tiles" / f"{slide_id}.h5"
        run_tiling(
            str(path), slide_id, TilingParams().as_dict(), None, str(tiles), str(root / "q.png")
        )
        slides.append({"slide_id": slide_id, "slide_path": str(path), "tiles": str(tiles)})
    return {"root": root, "slides": slides}


def run_stages(cohort: dict, out: Path, top_k: int = 3) -> list[dict]:
    slides = [
        {
            **s,
            "features": str(out / "features" / f"{s['slide_id']}.h5"),
            "attention": str(out / "attention" / f"{s['slide_id']}.h5"),
            "topk": str(out / "topk" / f"{s['slide_id']}.h5"),
        }
        for s in cohort["slides"]
    ]
    run_tile_encoder_batch(
        "ctranspath",
        [{**s, "output": s["features"]} for s in slides],
        {"ctranspath": DEMO},
        EXTRACTION,
        str(out / "f.tsv"),
    )
    run_chief_batch([{**s, "output": s["attention"]} for s in slides], DEMO, str(out / "a.tsv"))
    eagle = {**EXTRACTION, "top_k": top_k, "reference_transpose": False}
    run_topk_batch(
        "virchow2",
        [{**s, "output": s["topk"]} for s in slides],
        {"virchow2": DEMO},
        eagle,
        str(out / "t.tsv"),
    )
    return slides


@pytest.fixture(scope="module")
def outputs(cohort: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("run1")
    return {"dir": out, "slides": run_stages(cohort, out)}


def test_outputs_have_shapes_attributes_and_demo_flags(cohort, outputs):
    for slide in outputs["slides"]:
        coords = validate_tiles(slide["tiles"]) and read_h5(slide["tiles"])[0]["coords"]
        features, f_attrs = read_h5(slide["features"])
        assert features["feats"].shape == (len(coords), 768)
        assert np.array_equal(features["coords_level0_px"], coords)
        # peers' convention: coords in µm (0.5 µm/px scans here)
        np.testing.assert_allclose(features["coords"], coords * 0.5)
        assert f_attrs["unit"] == "um" and f_attrs["feat_type"] == "tile"
        assert f_attrs["encoder"] == "ctranspath" and f_attrs["ctranspath_weights_demo"] == "true"
        assert f_attrs["tile_size_um"] == pytest.approx(448.0) and f_attrs["tile_size_px"] == 224
        assert f_attrs["code_version"].startswith("eagleflow")
        assert f_attrs["tile_forwards"] == len(coords) and f_attrs["compute_seconds"] > 0
        np.testing.assert_allclose(
            features["feats_mean"],
            features["feats"].astype(np.float64).mean(0),
            rtol=1e-5,
            atol=1e-6,
        )
        attention, a_attrs = read_h5(slide["attention"])
        assert attention["attention_raw"].shape == (len(coords),)
        assert attention["chief_embedding"].shape == (768,)
        np.testing.assert_allclose(attention["attention_softmax"].sum(), 1.0, rtol=1e-5)
        assert a_attrs["chief_weights_demo"] == "true"
        assert a_attrs["ctranspath_weights_demo"] == "true"  # upstream weights carried down
        topk, t_attrs = read_h5(slide["topk"])
        k = min(3, len(coords))
        assert topk["tile_embeddings"].shape == (k, 1280) and t_attrs["k_used"] == k
        assert (
            t_attrs["virchow2_weights_demo"] == "true" and t_attrs["chief_weights_demo"] == "true"
        )
        assert topk["tile_index"].tolist() == top_k_indices(attention["attention_raw"], 3).tolist()
        np.testing.assert_allclose(
            topk["embedding_mean"], topk["tile_embeddings"].mean(0), rtol=1e-5
        )
    small = next(s for s in outputs["slides"] if s["slide_id"] == "SMALL")
    assert read_attrs(small["topk"])["k_used"] < 3  # fewer tiles than k: all of them


def test_virchow2_embedded_exactly_the_scored_tiles(cohort, outputs):
    slide = outputs["slides"][0]
    topk, _ = read_h5(slide["topk"])
    tiles, tiles_attrs = read_h5(slide["tiles"])
    attention, _ = read_h5(slide["attention"])
    np.testing.assert_array_equal(topk["coords_level0_px"], tiles["coords"][topk["tile_index"]])
    np.testing.assert_array_equal(
        topk["coords_level0_px"], attention["coords_level0_px"][topk["tile_index"]]
    )
    # The pixels the tiling stage scored for edges, read again by the loader, give the embeddings.
    geometry = TileGeometry.from_tiles_file(slide["tiles"], slide["slide_path"])
    table = tile_slide(slide["slide_path"], slide["slide_id"], TilingParams(), progress=False)
    scored = list(
        iter_tiles(
            slide["slide_path"],
            slide["slide_id"],
            table.info,
            topk["coords_level0_px"],
            int(tiles_attrs["read_level"]),
            int(tiles_attrs["tile_size_level0_px"]),
            224,
        )
    )
    loaded = [
        t
        for _, _, batch in iter_tile_batches([geometry.subset(topk["tile_index"])], 8, 0)
        for t in batch.numpy()
    ]
    for a, b in zip(scored, loaded, strict=True):
        np.testing.assert_array_equal(a, b)
    model = load_model("virchow2", "demo")
    with torch.inference_mode():
        again = model(preprocess_tiles("virchow2", np.stack(scored[:1]))).numpy()
    np.testing.assert_allclose(again[0], topk["tile_embeddings"][0], rtol=1e-4, atol=1e-5)


def test_two_runs_give_identical_files(cohort, outputs, tmp_path):
    second = run_stages(cohort, tmp_path)
    for a, b in zip(outputs["slides"], second, strict=True):
        for key in ("features", "attention", "topk"):
            assert read_attrs(a[key])["content_sha256"] == read_attrs(b[key])["content_sha256"]


def test_rerun_recomputes_only_missing_or_broken_slides(cohort, outputs, tmp_path, caplog):
    out = tmp_path / "resume"
    shutil.copytree(outputs["dir"], out)
    slides = run_stages(cohort, out)  # same paths now under `out`
    (Path(slides[0]["features"])).unlink()
    broken = Path(slides[1]["features"])
    broken.write_bytes(broken.read_bytes()[:500])  # truncated: must not be trusted
    untouched = Path(slides[2]["features"]).stat().st_mtime_ns
    caplog.clear()
    caplog.set_level("INFO")
    run_stages(cohort, out)
    assert Path(slides[2]["features"]).stat().st_mtime_ns == untouched
    assert "SMALL: ctranspath features up to date, skipped" in caplog.text
    assert f"recomputing {broken}" in caplog.text
    with h5py.File(broken) as h5:
        assert h5["feats"].shape[1] == 768


def test_cohort_tables(cohort, outputs, tmp_path):
    rows = [
        {"slide_id": "S1", "patient": "P1", "cohort": "C", "stain": "HE"},
        {"slide_id": "S2", "patient": "P1", "cohort": "C", "stain": "HE"},
        {"slide_id": "SMALL", "patient": "P2", "cohort": "C", "stain": "HE"},
    ]
    out = outputs["dir"]
    specs = configured_embeddings(["ctranspath"], ["virchow2"], [3, 1])
    build_cohort_embeddings(
        rows,
        [vars(spec) for spec in specs],
        [str(out / "a.tsv")],
        {"ctranspath": [str(out / "f.tsv")]},
        {"virchow2": [str(out / "t.tsv")]},
        {},
        {"aggregation": "mean"},
        str(tmp_path / "slides.h5"),
        str(tmp_path / "patients.h5"),
        str(tmp_path / "compute.csv"),
    )
    slides, _ = read_h5(tmp_path / "slides.h5")
    patients, p_attrs = read_h5(tmp_path / "patients.h5")
    assert slides["eagle"].shape == (3, 1280) and slides["chief"].shape == (3, 768)
    assert patients["patient"].tolist() == [b"P1", b"P2"]
    assert patients["n_slides"].tolist() == [2, 1]
    assert patients["eagle"].shape == (2, 1280) and patients["meanpool_ctranspath"].shape == (
        2,
        768,
    )
    # k = 1 of the same run: a slide's single best tile
    topk, _ = read_h5(outputs["slides"][0]["topk"])
    np.testing.assert_allclose(slides["eagle_k1"][0], topk["tile_embeddings"][0], rtol=1e-6)
    features, _ = read_h5(outputs["slides"][2]["features"])
    np.testing.assert_allclose(
        patients["meanpool_ctranspath"][1], features["feats"].mean(0), rtol=1e-5
    )
    assert p_attrs["weights_demo"] == "true" and "virchow2" in p_attrs["demo_weights"]
    assert set(read_manifest(out / "t.tsv")) == {"S1", "S2", "SMALL"}
    import pandas as pd

    compute = pd.read_csv(tmp_path / "compute.csv").set_index("embedding")
    assert list(compute.index) == ["eagle", "eagle_k1", "chief", "meanpool_ctranspath"]
    n_tiles = np.mean([read_attrs(s["attention"])["n_tiles"] for s in outputs["slides"]])
    assert compute.loc["chief", "tile_forwards_per_slide"] == pytest.approx(n_tiles)
    k_used = np.mean([read_attrs(s["topk"])["k_used"] for s in outputs["slides"]])
    assert compute.loc["eagle", "tile_forwards_per_slide"] == pytest.approx(n_tiles + k_used)
    assert compute.loc["eagle_k1", "tile_forwards_per_slide"] == pytest.approx(n_tiles + 1)
    assert compute.loc["eagle", "seconds_per_slide"] > compute.loc["eagle_k1", "seconds_per_slide"]
    assert compute.loc["eagle_k1", "seconds_per_slide"] > compute.loc["chief", "seconds_per_slide"]
    assert "virchow2" in compute.loc["eagle", "demo_weights"]
    assert compute.loc["meanpool_ctranspath", "demo_weights"] == "ctranspath"


def test_an_ihc_slide_uses_the_ihc_checkpoint_and_h_e_encoders_say_so(
    cohort, tmp_path, caplog, monkeypatch
):
    """PathoDuet picks its checkpoint by stain; CTransPath (H&E only) warns on an IHC slide."""
    import eagleflow.model_stage as model_stage

    loaded = []
    real = load_model

    def recording(name, *args, **kwargs):
        loaded.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr("eagleflow.models.loading.load_model", recording)
    slides = [
        {**s, "stain": stain, "output": str(tmp_path / f"{s['slide_id']}.h5")}
        for s, stain in zip(cohort["slides"][:2], ("HE", "IHC"), strict=True)
    ]
    caplog.set_level("WARNING")
    run_tile_encoder_batch(
        "pathoduet",
        slides,
        {"pathoduet_he": DEMO, "pathoduet_ihc": DEMO},
        EXTRACTION,
        str(tmp_path / "p.tsv"),
    )
    assert sorted(loaded) == ["pathoduet_he", "pathoduet_ihc"]
    models = [read_attrs(s["output"])["model"] for s in slides]
    assert models == ["pathoduet_he", "pathoduet_ihc"]
    assert "trained on" not in caplog.text  # PathoDuet knows both stains
    assert model_stage.Models  # the shared skeleton ran both
    run_tile_encoder_batch(
        "ctranspath",
        [{**s, "output": str(tmp_path / "c" / f"{s['slide_id']}.h5")} for s in slides],
        {"ctranspath": DEMO},
        EXTRACTION,
        str(tmp_path / "c.tsv"),
    )
    assert f"{slides[1]['slide_id']}: a IHC slide embedded by ctranspath" in caplog.text
    assert f"{slides[0]['slide_id']}: a HE slide" not in caplog.text


def test_killed_batch_job_resumes_without_redoing_finished_slides(cohort, tmp_path):
    """SIGKILL the CTransPath stage after its first slide; the rerun keeps that slide's file."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    slides = [
        {**s, "output": str(tmp_path / "features" / f"{s['slide_id']}.h5")}
        for s in cohort["slides"]
    ]
    # Slow the loader so that the kill lands between slides: one tile per batch.
    extraction = {**EXTRACTION, "batch_size": 1}
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"slides": slides, "extraction": extraction}))
    code = (
        "import json, sys; from eagleflow.features import run_tile_encoder_batch;"
        f"job = json.load(open({str(job)!r}));"
        "run_tile_encoder_batch('ctranspath', job['slides'], {'ctranspath': {'weights': 'demo'}},"
        f" job['extraction'], {str(tmp_path / 'f.tsv')!r})"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "scripts")}
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.DEVNULL)
    first = Path(slides[0]["output"])
    deadline = time.monotonic() + 300
    while not first.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first.exists(), "the job ended before its first slide was written"
    finished = {
        s["output"]: Path(s["output"]).stat().st_mtime_ns
        for s in slides
        if Path(s["output"]).exists()
    }
    assert len(finished) < len(slides), "the kill came too late to leave work unfinished"
    assert not (tmp_path / "f.tsv").exists()  # the manifest marks a finished job only
    run_tile_encoder_batch(
        "ctranspath",
        slides,
        {"ctranspath": {"weights": "demo"}},
        EXTRACTION,
        str(tmp_path / "f.tsv"),
    )
    for output, mtime in finished.items():
        assert Path(output).stat().st_mtime_ns == mtime  # finished slides were not redone
    for slide in slides:
        assert read_attrs(slide["output"])["content_sha256"]
    assert not list((tmp_path / "features").glob(".*tmp*"))  # stale temporaries removed
