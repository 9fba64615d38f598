"""Rule embeddings_collect: per-slide files -> cohort tables of slide and patient embeddings."""

from eagleflow.embeddings import build_cohort_embeddings
from eagleflow.logutil import run_rule

run_rule(
    snakemake.log[0],
    build_cohort_embeddings,
    slides=snakemake.params.slides,
    attention_manifests=list(snakemake.input.attention),
    topk_manifests=list(snakemake.input.topk),
    params=dict(snakemake.params.eagle),
    slides_h5=snakemake.output.slides,
    patients_h5=snakemake.output.patients,
)
