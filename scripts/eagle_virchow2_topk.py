"""Rule eagle_virchow2_topk: one batch -> Virchow2 embeddings of each slide's top-k tiles."""

from eagleflow.eagle import run_virchow2_batch
from eagleflow.features import runtime_settings
from eagleflow.logutil import run_rule

run_rule(
    snakemake.log[0],
    run_virchow2_batch,
    slides=snakemake.params.slides,
    model_cfg=dict(snakemake.params.model),
    # top_k and the orientation come through params (they change the result); device, batch
    # size and workers come from the config (runtime only, they must not plan the stage again).
    params={**runtime_settings(snakemake.config, "eagle"), **snakemake.params.eagle},
    manifest=snakemake.output.manifest,
    threads=snakemake.threads,
)
