"""Rule tiling_tile_slide: slide -> one tiles H5 per grid (from one tissue mask) + QC thumbnail."""

from eagleflow.logutil import run_rule
from eagleflow.tiling import run_tiling

run_rule(
    snakemake.log[0],
    run_tiling,
    slide_path=str(snakemake.params.slide),
    slide_id=snakemake.wildcards.slide,
    params={**snakemake.params.tiling, "mpp_range": snakemake.config["tiling"]["mpp_range"]},
    grids=list(snakemake.params.grids),
    sheet_mpp=snakemake.params.sheet_mpp,
    tiles_h5=list(snakemake.output.tiles),
    qc_png=snakemake.output.qc,
    threads=snakemake.threads,
)
