"""Virchow2 (Paige, Zimmermann et al. 2024): ViT-H/14 with 4 register tokens and SwiGLU MLPs.

The architecture is timm's `vit_huge_patch14_224` with the kwargs of the Hugging Face config
plus `mlp_layer=SwiGLUPacked, act_layer=SiLU`, which the config cannot store: without the
activation the weights still load and every number is silently wrong.
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
    name="virchow2",
    summary="Virchow2 (Paige, Zimmermann et al. 2024): ViT-H/14 with 4 registers; EAGLE's second stage",
    weights=WeightFile(
        file_name="pytorch_model.bin",
        source=(
            "Hugging Face paige-ai/Virchow2 (gated: log in and accept the terms), file "
            "pytorch_model.bin, or any file holding the timm state dict saved with "
            "torch.save(model.state_dict(), path)"
        ),
        container="bare timm state dict (455 keys)",
    ),
    role=TileEncoderRole(
        encoder="virchow2",
        dim=1280,
        tile_px=224,
        tile_mpp=0.5,
        trained_stains=("HE", "IHC"),
        reference="Virchow2 model card: 224 px tiles, trained at several magnifications (0.5 µm/px default)",
        # pretrained_cfg: Resize(224, bicubic) + CenterCrop(224) + ImageNet Normalize.
        preprocess=ImagePreprocess(resize=224, crop=224, interpolation="bicubic"),
    ),
)

TIMM_ARCH = "vit_huge_patch14_224"
ARCH_KWARGS: dict[str, Any] = {"patch_size": 14, "embed_dim": 1280, "depth": 32, "num_heads": 16}
MODEL_KWARGS: dict[str, Any] = {
    "img_size": 224,
    "init_values": 1e-5,
    "num_classes": 0,
    "reg_tokens": 4,
    "mlp_ratio": 5.3375,
    "global_pool": "",
    "dynamic_img_size": True,
    "mlp_layer": SwiGLUPacked,
    "act_layer": nn.SiLU,
}
EMBED_DIM = 1280
NUM_TOKENS = 261  # class + 4 registers + 16x16 patches
NUM_PREFIX_TOKENS = 5
INPUT_SIZE = 224
SIGNATURE_KEYS = ("reg_token", "blocks.0.ls1.gamma", "blocks.0.mlp.fc1.weight")


class Virchow2(VisionTransformer):
    """timm `vit_huge_patch14_224` with Virchow2's kwargs; `forward` returns the class token.

    Constructed from the class (not `timm.create_model`) so that an environment variable such as
    TIMM_USE_NAFLEXVIT cannot swap the implementation; the module tree is the same (tested).
    """

    def __init__(self, **overrides: Any) -> None:
        super().__init__(**{**ARCH_KWARGS, **MODEL_KWARGS, **overrides})

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized [B, 3, 224, 224] -> all tokens [B, 261, 1280] after the final norm."""
        return self.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized [B, 3, 224, 224] -> class token [B, 1280] (the embedding EAGLE uses)."""
        return self.forward_tokens(x)[:, 0]

    def forward_cls_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The model card's 2560-d embedding: class token ‖ mean of the patch tokens."""
        return cls_mean_embedding(self.forward_tokens(x))


def cls_mean_embedding(tokens: torch.Tensor) -> torch.Tensor:
    """[B, 261, 1280] tokens -> [B, 2560] = class token ‖ mean of tokens[5:] (registers skipped)."""
    return torch.cat([tokens[:, 0], tokens[:, NUM_PREFIX_TOKENS:].mean(dim=1)], dim=-1)


def build(device: torch.device | str | None = None) -> Virchow2:
    """Virchow2 on `device`; build on meta and load weights with assign=True for a fast start."""
    # weight_init='skip': every parameter is overwritten by the strict load that follows.
    with torch.device(device) if device is not None else nullcontext():
        return Virchow2(weight_init="skip")


def prepare_state_dict(checkpoint: Any, path: Path | None) -> dict[str, torch.Tensor]:
    """The bare timm state dict, used as is."""
    return require_tensor_dict(checkpoint, "virchow2", path, "a bare timm state dict of tensors")
