"""Rule eagle_virchow2_topk: one batch -> Virchow2 embeddings of each slide's top-k tiles."""

from eagleflow.eagle import run_virchow2_batch
from eagleflow.logutil import run_rule

run_rule(
    snakemake.log[0],
    run_virchow2_batch,
    slides=snakemake.params.slides,
    model_cfg=dict(snakemake.params.model),
    params=dict(snakemake.params.eagle),
    manifest=snakemake.output.manifest,
    threads=snakemake.threads,
)
