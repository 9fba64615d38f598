# Helpers: config and sheet validation, wildcard constraints, input and parameter functions.
import sys
from pathlib import Path

from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "scripts"))

from eagleflow.sheets import (  # noqa: E402
    ID_PATTERN,
    check_sheets_agree,
    read_clinical_table,
    read_slide_sheet,
)
from eagleflow.models.registry import check_weights_config  # noqa: E402

validate(config, schema="../config/schemas/config.schema.yaml", set_default=True)

SLIDES = read_slide_sheet(config["slide_sheet"])
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


wildcard_constraints:
    slide=ID_PATTERN,
    patient=ID_PATTERN,
    cohort=ID_PATTERN,


def slide_path(wildcards):
    return SLIDES.at[wildcards.slide, "PATH"]


def sheet_mpp(wildcards):
    """The sheet's MPP override for a slide, or None."""
    value = SLIDES.at[wildcards.slide, "MPP"]
    return None if value != value else float(value)


def final_outputs():
    slides = SLIDES["SLIDE"]
    return expand("results/tiles/{slide}.h5", slide=slides) + expand(
        "results/qc/tiles/{slide}.png", slide=slides
    )
