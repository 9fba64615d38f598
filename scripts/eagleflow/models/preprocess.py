"""Tile preprocessing per model: uint8 RGB tiles -> the normalized float tensor the model expects.

Mean/std are hard-coded: a timm model built from a bare architecture name carries ImageNet-augreg
defaults (0.5/0.5), not the values these models were trained with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NO_NORMALISATION_MEAN = (0.0, 0.0, 0.0)
NO_NORMALISATION_STD = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class PreprocessSpec:
    """Resize the shorter side to `resize` (if needed), center-crop `crop`, normalize."""

    resize: int
    crop: int
    interpolation: InterpolationMode
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


PREPROCESS: dict[str, PreprocessSpec] = {
    # TransPath / CHIEF: Resize(224) (bilinear) + ImageNet Normalize; STAMP adds CenterCrop(224).
    "ctranspath": PreprocessSpec(resize=224, crop=224, interpolation=InterpolationMode.BILINEAR),
    # Virchow2's pretrained_cfg: Resize(224, bicubic) + CenterCrop(224) + ImageNet Normalize.
    "virchow2": PreprocessSpec(resize=224, crop=224, interpolation=InterpolationMode.BICUBIC),
    # Prov-GigaPath (demo/3_load_tile_encoder.py, README): Resize(256, bicubic) + CenterCrop(224)
    # + ImageNet Normalize, for 256 px tiles at 0.5 µm/px.
    "gigapath_tile": PreprocessSpec(resize=256, crop=224, interpolation=InterpolationMode.BICUBIC),
    # PathoDuet's evaluation transform: Resize(256) (bilinear) + CenterCrop(224) + ToTensor, and
    # no normalisation ("we do not use a normalize function"): RGB in [0, 1].
    **{
        name: PreprocessSpec(
            resize=256,
            crop=224,
            interpolation=InterpolationMode.BILINEAR,
            mean=NO_NORMALISATION_MEAN,
            std=NO_NORMALISATION_STD,
        )
        for name in ("pathoduet_he", "pathoduet_ihc")
    },
}


def preprocess_spec(name: str) -> PreprocessSpec:
    """The preprocessing of an image model; CHIEF and the GigaPath slide encoder take features."""
    try:
        return PREPROCESS[name]
    except KeyError:
        raise ValueError(
            f"no image preprocessing for {name!r} (image models: {', '.join(PREPROCESS)}); "
            "CHIEF and gigapath_slide take tile features, not images"
        ) from None


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
        x = TF.resize(x, [spec.resize], interpolation=spec.interpolation, antialias=True)
    if tuple(x.shape[-2:]) != (spec.crop, spec.crop):
        x = TF.center_crop(x, [spec.crop, spec.crop])
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return ((x.float() / 255.0 - mean) / std).contiguous()
