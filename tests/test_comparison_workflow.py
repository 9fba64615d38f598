"""The comparison grid in one DAG on small demo slides: encoders at several magnifications, slide
encoders over each, early and late patient fusion, the pivoted table and the efficiency figure;
then what adding and removing a magnification plans.

The documented demo (config/comparison.yaml) runs every model of the paper; this test keeps CI
short with the cheaper ones on half-size slides and one task: CTransPath and CONCH v1 at two
grids, CONCH v1 as EAGLE's second stage, MADELEINE (early fusion) and COBRA (late). Every other
model runs through its stage in tests/test_model_stages.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from workflow_helpers import FAST_CONFIG, REPO, SNAKEMAKE, job_counts, run

from eagleflow.demo import make_demo_cohort
from eagleflow.h5io import read_h5

pytestmark = pytest.mark.workflow

GRID = (
    FAST_CONFIG
    + """
evaluation:
  note: TEST grid on half-size slides
tile_encoders:
  ctranspath:
    grids: [{tile_px: 224, tile_mpp: 2.0}, {tile_px: 224, tile_mpp: 4.0}]
  conch_v1:
    grids: [{tile_px: 224, tile_mpp: 2.0}, {tile_px: 224, tile_mpp: 4.0}]
slide_encoders:
  madeleine: {fusion: early}
  cobra: {fusion: late, tile_encoder: conch_v1}
eagle:
  encoder: conch_v1         # the paper's eaglefm variant; cheaper than Virchow2 on a CPU
models:
  conch_v1: {weights: demo}
  madeleine: {weights: demo}
  cobra: {weights: demo}
"""
)
BASES = ["eagle", "chief", "meanpool_ctranspath", "meanpool_conch_v1", "madeleine", "cobra"]
GRID_EMBEDDINGS = {2.0: BASES, 4.0: [f"{base}@4mpp" for base in BASES]}
CONFIGS = ["--configfile", "config/config.yaml", "config/grid.yaml"]


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("comparison")
    make_demo_cohort(work / "resources" / "demo", seed=0, size_scale=0.5, hostile=False)
    (work / "config").mkdir()
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["tasks"] = {"SUBTYPE": config["tasks"]["SUBTYPE"]}  # one task: half the heads
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    (work / "config" / "grid.yaml").write_text(GRID)
    result = run([*SNAKEMAKE, "--cores", "2", "--directory", str(work), *CONFIGS], cwd=work)
    assert "slide_encoders_encode_bags" in result.stderr
    assert job_counts(plan(work).stdout) == {}
    return work


def plan(work: Path, *extra: str):
    return run([*SNAKEMAKE, "-n", "--directory", str(work), *CONFIGS, *extra], cwd=work)


def test_every_embedding_at_every_grid_reaches_the_pivoted_table(grid_run):
    compute = pd.read_csv(grid_run / "results" / "embeddings" / "compute.csv")
    by_grid = compute.groupby("tile_mpp")["embedding"].apply(list).to_dict()
    assert {mpp: sorted(names) for mpp, names in by_grid.items()} == {
        mpp: sorted(names) for mpp, names in GRID_EMBEDDINGS.items()
    }
    assert set(compute.loc[compute["embedding"] == "eagle@4mpp", "base"]) == {"eagle"}
    pivot = pd.read_csv(grid_run / "results" / "evaluation" / "comparison_grid.csv")
    subtype = pivot[pivot["task"] == "SUBTYPE"]
    crossval = subtype[subtype["set"] == "crossval"].set_index("embedding")  # the base name
    for mpp, names in GRID_EMBEDDINGS.items():
        bases = {name.split("@")[0] for name in names}
        column = f"embedding_{mpp:g}mpp"
        assert set(crossval[column].dropna().index) == bases, mpp
    # DeLong against EAGLE at the same magnification
    long = pd.read_csv(grid_run / "results" / "evaluation" / "comparison.csv")
    chief4 = long[(long["embedding"] == "chief@4mpp") & (long["task"] == "SUBTYPE")]
    assert set(chief4["delong_reference"]) == {"eagle@4mpp"}
    page = (grid_run / "results" / "evaluation" / "metrics.html").read_text()
    assert "TEST grid" in page and "DEMO WEIGHTS" in page
    assert (grid_run / "results" / "evaluation" / "efficiency.png").stat().st_size > 10_000


def test_early_fusion_is_one_pass_and_late_fusion_the_mean_of_slides(grid_run):
    patients, _ = read_h5(grid_run / "results" / "embeddings" / "patients.h5")
    slides, _ = read_h5(grid_run / "results" / "embeddings" / "slides.h5")
    slide_patient = dict(zip(slides["slide"], slides["patient"], strict=True))
    two = [p for p in set(slides["patient"]) if list(slides["patient"]).count(p) == 2]
    assert two, "the demo cohort has patients with two slides"
    for patient in two:
        row = list(patients["patient"]).index(patient)
        mine = [i for i, s in enumerate(slides["slide"]) if slide_patient[s] == patient]
        # late: the plain mean of the patient's slide embeddings (one COBRA pass per slide)
        np.testing.assert_allclose(
            patients["cobra"][row], slides["cobra"][mine].mean(0), rtol=1e-5, atol=1e-6
        )
        # early: one MADELEINE pass over both slides' tiles, no slide-level embedding
        bag, attrs = read_h5(
            grid_run / "results" / "slide_encoders" / "madeleine" / f"{patient.decode()}.HE.h5"
        )
        assert attrs["n_slides"] == 2 and attrs["fusion"] == "early"
        np.testing.assert_array_equal(patients["madeleine"][row], bag["embedding"])
    assert "madeleine" not in slides and patients["cobra"].shape[1] == 512  # COBRA: CONCH's dim


def test_adding_a_magnification_tiles_once_and_removing_one_recomputes_nothing(grid_run, tmp_path):
    work = tmp_path / "grid"
    shutil.copytree(grid_run, work)  # copy2 keeps mtimes
    n_slides = len(pd.read_csv(work / "resources" / "demo" / "slides.csv"))
    added = work / "config" / "added.yaml"
    added.write_text(
        "tile_encoders:\n  ctranspath:\n    grids: [{tile_mpp: 2.0}, {tile_mpp: 4.0}, "
        "{tile_mpp: 8.0}]\n"
    )
    result = plan(work, "config/added.yaml")
    counts = job_counts(result.stdout)
    assert counts["tiling_tile_slide"] == n_slides  # one job per slide writes every grid
    planned = set(result.stdout.split())
    for new in ("features/ctranspath@8mpp", "attention/chief@8mpp", "eagle/conch_v1@8mpp"):
        assert any(f"results/{new}/batches/" in word for word in planned), new
    # removing CONCH v1's 4 µm/px: nothing upstream of the cohort tables
    removed = work / "config" / "removed.yaml"
    removed.write_text("tile_encoders:\n  conch_v1:\n    grids: [{tile_px: 224, tile_mpp: 2.0}]\n")
    counts = job_counts(plan(work, "config/removed.yaml").stdout)
    upstream = (
        "tiling_tile_slide",
        "features_encode_tiles",
        "attention_chief",
        "eagle_embed_topk",
        "slide_encoders_encode_bags",
    )
    assert not set(upstream) & set(counts), counts
    assert counts["embeddings_collect"] == 1  # the tables drop its embeddings at 4 µm/px
