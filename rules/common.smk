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
    sheet_stains,
)
from eagleflow.batches import assign_batches  # noqa: E402
from eagleflow.mpp import check_mpp_settings  # noqa: E402
from eagleflow.slidefiles import slide_fingerprint  # noqa: E402
from eagleflow.encoders import (  # noqa: E402
    SELECTION_ENCODER,
    SLIDE_ENCODERS,
    TILE_ENCODERS,
    as_list,
    check_embedding_names,
    check_encoder_config,
    configured_embeddings,
    instance_base,
    instance_suffix,
    required_models,
    slide_encoder_settings,
    tile_encoder_instances,
)
from eagleflow.tasks import validate_tasks  # noqa: E402
from eagleflow.provenance import stage_code_digest  # noqa: E402
from eagleflow.models.catalog import model_files  # noqa: E402
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
SLIDE_STAINS = SLIDES["STAIN"].to_dict()  # the sheet's STAIN, HE where it gives none
STAINS = sheet_stains(SLIDES)

# Encoders: which run on every tile (each at its grid), which embed EAGLE's top-k, which encode
# bags of tile embeddings; and the embeddings they make, in report order.
check_encoder_config(config)
# A tile encoder at each of its grids is an instance: `ctranspath` (its first grid) or
# `ctranspath@0.5mpp`; CHIEF, EAGLE and the slide encoders run once per instance they read.
TILE_INSTANCES = tile_encoder_instances(config["tile_encoders"])
ENCODER_GRIDS = {name: instance.grid for name, instance in TILE_INSTANCES.items()}
SELECTION_GRID = ENCODER_GRIDS[SELECTION_ENCODER]
# The selection grid first, the others sorted: reordering the config replans no tiling.
GRIDS = [SELECTION_GRID] + sorted(set(ENCODER_GRIDS.values()) - {SELECTION_GRID})
GRID_NAMES = [grid.name for grid in GRIDS]
TILE_ENCODER_NAMES = list(TILE_INSTANCES)
SELECTION_SUFFIXES = [
    instance.suffix
    for instance in TILE_INSTANCES.values()
    if instance.encoder == SELECTION_ENCODER
]
CHIEF_NAMES = [f"chief{suffix}" for suffix in SELECTION_SUFFIXES]
EAGLE_ENCODERS = as_list(config["eagle"]["encoder"])
EAGLE_INSTANCES = [
    f"{encoder}{suffix}" for suffix in SELECTION_SUFFIXES for encoder in EAGLE_ENCODERS
]
TOP_KS = [int(k) for k in as_list(config["eagle"]["top_k"])]
SLIDE_ENCODER_CONFIG = slide_encoder_settings(config.get("slide_encoders"))
# slide encoder instance -> the tile-encoder instance it reads
SLIDE_ENCODER_INSTANCES = {
    f"{name}{instance.suffix}": instance.name
    for name, settings in SLIDE_ENCODER_CONFIG.items()
    for instance in TILE_INSTANCES.values()
    if instance.encoder == settings["tile_encoder"]
}
EMBEDDINGS = configured_embeddings(
    TILE_INSTANCES,
    EAGLE_ENCODERS,
    TOP_KS,
    SLIDE_ENCODER_CONFIG,
    eagle_all=config["eagle"]["all_tiles"],
)
EMBEDDING_NAMES = [spec.name for spec in EMBEDDINGS]
for section in ("umap", "retrieval"):
    check_embedding_names(
        f"evaluation.{section}.embeddings",
        config["evaluation"][section]["embeddings"],
        EMBEDDING_NAMES,
    )

# Missing weight files fail here, before any slide is touched.
WEIGHTS = check_weights_config(
    config["models"], required=required_models(config, STAINS)
)
# GPU stages run per batch of slides (one model load per job); a slide's batch hashes its id.
N_BATCHES = config["features"]["n_batches"]
BATCH_SLIDES = assign_batches(SLIDES.index, N_BATCHES)
BATCHES = list(BATCH_SLIDES)
# Plain dicts for the per-job functions: a pandas lookup costs ~50 µs, 10,000 of them a second.
SLIDE_PATHS = SLIDES["PATH"].to_dict()
SLIDE_MPPS = SLIDES["MPP"].to_dict()
SLIDE_PATIENTS = SLIDES["PATIENT"].to_dict()

