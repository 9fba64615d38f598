"""After a config or code change, `snakemake -n` plans exactly the stages that change invalidates.

Each case edits one thing on a finished demo run (fast settings: 2 batches) and compares the
planned job counts per rule with the README's invalidation table. The last test runs one change
and checks that the outputs it does not touch keep their bytes and mtimes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import tissue_image, write_pyramid
from hostile_helpers import make_tiling_workdir, tiling_args
from workflow_helpers import FAST, REPO, SNAKEMAKE, job_counts, run

from eagleflow.batches import assign_batches, batch_of
from eagleflow.h5io import read_attrs
from eagleflow.sheets import read_slide_sheet

pytestmark = pytest.mark.workflow

BATCH_RULES = ("features_encode_tiles", "attention_chief", "eagle_embed_topk")
EAGLE_GRID = "224px_2mpp"
# Demo tasks SUBTYPE and GRADE, three embeddings each (eagle, chief, meanpool_ctranspath).
TASKS, EMBEDDINGS = 2, 3


def heads(embeddings: int = EMBEDDINGS) -> dict[str, int]:
    """What a new embeddings table plans below it, with this many embeddings per task."""
    return {
        "heads_mlp_crossval": TASKS * embeddings,
        "heads_fewshot": TASKS * embeddings,
        "evaluation_metrics": TASKS,
        "evaluation_figures": TASKS,
        "evaluation_summary": 1,
        "evaluation_umap": 1,
        "evaluation_retrieval": 1,
    }


HEADS = heads()


def plan(workdir: Path, *extra: str, snakefile: Path | None = None) -> dict[str, int]:
    args = list(SNAKEMAKE)
    if snakefile is not None:
        args[args.index("--snakefile") + 1] = str(snakefile)
    result = run([*args, "-n", "--directory", str(workdir), *FAST, *extra], cwd=workdir)
    counts = job_counts(result.stdout)
    counts.pop("total", None)
    counts.pop("all", None)
    return counts


def slides_of(workdir: Path) -> list[str]:
    return list(read_slide_sheet(workdir / "resources" / "demo" / "slides.csv").index)


def expected(*, tiles: int = 0, batches: int = 0, from_stage: str, thumbnails: int) -> dict:
    """Job counts when everything from `from_stage` down is planned."""
    order = ["tiling_tile_slide", *BATCH_RULES, "embeddings_collect"]
    counts: dict[str, int] = {}
    for rule in order[order.index(from_stage) :]:
        if rule == "tiling_tile_slide":
            counts[rule] = tiles
        elif rule in BATCH_RULES:
            counts[rule] = batches
        else:
            counts[rule] = 1
    if thumbnails:
        counts["eagle_topk_thumbnails"] = thumbnails
    return {**counts, **HEADS}


def write_override(workdir: Path, name: str, text: str) -> str:
    path = workdir / "config" / name
    path.write_text(text)
    return f"config/{name}"


def test_nothing_changed_plans_nothing(finished_demo):
    assert plan(finished_demo) == {}


def test_a_lost_qc_picture_is_remade_and_a_lost_intermediate_is_not(finished_demo):
    """QC pictures are not listed per slide for the batches below (that would slow planning at
    scale), yet one deleted by hand is redrawn. A deleted tiles file is an intermediate whose
    results downstream are complete: as for any Snakemake intermediate, nothing is planned."""
    slide = slides_of(finished_demo)[0]
    for lost, planned in (
        (
            f"results/qc/tiles/{slide}.png",
            expected(tiles=1, batches=1, from_stage="tiling_tile_slide", thumbnails=1),
        ),
        (f"results/tiles/{EAGLE_GRID}/{slide}.h5", {}),
    ):
        path = finished_demo / lost
        kept = path.with_name(path.name + ".kept")
        path.rename(kept)
        try:
            counts = plan(finished_demo)
        finally:
            kept.rename(path)
        assert counts == planned, lost


def test_tiling_threshold_reruns_everything(finished_demo):
    n = len(slides_of(finished_demo))
    override = write_override(finished_demo, "canny.yaml", "tiling:\n  canny_low: 30\n")
    assert plan(finished_demo, override) == expected(
        tiles=n, batches=2, from_stage="tiling_tile_slide", thumbnails=2
    )


def test_top_k_reruns_the_second_stage_and_below_only(finished_demo):
    override = write_override(finished_demo, "topk.yaml", "eagle:\n  top_k: 3\n")
    assert plan(finished_demo, override) == expected(
        batches=2, from_stage="eagle_embed_topk", thumbnails=2
    )


def test_a_top_k_list_runs_the_second_stage_once_on_the_largest_k(finished_demo):
    """The paper's k ablation: a smaller k added to the list is the first rows of the files
    already made (no forward); a larger k reruns the second stage once."""
    smaller = write_override(finished_demo, "ks.yaml", "eagle:\n  top_k: [2, 1]\n")
    assert plan(finished_demo, smaller) == {"embeddings_collect": 1, **heads(EMBEDDINGS + 1)}
    larger = write_override(finished_demo, "kl.yaml", "eagle:\n  top_k: [2, 3]\n")
    assert plan(finished_demo, larger) == {
        **expected(batches=2, from_stage="eagle_embed_topk", thumbnails=2),
        **heads(EMBEDDINGS + 1),
    }


def test_another_eagle_encoder_plans_its_top_k_stage_not_ctranspath_or_chief(finished_demo):
    override = write_override(
        finished_demo,
        "eaglefm.yaml",
        "eagle:\n  encoder: pathoduet\nmodels:\n  pathoduet_he:\n    weights: demo\n",
    )
    assert plan(finished_demo, override) == expected(
        batches=2, from_stage="eagle_embed_topk", thumbnails=2
    )


PATHODUET = "models:\n  pathoduet_he:\n    weights: demo\n"


def test_an_encoder_on_an_existing_grid_plans_only_its_features_and_below(finished_demo):
    override = write_override(
        finished_demo,
        "same_grid.yaml",
        "tile_encoders:\n  pathoduet:\n    tile_px: 224\n    tile_mpp: 2.0\n" + PATHODUET,
    )
    assert plan(finished_demo, override) == {
        "features_encode_tiles": 2,  # pathoduet's two batches; no tiling, no CTransPath
        "embeddings_collect": 1,
        **heads(EMBEDDINGS + 1),
    }


def test_virchow2_weights_setting_reruns_virchow2_and_below_only(finished_demo):
    len(slides_of(finished_demo))
    override = write_override(
        finished_demo,
        "v2.yaml",
        "models:\n  virchow2:\n    weights: demo\n    verify_sha256: false\n",
    )
    assert plan(finished_demo, override) == expected(
        batches=2, from_stage="eagle_embed_topk", thumbnails=2
    )


def test_chief_weights_setting_reruns_chief_and_below(finished_demo):
    len(slides_of(finished_demo))
    override = write_override(
        finished_demo,
        "chief.yaml",
        "models:\n  chief:\n    weights: demo\n    verify_sha256: false\n",
    )
    assert plan(finished_demo, override) == expected(
        batches=2, from_stage="attention_chief", thumbnails=2
    )


def test_aggregation_reruns_the_cohort_tables_only(finished_demo):
    override = write_override(finished_demo, "agg.yaml", "eagle:\n  aggregation: softmax\n")
    assert plan(finished_demo, override) == {"embeddings_collect": 1, **HEADS}


def test_mlp_hyper_parameter_reruns_training_evaluation_and_report_only(finished_demo):
    override = write_override(finished_demo, "mlp.yaml", "heads:\n  mlp:\n    hidden: 128\n")
    assert plan(finished_demo, override) == {
        "heads_mlp_crossval": TASKS * EMBEDDINGS,
        "evaluation_metrics": TASKS,
        "evaluation_figures": TASKS,
        "evaluation_summary": 1,
    }


def test_runtime_settings_plan_nothing(finished_demo):
    override = write_override(
        finished_demo,
        "runtime.yaml",
        "features:\n  batch_size: 7\n  num_workers: 0\n  device: cpu\n",
    )
    assert plan(finished_demo, override) == {}


def test_adding_one_slide_plans_that_slide_and_its_batch(finished_demo):
    slides = slides_of(finished_demo)
    sheet = finished_demo / "resources" / "demo" / "slides.csv"
    grown = finished_demo / "resources" / "demo" / "slides_plus.csv"
    new_id = "DEMO-INT-001-S9"
    grown.write_text(
        sheet.read_text() + f"DEMO-INT-001,{new_id},slides/DEMO-INT-001-S1.svs,DEMO-INT\n"
    )
    override = write_override(finished_demo, "plus.yaml", f"slide_sheet: {grown}\n")
    assert len(assign_batches([*slides, new_id], 2)[batch_of(new_id, 2)]) > 1  # shares a batch
    counts = plan(finished_demo, override)
    assert counts == {
        "tiling_tile_slide": 1,
        **dict.fromkeys(BATCH_RULES, 1),
        "eagle_topk_thumbnails": 1,  # the figures of that batch
        "embeddings_collect": 1,
        **HEADS,
    }


EDITS = {
    # a module of one stage's own: that stage and below
    "attention.py": expected(batches=2, from_stage="attention_chief", thumbnails=2),
    # the models package that every model stage imports (a hand list had missed it)
    "models/__init__.py": expected(batches=2, from_stage="features_encode_tiles", thumbnails=2),
    # one model's file: the stages that run that model and below, not CTransPath or CHIEF
    "models/virchow2.py": expected(batches=2, from_stage="eagle_embed_topk", thumbnails=2),
    # a model this config does not run: nothing
    "models/gigapath_slide.py": {},
    # a module only the retrieval figure runs
    "retrieval.py": {"evaluation_retrieval": 1},
    # the demo generator is no stage's code
    "demo/tiff.py": {},
}


@pytest.mark.parametrize("module", sorted(EDITS))
def test_editing_a_module_reruns_the_stages_that_import_it_and_below(
    finished_demo, tmp_path, module
):
    copy = tmp_path / "repo"
    ignore = shutil.ignore_patterns(".venv", ".snakemake", "results", "resources", ".git", "logs")
    shutil.copytree(REPO, copy, ignore=ignore)  # copy2 keeps mtimes: only the edit differs
    path = copy / "scripts" / "eagleflow" / module
    path.write_text(path.read_text() + "\n# an edit\n")
    assert plan(finished_demo, snakefile=copy / "Snakefile") == EDITS[module]


def test_adding_a_task_trains_only_that_task(finished_demo):
    override = write_override(
        finished_demo,
        "task.yaml",
        "tasks:\n  SUBTYPE_AGAIN:\n    label: SUBTYPE\n    train_cohorts: [DEMO-INT]\n",
    )
    assert plan(finished_demo, override) == {
        "heads_mlp_crossval": EMBEDDINGS,
        "heads_fewshot": EMBEDDINGS,
        "evaluation_metrics": 1,
        "evaluation_figures": 1,
        "evaluation_summary": 1,
        "evaluation_umap": 1,  # it colours patients by every task's label
    }


def copy_project(finished_demo: Path, to: Path) -> Path:
    """The finished demo copied elsewhere as users move projects (times kept, as mv/rsync -a do)."""
    shutil.copytree(finished_demo, to, symlinks=True)
    return to


def output_stamps(workdir: Path, *folders: str) -> dict[str, tuple[int, bytes]]:
    """Relative path -> (mtime, bytes) of every per-slide file (*.h5) under `folders`."""
    return {
        str(path.relative_to(workdir)): (path.stat().st_mtime_ns, path.read_bytes())
        for folder in folders
        for path in sorted((workdir / folder).rglob("*.h5"))
    }


def test_a_moved_project_plans_nothing(finished_demo, tmp_path):
    """Issue 13: a finished demo copied to another folder planned all its jobs again, every
    tiling job for "Set of input files has changed", as the slide paths were absolute."""
    moved = copy_project(finished_demo, tmp_path / "project-space" / "demo")
    assert plan(moved) == {}


def test_a_moved_slide_folder_recomputes_no_tiles_and_no_features(finished_demo, tmp_path):
    """The slides move (the sheet follows, the files are the same): no tiling job is planned,
    and the batch jobs that see the new paths keep every tiles and features file as it was."""
    work = copy_project(finished_demo, tmp_path / "demo")
    slides = work / "resources" / "demo" / "slides"
    archive = tmp_path / "archive" / "scans"
    archive.parent.mkdir()
    shutil.move(slides, archive)
    sheet = work / "resources" / "demo" / "slides.csv"
    sheet.write_text(sheet.read_text().replace(",slides/", f",{archive}/"))
    assert str(archive) in sheet.read_text()
    before = output_stamps(work, "results/tiles", "results/features")
    manifests = sorted((work / "results" / "features").rglob("batches/*.tsv"))
    listed = [manifest.read_bytes() for manifest in manifests]
    counts = plan(work)
    assert "tiling_tile_slide" not in counts
    run([*SNAKEMAKE, "--cores", "2", "--directory", str(work), *FAST], cwd=work)
    assert output_stamps(work, "results/tiles", "results/features") == before
    # the batch jobs ran (their params hold the paths) and rewrote the same manifests
    assert [manifest.read_bytes() for manifest in manifests] == listed
    assert plan(work) == {}


def test_tiling_follows_the_slides_content_not_their_paths(tmp_path):
    """The same moves on tiling alone (fast): a copied project and a moved slide folder plan no
    tiling job and keep the tiles files; a slide rewritten with other pixels is tiled again."""
    scratch = tmp_path / "scratch" / "demo"
    (scratch / "slides").mkdir(parents=True)
    for i in range(2):
        write_pyramid(scratch / "slides" / f"S{i}.tif", tissue_image(2048, 1536, seed=i), 0.5)
    args = make_tiling_workdir(scratch, {f"S{i}": f"slides/S{i}.tif" for i in range(2)})
    run([*args, "--cores", "2"], cwd=scratch)

    work = copy_project(scratch, tmp_path / "project" / "demo")
    assert "tiling_tile_slide" not in job_counts(run([*tiling_args(work), "-n"], cwd=work).stdout)

    archive = tmp_path / "archive"
    shutil.move(work / "slides", archive)
    sheet = work / "slides.csv"
    sheet.write_text(sheet.read_text().replace(",slides/", f",{archive}/"))
    before = output_stamps(work, "results/tiles")
    run([*tiling_args(work), "--cores", "2"], cwd=work)
    assert output_stamps(work, "results/tiles") == before

    write_pyramid(archive / "S1.tif", tissue_image(2048, 1536, seed=7), 0.5)
    assert job_counts(run([*tiling_args(work), "-n"], cwd=work).stdout)["tiling_tile_slide"] == 1


def test_an_encoder_on_a_new_grid_tiles_once_and_keeps_every_finished_file(finished_demo, tmp_path):
    """A new grid is written by the slide's one tiling job (one tissue mask for all grids): every
    slide is tiled again, the existing grid's files come out identical, so the stages below them
    keep every slide's file (their jobs run and find them up to date); only the new encoder
    computes. Then nothing is planned."""
    work = copy_project(finished_demo, tmp_path / "demo")
    override = write_override(
        work,
        "new_grid.yaml",
        "tile_encoders:\n  pathoduet:\n    tile_px: 224\n    tile_mpp: 4.0\n" + PATHODUET,
    )
    counts = plan(work, override)
    assert counts["tiling_tile_slide"] == len(slides_of(work))
    assert counts["features_encode_tiles"] == 4  # two encoders x two batches
    folders = ("results/features/ctranspath", "results/attention", "results/eagle")
    tiles = work / "results" / "tiles" / EAGLE_GRID
    tile_digests = {p.name: read_attrs(p)["content_sha256"] for p in tiles.glob("*.h5")}
    before = output_stamps(work, *folders)
    run([*SNAKEMAKE, "--cores", "2", "--directory", str(work), *FAST, override], cwd=work)
    assert {p.name: read_attrs(p)["content_sha256"] for p in tiles.glob("*.h5")} == tile_digests
    assert output_stamps(work, *folders) == before  # not rewritten: same bytes, same mtimes
    assert len(list((work / "results" / "tiles" / "224px_4mpp").glob("*.h5"))) == len(
        slides_of(work)
    )
    assert len(list((work / "results" / "features" / "pathoduet").glob("*.h5"))) == len(
        slides_of(work)
    )
    assert plan(work, override) == {}
