# One rule for every tile encoder: each runs on every tile of its grid, in batches of slides.
rule features_encode_tiles:
    input:
        tiles=batch_inputs("results/tiles/{grid}/{slide}.h5", grid=encoder_grid),
    output:
        manifest="results/features/{encoder}/batches/{batch}.tsv",
    log:
        "logs/features/{encoder}/{batch}.log",
    benchmark:
        "benchmarks/features/{encoder}/{batch}.tsv"
    wildcard_constraints:
        encoder=alternatives(TILE_ENCODER_NAMES),
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        code=model_stage_code("features_encode_tiles"),
        slides=batch_params(
            tiles="results/tiles/{grid}/{slide}.h5",
            output="results/features/{encoder}/{slide}.h5",
        ),
        models=tile_encoder_models,
    script:
        "../scripts/features_encode_tiles.py"
