"""Rule evaluation_figures: one task's ROC, precision-recall and few-shot curves."""

from eagleflow.figures import task_figures
from eagleflow.logutil import run_rule

run_rule(
    snakemake.log[0],
    task_figures,
    task=dict(snakemake.params.task),
    predictions=list(snakemake.input.predictions),
    external=list(snakemake.input.external),
    fewshot_metrics=snakemake.input.fewshot,
    patients_h5=snakemake.input.embeddings,
    roc_png=snakemake.output.roc,
    pr_png=snakemake.output.pr,
    fewshot_png=snakemake.output.fewshot,
)
