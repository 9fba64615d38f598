"""Cohort tables of slide and patient embeddings: every configured embedding, plus what each cost.

Per embedding kind (eagleflow.encoders.EmbeddingSpec):
- eagle (encoder, k): mean (or softmax-weighted mean) of the k tiles with the highest raw CHIEF
  score; a patient's k are the best over all its slides' tiles;
- chief: CHIEF's attention pooling; a patient's softmax runs over all its tiles (the slides'
  softmaxes merged exactly through their log-sum-exp);
- meanpool_<encoder>: mean of every tile's embedding; a patient's is tile-count weighted;
- slide_encoder: the slide encoder's embedding of a bag (a patient's slides of one stain in one
  pass, or one slide); a patient's over several bags is their tile-count weighted mean.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from eagleflow.batches import read_manifest
from eagleflow.eagle import aggregate, softmax
from eagleflow.encoders import DEFAULT_STAIN, SELECTION_ENCODER, EmbeddingSpec
from eagleflow.feature_files import read_feats_mean, read_tile_features
from eagleflow.h5io import (
    COMPUTE_COLUMNS,
    EMBEDDINGS_FORMAT,
    FormatError,
    read_h5,
    write_csv,
    write_h5,
)
from eagleflow.provenance import provenance_attrs

log = logging.getLogger(__name__)


@dataclass
class SlideRecord:
    """What the per-slide files hold for one slide, for every embedding."""

    slide_id: str
    patient: str
    cohort: str
    stain: str
    chief: dict[str, np.ndarray] = field(default_factory=dict)  # CHIEF instance -> embedding
    logsumexp: dict[str, float] = field(default_factory=dict)  # CHIEF instance -> its attention's
    n_tiles: int = 0  # tiles of the first selection grid (CTransPath, CHIEF, EAGLE)
    means: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)  # encoder -> (mean, n)
    topk: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # encoder -> datasets
    cost: dict[str, tuple[float, float]] = field(default_factory=dict)  # stage -> (forwards, s)
    demo: dict[str, set[str]] = field(default_factory=dict)  # stage -> models with demo weights
    grids: dict[str, tuple[int, float]] = field(default_factory=dict)  # features:<enc> -> px, mpp
    # (features instance, CHIEF instance) -> CHIEF-softmax-weighted mean of every tile's features
    all_tiles: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)

    def demo_models(self) -> set[str]:
        return set().union(*self.demo.values())


def demo_models(attrs: Mapping[str, Any]) -> set[str]:
    """Models a file (or its inputs) ran with demo weights."""
    return {
        key.removesuffix("_weights_demo")
        for key, value in attrs.items()
        if key.endswith("_weights_demo") and value == "true"
    }


def tile_grid(attrs: Mapping[str, Any]) -> tuple[int, float]:
    """(tile px, tile µm/px) a features file was read at, from its attributes (NaN if absent)."""
    try:
        px = int(attrs.get("tile_px", attrs["tile_size_px"]))
        mpp = float(attrs.get("tile_mpp", float(attrs["tile_size_um"]) / px))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 0, float("nan")
    # tile_size_um / px of 1.14 µm/px is 1.1400000000000001: keep the configured figure
    return px, float(f"{mpp:.6g}")


def _merge_manifests(manifests: Sequence[str]) -> dict[str, str]:
    return {k: v for m in manifests for k, v in read_manifest(m).items()}


def load_slide_records(
    slides: Sequence[Mapping[str, str]],
    attention: Mapping[str, Sequence[str]] | Sequence[str],
    features: Mapping[str, Sequence[str]],
    topk: Mapping[str, Sequence[str]],
    all_tiles: Sequence[tuple[str, str]] = (),
) -> dict[str, SlideRecord]:
    """Read every slide's per-slide files (only the small datasets of the feature files, but
    the whole features of the (features instance, CHIEF instance) pairs in `all_tiles`).

    `attention`: CHIEF instance (`chief`, `chief@0.5mpp`) -> its manifests; a plain list is
    `chief`'s.
    """
    if not isinstance(attention, Mapping):
        attention = {"chief": attention}
    attention_files = {name: _merge_manifests(m) for name, m in attention.items()}
    feature_files = {enc: _merge_manifests(m) for enc, m in features.items()}
    topk_files = {enc: _merge_manifests(m) for enc, m in topk.items()}
    records = {}
    for slide in sorted(slides, key=lambda s: s["slide_id"]):
        sid = slide["slide_id"]
        record = SlideRecord(
            sid, slide["patient"], slide["cohort"], slide.get("stain", DEFAULT_STAIN)
        )
        raw_scores = {}
        for name, files in attention_files.items():
            data, attrs = read_h5(files[sid])
            raw_scores[name] = data["attention_raw"]
            record.chief[name] = data["chief_embedding"]
            record.logsumexp[name] = float(attrs["attention_logsumexp"])
            if name == "chief" or not record.n_tiles:
                record.n_tiles = int(attrs["n_tiles"])
            record.cost[name] = (0.0, float(attrs.get("compute_seconds", 0.0)))
            record.demo[name] = demo_models(attrs)
        for encoder, files in feature_files.items():
            mean, n, attrs = read_feats_mean(files[sid])
            record.means[encoder] = (mean, n)
            record.cost[f"features:{encoder}"] = (
                float(attrs.get("tile_forwards", n)),
                float(attrs.get("compute_seconds", 0.0)),
            )
            record.demo[f"features:{encoder}"] = demo_models(attrs)
            record.grids[f"features:{encoder}"] = tile_grid(attrs)
        for encoder, files in topk_files.items():
            data, attrs = read_h5(files[sid])
            record.topk[encoder] = data
            record.cost[f"topk:{encoder}"] = (
                float(attrs.get("tile_forwards", len(data["tile_index"]))),
                float(attrs.get("compute_seconds", 0.0)),
            )
            record.demo[f"topk:{encoder}"] = demo_models(attrs)
        for features_key, attention_key in all_tiles:
            record.all_tiles[features_key, attention_key] = all_tiles_embedding(
                feature_files[features_key][sid], raw_scores[attention_key]
            )
        records[sid] = record
    return records


def load_bags(manifests: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Slide-encoder bag id -> {embedding, n_tiles, seconds, demo, slides} from its files."""
    bags = {}
    for bag, path in _merge_manifests(manifests).items():
        data, attrs = read_h5(path)
        bags[bag] = {
            "embedding": data["embedding"],
            "n_tiles": int(attrs["n_tiles"]),
            "seconds": float(attrs.get("compute_seconds", 0.0)),
            "demo": demo_models(attrs),
            "slides": [s.decode() for s in data["slide_order"]],
        }
    return bags


