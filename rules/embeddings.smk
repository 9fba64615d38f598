rule embeddings_collect:
    input:
        attention=expand(
            "results/attention/{chief}/batches/{batch}.tsv",
            chief=CHIEF_NAMES,
            batch=BATCHES,
        ),
        features=expand(
            "results/features/{encoder}/batches/{batch}.tsv",
            encoder=TILE_ENCODER_NAMES,
            batch=BATCHES,
        ),
        topk=expand(
            "results/eagle/{encoder}/batches/{batch}.tsv",
            encoder=EAGLE_INSTANCES,
            batch=BATCHES,
        ),
        slide_encoders=[
            f"results/slide_encoders/{name}/batches/{batch}.tsv"
            for name in SLIDE_ENCODER_INSTANCES
            for batch in SLIDE_ENCODER_BATCHES[name]
        ],
    output:
        slides="results/embeddings/slides.h5",
        patients="results/embeddings/patients.h5",
        stain_tables=list(STAIN_TABLES.values()),
        compute="results/embeddings/compute.csv",
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
        embeddings=embedding_specs(),
        stain_tables=STAIN_TABLES,
        eagle={
            "aggregation": config["eagle"]["aggregation"],
            "slide_encoder_fusion": {
                name: SLIDE_ENCODER_CONFIG[instance_base(name)]["fusion"]
                for name in SLIDE_ENCODER_INSTANCES
            },
        },
    script:
        "../scripts/embeddings_collect.py"
