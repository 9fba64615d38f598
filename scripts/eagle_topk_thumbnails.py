"""Rule eagle_topk_thumbnails: per slide of a batch, its top-k tiles boxed and ranked."""

from eagleflow.logutil import run_rule
from eagleflow.thumbnails import write_topk_figures

run_rule(
    snakemake.log[0],
    write_topk_figures,
    slides=snakemake.params.slides,
    manifest=snakemake.input.manifest,
    output_dir=snakemake.output.pngs,
)