def eagle_embedding(
    records: Sequence[SlideRecord], encoder: str, k: int, aggregation: str
) -> np.ndarray:
    """EAGLE over the tiles of `records` (one slide, or a patient's slides) at this k.

    Ties: higher raw score first, then the slide id, then the tile's row in the tiles file.
    """
    records = sorted(records, key=lambda r: r.slide_id)
    tops = [r.topk[encoder] for r in records]
    scores = np.concatenate([t["attention_raw"] for t in tops])
    slide_rank = np.concatenate([np.full(len(t["attention_raw"]), i) for i, t in enumerate(tops)])
    tile_index = np.concatenate([t["tile_index"] for t in tops])
    embeddings = np.concatenate([t["tile_embeddings"] for t in tops])
    order = np.lexsort((tile_index, slide_rank, -scores.astype(np.float64)))[:k]
    mean, weighted = aggregate(embeddings[order], scores[order])
    return mean if aggregation == "mean" else weighted


def all_tiles_embedding(features_path: str, attention_raw: np.ndarray) -> np.ndarray:
    """softmax(CHIEF's raw scores) · every tile's features: EAGLE's `all` ablation, one slide.

    The features were read from the same tiles file CHIEF's input was, so rows pair up; the
    row count is checked.
    """
    feats, _coords, _attrs = read_tile_features(features_path)
    if len(feats) != len(attention_raw):
        raise FormatError(
            f"{features_path}: {len(feats)} tiles, but CHIEF scored {len(attention_raw)}: "
            "not the same tiles file"
        )
    weights = softmax(np.asarray(attention_raw, dtype=np.float64))
    return (weights[:, None] * feats.astype(np.float64)).sum(0).astype(np.float32)


def chief_pooled(vectors: Sequence[np.ndarray], logsumexps: Sequence[float]) -> np.ndarray:
    """Slides' attention-pooled vectors as one softmax over all their tiles: each slide
    weighted by its softmax mass (exp of its log-sum-exp)."""
    weight = softmax(np.array(logsumexps, dtype=np.float64))
    stacked = np.stack(vectors).astype(np.float64)
    return (weight[:, None] * stacked).sum(0).astype(np.float32)


def chief_embedding(records: Sequence[SlideRecord], key: str = "chief") -> np.ndarray:
    """CHIEF's pooling over all tiles of the records: each slide weighted by its softmax mass."""
    return chief_pooled([r.chief[key] for r in records], [r.logsumexp[key] for r in records])


