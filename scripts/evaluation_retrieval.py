"""Rule evaluation_retrieval: each patient's most similar patients, and the similarity matrices."""

from eagleflow.logutil import run_rule
from eagleflow.retrieval import patient_retrieval

run_rule(
    snakemake.log[0],
    patient_retrieval,
    patients_h5=snakemake.input.embeddings,
    params=dict(snakemake.params.retrieval),
    table_csv=snakemake.output.table,
    figure_png=snakemake.output.png,
)
