"""Rule heads_mlp_crossval: EAGLE's MLP head, stratified cross-validation, per-fold deployment."""

from eagleflow.heads_mlp import mlp_crossval
from eagleflow.logutil import run_rule

run_rule(
    snakemake.log[0],
    mlp_crossval,
    patients_h5=snakemake.input.embeddings,
    clinical_table=snakemake.input.clinical,
    embedding=snakemake.wildcards.embedding,
    task=dict(snakemake.params.task),
    params=dict(snakemake.params.mlp),
    predictions=snakemake.output.predictions,
    external=snakemake.output.external,
    external_folds=snakemake.output.external_folds,
    splits=snakemake.output.splits,
    history=snakemake.output.history,
    threads=snakemake.threads,
)
