"""Rules evaluation_figures (one task: ROC, PR and few-shot curves), evaluation_umap (patients
by cohort and label) and evaluation_retrieval (most similar patients, similarity matrices)."""

from eagleflow.evaluation import patient_retrieval
from eagleflow.figures import task_figures, umap_figure
from eagleflow.logutil import run_rule

if snakemake.rule == "evaluation_umap":
    run_rule(
        snakemake.log[0],
        umap_figure,
        patients_h5=snakemake.input.embeddings,
        clinical_table=snakemake.input.clinical,
        labels=dict(snakemake.params.labels),
        params=dict(snakemake.params.umap),
        output=snakemake.output.png,
    )
elif snakemake.rule == "evaluation_retrieval":
    run_rule(
        snakemake.log[0],
        patient_retrieval,
        patients_h5=snakemake.input.embeddings,
        params=dict(snakemake.params.retrieval),
        table_csv=snakemake.output.table,
        figure_png=snakemake.output.png,
    )
else:
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
