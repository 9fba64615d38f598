# The slide is no `input:`: Snakemake replans a job whose input paths changed, so a moved project
# or slide folder would tile every slide again. Its path reaches the job as an untracked Path param
# (common.smk slide_location) and its content fingerprint as a tracked one: a slide replaced or
# rewritten is tiled again, a moved one is not.
# One job per slide writes every grid from one tissue mask: encoders sharing a grid share its
# tiles file, and the DAG has one tiling job per slide however many grids there are. The grids
# are the output folders (224px_2mpp), not a param: removing a grid from the config plans nothing.
rule tiling_tile_slide:
    output:
        tiles=expand("results/tiles/{grid}/{{slide}}.h5", grid=GRID_NAMES),
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
        # mpp_range only decides which slides are refused: read by the script, so it reruns nothing
        tiling={k: v for k, v in config["tiling"].items() if k != "mpp_range"},
        sheet_mpp=sheet_mpp_param(),
        slide=slide_location,
        slide_content=slide_content,
    script:
        "../scripts/tiling_tile_slide.py"
