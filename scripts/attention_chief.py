"""Rule attention_chief: one batch of slides -> CHIEF attention H5 per slide + manifest."""

from eagleflow.attention import run_chief_batch
from eagleflow.logutil import run_rule

run_rule(
    snakemake.log[0],
    run_chief_batch,
    slides=snakemake.params.slides,
    model_cfg=dict(snakemake.params.model),
    manifest=snakemake.output.manifest,
    threads=snakemake.threads,
)
