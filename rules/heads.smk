rule heads_mlp_crossval:
    input:
        embeddings=task_embeddings_table,
        clinical=config["clinical_table"],
    output:
        predictions="results/heads/{task}/{embedding}/mlp/predictions.csv",
        external="results/heads/{task}/{embedding}/mlp/external.csv",
        external_folds="results/heads/{task}/{embedding}/mlp/external_folds.csv",
        splits="results/heads/{task}/{embedding}/mlp/splits.json",
        history="results/heads/{task}/{embedding}/mlp/history.csv",
    log:
        "logs/heads/{task}/{embedding}/mlp.log",
    benchmark:
        "benchmarks/heads/{task}/{embedding}/mlp.tsv"
    conda:
        "../envs/heads.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        code=stage_code_digest("heads_mlp_crossval"),
        task=task_params,
        mlp=config["heads"]["mlp"],
    script:
        "../scripts/heads_mlp_crossval.py"


rule heads_fewshot:
    input:
        embeddings=task_embeddings_table,
        clinical=config["clinical_table"],
    output:
        predictions="results/heads/{task}/{embedding}/fewshot/predictions.csv",
        samples="results/heads/{task}/{embedding}/fewshot/samples.json",
    log:
        "logs/heads/{task}/{embedding}/fewshot.log",
    benchmark:
        "benchmarks/heads/{task}/{embedding}/fewshot.tsv"
    conda:
        "../envs/heads.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        code=stage_code_digest("heads_fewshot"),
        task=task_params,
        fewshot=config["heads"]["fewshot"],
    script:
        "../scripts/heads_fewshot.py"
