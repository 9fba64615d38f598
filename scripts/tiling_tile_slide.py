"""Rule tiling_tile_slide: slide -> one tiles H5 per grid (from one tissue mask) + QC thumbnail."""

from pathlib import Path

from eagleflow.grids import Grid
from eagleflow.logutil import run_rule
from eagleflow.tiling import run_tiling

tiles = list(snakemake.output.tiles)

run_rule(
    snakemake.log[0],
    run_tiling,
    slide_path=str(snakemake.params.slide),
    slide_id=snakemake.wildcards.slide,
    params={**snakemake.params.tiling, "mpp_range": snakemake.config["tiling"]["mpp_range"]},
    # results/tiles/224px_2mpp/<slide>.h5 -> 224 px at 2 µm/px
    grids=[vars(Grid.from_name(Path(path).parent.name)) for path in tiles],
    sheet_mpp=snakemake.params.sheet_mpp,
    tiles_h5=tiles,
    qc_png=snakemake.output.qc,
    threads=snakemake.threads,
)
