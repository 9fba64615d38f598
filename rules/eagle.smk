rule eagle_virchow2_topk:
    input:
        # The batch's tiles are upstream of this manifest (tiles -> features -> attention), so
        # they are not listed again: each listing costs one DAG lookup per slide.
        attention="results/attention/chief/batches/{batch}.tsv",
    output:
        manifest="results/eagle/topk/batches/{batch}.tsv",
    log:
        "logs/eagle/virchow2/{batch}.log",
    benchmark:
        "benchmarks/eagle/virchow2/{batch}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=120,
    params:
        code=stage_code_digest("eagle_virchow2_topk"),
        slides=batch_params(
            tiles="results/tiles/{slide}.h5",
            attention="results/attention/chief/{slide}.h5",
            output="results/eagle/topk/{slide}.h5",
        ),
        model=config["models"]["virchow2"],
        eagle=eagle_params(),
    script:
        "../scripts/eagle_virchow2_topk.py"


rule eagle_topk_thumbnails:
    input:
        manifest="results/eagle/topk/batches/{batch}.tsv",
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
        slides=batch_params(tiles="results/tiles/{slide}.h5"),
    script:
        "../scripts/eagle_topk_thumbnails.py"
