"""Tile preprocessing per model: uint8 RGB tiles -> the normalized float tensor the model expects.

Each tile encoder's card states its resize, crop, interpolation and mean/std: a timm model built
from a bare architecture name carries ImageNet-augreg defaults (0.5/0.5), not the values these
models were trained with.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from eagleflow.models.card import ImagePreprocess
from eagleflow.models.catalog import catalog

INTERPOLATION = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


def preprocess_spec(name: str) -> ImagePreprocess:
    """The preprocessing of image model `name`, from its card."""
    card = catalog().card(name)
    if card.tile_role is None:
        raise ValueError(
            f"no image preprocessing for {name!r}: it takes tile features, not images "
            f"(image models: {', '.join(n for n, c in catalog().cards.items() if c.tile_role)})"
        )
    return card.tile_role.preprocess


def as_uint8_nchw(tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB tiles [B, H, W, 3] (or one [H, W, 3]), numpy or torch -> uint8 [B, 3, H, W]."""
    if isinstance(tiles, np.ndarray):
        tiles = torch.from_numpy(np.ascontiguousarray(tiles))
    if not isinstance(tiles, torch.Tensor):
        raise TypeError(f"expected a numpy array or torch tensor, got {type(tiles).__name__}")
    if tiles.dtype != torch.uint8:
        raise TypeError(f"expected uint8 RGB tiles, got dtype {tiles.dtype}")
    if tiles.ndim == 3:
        tiles = tiles.unsqueeze(0)
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"expected tiles [B, H, W, 3], got {tuple(tiles.shape)}")
    return tiles.permute(0, 3, 1, 2)


def preprocess_tiles(
    name: str, tiles: np.ndarray | torch.Tensor, device: torch.device | str | None = None
) -> torch.Tensor:
    """uint8 RGB tiles [B, H, W, 3] -> normalized float32 [B, 3, crop, crop] on `device`.

    Resizing runs on uint8 with antialiasing, as torchvision does on the PIL images of the
    reference pipelines; tiles already at the model's size are only normalized.
    """
    spec = preprocess_spec(name)
    x = as_uint8_nchw(tiles)
    if device is not None:
        x = x.to(device, non_blocking=True)  # move uint8, 4x less traffic than float
    if min(x.shape[-2:]) != spec.resize:
        x = TF.resize(
            x, [spec.resize], interpolation=INTERPOLATION[spec.interpolation], antialias=True
        )
    if tuple(x.shape[-2:]) != (spec.crop, spec.crop):
        x = TF.center_crop(x, [spec.crop, spec.crop])
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return ((x.float() / 255.0 - mean) / std).contiguous()
