# Helpers: config and sheet validation, wildcard constraints, input and parameter functions.
import os
import re
import sys
from pathlib import Path

import yaml
from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "scripts"))

from eagleflow.config_values import coerce_command_line_strings  # noqa: E402
from eagleflow.sheets import (  # noqa: E402
    ID_PATTERN,
    check_sheets_agree,
    read_clinical_table,
    read_slide_sheet,
)
from eagleflow.batches import assign_batches  # noqa: E402
from eagleflow.mpp import check_mpp_settings  # noqa: E402
from eagleflow.slidefiles import slide_fingerprint  # noqa: E402
from eagleflow.h5io import EMBEDDING_NAMES  # noqa: E402
from eagleflow.tasks import validate_tasks  # noqa: E402
from eagleflow.provenance import stage_code_digest  # noqa: E402
from eagleflow.weights import check_weights_config  # noqa: E402

CONFIG_SCHEMA = Path(workflow.basedir) / "config" / "schemas" / "config.schema.yaml"
# `--config 'eagle={top_k: 12}'` passes '12' as text: typed where the schema asks for a number.
typed_config, converted = coerce_command_line_strings(
    config, yaml.safe_load(CONFIG_SCHEMA.read_text())
)
config.update(typed_config)
if converted:
    print(f"config: read as typed values: {', '.join(converted)}", file=sys.stderr)
validate(config, schema=str(CONFIG_SCHEMA), set_default=True)

check_mpp_settings(config["tiling"]["mpp_range"], config["tiling"]["default_mpp"])
# Slide paths inside the working directory stay relative to it: a moved project keeps its paths.
SLIDES = read_slide_sheet(
    config["slide_sheet"],
    mpp_range=config["tiling"]["mpp_range"],
    relative_to=os.getcwd(),
)
CLINICAL = read_clinical_table(config["clinical_table"])
check_sheets_agree(
    SLIDES,
    CLINICAL,
    config["slide_sheet"],
    config["clinical_table"],
    config["sheets"]["allow_patients_without_slides"],
)
# Missing weight files fail here, before any slide is touched.
WEIGHTS = check_weights_config(config["models"])
# GPU stages run per batch of slides (one model load per job); a slide's batch hashes its id.
N_BATCHES = config["features"]["n_batches"]
BATCH_SLIDES = assign_batches(SLIDES.index, N_BATCHES)
BATCHES = list(BATCH_SLIDES)
# Plain dicts for the per-job functions: a pandas lookup costs ~50 µs, 10,000 of them a second.
SLIDE_PATHS = SLIDES["PATH"].to_dict()
SLIDE_MPPS = SLIDES["MPP"].to_dict()

# Label columns, classes, cohorts and fold counts of every task fail here, before any slide runs.
TASKS = validate_tasks(
    config["tasks"],
    CLINICAL,
    SLIDES,
    folds=config["heads"]["mlp"]["folds"],
    clinical_path=config["clinical_table"],
)


def alternatives(names):
    """A wildcard constraint that matches exactly these names (nothing if there are none)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


wildcard_constraints:
    slide=ID_PATTERN,
    patient=ID_PATTERN,
    cohort=ID_PATTERN,
    batch="b[0-9]{4}",
    task=alternatives(TASKS),
    embedding=alternatives(EMBEDDING_NAMES),


def slide_location(wildcards):
    """The slide's path as a pathlib.Path, for `params:`.

    Snakemake's params trigger records builtin values only (str, numbers, lists, dicts ...), so a
    Path reaches the job without a moved slide ever planning it; slide_content decides instead.
    """
    return Path(SLIDE_PATHS[wildcards.slide])


def slide_content(wildcards):
    """The slide's path-free fingerprint (size and mtime): what reruns a slide's tiling."""
    return slide_fingerprint(SLIDE_PATHS[wildcards.slide])


def sheet_mpp(wildcards):
    """The sheet's MPP override for a slide, or None."""
    value = SLIDE_MPPS[wildcards.slide]
    return None if value != value else float(value)


def sheet_mpp_param():
    """`sheet_mpp` as a params function, or plain None when the sheet overrides no MPP.

    The value per slide is the same either way; a function costs a call per job at planning.
    """
    return sheet_mpp if SLIDES["MPP"].notna().any() else None


def batch_inputs(pattern):
    """Input function: `pattern` for every slide of the job's batch."""

    def inputs(wildcards):
        return expand(pattern, slide=BATCH_SLIDES[wildcards.batch])

    return inputs


def batch_params(**patterns):
    """Params function: per slide of the batch its id, slide path and the given file paths."""

    def params(wildcards):
        return [
            {
                "slide_id": slide,
                "slide_path": SLIDE_PATHS[slide],
                **{
                    key: pattern.format(slide=slide)
                    for key, pattern in patterns.items()
                },
            }
            for slide in BATCH_SLIDES[wildcards.batch]
        ]

    return params


def eagle_params():
    """What changes the Virchow2 top-k stage's results (runtime settings are read by the script)."""
    return {key: config["eagle"][key] for key in ("top_k", "reference_transpose")}


def sheet_rows():
    return [
        {"slide_id": slide, "patient": patient, "cohort": cohort}
        for slide, patient, cohort in zip(
            SLIDES.index, SLIDES["PATIENT"], SLIDES["COHORT"], strict=True
        )
    ]


def file_stems(folder, suffix):
    """Names (without `suffix`) of the files in `folder`: one directory listing, no stat per file."""
    try:
        with os.scandir(folder) as entries:
            return {e.name[: -len(suffix)] for e in entries if e.name.endswith(suffix)}
    except FileNotFoundError:
        return set()


def lost_tiling_qc():
    """QC pictures missing beside an existing tiles file (deleted by hand), so they are redrawn.

    The others come with the tiles every batch needs: listing all 10,000 would cost seconds of
    planning for nothing.
    """
    lost = file_stems("results/tiles", ".h5") - file_stems("results/qc/tiles", ".png")
    return [
        f"results/qc/tiles/{slide}.png"
        for slide in sorted(lost)
        if slide in SLIDE_PATHS
    ]


def final_outputs():
    return (
        lost_tiling_qc()
        + expand("results/qc/topk/{batch}", batch=BATCHES)
        + ["results/embeddings/slides.h5", "results/embeddings/patients.h5"]
        + evaluation_outputs()
    )


def task_params(wildcards):
    """The validated task (label, classes, cohorts, embeddings) as plain data for `params:`."""
    return TASKS[wildcards.task].params()


def task_embedding_files(pattern):
    """Input function: `pattern` for every embedding of the job's task, in the task's order."""

    def inputs(wildcards):
        return expand(
            pattern, task=wildcards.task, embedding=TASKS[wildcards.task].embeddings
        )

    return inputs


def task_labels():
    """Task name -> label column (the UMAP colours patients by each)."""
    return {name: task.label for name, task in TASKS.items()}


def evaluation_outputs():
    outputs = [
        "results/evaluation/umap.png",
        "results/evaluation/retrieval.csv",
        "results/evaluation/retrieval.png",
    ]
    if TASKS:
        outputs += expand(
            "results/evaluation/{task}/{figure}.png",
            task=list(TASKS),
            figure=["roc", "pr", "fewshot"],
        )
        outputs += [
            "results/evaluation/metrics.html",
            "results/evaluation/metrics.csv",
            "results/evaluation/fewshot.csv",
            "results/evaluation/delong.csv",
        ]
    return outputs
