rule tiling_tile_slide:
    input:
        slide=slide_path,
    output:
        tiles="results/tiles/{slide}.h5",
        qc=report(
            "results/qc/tiles/{slide}.png",
            caption="../report/tiling_qc.rst",
            category="Tiling QC",
            labels={"slide": "{slide}"},
        ),
    log:
        "logs/tiling/{slide}.log",
    benchmark:
        "benchmarks/tiling/{slide}.tsv"
    conda:
        "../envs/slides.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        code=stage_code_digest("tiling_tile_slide"),
        tiling=config["tiling"],
        sheet_mpp=sheet_mpp_param(),
    script:
        "../scripts/tiling_tile_slide.py"
