rule features_ctranspath:
    input:
        tiles=batch_inputs("results/tiles/{slide}.h5"),
    output:
        manifest="results/features/ctranspath/batches/{batch}.tsv",
    log:
        "logs/features/ctranspath/{batch}.log",
    benchmark:
        "benchmarks/features/ctranspath/{batch}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        code=stage_code_digest("features_ctranspath"),
        slides=batch_params(
            tiles="results/tiles/{slide}.h5",
            output="results/features/ctranspath/{slide}.h5",
        ),
        model=config["models"]["ctranspath"],
    script:
        "../scripts/features_ctranspath.py"
