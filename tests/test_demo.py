"""The synthetic demo cohort: readable by OpenSlide, right scale, deterministic, realistic enough."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest

from eagleflow.demo import (
    EXT_COHORT,
    INT_COHORT,
    MASK_LABELS,
    DemoCohort,
    make_demo_cohort,
)
from eagleflow.weights import sha256_file

TILE_PX = 224
TILE_MPP = 2.0
SMALL = 0.25  # size_scale for the cohorts that are only compared byte for byte


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> DemoCohort:
    """The full-size cohort, as `make demo` writes it."""
    return make_demo_cohort(tmp_path_factory.mktemp("demo"), seed=0)


@pytest.fixture(scope="module")
def manifest(cohort: DemoCohort) -> dict:
    return json.loads(cohort.manifest.read_text())


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root except the manifest (it records the code version)."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def at_tile_mpp(slide: openslide.OpenSlide) -> tuple[np.ndarray, float]:
    """The whole slide as RGB at 2 µm/px (best level, then INTER_AREA), and the scale used."""
    mpp = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
    level = slide.get_best_level_for_downsample(TILE_MPP / mpp)
    rgb = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))
    factor = TILE_MPP / (mpp * slide.level_downsamples[level])
    if abs(factor - 1) > 1e-6:
        size = (round(rgb.shape[1] / factor), round(rgb.shape[0] / factor))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return rgb, factor


def test_every_slide_opens_with_manifest_geometry(cohort: DemoCohort, manifest: dict) -> None:
    assert len(manifest["slides"]) == 16
    for record in manifest["slides"]:
        path = cohort.out_dir / record["path"]
        assert sha256_file(path) == record["sha256"]
        vendor = openslide.OpenSlide.detect_format(str(path))
        assert vendor == ("aperio" if path.suffix == ".svs" else "generic-tiff")
        with openslide.OpenSlide(str(path)) as slide:
            assert slide.level_count >= 3
            assert slide.level_count == record["level_count"]
            assert slide.dimensions == (record["width"], record["height"])
            assert [list(d) for d in slide.level_dimensions] == record["level_dimensions"]
            assert slide.level_downsamples[:3] == pytest.approx((1, 4, 16))
            for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
                assert float(slide.properties[key]) == pytest.approx(record["mpp"], rel=1e-9)
            # Reading through the pyramid works (JPEG tiles decode).
            region = slide.read_region((record["width"] // 2, record["height"] // 2), 0, (64, 64))
            assert region.size == (64, 64)


def test_slide_scales_and_sizes(manifest: dict) -> None:
    mpps = {r["mpp"] for r in manifest["slides"]}
    assert mpps == {0.25, 0.5}  # both 20x and 40x, so level choice is exercised
    for r in manifest["slides"]:
        width_mm, height_mm = r["width"] * r["mpp"] / 1000, r["height"] * r["mpp"] / 1000
        assert 2.0 <= width_mm <= 4.5 and 1.5 <= height_mm <= 3.5
        assert r["width"] % 64 == 0 and r["height"] % 64 == 0


def test_sheets(cohort: DemoCohort) -> None:
    columns, slides = read_csv(cohort.slides_csv)
    assert columns == ["PATIENT", "SLIDE", "PATH", "COHORT"]
    columns, clinical = read_csv(cohort.clinical_csv)
    assert columns == ["PATIENT", "SUBTYPE", "GRADE"]

    for row in slides:  # PATH is relative to the sheet's directory
        assert not Path(row["PATH"]).is_absolute()
        assert (cohort.slides_csv.parent / row["PATH"]).is_file()
    assert len({r["SLIDE"] for r in slides}) == len(slides)

    labels = {r["PATIENT"]: r for r in clinical}
    assert len(labels) == len(clinical)
    assert {r["PATIENT"] for r in slides} == set(labels)
    assert {r["SUBTYPE"] for r in clinical} == {"A", "B"}
    assert {r["GRADE"] for r in clinical} == {"1", "2", "3"}

    for cohort_name, n_slides, per_class in ((INT_COHORT, 12, 5), (EXT_COHORT, 4, 2)):
        rows = [r for r in slides if r["COHORT"] == cohort_name]
        assert len(rows) == n_slides
        patients = {r["PATIENT"] for r in rows}
        for subtype in ("A", "B"):
            assert sum(labels[p]["SUBTYPE"] == subtype for p in patients) == per_class
    internal = [r["PATIENT"] for r in slides if r["COHORT"] == INT_COHORT]
    assert sorted(internal.count(p) for p in set(internal))[-2:] == [2, 2]


def test_tissue_has_edges_and_background_has_none(cohort: DemoCohort, manifest: dict) -> None:
    """The EAGLE/STAMP background test (Canny 40/100 at 2 µm/px) separates the two cleanly."""
    tissue_edges, background_edges, background_rgb = [], [], []
    for record in manifest["slides"]:
        with openslide.OpenSlide(str(cohort.out_dir / record["path"])) as slide:
            rgb, _ = at_tile_mpp(slide)
        labels = cv2.imread(str(cohort.out_dir / record["mask_path"]), cv2.IMREAD_UNCHANGED)
        labels = cv2.resize(labels, rgb.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        edges = cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 40, 100) > 0
        for y in range(0, rgb.shape[0] - TILE_PX + 1, TILE_PX):
            for x in range(0, rgb.shape[1] - TILE_PX + 1, TILE_PX):
                window = np.s_[y : y + TILE_PX, x : x + TILE_PX]
                tile_labels = labels[window]
                if (tile_labels == MASK_LABELS["tissue"]).mean() > 0.95:
                    tissue_edges.append(edges[window].mean())
                elif (tile_labels == MASK_LABELS["background"]).all():
                    background_edges.append(edges[window].mean())
                    background_rgb.append(rgb[window].reshape(-1, 3).mean(axis=0))
    assert len(tissue_edges) >= 50 and len(background_edges) >= 50
    assert min(tissue_edges) > 0.02
    assert max(background_edges) < 0.005
    assert np.all((np.array(background_rgb) >= 235) & (np.array(background_rgb) <= 250))


def test_subtypes_look_different(cohort: DemoCohort, manifest: dict) -> None:
    """Class B is darker and more purple than class A, slide by slide on average."""
    means: dict[str, list[float]] = {"A": [], "B": []}
    for record in manifest["slides"]:
        with openslide.OpenSlide(str(cohort.out_dir / record["path"])) as slide:
            rgb, _ = at_tile_mpp(slide)
        labels = cv2.imread(str(cohort.out_dir / record["mask_path"]), cv2.IMREAD_UNCHANGED)
        labels = cv2.resize(labels, rgb.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        means[record["subtype"]].append(float(gray[labels == MASK_LABELS["tissue"]].mean()))
    assert np.mean(means["A"]) - np.mean(means["B"]) > 10


def test_artefacts_are_present(cohort: DemoCohort, manifest: dict) -> None:
    kinds = {a for r in manifest["slides"] for a in r["artefacts"]}
    assert kinds == {"pen", "blank", "blur"}
    for record in manifest["slides"]:
        labels = cv2.imread(str(cohort.out_dir / record["mask_path"]), cv2.IMREAD_UNCHANGED)
        for artefact in record["artefacts"]:
            assert (labels == MASK_LABELS[artefact]).any(), (record["slide"], artefact)
        if "blank" in record["artefacts"]:
            with openslide.OpenSlide(str(cohort.out_dir / record["path"])) as slide:
                rgb, _ = at_tile_mpp(slide)
            blank = cv2.resize(labels, rgb.shape[1::-1], interpolation=cv2.INTER_NEAREST) == 3
            # Away from its edge, where JPEG ringing (8 px blocks) from the tissue reaches in.
            inner = cv2.erode(blank.astype(np.uint8), np.ones((21, 21), np.uint8)) > 0
            assert rgb[inner].min() >= 250


def test_generation_is_deterministic(tmp_path: Path) -> None:
    first = make_demo_cohort(tmp_path / "a", seed=7, size_scale=SMALL)
    second = make_demo_cohort(tmp_path / "b", seed=7, size_scale=SMALL)
    other = make_demo_cohort(tmp_path / "c", seed=8, size_scale=SMALL, hostile=False)
    hashes = tree_hashes(first.out_dir)
    assert len(hashes) > 30
    assert hashes == tree_hashes(second.out_dir)
    assert [s.sha256 for s in first.slides] == [s.sha256 for s in second.slides]
    assert all(a.sha256 != b.sha256 for a, b in zip(first.slides, other.slides, strict=True))


def test_rerun_does_nothing_and_repairs_one_slide(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    first = make_demo_cohort(out, seed=0, size_scale=SMALL)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    again = make_demo_cohort(out, seed=0, size_scale=SMALL)
    assert again.regenerated == []
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes

    victim = first.slides[3]
    (out / victim.path).write_bytes(b"damaged")
    repaired = make_demo_cohort(out, seed=0, size_scale=SMALL)
    assert repaired.regenerated == [victim.slide]
    assert sha256_file(out / victim.path) == victim.sha256
    assert not list(out.rglob("*.tmp-*"))


def test_cli_is_idempotent(cohort: DemoCohort, capsys: pytest.CaptureFixture[str]) -> None:
    import make_demo

    manifest_mtime = cohort.manifest.stat().st_mtime_ns
    assert make_demo.main(["--out", str(cohort.out_dir), "--seed", "0"]) == 0
    assert "(0 written)" in capsys.readouterr().out
    assert cohort.manifest.stat().st_mtime_ns == manifest_mtime


def test_hostile_inputs(cohort: DemoCohort) -> None:
    hostile = cohort.hostile
    assert set(hostile) >= {"empty", "truncated", "not_tiff", "no_mpp", "no_tissue", "tiny"}
    assert all(p.parent == cohort.out_dir / "hostile" for p in hostile.values())
    assert hostile["empty"].stat().st_size == 0
    for name in ("empty", "truncated", "not_tiff"):
        with pytest.raises(openslide.OpenSlideError):
            openslide.OpenSlide(str(hostile[name]))

    with openslide.OpenSlide(str(hostile["no_mpp"])) as slide:
        assert slide.level_count >= 3
        assert openslide.PROPERTY_NAME_MPP_X not in slide.properties
        assert openslide.PROPERTY_NAME_MPP_Y not in slide.properties
        thumb = np.asarray(slide.read_region((0, 0), 1, slide.level_dimensions[1]).convert("RGB"))
        assert thumb.min() < 150  # it does contain tissue

    with openslide.OpenSlide(str(hostile["no_tissue"])) as slide:
        rgb, _ = at_tile_mpp(slide)
        assert rgb.min() >= 225
        assert (cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 40, 100) > 0).mean() < 0.001

    with openslide.OpenSlide(str(hostile["tiny"])) as slide:
        mpp = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
        assert max(slide.dimensions) * mpp < TILE_PX * TILE_MPP

    for level in (0, 1):  # both levels a 2 µm/px reader may use; coarser levels are intact
        with openslide.OpenSlide(str(hostile["corrupt_tiles"])) as slide:
            assert slide.level_count >= 3
            slide.read_region((0, 0), 2, slide.level_dimensions[2])
            with pytest.raises(openslide.OpenSlideError):
                slide.read_region((0, 0), level, slide.level_dimensions[level])
