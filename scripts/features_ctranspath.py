"""Rule features_ctranspath: one batch of slides -> CTransPath features H5 per slide + manifest."""

from eagleflow.features import run_ctranspath_batch
from eagleflow.logutil import run_rule

run_rule(
    snakemake.log[0],
    run_ctranspath_batch,
    slides=snakemake.params.slides,
    model_cfg=dict(snakemake.params.model),
    params=dict(snakemake.params.extraction),
    manifest=snakemake.output.manifest,
    threads=snakemake.threads,
)
