# Slide encoders over bags of tile embeddings: a patient's slides of one stain in one pass (the
# better option in the Prov-GigaPath paper), or one slide. Bags are hashed into batches.
rule slide_encoder_gigapath:
    input:
        features=slide_encoder_inputs,
    output:
        manifest="results/slide_encoders/{slide_encoder}/batches/{batch}.tsv",
    log:
        "logs/slide_encoders/{slide_encoder}/{batch}.log",
    benchmark:
        "benchmarks/slide_encoders/{slide_encoder}/{batch}.tsv"
    wildcard_constraints:
        slide_encoder="gigapath_slide",
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=60,
    params:
        code=stage_code_digest("slide_encoder_gigapath"),
        bags=slide_encoder_bags,
        model=config["models"].get("gigapath_slide", {}),
        slide_encoder=lambda wildcards: SLIDE_ENCODER_CONFIG[wildcards.slide_encoder],
    script:
        "../scripts/slide_encoder_gigapath.py"
