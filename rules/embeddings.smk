rule embeddings_collect:
    input:
        attention=expand("results/attention/chief/batches/{batch}.tsv", batch=BATCHES),
        topk=expand("results/eagle/topk/batches/{batch}.tsv", batch=BATCHES),
    output:
        slides="results/embeddings/slides.h5",
        patients="results/embeddings/patients.h5",
    log:
        "logs/embeddings/collect.log",
    benchmark:
        "benchmarks/embeddings/collect.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        code=stage_code_digest("embeddings_collect"),
        slides=sheet_rows(),
        eagle={
            "top_k": config["eagle"]["top_k"],
            "aggregation": config["eagle"]["aggregation"],
        },
    script:
        "../scripts/embeddings_collect.py"
