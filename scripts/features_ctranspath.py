"""Rule features_ctranspath: one batch of slides -> CTransPath features H5 per slide + manifest."""

from eagleflow.features import run_ctranspath_batch, runtime_settings
from eagleflow.logutil import run_rule

run_rule(
    snakemake.log[0],
    run_ctranspath_batch,
    slides=snakemake.params.slides,
    model_cfg=dict(snakemake.params.model),
    # Runtime-only settings come from the config directly, not params: switching CPU/GPU or the
    # batch size must not plan the stage again (finished slides would be kept anyway).
    params=runtime_settings(snakemake.config),
    manifest=snakemake.output.manifest,
    threads=snakemake.threads,
)
