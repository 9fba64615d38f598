"""Tile reading for the model stages and the tile-encoder stage (tiles -> features H5 per encoder).

Tiles are re-read from the slide with the geometry recorded in the tiles file, by reader threads
(eagleflow.tilereader) that decode while the model computes; one model load serves every slide
of a batch.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from eagleflow.encoders import DEFAULT_STAIN, TILE_ENCODERS
from eagleflow.feature_files import FEATURES_FORMAT, FEATURES_SHAPES, write_tile_features
from eagleflow.h5io import read_tiles, validate_tiles
from eagleflow.model_stage import (
    Models,
    Pending,
    StageOutput,
    run_model_stage,
)
from eagleflow.tilereader import SlideTileReader, iter_slide_tiles

log = logging.getLogger(__name__)

# Attributes of the tiles file that every downstream file repeats, so each stands on its own.
GEOMETRY_ATTRS = (
    "slide_id",
    "slide_path",
    "mpp",
    "mpp_source",
    "coord_unit",
    "coord_order",
    "tile_px",
    "tile_mpp",
    "tile_size_um",
    "tile_size_level0_px",
    "effective_mpp",
    "read_level",
    "read_level_downsample",
    # how the tiles sit on the read level's pixels (eagleflow.tiling placement_attrs)
    "coord_placement",
    "read_level_factor",
    "coords_max_offset_level0_px",
    "coords_max_offset_openslide_level0_px",
)


def features_shapes(dim: int) -> dict[str, tuple[int | str | None, ...]]:
    """The dataset shapes of one encoder's feature files."""
    return {**FEATURES_SHAPES, "feats": ("N", dim), "feats_mean": (dim,)}


@dataclass(frozen=True)
class TileGeometry:
    """Where a slide's tiles are and how to read them (from its tiles file)."""

    slide_id: str
    slide_path: str
    coords: np.ndarray  # (N, 2) int64 level-0 (x, y)
    size_level0: int
    level: int
    downsample: float
    tile_px: int

    @classmethod
    def from_tiles_file(cls, path: str, slide_path: str | None = None) -> TileGeometry:
        coords, attrs = read_tiles(path)
        return cls(
            slide_id=str(attrs["slide_id"]),
            slide_path=slide_path or str(attrs["slide_path"]),
            coords=coords,
            size_level0=int(attrs["tile_size_level0_px"]),
            level=int(attrs["read_level"]),
            downsample=float(attrs["read_level_downsample"]),
            tile_px=int(attrs["tile_px"]),
        )

    def subset(self, indices: np.ndarray) -> TileGeometry:
        return TileGeometry(
            self.slide_id,
            self.slide_path,
            self.coords[indices],
            self.size_level0,
            self.level,
            self.downsample,
            self.tile_px,
        )

    def reader(self) -> SlideTileReader:
        return SlideTileReader(
            self.slide_path,
            self.slide_id,
            self.coords,
            self.size_level0,
            self.level,
            self.downsample,
            self.tile_px,
        )


