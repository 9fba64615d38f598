"""PathoDuet (Hua et al. 2024): ViT-B/16 with an extra learned "pretext" token, H&E and IHC.

openmedlab/PathoDuet `vits.py` (`VisionTransformerMoCo(pretext_token=True, global_pool='avg')`)
on timm 0.6.7, rebuilt on current timm: tokens [pretext, cls, 196 patches] plus a stored 198-row
position table, 12 pre-LN blocks (LayerNorm eps 1e-6, exact GELU, no LayerScale), no final norm;
the embedding is the mean of the patch tokens only, then `fc_norm`. Input RGB in [0, 1] without
normalisation (the README: "we do not use a normalize function"). The H&E and IHC checkpoints
share architecture and keys (151, no head).
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from eagleflow.models.card import (
    NO_NORMALISATION_MEAN,
    NO_NORMALISATION_STD,
    ImagePreprocess,
    ModelCard,
    TileEncoderRole,
    WeightFile,
)
from eagleflow.models.checkpoints import require_tensor_dict

# One architecture, two published files: the H&E model and the IHC model.
PATHODUET_PREPROCESS = ImagePreprocess(  # Resize(256) (bilinear) + CenterCrop(224) + ToTensor
    resize=256,
    crop=224,
    interpolation="bilinear",
    mean=NO_NORMALISATION_MEAN,
    std=NO_NORMALISATION_STD,
)
PATHODUET_SOURCE = (
    "the PathoDuet README (github.com/openmedlab/PathoDuet): the Google Drive folder it links"
)
PATHODUET_REFERENCE = "PathoDuet patch benchmark (NCT-CRC-HE): 224 px at 0.5 µm/px"
CARDS = (
    ModelCard(
        name="pathoduet_he",
        summary="PathoDuet (Hua et al. 2024) H&E model: ViT-B/16 with a pretext token",
        weights=WeightFile(
            file_name="checkpoint_HE.pth",
            source=PATHODUET_SOURCE,
            container="bare state dict (151 keys, no head)",
        ),
        role=TileEncoderRole(
            encoder="pathoduet",
            dim=768,
            tile_px=224,
            tile_mpp=0.5,
            trained_stains=("HE", "IHC"),
            reference=PATHODUET_REFERENCE,
            preprocess=PATHODUET_PREPROCESS,
            stain="HE",
        ),
    ),
    ModelCard(
        name="pathoduet_ihc",
        summary="PathoDuet (Hua et al. 2024) IHC model: ViT-B/16 with a pretext token",
        weights=WeightFile(
            file_name="checkpoint_IHC.pth",
            source=PATHODUET_SOURCE,
            container="bare state dict (151 keys, no head)",
        ),
        role=TileEncoderRole(
            encoder="pathoduet",
            dim=768,
            tile_px=224,
            tile_mpp=0.5,
            trained_stains=("HE", "IHC"),
            reference=PATHODUET_REFERENCE,
            preprocess=PATHODUET_PREPROCESS,
            stain="IHC",
        ),
    ),
)

EMBED_DIM = 768
NUM_PREFIX_TOKENS = 2  # pretext, cls
NUM_TOKENS = 198
INPUT_SIZE = 224
LAYER_NORM_EPS = 1e-6
MODEL_KWARGS: dict[str, Any] = {
    "img_size": 224,
    "patch_size": 16,
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "norm_layer": partial(nn.LayerNorm, eps=LAYER_NORM_EPS),
    "global_pool": "avg",  # timm then puts the LayerNorm after pooling (fc_norm), norm = Identity
    "num_classes": 0,
}
SIGNATURE_KEYS = ("pretext_token", "fc_norm.weight")


class PathoDuet(VisionTransformer):
    """ViT-B/16 with the pretext token; `forward`: [B, 3, 224, 224] in [0, 1] -> [B, 768]."""

    def __init__(self, **overrides: Any) -> None:
        super().__init__(**{**MODEL_KWARGS, **overrides})
        dd = {"device": self.cls_token.device, "dtype": self.cls_token.dtype}
        self.pretext_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, NUM_TOKENS, self.embed_dim, **dd))
        self.num_prefix_tokens = NUM_PREFIX_TOKENS  # pooling skips pretext and cls

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 196, 768] patch tokens -> [B, 198, 768]: [pretext, cls, patches] + pos_embed."""
        batch = x.shape[0]
        prefix = torch.cat(
            [self.pretext_token.expand(batch, -1, -1), self.cls_token.expand(batch, -1, -1)], 1
        )
        return self.pos_drop(torch.cat([prefix, x], dim=1) + self.pos_embed)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens [B, 198, 768] after the last block (no final norm, as in PathoDuet)."""
        return self.forward_features(x)


def build(device: torch.device | str | None = None) -> PathoDuet:
    """PathoDuet on `device` (meta: no memory, no init; then load with assign=True)."""
    with torch.device(device) if device is not None else nullcontext():
        return PathoDuet(weight_init="skip")


def prepare_state_dict(checkpoint: Any, path: Path | None) -> dict[str, torch.Tensor]:
    """The bare state dict (`checkpoint_HE.pth` / `checkpoint_IHC.pth`), used as is."""
    return require_tensor_dict(checkpoint, "pathoduet", path, "a bare state dict of tensors")
