rule evaluation_metrics:
    input:
        predictions=task_embedding_files(
            "results/heads/{task}/{embedding}/mlp/predictions.csv"
        ),
        external=task_embedding_files(
            "results/heads/{task}/{embedding}/mlp/external.csv"
        ),
        external_folds=task_embedding_files(
            "results/heads/{task}/{embedding}/mlp/external_folds.csv"
        ),
        fewshot=task_embedding_files(
            "results/heads/{task}/{embedding}/fewshot/predictions.csv"
        ),
    output:
        metrics="results/evaluation/{task}/metrics.csv",
        fewshot="results/evaluation/{task}/fewshot.csv",
        delong="results/evaluation/{task}/delong.csv",
        info="results/evaluation/{task}/evaluation.json",
    log:
        "logs/evaluation/{task}/metrics.log",
    benchmark:
        "benchmarks/evaluation/{task}/metrics.tsv"
    conda:
        "../envs/heads.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        code=stage_code_digest("evaluation_metrics"),
        task=task_params,
        bootstrap=config["heads"]["bootstrap"],
    script:
        "../scripts/evaluation_metrics.py"


rule evaluation_figures:
    input:
        predictions=task_embedding_files(
            "results/heads/{task}/{embedding}/mlp/predictions.csv"
        ),
        external=task_embedding_files(
            "results/heads/{task}/{embedding}/mlp/external.csv"
        ),
        fewshot="results/evaluation/{task}/fewshot.csv",
        embeddings=task_embeddings_table,
    output:
        roc=report(
            "results/evaluation/{task}/roc.png",
            caption="../report/evaluation_roc.rst",
            category="Classification",
            subcategory="{task}",
            labels={"task": "{task}", "figure": "ROC curves"},
        ),
        pr=report(
            "results/evaluation/{task}/pr.png",
            caption="../report/evaluation_pr.rst",
            category="Classification",
            subcategory="{task}",
            labels={"task": "{task}", "figure": "precision-recall curves"},
        ),
        fewshot=report(
            "results/evaluation/{task}/fewshot.png",
            caption="../report/evaluation_fewshot.rst",
            category="Classification",
            subcategory="{task}",
            labels={"task": "{task}", "figure": "few-shot curves"},
        ),
    log:
        "logs/evaluation/{task}/figures.log",
    benchmark:
        "benchmarks/evaluation/{task}/figures.tsv"
    conda:
        "../envs/heads.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    params:
        code=stage_code_digest("evaluation_figures"),
        task=task_params,
    script:
        "../scripts/evaluation_figures.py"


rule evaluation_summary:
    input:
        metrics=expand("results/evaluation/{task}/metrics.csv", task=list(TASKS)),
        fewshot=expand("results/evaluation/{task}/fewshot.csv", task=list(TASKS)),
        delong=expand("results/evaluation/{task}/delong.csv", task=list(TASKS)),
        embeddings="results/embeddings/patients.h5",
        compute="results/embeddings/compute.csv",
    output:
        html=report(
            "results/evaluation/metrics.html",
            caption="../report/evaluation_tables.rst",
            category="Classification",
            subcategory="All tasks",
            labels={"table": "comparison, metrics, DeLong, few-shot"},
        ),
        grid=report(
            "results/evaluation/comparison_grid.csv",
            caption="../report/evaluation_tables.rst",
            category="Classification",
            subcategory="All tasks",
            labels={"table": "comparison: embeddings x magnifications (CSV)"},
        ),
        efficiency=report(
            "results/evaluation/efficiency.png",
            caption="../report/evaluation_efficiency.rst",
            category="Classification",
            subcategory="All tasks",
            labels={"figure": "AUROC against compute per slide"},
        ),
        comparison=report(
            "results/evaluation/comparison.csv",
            caption="../report/evaluation_tables.rst",
            category="Classification",
            subcategory="All tasks",
            labels={"table": "comparison (CSV)"},
        ),
        metrics=report(
            "results/evaluation/metrics.csv",
            caption="../report/evaluation_tables.rst",
            category="Classification",
            subcategory="All tasks",
            labels={"table": "metrics (CSV)"},
        ),
        fewshot=report(
            "results/evaluation/fewshot.csv",
            caption="../report/evaluation_tables.rst",
            category="Classification",
            subcategory="All tasks",
            labels={"table": "few-shot metrics (CSV)"},
        ),
        delong=report(
            "results/evaluation/delong.csv",
            caption="../report/evaluation_tables.rst",
            category="Classification",
            subcategory="All tasks",
            labels={"table": "DeLong tests (CSV)"},
        ),
    log:
        "logs/evaluation/summary.log",
    benchmark:
        "benchmarks/evaluation/summary.tsv"
    conda:
        "../envs/heads.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=stage_code_digest("evaluation_summary"),
        note=config["evaluation"]["note"],
    script:
        "../scripts/evaluation_summary.py"


rule evaluation_umap:
    input:
        embeddings="results/embeddings/patients.h5",
        clinical=config["clinical_table"],
    output:
        png=report(
            "results/evaluation/umap.png",
            caption="../report/evaluation_umap.rst",
            category="Embeddings",
            labels={"figure": "UMAP"},
        ),
    log:
        "logs/evaluation/umap.log",
    benchmark:
        "benchmarks/evaluation/umap.tsv"
    conda:
        "../envs/heads.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        code=stage_code_digest("evaluation_umap"),
        umap=config["evaluation"]["umap"],
        labels=task_labels(),
    script:
        "../scripts/evaluation_umap.py"


rule evaluation_retrieval:
    input:
        embeddings="results/embeddings/patients.h5",
    output:
        table=report(
            "results/evaluation/retrieval.csv",
            caption="../report/evaluation_retrieval.rst",
            category="Embeddings",
            labels={"figure": "retrieval (CSV)"},
        ),
        png=report(
            "results/evaluation/retrieval.png",
            caption="../report/evaluation_retrieval.rst",
            category="Embeddings",
            labels={"figure": "retrieval similarity"},
        ),
    log:
        "logs/evaluation/retrieval.log",
    benchmark:
        "benchmarks/evaluation/retrieval.tsv"
    conda:
        "../envs/heads.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=15,
    params:
        code=stage_code_digest("evaluation_retrieval"),
        retrieval=config["evaluation"]["retrieval"],
    script:
        "../scripts/evaluation_retrieval.py"
