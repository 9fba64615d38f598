"""Rule eagle_embed_topk: one batch -> the second-stage embeddings of each slide's top-k tiles."""

from eagleflow.eagle import run_topk_batch
from eagleflow.encoders import instance_base
from eagleflow.features import runtime_settings
from eagleflow.logutil import run_rule

run_rule(
    snakemake.log[0],
    run_topk_batch,
    encoder=instance_base(snakemake.wildcards.encoder),  # virchow2@0.5mpp -> virchow2
    slides=snakemake.params.slides,
    models_cfg=dict(snakemake.params.models),
    # top_k and the orientation come through params (they change the result); device, batch
    # size and workers come from the config (runtime only, they must not plan the stage again).
    params={
        **runtime_settings(snakemake.config, snakemake.config["eagle"]["batch_size"]),
        **snakemake.params.eagle,
    },
    manifest=snakemake.output.manifest,
    threads=snakemake.threads,
)
