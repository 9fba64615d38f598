"""Rule evaluation_metrics: one task's metrics with bootstrap CIs, and DeLong between embeddings."""

from eagleflow.evaluation import evaluate_task
from eagleflow.logutil import run_rule

run_rule(
    snakemake.log[0],
    evaluate_task,
    task=dict(snakemake.params.task),
    predictions=list(snakemake.input.predictions),
    external=list(snakemake.input.external),
    external_folds=list(snakemake.input.external_folds),
    fewshot=list(snakemake.input.fewshot),
    bootstrap=dict(snakemake.params.bootstrap),
    metrics_csv=snakemake.output.metrics,
    fewshot_csv=snakemake.output.fewshot,
    delong_csv=snakemake.output.delong,
    info_json=snakemake.output.info,
)
