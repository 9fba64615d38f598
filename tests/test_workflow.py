"""The workflow as users run it: lint, format, dry-run and a real run on the generated demo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from eagleflow.h5io import read_tiles

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile")]
# Small enough for CI on 2 cores: 2 tiles per slide through Virchow2 (ViT-H on CPU), 2 GPU batches.
FAST = ["--config", "eagle={'top_k': 2}", "features={'n_batches': 2}"]

pytestmark = pytest.mark.workflow


def run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=1800)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory with the generated demo cohort and a config pointing at it."""
    from eagleflow.demo import make_demo_cohort

    work = tmp_path_factory.mktemp("workflow")
    make_demo_cohort(work / "resources" / "demo", seed=0)
    (work / "config").mkdir()
    shutil.copy(REPO / "config" / "config.yaml", work / "config" / "config.yaml")
    return work


def test_snakefmt_is_clean():
    run([str(BIN / "snakefmt"), "--check", "Snakefile", "rules"], cwd=REPO)


def test_ruff_is_clean():
    run([str(BIN / "ruff"), "check", "scripts", "tests"], cwd=REPO)
    run([str(BIN / "ruff"), "format", "--check", "scripts", "tests"], cwd=REPO)


def test_lint_has_no_findings(demo_dir):
    result = run([*SNAKEMAKE, "--lint", "--directory", str(demo_dir)], cwd=demo_dir, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Lints for" not in output, output


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run."""
    return {
        line.split()[0]: int(line.split()[1])
        for line in output.splitlines()
        if len(line.split()) == 2 and line.split()[1].isdigit()
    }


def test_dry_run_plans_the_dag(demo_dir):
    from eagleflow.sheets import read_slide_sheet

    slides = read_slide_sheet(demo_dir / "resources" / "demo" / "slides.csv")
    result = run([*SNAKEMAKE, "-n", "--directory", str(demo_dir), *FAST], cwd=demo_dir)
    counts = job_counts(result.stdout)
    assert counts["tiling_tile_slide"] == len(slides)
    assert counts["eagle_topk_thumbnail"] == len(slides)
    for batch_rule in ("features_ctranspath", "attention_chief", "eagle_virchow2_topk"):
        assert counts[batch_rule] == 2
    assert counts["embeddings_collect"] == 1


def test_demo_run_makes_every_output_and_resumes_without_work(demo_dir):
    from eagleflow.sheets import read_slide_sheet

    run([*SNAKEMAKE, "--cores", "2", "--directory", str(demo_dir), *FAST], cwd=demo_dir)
    slides = read_slide_sheet(demo_dir / "resources" / "demo" / "slides.csv")
    for slide_id in slides.index:
        coords, attrs = read_tiles(demo_dir / "results" / "tiles" / f"{slide_id}.h5")
        assert len(coords) > 0 and attrs["slide_id"] == slide_id
        assert (demo_dir / "results" / "qc" / "tiles" / f"{slide_id}.png").stat().st_size > 0
        assert (demo_dir / "logs" / "tiling" / f"{slide_id}.log").exists()
        assert (demo_dir / "benchmarks" / "tiling" / f"{slide_id}.tsv").exists()
        assert (demo_dir / "results" / "qc" / "topk" / f"{slide_id}.png").stat().st_size > 0
        for stage in ("features/ctranspath", "attention/chief", "eagle/topk"):
            assert (demo_dir / "results" / stage / f"{slide_id}.h5").exists()
    with h5py.File(demo_dir / "results" / "embeddings" / "patients.h5") as h5:
        assert h5["eagle"].shape == (len(set(slides["PATIENT"])), 1280)
        assert h5.attrs["weights_demo"] == "true"
    first = next(iter(slides.index))
    tiles = demo_dir / "results" / "tiles" / f"{first}.h5"
    before = tiles.stat().st_mtime_ns
    again = run([*SNAKEMAKE, "-n", "--directory", str(demo_dir), *FAST], cwd=demo_dir)
    assert "Nothing to be done" in again.stdout + again.stderr
    # top_k reaches only the Virchow2 stage: CTransPath and CHIEF are not planned again.
    top_k = run(
        [
            *SNAKEMAKE,
            "-n",
            "--directory",
            str(demo_dir),
            "--config",
            "eagle={'top_k': 3}",
            "features={'n_batches': 2}",
        ],
        cwd=demo_dir,
    )
    counts = job_counts(top_k.stdout)
    assert counts["eagle_virchow2_topk"] == 2 and "features_ctranspath" not in counts
    assert "tiling_tile_slide" not in counts and "attention_chief" not in counts
    # A tiling threshold reaches the tiling rule through params: every slide is tiled again.
    tiling = run(
        [*SNAKEMAKE, "-n", "--directory", str(demo_dir), *FAST, "tiling={'canny_low': 30}"],
        cwd=demo_dir,
    )
    assert job_counts(tiling.stdout)["tiling_tile_slide"] == len(slides)
    assert "Params have changed" in tiling.stdout
    report = demo_dir / "report.html"
    run([*SNAKEMAKE, "--directory", str(demo_dir), *FAST, "--report", str(report)], cwd=demo_dir)
    assert report.stat().st_size > 100_000
    assert tiles.stat().st_mtime_ns == before
    with h5py.File(tiles) as h5:
        assert h5.attrs["tile_size_um"] == pytest.approx(448.0)