def iter_tile_batches(
    slides: Sequence[TileGeometry],
    batch_size: int,
    num_workers: int,
    transpose: bool = False,
    pin_memory: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
    """Yield (slide indices, tile indices, uint8 tiles [B, H, W, 3]) in slide order.

    `num_workers` reader threads (0: read in the calling thread) decode ahead of the consumer,
    across slide boundaries; a batch may hold the end of one slide and the start of the next.
    """
    readers = (geometry.reader() for geometry in slides)
    tiles = iter_slide_tiles(readers, num_workers)
    while True:
        chunk = list(itertools.islice(tiles, batch_size))
        if not chunk:
            return
        slide_index, tile_index, pixels = zip(*chunk, strict=True)
        batch = np.stack(pixels)
        if transpose:
            batch = np.ascontiguousarray(batch.transpose(0, 2, 1, 3))
        tensor = torch.from_numpy(batch)
        if pin_memory:
            tensor = tensor.pin_memory()
        yield np.array(slide_index, dtype=np.int64), np.array(tile_index, dtype=np.int64), tensor


def runtime_settings(config: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """Device, batch size and reader workers of a model stage (they do not change results)."""
    features = config["features"]
    return {
        "device": features["device"],
        "num_workers": features["num_workers"],
        "batch_size": batch_size,
    }


def embed_slides(
    model: torch.nn.Module,
    model_name: str,
    slides: Sequence[TileGeometry],
    device: torch.device,
    batch_size: int,
    num_workers: int,
    transpose: bool = False,
    desc: str = "tiles",
) -> Iterator[tuple[int, np.ndarray, float]]:
    """Run `model` over every tile of every slide; yield (slide index, float32 [N, D], seconds).

    A slide is yielded as soon as its last tile is embedded, so its file can be written at once.
    Seconds are the model's time (preprocessing, forward, copy back) on that slide's tiles: a
    batch shared by two slides is split by tile count. Reading overlaps and is not counted.
    """
    from eagleflow.models.loading import autocast_context
    from eagleflow.models.preprocess import preprocess_tiles

    pending: dict[int, list[np.ndarray]] = {}
    counts = {i: len(g.coords) for i, g in enumerate(slides)}
    done = dict.fromkeys(counts, 0)
    seconds = dict.fromkeys(counts, 0.0)
    for i, n in counts.items():
        if n == 0:
            yield i, np.zeros((0, 0), dtype=np.float32), 0.0
    progress = tqdm(total=sum(counts.values()), desc=desc, unit="tile", mininterval=2.0)
    batches = iter_tile_batches(
        slides, batch_size, num_workers, transpose, pin_memory=device.type == "cuda"
    )
    with torch.inference_mode():
        for slide_index, _tile_index, tiles in batches:
            started = time.perf_counter()
            x = preprocess_tiles(model_name, tiles, device=device)
            with autocast_context(device):
                features = model(x)
            features = features.float().cpu().numpy()
            per_tile = (time.perf_counter() - started) / len(tiles)
            for s in np.unique(slide_index).tolist():
                rows = slide_index == s
                pending.setdefault(s, []).append(features[rows])
                done[s] += int(rows.sum())
                seconds[s] += per_tile * int(rows.sum())
                if done[s] == counts[s]:
                    yield s, np.concatenate(pending.pop(s)), seconds[s]
            progress.update(len(tiles))
    progress.close()


def warn_untrained_stains(encoder: str, slides: Sequence[Pending]) -> None:
    """An encoder trained on H&E only says so when it embeds IHC slides."""
    trained = TILE_ENCODERS[encoder].trained_stains
    for p in slides:
        stain = p.slide.get("stain", DEFAULT_STAIN)
        if stain not in trained:
            log.warning(
                "%s: a %s slide embedded by %s, which was trained on %s slides only",
                p.slide["slide_id"],
                stain,
                encoder,
                " and ".join(trained),
            )


def run_tile_encoder_batch(
    encoder: str,
    slides: Sequence[dict[str, Any]],
    models_cfg: Mapping[str, Mapping[str, Any]],
    params: dict[str, Any],
    manifest: str,
    threads: int = 1,
) -> None:
    """The `features_encode_tiles` rule for one encoder: every tile of every slide of a batch.

    slides: {slide_id, slide_path, tiles, output, stain}. A slide's model is the encoder's for
    its stain (PathoDuet: the H&E or the IHC checkpoint); each model streams its slides once.
    """
    spec = TILE_ENCODERS[encoder]

    def compute(todo: list[Pending], models: Models):
        warn_untrained_stains(encoder, todo)
        for model_name in dict.fromkeys(p.model for p in todo):
            group = [p for p in todo if p.model == model_name]
            geometries = [
                TileGeometry.from_tiles_file(p.slide["tiles"], p.slide["slide_path"]) for p in group
            ]
            for index, feats, seconds in embed_slides(
                models[model_name],
                model_name,
                geometries,
                models.device,
                int(params["batch_size"]),
                int(params["num_workers"]),
                desc=encoder,
            ):
                p = group[index]
                attrs = {
                    **{key: p.input_attrs[key] for key in GEOMETRY_ATTRS},
                    "stain": p.slide.get("stain", DEFAULT_STAIN),
                    "tile_forwards": len(feats),
                    "compute_seconds": seconds,
                }
                datasets = {
                    "feats": feats.reshape(-1, spec.dim),
                    "coords": geometries[index].coords,
                }
                yield p, datasets, attrs

    def write(path: str, data: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        write_tile_features(
            path,
            data["feats"],
            data["coords"],
            mpp=float(attrs["mpp"]),
            tile_size_px=int(attrs["tile_px"]),
            tile_size_um=float(attrs["tile_size_um"]),
            encoder=encoder,
            attrs=attrs,
        )

    run_model_stage(
        "features_encode_tiles",
        slides,
        input_key="tiles",
        read_input=validate_tiles,
        model_of=lambda slide: spec.model_for(slide.get("stain", DEFAULT_STAIN)),
        models_cfg=models_cfg,
        settings={"encoder": encoder},
        output=StageOutput(FEATURES_FORMAT, features_shapes(spec.dim), write),
        compute=compute,
        manifest=manifest,
        device=params["device"],
        threads=threads,
        what=f"{encoder} features",
    )
