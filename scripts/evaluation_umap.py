"""Rule evaluation_umap: patients' embeddings in 2-D, coloured by cohort and by each task's label."""

from eagleflow.figures import umap_figure
from eagleflow.logutil import run_rule

run_rule(
    snakemake.log[0],
    umap_figure,
    patients_h5=snakemake.input.embeddings,
    clinical_table=snakemake.input.clinical,
    labels=dict(snakemake.params.labels),
    params=dict(snakemake.params.umap),
    output=snakemake.output.png,
)
