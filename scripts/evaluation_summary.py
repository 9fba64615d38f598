"""Rule evaluation_summary: every task's tables in one, DeLong p-values adjusted together, and the
comparison of slide representations (metrics, DeLong vs eagle, compute per slide)."""

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
    note=snakemake.params.note,
)