def weighted_mean(vectors: Sequence[np.ndarray], counts: Sequence[int]) -> np.ndarray:
    weights = np.asarray(counts, dtype=np.float64)
    stacked = np.stack(vectors).astype(np.float64)
    return ((weights[:, None] * stacked).sum(0) / weights.sum()).astype(np.float32)


def bag_of(record: SlideRecord, fusion: str) -> str:
    """The slide-encoder bag of a slide: the slide itself (late fusion), or its patient's
    slides of its stain (early fusion)."""
    return record.slide_id if fusion == "late" else f"{record.patient}.{record.stain}"


def embed_group(
    records: Sequence[SlideRecord],
    spec: EmbeddingSpec,
    aggregation: str,
    bags: Mapping[str, Mapping[str, Mapping[str, Any]]],
    fusion: Mapping[str, str],
) -> np.ndarray:
    """One embedding of a group of slides (a slide, or a patient's slides).

    A slide encoder's bags are `bags[encoder]`; with late fusion the group's embedding is the
    plain mean of its slides' embeddings (Patho-Bench), with early fusion the bag of its
    patient's slides of one stain (bags of several stains: their tile-weighted mean).
    """
    if spec.kind == "eagle":
        return eagle_embedding(records, spec.stage_key, int(spec.top_k or 0), aggregation)
    if spec.kind == "chief":
        return chief_embedding(records, spec.attention_key)
    if spec.kind == "eagle_all":
        key = (spec.features_key, spec.attention_key)
        return chief_pooled(
            [r.all_tiles[key] for r in records], [r.logsumexp[spec.attention_key] for r in records]
        )
    if spec.kind == "meanpool":
        means = [r.means[spec.features_key] for r in records]
        return weighted_mean([m for m, _ in means], [n for _, n in means])
    own, how = bags[spec.stage_key], fusion[spec.stage_key]
    members = list(dict.fromkeys(bag_of(r, how) for r in records))
    weights = [1 if how == "late" else own[b]["n_tiles"] for b in members]
    return weighted_mean([own[b]["embedding"] for b in members], weights)


def stages_of(spec: EmbeddingSpec) -> list[str]:
    """The per-slide stages an embedding needs (keys of SlideRecord.cost)."""
    selection = [f"features:{SELECTION_ENCODER}{spec.grid}", spec.attention_key]
    if spec.kind == "eagle_all":
        return [f"features:{spec.features_key}", *selection]
    if spec.kind == "eagle":
        return [*selection, f"topk:{spec.stage_key}"]
    if spec.kind == "chief":
        return selection
    return [f"features:{spec.features_key}"]


