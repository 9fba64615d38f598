"""Rule embeddings_collect: per-slide files -> cohort tables of every configured embedding."""

from eagleflow.embeddings import build_cohort_embeddings
from eagleflow.logutil import run_rule


def by_folder(paths: list[str], position: int) -> dict[str, list[str]]:
    """Manifests grouped by the path component that names their encoder."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        groups.setdefault(path.split("/")[position], []).append(path)
    return groups


run_rule(
    snakemake.log[0],
    build_cohort_embeddings,
    slides=snakemake.params.slides,
    embeddings=snakemake.params.embeddings,
    attention_manifests=by_folder(list(snakemake.input.attention), 2),
    feature_manifests=by_folder(list(snakemake.input.features), 2),
    topk_manifests=by_folder(list(snakemake.input.topk), 2),
    slide_encoder_manifests=by_folder(list(snakemake.input.slide_encoders), 2),
    params=dict(snakemake.params.eagle),
    slides_h5=snakemake.output.slides,
    patients_h5=snakemake.output.patients,
    compute_csv=snakemake.output.compute,
    stain_tables=dict(snakemake.params.stain_tables),
)