# Label columns, classes, cohorts and fold counts of every task fail here, before any slide runs.
TASKS = validate_tasks(
    config["tasks"],
    CLINICAL,
    SLIDES,
    folds=config["heads"]["mlp"]["folds"],
    clinical_path=config["clinical_table"],
    embedding_names=EMBEDDING_NAMES,
)
# Stain -> patient table from that stain's slides only, for the tasks restricted to a stain.
STAIN_TABLES = {
    task.stain: f"results/embeddings/{task.embeddings_table}.h5"
    for task in sorted(TASKS.values(), key=lambda task: str(task.stain))
    if task.stain is not None
}


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
    grid=alternatives(GRID_NAMES),


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


def batch_inputs(pattern, **fixed):
    """Input function: `pattern` for every slide of the job's batch (other fields from `fixed`,
    values may be functions of the wildcards)."""

    def inputs(wildcards):
        values = {k: v(wildcards) if callable(v) else v for k, v in fixed.items()}
        return [
            pattern.format(slide=slide, **values)
            for slide in BATCH_SLIDES[wildcards.batch]
        ]

    return inputs


def selection_fields(suffix):
    """The selection instance of a grid suffix: its features, CHIEF and tiles folders."""
    selection = f"{SELECTION_ENCODER}{suffix}"
    return {
        "selection": selection,
        "chief": f"chief{suffix}",
        "selection_grid": ENCODER_GRIDS[selection].name,
    }


def batch_params(**patterns):
    """Params function: per slide of the batch its id, slide path, stain and the given paths.

    Patterns may use {slide}, the job's wildcards ({encoder}, {chief}), {grid} (a tile-encoder
    instance's grid) and {selection}, {chief}, {selection_grid} (the CTransPath instance, CHIEF
    instance and tiles folder of the job's grid).
    """

    def params(wildcards):
        fields = dict(wildcards.items())
        if fields.get("encoder") in ENCODER_GRIDS:
            fields["grid"] = encoder_grid(wildcards)
        own = fields.get("chief", fields.get("encoder", ""))
        if own and ("chief" in fields or own in EAGLE_INSTANCES):
            fields.update(selection_fields(instance_suffix(own)))
        return [
            {
                "slide_id": slide,
                "slide_path": SLIDE_PATHS[slide],
                "stain": SLIDE_STAINS[slide],
                **{
                    key: pattern.format(slide=slide, **fields)
                    for key, pattern in patterns.items()
                },
            }
            for slide in BATCH_SLIDES[wildcards.batch]
        ]

    return params


def encoder_grid(wildcards):
    """The grid name of the job's tile encoder."""
    return ENCODER_GRIDS[wildcards.encoder].name


def encoder_models(encoder):
    """The `models:` settings of an encoder's (or instance's) models for the sheet's stains."""
    return {
        name: config["models"][name]
        for name in TILE_ENCODERS[instance_base(encoder)].models_for(STAINS)
    }


def tile_encoder_models(wildcards):
    return encoder_models(wildcards.encoder)


def model_stage_code(stage):
    """Params function: the code digest of a tile-encoder stage with its encoder's model files
    (adding or editing another model's file replans nothing here)."""

    def code(wildcards):
        models = TILE_ENCODERS[instance_base(wildcards.encoder)].models_for(STAINS)
        return stage_code_digest(stage, model_files(models))

    return code


def eagle_params():
    """What changes the top-k stage's results: the largest k and the orientation.

    A list of k runs the second stage once on the largest; every k is the first k rows.
    """
    return {
        "top_k": max(TOP_KS),
        "reference_transpose": config["eagle"]["reference_transpose"],
    }


def patient_bags(name):
    """Slide-encoder bags: per patient and stain (early fusion: one pass over its slides), or
    per slide (late fusion: the patient's embedding is the mean of its slides')."""
    fusion = SLIDE_ENCODER_CONFIG[instance_base(name)]["fusion"]
    bags = {}
    for slide in sorted(SLIDES.index):
        bag = (
            slide
            if fusion == "late"
            else f"{SLIDE_PATIENTS[slide]}.{SLIDE_STAINS[slide]}"
        )
        bags.setdefault(bag, []).append(slide)
    return bags


