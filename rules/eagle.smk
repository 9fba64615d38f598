# EAGLE's second stage, once per configured encoder: the top-k tiles of each slide (the largest
# k of eagle.top_k) re-read on CHIEF's grid and embedded.
rule eagle_embed_topk:
    input:
        # The batch's tiles are upstream of this manifest (tiles -> features -> attention), so
        # they are not listed again: each listing costs one DAG lookup per slide.
        attention=lambda wildcards: "results/attention/{chief}/batches/{batch}.tsv".format(
            batch=wildcards.batch,
            **selection_fields(instance_suffix(wildcards.encoder)),
        ),
    output:
        manifest="results/eagle/{encoder}/batches/{batch}.tsv",
    log:
        "logs/eagle/{encoder}/{batch}.log",
    benchmark:
        "benchmarks/eagle/{encoder}/{batch}.tsv"
    wildcard_constraints:
        encoder=alternatives(EAGLE_INSTANCES),
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=120,
    params:
        code=model_stage_code("eagle_embed_topk"),
        slides=batch_params(
            tiles="results/tiles/{selection_grid}/{slide}.h5",
            attention="results/attention/{chief}/{slide}.h5",
            output="results/eagle/{encoder}/{slide}.h5",
        ),
        models=tile_encoder_models,
        eagle=eagle_params(),
    script:
        "../scripts/eagle_embed_topk.py"


rule eagle_topk_thumbnails:
    input:
        manifest=f"results/eagle/{EAGLE_ENCODERS[0]}/batches/{{batch}}.tsv",
    output:
        pngs=report(
            directory("results/qc/topk/{batch}"),
            patterns=["{slide}.png"],
            caption="../report/topk.rst",
            category="Top-k tiles",
            labels={"slide": "{slide}"},
        ),
    log:
        "logs/eagle/thumbnails/{batch}.log",
    benchmark:
        "benchmarks/eagle/thumbnails/{batch}.tsv"
    conda:
        "../envs/slides.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        code=stage_code_digest("eagle_topk_thumbnails"),
        slides=batch_params(tiles=f"results/tiles/{SELECTION_GRID.name}/{{slide}}.h5"),
    script:
        "../scripts/eagle_topk_thumbnails.py"
