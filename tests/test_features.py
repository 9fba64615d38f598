"""Feature stages on CPU with demo weights: CTransPath -> CHIEF -> Virchow2 top-k -> embeddings."""

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
from eagleflow.eagle import (
    SlideEmbeddings,
    aggregate,
    patient_embeddings,
    run_virchow2_batch,
    top_k_indices,
)
from eagleflow.embeddings import build_cohort_embeddings
from eagleflow.features import TileGeometry, iter_tile_batches, run_ctranspath_batch
from eagleflow.h5io import read_attrs, read_h5, validate_tiles
from eagleflow.models import load_model, preprocess_tiles
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


def _slide(rng: np.random.Generator, name: str, n: int, dim: int = 6) -> tuple:
    scores = rng.normal(size=n).astype(np.float32)
    embeddings = rng.normal(size=(n, dim)).astype(np.float32)
    return name, scores, embeddings


def test_patient_top_k_spans_slides_and_equals_ranking_all_tiles():
    rng = np.random.default_rng(2)
    k = 5
    slides = [_slide(rng, "S2", 12), _slide(rng, "S1", 9), _slide(rng, "S3", 3)]
    slides[0][1][3] = slides[1][1][0] = 10.0  # a tie across slides: slide id decides
    per_slide = []
    for name, scores, embeddings in slides:
        chosen = top_k_indices(scores, k)
        mean, weighted = aggregate(embeddings[chosen], scores[chosen])
        per_slide.append(
            SlideEmbeddings(
                name,
                np.zeros(768, np.float32),
                np.zeros(768, np.float32),
                len(scores),
                0.0,
                embeddings[chosen],
                scores[chosen],
                chosen,
                mean,
                weighted,
            )
        )
    result = patient_embeddings(per_slide, k)
    union = [(-float(s[i]), name, i, e[i]) for name, s, e in slides for i in range(len(s))]
    best = sorted(union, key=lambda t: t[:3])[:k]
    expected = np.mean([t[3] for t in best], axis=0)
    np.testing.assert_allclose(result["eagle"], expected, rtol=1e-6)
    chosen_slides = {s.decode() for s in result["selected_slides"]}
    assert len(chosen_slides) > 1  # the patient's top-k comes from several slides
    assert result["selected_slides"][0].decode() == "S1"  # tie at 10.0: S1 before S2


