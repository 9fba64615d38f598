# Slide encoders over bags of tile embeddings, one rule for all (Prov-GigaPath, TITAN, MADELEINE,
# PRISM, COBRA): a patient's slides of one stain in one pass (early fusion, as the EAGLE paper
# and STAMP), or one slide (late fusion). Bags are hashed into batches.
rule slide_encoders_encode_bags:
    input:
        features=slide_encoder_inputs,
    output:
        manifest="results/slide_encoders/{slide_encoder}/batches/{batch}.tsv",
    log:
        "logs/slide_encoders/{slide_encoder}/{batch}.log",
    benchmark:
        "benchmarks/slide_encoders/{slide_encoder}/{batch}.tsv"
    wildcard_constraints:
        slide_encoder=alternatives(SLIDE_ENCODER_INSTANCES),
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=60,
    params:
        code=slide_encoder_code,
        bags=slide_encoder_bags,
        model=slide_encoder_model_settings,
        slide_encoder=slide_encoder_settings_of,
    script:
        "../scripts/slide_encoders_encode_bags.py"
