"""Rule eagle_topk_thumbnail: a slide's top-k tiles boxed and ranked on its thumbnail."""

from eagleflow.logutil import run_rule
from eagleflow.plots import write_topk_figure

run_rule(
    snakemake.log[0],
    write_topk_figure,
    slide_path=snakemake.input.slide,
    slide_id=snakemake.wildcards.slide,
    manifest=snakemake.input.manifest,
    tiles_path=snakemake.input.tiles,
    output=snakemake.output.png,
)
