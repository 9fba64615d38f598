"""Rule features_encode_tiles: one batch of slides -> one tile encoder's features H5 per slide."""

from eagleflow.encoders import instance_base
from eagleflow.features import run_tile_encoder_batch, runtime_settings
from eagleflow.logutil import run_rule

encoder = instance_base(snakemake.wildcards.encoder)  # ctranspath@0.5mpp -> ctranspath
settings = snakemake.config["tile_encoders"][encoder] or {}
run_rule(
    snakemake.log[0],
    run_tile_encoder_batch,
    encoder=encoder,
    slides=snakemake.params.slides,
    models_cfg=dict(snakemake.params.models),
    # Runtime-only settings come from the config directly, not params: switching CPU/GPU or the
    # batch size must not plan the stage again (finished slides would be kept anyway).
    params=runtime_settings(
        snakemake.config,
        settings.get("batch_size", snakemake.config["features"]["batch_size"]),
    ),
    manifest=snakemake.output.manifest,
    threads=snakemake.threads,
)
