"""Builders for the hostile-input tests: a small mixed cohort and a huge, almost empty slide."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
import yaml
from conftest import REPO, shrink, tissue_image, write_pyramid
from workflow_helpers import FAST, FAST_CONFIG, SNAKEMAKE

# Bad slides of the workflow test: hostile file name -> (slide id, what its log must say).
BAD_SLIDES = {
    "empty": ("BAD-empty", "file is empty (0 bytes). Re-copy the slide from its source."),
    "truncated": ("BAD-truncated", "it is a TIFF truncated at"),
    "no_mpp": ("BAD-no_mpp", "no MPP (microns per pixel)"),
    "corrupt_tiles": ("BAD-corrupt", "the slide's image data is corrupt or truncated"),
}
GOOD_SLIDES = ("GOOD-1", "GOOD-2", "GOOD-3")
VANISH = "GOOD-vanish"  # a valid slide whose file the workflow test deletes mid-run


def make_hostile_workdir(work: Path) -> Path:
    """A working directory: 4 good small slides, 4 bad ones, both sheets and a fast config."""
    from eagleflow.demo import make_hostile_slides

    hostile = make_hostile_slides(work / "resources", seed=0)
    slides_dir = work / "resources" / "slides"
    slides_dir.mkdir(parents=True)
    rows = []
    for i, slide in enumerate(GOOD_SLIDES):
        path = write_pyramid(slides_dir / f"{slide}.tif", tissue_image(3072, 2048, seed=i), 0.5)
        rows.append(f"P{i},{slide},{path.relative_to(work / 'resources')}")
    path = write_pyramid(slides_dir / f"{VANISH}.tif", tissue_image(3072, 2048, seed=9), 0.5)
    rows.append(f"P0,{VANISH},{path.relative_to(work / 'resources')}")
    for name, (slide, _) in BAD_SLIDES.items():
        rows.append(f"PBAD,{slide},{hostile[name].relative_to(work / 'resources')}")
    (work / "resources" / "slides.csv").write_text("PATIENT,SLIDE,PATH\n" + "\n".join(rows) + "\n")
    patients = [f"P{i}" for i in range(len(GOOD_SLIDES))] + ["PBAD"]
    (work / "resources" / "clinical.csv").write_text(
        "PATIENT,SUBTYPE\n" + "".join(f"{p},{'AB'[i % 2]}\n" for i, p in enumerate(patients))
    )
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["slide_sheet"] = "resources/slides.csv"
    config["clinical_table"] = "resources/clinical.csv"
    config["tasks"] = {}  # no label tasks: this cohort is about slides, not heads
    (work / "config").mkdir()
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (work / "config" / "fast.yaml").write_text(FAST_CONFIG.replace("n_batches: 2", "n_batches: 1"))
    return work


def tiling_args(work: Path) -> list[str]:
    """Snakemake arguments that tile the slides of `work` (append --cores or -n)."""
    return [*SNAKEMAKE, "--directory", str(work), *FAST, "--until", "tiling_tile_slide"]


def make_tiling_workdir(work: Path, slides: dict[str, Path | str]) -> list[str]:
    """A working directory for `slides` (id -> PATH as the sheet gives it, one patient each);
    returns its tiling_args."""
    (work / "config").mkdir(parents=True)
    rows = "".join(f"P{i},{slide},{path}\n" for i, (slide, path) in enumerate(slides.items()))
    (work / "slides.csv").write_text("PATIENT,SLIDE,PATH\n" + rows)
    clinical = "".join(f"P{i},{'AB'[i % 2]}\n" for i in range(len(slides)))
    (work / "clinical.csv").write_text("PATIENT,SUBTYPE\n" + clinical)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(slide_sheet="slides.csv", clinical_table="clinical.csv", tasks={})
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (work / "config" / "fast.yaml").write_text("features:\n  n_batches: 1\n")
    return tiling_args(work)


def _sparse_tiles(
    width: int, height: int, factor: int, patch: np.ndarray, origin: tuple[int, int], tile: int
) -> Iterator[np.ndarray | None]:
    """Row-major tiles of one pyramid level; None (stored as an empty tile) away from the patch."""
    small = shrink(patch, factor)
    px, py = origin[0] // factor, origin[1] // factor
    ph, pw = small.shape[:2]
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            outside = tx + tile <= px or tx >= px + pw or ty + tile <= py or ty >= py + ph
            if outside and (tx, ty) != (0, 0):  # tifffile needs a real first tile for its dtype
                yield None
                continue
            out = np.full((tile, tile, 3), 245, dtype=np.uint8)
            x0, y0, x1, y1 = (
                max(tx, px),
                max(ty, py),
                min(tx + tile, px + pw),
                min(ty + tile, py + ph),
            )
            if x1 > x0 and y1 > y0:
                out[y0 - ty : y1 - ty, x0 - tx : x1 - tx] = small[
                    y0 - py : y1 - py, x0 - px : x1 - px
                ]
            yield out


def write_sparse_slide(
    path: Path,
    width: int,
    height: int,
    mpp: float,
    downsamples: tuple[int, ...] = (1, 4, 16),
    patch_side: int = 4096,
    tile: int = 256,
) -> Path:
    """A huge tiled BigTIFF that is empty (zero-length tiles) except for one tissue patch.

    Written tile by tile from an iterator, so the full image never exists in memory.
    """
    patch = tissue_image(patch_side, patch_side, margin=8)
    origin = (width // 2, height // 2)
    with tifffile.TiffWriter(path, bigtiff=True) as tiff:
        for i, factor in enumerate(downsamples):
            w, h = width // factor, height // factor
            tiff.write(
                _sparse_tiles(w, h, factor, patch, origin, tile),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                compression="jpeg",
                photometric="rgb",
                subfiletype=0 if i == 0 else 1,
                resolution=(1e4 / (mpp * factor),) * 2,
                resolutionunit="CENTIMETER",
            )
    return path
