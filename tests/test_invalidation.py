"""After a config or code change, `snakemake -n` plans exactly the stages that change invalidates.

Each case edits one thing on a finished demo run (fast settings: 2 batches) and compares the
planned job counts per rule with the README's invalidation table. The last test runs one change
and checks that the outputs it does not touch keep their bytes and mtimes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from workflow_helpers import FAST, REPO, SNAKEMAKE, job_counts, run

from eagleflow.batches import assign_batches, batch_of
from eagleflow.sheets import read_slide_sheet

pytestmark = pytest.mark.workflow

BATCH_RULES = ("features_ctranspath", "attention_chief", "eagle_virchow2_topk")
# Demo tasks SUBTYPE and GRADE, three embeddings each: what a new embeddings table plans below it.
TASKS, EMBEDDINGS = 2, 3
HEADS = {
    "heads_mlp_crossval": TASKS * EMBEDDINGS,
    "heads_fewshot": TASKS * EMBEDDINGS,
    "evaluation_metrics": TASKS,
    "evaluation_figures": TASKS,
    "evaluation_summary": 1,
    "evaluation_umap": 1,
    "evaluation_retrieval": 1,
}


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
        (f"results/tiles/{slide}.h5", {}),
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


def test_top_k_reruns_virchow2_and_below_only(finished_demo):
    len(slides_of(finished_demo))
    override = write_override(finished_demo, "topk.yaml", "eagle:\n  top_k: 3\n")
    assert plan(finished_demo, override) == expected(
        batches=2, from_stage="eagle_virchow2_topk", thumbnails=2
    )


def test_virchow2_weights_setting_reruns_virchow2_and_below_only(finished_demo):
    len(slides_of(finished_demo))
    override = write_override(
        finished_demo,
        "v2.yaml",
        "models:\n  virchow2:\n    weights: demo\n    verify_sha256: false\n",
    )
    assert plan(finished_demo, override) == expected(
        batches=2, from_stage="eagle_virchow2_topk", thumbnails=2
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


def test_editing_one_stage_code_reruns_that_stage_and_below(finished_demo, tmp_path):
    copy = tmp_path / "repo"
    ignore = shutil.ignore_patterns(".venv", ".snakemake", "results", "resources", ".git", "logs")
    shutil.copytree(REPO, copy, ignore=ignore)  # copy2 keeps mtimes: only the edit differs
    module = copy / "scripts" / "eagleflow" / "attention.py"
    module.write_text(module.read_text() + "\n# an edit\n")
    assert plan(finished_demo, snakefile=copy / "Snakefile") == expected(
        batches=2, from_stage="attention_chief", thumbnails=2
    )


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
