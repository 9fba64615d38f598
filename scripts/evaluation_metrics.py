"""Rules evaluation_metrics (one task: metrics, bootstrap CIs, DeLong) and evaluation_summary (the
run's tables, DeLong p-values adjusted together)."""

from eagleflow.evaluation import evaluate_task, summarize_run
from eagleflow.logutil import run_rule

if snakemake.rule == "evaluation_summary":
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
    )
else:
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
