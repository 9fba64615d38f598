rule attention_chief:
    input:
        features=f"results/features/{SELECTION_ENCODER}/batches/{{batch}}.tsv",
    output:
        manifest="results/attention/chief/batches/{batch}.tsv",
    log:
        "logs/attention/chief/{batch}.log",
    benchmark:
        "benchmarks/attention/chief/{batch}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        code=stage_code_digest("attention_chief", ("chief",)),
        slides=batch_params(
            features=f"results/features/{SELECTION_ENCODER}/{{slide}}.h5",
            output="results/attention/chief/{slide}.h5",
        ),
        model=config["models"]["chief"],
    script:
        "../scripts/attention_chief.py"
