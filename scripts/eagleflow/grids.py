"""A tiling grid: square tiles of a size in pixels at a resolution in µm/px. No imports beyond the
standard library, so the tiling stage does not depend on the encoder and model modules."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Grid:
    """A tiling: square tiles of `tile_px` pixels at `tile_mpp` µm/px."""

    tile_px: int
    tile_mpp: float

    @property
    def name(self) -> str:
        """The grid's folder name, e.g. 224px_2mpp or 256px_0.5mpp."""
        return f"{self.tile_px}px_{self.tile_mpp:g}mpp"

    @classmethod
    def from_name(cls, name: str) -> Grid:
        """The grid a folder name says (`224px_2mpp` -> Grid(224, 2.0))."""
        found = re.fullmatch(r"(\d+)px_(\d+(?:\.\d+)?(?:e-?\d+)?)mpp", name)
        if found is None:
            raise ValueError(f"{name!r} is not a grid name like 224px_2mpp")
        return cls(int(found.group(1)), float(found.group(2)))

    @property
    def tile_size_um(self) -> float:
        return self.tile_px * self.tile_mpp