SLIDE_ENCODER_BAGS = {name: patient_bags(name) for name in SLIDE_ENCODER_INSTANCES}
SLIDE_ENCODER_BATCHES = {
    name: assign_batches(bags, N_BATCHES) for name, bags in SLIDE_ENCODER_BAGS.items()
}


def slide_encoder_bags(wildcards):
    """Params function: the bags of the job's batch, each with its slides' feature files."""
    name = wildcards.slide_encoder
    tile_encoder = SLIDE_ENCODER_INSTANCES[name]
    bags = SLIDE_ENCODER_BAGS[name]
    return [
        {
            "slide_id": bag,
            "patient": str(SLIDE_PATIENTS[bags[bag][0]]),
            "slides": [
                {
                    "slide_id": slide,
                    "features": f"results/features/{tile_encoder}/{slide}.h5",
                }
                for slide in bags[bag]
            ],
            "output": f"results/slide_encoders/{name}/{bag}.h5",
        }
        for bag in SLIDE_ENCODER_BATCHES[name][wildcards.batch]
    ]


def slide_encoder_settings_of(wildcards):
    """The job's slide-encoder settings (its instance's tile encoder included)."""
    name = wildcards.slide_encoder
    return {
        **SLIDE_ENCODER_CONFIG[instance_base(name)],
        "tile_encoder": instance_base(SLIDE_ENCODER_INSTANCES[name]),
    }


def slide_encoder_model_settings(wildcards):
    """The `models:` settings of the job's slide encoder."""
    model = SLIDE_ENCODERS[instance_base(wildcards.slide_encoder)].model
    return config["models"].get(model, {})


def slide_encoder_code(wildcards):
    """The slide-encoder stage's code digest with its model's file."""
    model = SLIDE_ENCODERS[instance_base(wildcards.slide_encoder)].model
    return stage_code_digest("slide_encoders_encode_bags", model_files([model]))


def slide_encoder_inputs(wildcards):
    tile_encoder = SLIDE_ENCODER_INSTANCES[wildcards.slide_encoder]
    return expand(
        "results/features/{encoder}/batches/{batch}.tsv",
        encoder=tile_encoder,
        batch=BATCHES,
    )


def sheet_rows():
    return [
        {
            "slide_id": slide,
            "patient": patient,
            "cohort": cohort,
            "stain": SLIDE_STAINS[slide],
        }
        for slide, patient, cohort in zip(
            SLIDES.index, SLIDES["PATIENT"], SLIDES["COHORT"], strict=True
        )
    ]


def embedding_specs():
    """The configured embeddings as plain data for `params:` (a change replans the tables)."""
    return [
        {
            "name": spec.name,
            "kind": spec.kind,
            "encoder": spec.encoder,
            "top_k": spec.top_k,
            "tile_encoder": spec.tile_encoder,
            "grid": spec.grid,
        }
        for spec in EMBEDDINGS
    ]


def task_embeddings_table(wildcards):
    """The patient table a task trains on: all slides, or those of its stain."""
    return f"results/embeddings/{TASKS[wildcards.task].embeddings_table}.h5"


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
    lost = file_stems(f"results/tiles/{SELECTION_GRID.name}", ".h5") - file_stems(
        "results/qc/tiles", ".png"
    )
    return [
        f"results/qc/tiles/{slide}.png"
        for slide in sorted(lost)
        if slide in SLIDE_PATHS
    ]


def final_outputs():
    return (
        lost_tiling_qc()
        + expand("results/qc/topk/{batch}", batch=BATCHES)
        + [
            "results/embeddings/slides.h5",
            "results/embeddings/patients.h5",
            "results/embeddings/compute.csv",
        ]
        + list(STAIN_TABLES.values())
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
            "results/evaluation/comparison.csv",
            "results/evaluation/metrics.csv",
            "results/evaluation/fewshot.csv",
            "results/evaluation/delong.csv",
        ]
    return outputs
