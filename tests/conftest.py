"""Shared fixtures: tiny pyramidal TIFFs written on the fly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from eagleflow.demo import write_pyramid_tiff

REPO = Path(__file__).resolve().parents[1]


def shrink(image: np.ndarray, factor: int) -> np.ndarray:
    """`image` at 1/`factor` of its size (pixel-area averaging), as a pyramid level."""
    if factor == 1:
        return image
    size = (image.shape[1] // factor, image.shape[0] // factor)
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def write_pyramid(
    path: Path,
    image: np.ndarray,
    mpp: float | None,
    downsamples: tuple[int, ...] = (1, 4, 16),
) -> Path:
    """A tiled JPEG generic TIFF (the demo's writer); MPP (if given) in the resolution tags."""
    write_pyramid_tiff(path, image, mpp, "generic-tiff", downsamples=list(downsamples))
    return path


def tissue_image(width: int, height: int, seed: int = 0, margin: int = 3) -> np.ndarray:
    """White background with one textured pink-purple block (the middle third by default)."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 245, dtype=np.uint8)
    y0, y1 = height // margin, height - height // margin
    x0, x1 = width // margin, width - width // margin
    # blocky noise ~ 8 level-0 px per cell, so texture survives the 4x downsampling to 2 µm/px
    cells = rng.integers(0, 90, size=((y1 - y0) // 8 + 1, (x1 - x0) // 8 + 1), dtype=np.uint8)
    noise = np.repeat(np.repeat(cells, 8, axis=0), 8, axis=1)[: y1 - y0, : x1 - x0, None]
    block = np.array([200, 120, 190]) - noise * np.array([0.6, 1.0, 0.5])
    image[y0:y1, x0:x1] = block.clip(0, 255).astype(np.uint8)
    return image


@pytest.fixture
def make_slide(tmp_path: Path) -> Callable[..., Path]:
    def make(
        name: str = "s.tif",
        width: int = 4096,
        height: int = 3072,
        mpp: float | None = 0.5,
        downsamples: tuple[int, ...] = (1, 4, 16),
        image: np.ndarray | None = None,
    ) -> Path:
        pixels = tissue_image(width, height) if image is None else image
        return write_pyramid(tmp_path / name, pixels, mpp, downsamples)

    return make


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory with the generated demo cohort and a config pointing at it."""
    from workflow_helpers import FAST_CONFIG, make_demo_workdir

    work = make_demo_workdir(tmp_path_factory.mktemp("workflow"))
    (work / "config" / "top3.yaml").write_text(FAST_CONFIG.replace("top_k: 2", "top_k: 3"))
    (work / "config" / "canny.yaml").write_text("tiling:\n  canny_low: 30\n")
    return work


@pytest.fixture(scope="session")
def finished_demo(demo_dir: Path) -> Path:
    """The demo working directory after a complete run of the workflow (fast settings)."""
    from workflow_helpers import FAST, SNAKEMAKE, run

    run([*SNAKEMAKE, "--cores", "2", "--directory", str(demo_dir), *FAST], cwd=demo_dir)
    return demo_dir
