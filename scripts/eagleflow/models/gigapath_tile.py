"""Prov-GigaPath tile encoder (Xu et al. 2024): ViT-g with patch 16 and SwiGLU MLPs, 1536-d.

The architecture is timm's `vit_giant_patch14_dinov2` with the Hugging Face hub's kwargs
(img 224, patch 16, mlp_ratio 5.33334, num_classes 0); the entrypoint adds
`mlp_layer=SwiGLUPacked, act_layer=SiLU`, which a strict load cannot check: with GELU the weights
load and every number is silently wrong. Input: 256 px tiles at 0.5 µm/px, Resize(256, bicubic),
CenterCrop(224), ImageNet mean/std; output: the class token after the final norm.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from eagleflow.models.card import ImagePreprocess, ModelCard, TileEncoderRole, WeightFile
from eagleflow.models.checkpoints import require_tensor_dict

CARD = ModelCard(
    name="gigapath_tile",
    summary="Prov-GigaPath tile encoder (Xu et al. 2024): ViT-g/16 with SwiGLU, class token",
    weights=WeightFile(
        file_name="pytorch_model.bin",
        source=(
            "Hugging Face prov-gigapath/prov-gigapath (gated: log in and accept the terms), file "
            "pytorch_model.bin (the tile encoder)"
        ),
        container="bare timm state dict (566 keys)",
    ),
    role=TileEncoderRole(
        encoder="gigapath_tile",
        dim=1536,
        tile_px=256,
        tile_mpp=0.5,
        trained_stains=("HE", "IHC"),
        reference="Prov-GigaPath demo/1_slide_mpp_check.py: 256 px tiles at 0.5 µm/px",
        # demo/3_load_tile_encoder.py: Resize(256, bicubic) + CenterCrop(224) + ImageNet.
        preprocess=ImagePreprocess(resize=256, crop=224, interpolation="bicubic"),
    ),
)

TIMM_ARCH = "vit_giant_patch14_dinov2"
# The entrypoint's own arguments (what timm.create_model adds to the hub's kwargs) ...
ENTRYPOINT_KWARGS: dict[str, Any] = {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}
# ... and the hub config's kwargs (checkpoint_keys/gigapath_tile.json).
MODEL_KWARGS: dict[str, Any] = {
    "img_size": 224,
    "in_chans": 3,
    "patch_size": 16,
    "embed_dim": 1536,
    "depth": 40,
    "num_heads": 24,
    "init_values": 1e-5,
    "mlp_ratio": 5.33334,
    "num_classes": 0,
}
EMBED_DIM = 1536
NUM_TOKENS = 197  # class + 14 x 14 patches
INPUT_SIZE = 224
SIGNATURE_KEYS = ("blocks.39.ls2.gamma", "blocks.0.mlp.fc1.weight", "pos_embed")


class GigaPathTile(VisionTransformer):
    """`vit_giant_patch14_dinov2` with the hub kwargs; `forward` returns the class token [B, 1536].

    Constructed from the class (not `timm.create_model`), like Virchow2, so that an environment
    variable cannot swap the implementation; the module tree is the same (tested).
    """

    def __init__(self, **overrides: Any) -> None:
        super().__init__(**{**ENTRYPOINT_KWARGS, **MODEL_KWARGS, **overrides})


def build(device: torch.device | str | None = None, **overrides: Any) -> GigaPathTile:
    """The tile encoder on `device`; build on meta and load with assign=True (4.5 GB in fp32)."""
    # weight_init='skip': every parameter is overwritten by the strict load that follows.
    with torch.device(device) if device is not None else nullcontext():
        return GigaPathTile(weight_init="skip", **overrides)


def prepare_state_dict(checkpoint: Any, path: Path | None) -> dict[str, torch.Tensor]:
    """The bare timm state dict (`pytorch_model.bin`), used as is."""
    return require_tensor_dict(
        checkpoint, "gigapath_tile", path, "a bare timm state dict of tensors"
    )