def compute_row(
    spec: EmbeddingSpec,
    records: Sequence[SlideRecord],
    bags: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """Tile forwards, slide-level forwards and model seconds per slide of one embedding.

    An EAGLE variant is costed as if run alone: CTransPath on every tile, CHIEF, and its k
    second-stage forwards (its share of the largest-k run). Tiling is common to all embeddings
    and not counted.
    """
    forwards = seconds = slide_forwards = 0.0
    demo: set[str] = set()
    # the grid its tiles were read at: its first tile-encoder stage (EAGLE, CHIEF: the selection's)
    grid_stage = next(s for s in stages_of(spec) if s.startswith("features:"))
    grids = list(dict.fromkeys(r.grids[grid_stage] for r in records if grid_stage in r.grids))
    if len(grids) > 1:
        log.warning(
            "%s: slides read at different grids %s; compute.csv lists the first", spec.name, grids
        )
    tile_px, tile_mpp = grids[0] if grids else (0, float("nan"))
    for r in records:
        for stage in stages_of(spec):
            f, s = r.cost[stage]
            if stage.startswith("topk:"):
                used = min(int(spec.top_k or 0), len(r.topk[spec.stage_key]["tile_index"]))
                f, s = used, s * used / f if f else 0.0
            forwards, seconds = forwards + f, seconds + s
            demo |= r.demo[stage]
        slide_forwards += 1 if spec.kind in ("eagle", "eagle_all", "chief") else 0
    if spec.kind == "slide_encoder":
        slide_ids = {r.slide_id for r in records}
        used_bags = [b for b in bags.values() if slide_ids & set(b["slides"])]
        seconds += sum(b["seconds"] for b in used_bags)
        slide_forwards = float(len(used_bags))
        demo = demo.union(*(b["demo"] for b in used_bags))
    n = max(len(records), 1)
    return {
        "embedding": spec.name,
        "base": spec.base,
        "kind": spec.kind,
        "description": spec.description,
        "tile_px": tile_px or None,
        "tile_mpp": tile_mpp,
        "tile_forwards_per_slide": forwards / n,
        "slide_forwards_per_slide": slide_forwards / n,
        "seconds_per_slide": seconds / n,
        "demo_weights": ",".join(sorted(demo)) or "none",
    }


def _table(
    groups: Mapping[str, Sequence[SlideRecord]],
    specs: Sequence[EmbeddingSpec],
    aggregation: str,
    bags: Mapping[str, Mapping[str, Mapping[str, Any]]],
    fusion: Mapping[str, str],
) -> dict[str, np.ndarray]:
    return {
        spec.name: np.stack(
            [embed_group(members, spec, aggregation, bags, fusion) for members in groups.values()]
        )
        for spec in specs
    }


def build_cohort_embeddings(
    slides: Sequence[dict[str, str]],
    embeddings: Sequence[Mapping[str, Any]],
    attention_manifests: Mapping[str, Sequence[str]] | Sequence[str],
    feature_manifests: Mapping[str, Sequence[str]],
    topk_manifests: Mapping[str, Sequence[str]],
    slide_encoder_manifests: Mapping[str, Sequence[str]],
    params: dict[str, Any],
    slides_h5: str,
    patients_h5: str,
    compute_csv: str,
    stain_tables: Mapping[str, str] | None = None,
) -> None:
    """The `embeddings_collect` rule: slides = [{slide_id, patient, cohort, stain}] from the sheet.

    embeddings: the configured EmbeddingSpecs as dicts (report order); stain_tables: stain ->
    path of a patient table built from that stain's slides only (tasks with `stain:`).
    """
    specs = [EmbeddingSpec(**e) for e in embeddings]
    aggregation = params["aggregation"]
    all_tiles = [(s.features_key, s.attention_key) for s in specs if s.kind == "eagle_all"]
    records = load_slide_records(
        slides, attention_manifests, feature_manifests, topk_manifests, all_tiles
    )
    fusion = params.get("slide_encoder_fusion", {})
    bags = {name: load_bags(m) for name, m in slide_encoder_manifests.items()}
    all_bags = {(name, b): v for name, per in bags.items() for b, v in per.items()}
    demo = sorted(
        set().union(
            *(r.demo_models() for r in records.values()), *(b["demo"] for b in all_bags.values())
        )
    )
    if demo:
        log.warning("embeddings made with random DEMO weights of %s: not results", ", ".join(demo))
    common = {
        "format": EMBEDDINGS_FORMAT,
        "eagle_aggregation": aggregation,
        "embeddings": [s.name for s in specs],
        "demo_weights": ",".join(demo) if demo else "none",
        "weights_demo": "true" if demo else "false",
        **provenance_attrs("embeddings_collect", params),
    }
    ordered = list(records.values())
    # slide-level table: slide-encoder embeddings only where a bag is one slide
    slide_specs = [s for s in specs if s.kind != "slide_encoder" or fusion.get(s.name) == "late"]
    slide_data: dict[str, np.ndarray] = {
        "slide": np.array([r.slide_id for r in ordered], dtype="S"),
        "patient": np.array([r.patient for r in ordered], dtype="S"),
        "cohort": np.array([r.cohort for r in ordered], dtype="S"),
        "stain": np.array([r.stain for r in ordered], dtype="S"),
        **_table({r.slide_id: [r] for r in ordered}, slide_specs, aggregation, bags, fusion),
        "n_tiles": np.array([r.n_tiles for r in ordered], dtype=np.int64),
    }
    write_h5(slides_h5, slide_data, {**common, "level": "slide"})
    tables = {None: patients_h5, **(stain_tables or {})}
    for stain, path in tables.items():
        chosen = [r for r in ordered if stain is None or r.stain == stain]
        groups: dict[str, list[SlideRecord]] = {}
        for r in chosen:
            groups.setdefault(r.patient, []).append(r)
        groups = dict(sorted(groups.items()))
        cohort_of = {r.patient: r.cohort for r in chosen}
        patient_data: dict[str, np.ndarray] = {
            "patient": np.array(list(groups), dtype="S"),
            "cohort": np.array([cohort_of[p] for p in groups], dtype="S"),
            **_table(groups, specs, aggregation, bags, fusion),
            "n_slides": np.array([len(m) for m in groups.values()], dtype=np.int64),
        }
        write_h5(path, patient_data, {**common, "level": "patient", "stain": stain or "all"})
    compute = pd.DataFrame(
        [compute_row(spec, ordered, bags.get(spec.stage_key, {})) for spec in specs],
        columns=COMPUTE_COLUMNS,
    )
    write_csv(compute, compute_csv)
    log.info(
        "%d slides, %d embeddings -> %s, %s, %s",
        len(ordered),
        len(specs),
        slides_h5,
        patients_h5,
        compute_csv,
    )
