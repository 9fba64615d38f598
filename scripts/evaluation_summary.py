"""Rule evaluation_summary: every task's tables in one, DeLong p-values adjusted together, and the
comparison of slide representations: pivoted (embeddings x magnifications), long (metrics, DeLong
vs eagle at the same magnification, compute per slide) and the AUROC-against-compute figure."""

from eagleflow.logutil import run_rule
from eagleflow.summary import summarize_run

run_rule(
    snakemake.log[0],
    summarize_run,
    metrics=list(snakemake.input.metrics),
    fewshot=list(snakemake.input.fewshot),
    delong=list(snakemake.input.delong),
    patients_h5=snakemake.input.embeddings,
    metrics_csv=snakemake.output.metrics,
    fewshot_csv=snakemake.output.fewshot,
    delong_csv=snakemake.output.delong,
    html_path=snakemake.output.html,
    compute_csv=snakemake.input.compute,
    comparison_csv=snakemake.output.comparison,
    grid_csv=snakemake.output.grid,
    efficiency_png=snakemake.output.efficiency,
    note=snakemake.params.note,
)
