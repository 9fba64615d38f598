"""The comparison config (config/comparison.yaml) on small demo slides: every configured embedding
reaches the report's comparison table, from one DAG."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from workflow_helpers import FAST_CONFIG, REPO, SNAKEMAKE, job_counts, run

from eagleflow.demo import make_demo_cohort
from eagleflow.h5io import read_h5

pytestmark = pytest.mark.workflow

EMBEDDINGS = [
    "eagle",
    "eagle_k1",
    "chief",
    "meanpool_ctranspath",
    "meanpool_gigapath_tile",
    "meanpool_pathoduet",
    "gigapath_slide",
]
# Smaller than the documented demo so that CI stays short: half-size slides, k = 2 and 1, and
# Prov-GigaPath (ViT-g) on 640 µm tiles.
SMALL = FAST_CONFIG.replace("top_k: 2", "top_k: [2, 1]") + (
    "tile_encoders:\n  gigapath_tile:\n    tile_px: 256\n    tile_mpp: 2.5\n"
)


@pytest.fixture(scope="module")
def comparison_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("comparison")
    make_demo_cohort(work / "resources" / "demo", seed=0, size_scale=0.5, hostile=False)
    (work / "config").mkdir()
    for name in ("config.yaml", "comparison.yaml"):
        shutil.copy(REPO / "config" / name, work / "config" / name)
    (work / "config" / "small.yaml").write_text(SMALL)
    configs = [
        "--configfile",
        *(f"config/{n}" for n in ("config.yaml", "comparison.yaml", "small.yaml")),
    ]
    result = run([*SNAKEMAKE, "--cores", "2", "--directory", str(work), *configs], cwd=work)
    assert "slide_encoders_encode_bags" in result.stderr
    assert (
        job_counts(run([*SNAKEMAKE, "-n", "--directory", str(work), *configs], cwd=work).stdout)
        == {}
    )
    return work


def test_every_embedding_reaches_the_comparison_table(comparison_run):
    table = pd.read_csv(comparison_run / "results" / "evaluation" / "comparison.csv")
    tasks = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["tasks"]
    for (task, set_name), rows in table.groupby(["task", "set"]):
        assert task in tasks
        assert rows["embedding"].tolist() == EMBEDDINGS, (task, set_name)
    assert set(table["set"]) >= {"crossval"}
    binary = table[(table["task"] == "SUBTYPE") & (table["embedding"] != "eagle")]
    assert binary["delong_p_vs_eagle"].notna().any()
    assert table["demo_weights"].ne("none").all()
    page = (comparison_run / "results" / "evaluation" / "metrics.html").read_text()
    assert "Comparison of slide representations" in page
    assert "DEMO comparison" in page and "DEMO WEIGHTS" in page


def test_encoders_share_a_grid_and_compute_is_counted(comparison_run):
    tiles = comparison_run / "results" / "tiles"
    # PathoDuet runs on EAGLE's grid here: two grids, not three
    assert sorted(p.name for p in tiles.iterdir()) == ["224px_2mpp", "256px_2.5mpp"]
    compute = pd.read_csv(comparison_run / "results" / "embeddings" / "compute.csv")
    compute = compute.set_index("embedding")
    assert list(compute.index) == EMBEDDINGS
    forwards = compute["tile_forwards_per_slide"]
    assert forwards["eagle"] > forwards["eagle_k1"] > forwards["chief"] > 0
    assert forwards["meanpool_pathoduet"] == pytest.approx(forwards["meanpool_ctranspath"])
    assert forwards["gigapath_slide"] == pytest.approx(forwards["meanpool_gigapath_tile"])
    assert compute.loc["gigapath_slide", "slide_forwards_per_slide"] > 0
    assert (compute["seconds_per_slide"] > 0).all()
    patients, attrs = read_h5(comparison_run / "results" / "embeddings" / "patients.h5")
    assert patients["gigapath_slide"].shape[1] == 768
    assert patients["meanpool_gigapath_tile"].shape[1] == 1536
    assert "gigapath_slide" in attrs["demo_weights"]