def test_chief_patient_merge_equals_chief_on_all_tiles():
    model = load_model("chief", "demo")
    rng = np.random.default_rng(3)
    bags = [torch.from_numpy(rng.normal(size=(n, 768)).astype(np.float32)) for n in (7, 30)]
    with torch.inference_mode():
        whole = model(torch.cat(bags))
        parts = [model(b) for b in bags]
    embeddings = [
        SlideEmbeddings(
            f"S{i}",
            p.slide_embedding.numpy(),
            b.mean(0).numpy(),
            len(b),
            float(torch.logsumexp(p.attention_raw, 0)),
            np.zeros((1, 4), np.float32),
            np.zeros(1, np.float32),
            np.zeros(1, np.int64),
            np.zeros(4, np.float32),
            np.zeros(4, np.float32),
        )
        for i, (p, b) in enumerate(zip(parts, bags, strict=True))
    ]
    merged = patient_embeddings(embeddings, 1)
    np.testing.assert_allclose(merged["chief"], whole.slide_embedding.numpy(), atol=1e-5)
    np.testing.assert_allclose(merged["meanpool"], torch.cat(bags).mean(0).numpy(), atol=1e-5)


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
    run_ctranspath_batch(
        [{**s, "output": s["features"]} for s in slides], DEMO, EXTRACTION, str(out / "f.tsv")
    )
    run_chief_batch([{**s, "output": s["attention"]} for s in slides], DEMO, str(out / "a.tsv"))
    eagle = {**EXTRACTION, "top_k": top_k, "reference_transpose": False}
    run_virchow2_batch(
        [{**s, "output": s["topk"]} for s in slides], DEMO, eagle, str(out / "t.tsv")
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
        assert np.array_equal(features["coords"], coords)
        assert f_attrs["extractor"] == "ctranspath" and f_attrs["ctranspath_weights_demo"] == "true"
        assert f_attrs["tile_size_um"] == pytest.approx(448.0) and f_attrs["coord_unit"]
        assert f_attrs["code_version"].startswith("eagleflow")
        attention, a_attrs = read_h5(slide["attention"])
        assert attention["attention_raw"].shape == (len(coords),)
        assert attention["chief_embedding"].shape == (768,)
        np.testing.assert_allclose(attention["attention_softmax"].sum(), 1.0, rtol=1e-5)
        np.testing.assert_allclose(
            attention["meanpool_embedding"], features["feats"].mean(0), rtol=1e-5
        )
        assert a_attrs["chief_weights_demo"] == "true"
        topk, t_attrs = read_h5(slide["topk"])
        k = min(3, len(coords))
        assert topk["tile_embeddings"].shape == (k, 1280) and t_attrs["k_used"] == k
        assert t_attrs["virchow2_weights_demo"] == "true"
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
    np.testing.assert_array_equal(topk["coords"], tiles["coords"][topk["tile_index"]])
    np.testing.assert_array_equal(topk["coords"], attention["coords"][topk["tile_index"]])
    # The pixels the tiling stage scored for edges, read again by the loader, give the embeddings.
    geometry = TileGeometry.from_tiles_file(slide["tiles"], slide["slide_path"])
    table = tile_slide(slide["slide_path"], slide["slide_id"], TilingParams(), progress=False)
    scored = list(
        iter_tiles(
            slide["slide_path"],
            slide["slide_id"],
            table.info,
            topk["coords"],
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
    assert "SMALL: features up to date, skipped" in caplog.text
    assert f"recomputing {broken}" in caplog.text
    with h5py.File(broken) as h5:
        assert h5["feats"].shape[1] == 768


def test_cohort_tables(cohort, outputs, tmp_path):
    rows = [
        {"slide_id": "S1", "patient": "P1", "cohort": "C"},
        {"slide_id": "S2", "patient": "P1", "cohort": "C"},
        {"slide_id": "SMALL", "patient": "P2", "cohort": "C"},
    ]
    out = outputs["dir"]
    build_cohort_embeddings(
        rows,
        [str(out / "a.tsv")],
        [str(out / "t.tsv")],
        {"top_k": 3, "aggregation": "mean"},
        str(tmp_path / "slides.h5"),
        str(tmp_path / "patients.h5"),
    )
    slides, _ = read_h5(tmp_path / "slides.h5")
    patients, p_attrs = read_h5(tmp_path / "patients.h5")
    assert slides["eagle"].shape == (3, 1280) and slides["chief"].shape == (3, 768)
    assert patients["patient"].tolist() == [b"P1", b"P2"] and patients["n_slides"].tolist() == [
        2,
        1,
    ]
    assert patients["eagle"].shape == (2, 1280) and patients["meanpool"].shape == (2, 768)
    assert p_attrs["weights_demo"] == "true" and "virchow2" in p_attrs["demo_weights"]
    assert set(read_manifest(out / "t.tsv")) == {"S1", "S2", "SMALL"}


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
        "import json, sys; from eagleflow.features import run_ctranspath_batch;"
        f"job = json.load(open({str(job)!r}));"
        "run_ctranspath_batch(job['slides'], {'weights': 'demo'}, job['extraction'], "
        f"{str(tmp_path / 'f.tsv')!r})"
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
    run_ctranspath_batch(slides, {"weights": "demo"}, EXTRACTION, str(tmp_path / "f.tsv"))
    for output, mtime in finished.items():
        assert Path(output).stat().st_mtime_ns == mtime  # finished slides were not redone
    for slide in slides:
        assert read_attrs(slide["output"])["content_sha256"]
    assert not list((tmp_path / "features").glob(".*tmp*"))  # stale temporaries removed
