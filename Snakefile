# eagle-snakemake: EAGLE (CHIEF-selected tiles embedded by Virchow2) and the slide representations
# it is compared with, as a restartable workflow.
# This file is the table of contents; helpers live in rules/common.smk, logic in scripts/eagleflow.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/tiling.smk"
include: "rules/features.smk"
include: "rules/attention.smk"
include: "rules/eagle.smk"
include: "rules/slide_encoders.smk"
include: "rules/embeddings.smk"
include: "rules/heads.smk"
include: "rules/evaluation.smk"


localrules:
    all,
    embeddings_collect,
    evaluation_summary,
    evaluation_figures,


rule all:
    default_target: True
    input:
        final_outputs(),
