"""The workflow as users run it: dry-run and a real run on the generated demo."""

from __future__ import annotations

import h5py
import pytest
from workflow_helpers import FAST, SNAKEMAKE, job_counts, run

from eagleflow.batches import batch_of
from eagleflow.h5io import read_tiles

pytestmark = pytest.mark.workflow


def test_dry_run_plans_the_dag(demo_dir):
    from eagleflow.sheets import read_slide_sheet

    slides = read_slide_sheet(demo_dir / "resources" / "demo" / "slides.csv")
    result = run(
        [*SNAKEMAKE, "-n", "--forceall", "--directory", str(demo_dir), *FAST], cwd=demo_dir
    )
    counts = job_counts(result.stdout)
    assert counts["tiling_tile_slide"] == len(slides)
    assert counts["eagle_topk_thumbnails"] == 2
    for batch_rule in ("features_encode_tiles", "attention_chief", "eagle_embed_topk"):
        assert counts[batch_rule] == 2
    assert counts["embeddings_collect"] == 1


def test_demo_run_makes_every_output_and_resumes_without_work(finished_demo):
    from eagleflow.sheets import read_slide_sheet

    demo_dir = finished_demo
    slides = read_slide_sheet(demo_dir / "resources" / "demo" / "slides.csv")
    for slide_id in slides.index:
        coords, attrs = read_tiles(demo_dir / "results" / "tiles" / "224px_2mpp" / f"{slide_id}.h5")
        assert len(coords) > 0 and attrs["slide_id"] == slide_id
        assert (demo_dir / "results" / "qc" / "tiles" / f"{slide_id}.png").stat().st_size > 0
        assert (demo_dir / "logs" / "tiling" / f"{slide_id}.log").exists()
        assert (demo_dir / "benchmarks" / "tiling" / f"{slide_id}.tsv").exists()
        batch = batch_of(slide_id, 2)
        assert (demo_dir / "results" / "qc" / "topk" / batch / f"{slide_id}.png").stat().st_size > 0
        for stage in ("features/ctranspath", "attention/chief", "eagle/virchow2"):
            assert (demo_dir / "results" / stage / f"{slide_id}.h5").exists()
    with h5py.File(demo_dir / "results" / "embeddings" / "patients.h5") as h5:
        assert h5["eagle"].shape == (len(set(slides["PATIENT"])), 1280)
        assert h5.attrs["weights_demo"] == "true"
    first = next(iter(slides.index))
    tiles = demo_dir / "results" / "tiles" / "224px_2mpp" / f"{first}.h5"
    before = tiles.stat().st_mtime_ns
    again = run([*SNAKEMAKE, "-n", "--directory", str(demo_dir), *FAST], cwd=demo_dir)
    assert "Nothing to be done" in again.stdout + again.stderr
    report = demo_dir / "report.html"
    run([*SNAKEMAKE, "--directory", str(demo_dir), *FAST, "--report", str(report)], cwd=demo_dir)
    assert report.stat().st_size > 100_000
    assert tiles.stat().st_mtime_ns == before
    with h5py.File(tiles) as h5:
        assert h5.attrs["tile_size_um"] == pytest.approx(448.0)


def test_running_a_change_leaves_untouched_outputs_alone(finished_demo):
    results = finished_demo / "results"
    untouched = sorted(
        [
            *results.glob("tiles/224px_2mpp/*.h5"),
            *results.glob("features/ctranspath/*.h5"),
            *results.glob("attention/chief/*.h5"),
        ]
    )
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in untouched}
    topk_before = {p: p.stat().st_mtime_ns for p in results.glob("eagle/virchow2/*.h5")}
    override = "config/top3.yaml"
    run(
        [*SNAKEMAKE, "--cores", "2", "--directory", str(finished_demo), *FAST, override],
        cwd=finished_demo,
    )
    for path, (mtime, data) in before.items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data, path
    assert all(p.stat().st_mtime_ns != m for p, m in topk_before.items())
    assert (
        "Nothing to be done"
        in run(
            [*SNAKEMAKE, "-n", "--directory", str(finished_demo), *FAST, override],
            cwd=finished_demo,
        ).stdout
    )
