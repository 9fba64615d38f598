"""Tile reading for the model stages and the CTransPath feature stage (tiles -> features H5).

Tiles are re-read from the slide with the geometry recorded in the tiles file, by reader threads
(eagleflow.tilereader) that decode while the model computes; one model load serves every slide
of a batch.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from eagleflow.batches import slides_to_compute, stage_params_sha256, write_manifest
from eagleflow.h5io import FEATURES_FORMAT, read_attrs, read_tiles, write_h5
from eagleflow.provenance import provenance_attrs
from eagleflow.tilereader import SlideTileReader, iter_slide_tiles
from eagleflow.weights import resolve_configured

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
)
FEATURES_SHAPES = {"feats": ("N", 768), "coords": ("N", 2)}


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


def runtime_settings(config: dict[str, Any], stage: str = "features") -> dict[str, Any]:
    """Device, batch size and reader workers of a model stage (they do not change results)."""
    features = config["features"]
    return {
        "device": features["device"],
        "num_workers": features["num_workers"],
        "batch_size": config[stage]["batch_size"],
    }


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available on this node")
    return torch.device(device)


def configure_torch(threads: int, seed: int = 0) -> None:
    """Same threads and seed every run, so CPU outputs are bit-identical between runs."""
    torch.set_num_threads(max(1, threads))
    torch.manual_seed(seed)


def embed_slides(
    model: torch.nn.Module,
    model_name: str,
    slides: Sequence[TileGeometry],
    device: torch.device,
    batch_size: int,
    num_workers: int,
    transpose: bool = False,
    desc: str = "tiles",
) -> Iterator[tuple[int, np.ndarray]]:
    """Run `model` over every tile of every slide; yield (slide index, float32 [N, D]) per slide.

    A slide is yielded as soon as its last tile is embedded, so its file can be written at once.
    """
    from eagleflow.models import autocast_context, preprocess_tiles

    pending: dict[int, list[np.ndarray]] = {}
    counts = {i: len(g.coords) for i, g in enumerate(slides)}
    done = {i: 0 for i in counts}
    for i, n in counts.items():
        if n == 0:
            yield i, np.zeros((0, 0), dtype=np.float32)
    total = sum(counts.values())
    progress = tqdm(total=total, desc=desc, unit="tile", mininterval=2.0)
    batches = iter_tile_batches(
        slides, batch_size, num_workers, transpose, pin_memory=device.type == "cuda"
    )
    with torch.inference_mode():
        for slide_index, _tile_index, tiles in batches:
            x = preprocess_tiles(model_name, tiles, device=device)
            with autocast_context(device):
                features = model(x)
            features = features.float().cpu().numpy()
            for s in np.unique(slide_index):
                rows = slide_index == s
                pending.setdefault(int(s), []).append(features[rows])
                done[int(s)] += int(rows.sum())
                if done[int(s)] == counts[int(s)]:
                    yield int(s), np.concatenate(pending.pop(int(s)))
            progress.update(len(tiles))
    progress.close()


def run_ctranspath_batch(
    slides: Sequence[dict[str, str]],
    model_cfg: dict[str, Any],
    params: dict[str, Any],
    manifest: str,
    threads: int = 1,
) -> None:
    """The `features_ctranspath` rule: for each slide {slide_id, slide_path, tiles, output}."""
    from eagleflow.models import load_model, weights_attrs

    configure_torch(threads)
    info = resolve_configured("ctranspath", model_cfg)
    params_sha256 = stage_params_sha256("features_ctranspath", info.sha256, extractor="ctranspath")
    todo = slides_to_compute(
        slides, "tiles", read_attrs, FEATURES_FORMAT, FEATURES_SHAPES, params_sha256, "features"
    )
    if todo:
        device = resolve_device(params["device"])
        model = load_model("ctranspath", info, device=device)  # info: already hashed and checked
        geometries = [TileGeometry.from_tiles_file(s["tiles"], s["slide_path"]) for s, _ in todo]
        for index, feats in embed_slides(
            model,
            "ctranspath",
            geometries,
            device,
            int(params["batch_size"]),
            int(params["num_workers"]),
            desc="CTransPath",
        ):
            slide, tiles_attrs = todo[index]
            attrs = {
                "format": FEATURES_FORMAT,
                "extractor": "ctranspath",
                "feature_dim": 768,
                "device": str(device),
                "precision": "fp32" if device.type == "cpu" else "bf16 autocast",
                **{key: tiles_attrs[key] for key in GEOMETRY_ATTRS},
                **weights_attrs(info),
                "params_sha256": params_sha256,
                "input_sha256": str(tiles_attrs["content_sha256"]),
                **provenance_attrs("features_ctranspath", params),
            }
            write_h5(
                slide["output"],
                {"feats": feats.reshape(-1, 768), "coords": geometries[index].coords},
                attrs,
            )
            log.info("%s: %d tiles -> %s", slide["slide_id"], len(feats), slide["output"])
    write_manifest(manifest, slides, info.is_demo)
