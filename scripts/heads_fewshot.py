"""Rule heads_fewshot: few-shot logistic regression on k patients per class, seeded repeats."""

from eagleflow.heads_fewshot import fewshot
from eagleflow.logutil import run_rule

run_rule(
    snakemake.log[0],
    fewshot,
    patients_h5=snakemake.input.embeddings,
    clinical_table=snakemake.input.clinical,
    embedding=snakemake.wildcards.embedding,
    task=dict(snakemake.params.task),
    params=dict(snakemake.params.fewshot),
    predictions=snakemake.output.predictions,
    samples=snakemake.output.samples,
)
