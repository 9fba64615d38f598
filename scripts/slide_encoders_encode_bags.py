"""Rule slide_encoders_encode_bags: bags of slides (patients or slides) -> one slide encoder's
embedding H5 per bag + manifest."""

from eagleflow.encoders import instance_base
from eagleflow.logutil import run_rule
from eagleflow.slide_encoding import run_slide_encoder_batch

run_rule(
    snakemake.log[0],
    run_slide_encoder_batch,
    bags=snakemake.params.bags,
    encoder=instance_base(snakemake.wildcards.slide_encoder),  # titan@0.5mpp -> titan
    model_cfg=dict(snakemake.params.model),
    params={**snakemake.params.slide_encoder, "device": snakemake.config["features"]["device"]},
    manifest=snakemake.output.manifest,
    threads=snakemake.threads,
)
