"""Virchow v1 (Paige; Vorontsov et al., Nature Medicine 2024): PRISM's tile encoder.

Architecture: timm `vit_huge_patch14_224` (ViT-H/14: patch 14, 1280-d, 32 pre-LN blocks, 16 heads
x 80, qkv bias, LayerNorm eps 1e-6), LayerScale (ls1/ls2), a class token and NO register tokens
(pos_embed (1, 257, 1280) covers the class token and 16 x 16 patches), SwiGLUPacked MLPs
(fc1 1280 -> 6832, silu(first half) * second half, fc2 3416 -> 1280) and a final LayerNorm on every
token. 631,229,184 parameters. The Hugging Face config stores the architecture name and
`model_args` only, so every caller passes `mlp_layer=SwiGLUPacked, act_layer=SiLU`: with timm's
GELU default the weights load strict and every number is silently wrong (tested).

Exact forward: tokens = norm(blocks(patch_embed(x) with the class token, + pos_embed)),
[B, 257, 1280]; the embedding is class token ‖ mean of the 256 patch tokens (tokens[:, 1:], taken
after the final norm) = [B, 2560]. This is the model card's embedding, TRIDENT's `virchow` default
and STAMP's `virchow-full`, and the input PRISM was trained on; `meanpool_virchow` is the mean of
it over a bag. (Virchow2 has 4 registers and its patch tokens start at 5: its `[:, 5:]` slice
would drop 4 patches here.) STAMP's `virchow` extractor takes the class token only (1280).

Published file: `pytorch_model.bin` in the gated Hugging Face repository `paige-ai/Virchow`
(Apache-2.0; log in and accept the terms), a bare timm state dict of 454 keys, loaded strict.

Preprocessing (the file's pretrained_cfg `virchow_v1`: input 224, bicubic, crop_pct 1.0, center
crop, ImageNet mean/std): Resize(224, bicubic) -> CenterCrop(224) -> [0, 1] -> ImageNet
normalisation. Reference grid: 224 px tiles at 20x, 0.5 µm/px (TRIDENT and prism-embedder, which
make PRISM's input there); Virchow was trained on H&E only.

Speed and precision on 2 CPU cores in fp32 (scripts/tools/bench_models.py, demo weights, load
average ~8 on the 2 cores): 7.4 s per tile at batch 8. fp32 vs fp64: max 2.1e-5 (values up to
3.7). Users run fp16 autocast on CUDA (TRIDENT); CPU bf16 autocast vs fp32: max 0.16, 4.2 % of the
largest value (cosine 0.9993) on the full-size demo model (LayerScale 1, harsher than trained
weights), 0.5-0.9 % on the test twin; BF16_TOLERANCE bounds the twin's relative error in the
tests.
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
    name="virchow",
    summary=(
        "Virchow v1 (Paige): ViT-H/14 without registers, SwiGLU with SiLU, LayerScale; "
        "class token ‖ mean of the patch tokens (2560-d), the input of PRISM"
    ),
    weights=WeightFile(
        file_name="pytorch_model.bin",
        source=(
            "Hugging Face paige-ai/Virchow (gated: log in and accept the terms), file "
            "pytorch_model.bin"
        ),
        container="bare timm state dict (454 keys)",
    ),
    role=TileEncoderRole(
        encoder="virchow",
        dim=2560,
        tile_px=224,
        tile_mpp=0.5,
        trained_stains=("HE",),
        reference=(
            "Virchow model card and PRISM's pipelines (TRIDENT, prism-embedder): 224 px tiles "
            "at 20x (0.5 µm/px)"
        ),
        preprocess=ImagePreprocess(resize=224, crop=224, interpolation="bicubic"),
    ),
)

TIMM_ARCH = "vit_huge_patch14_224"
ARCH_KWARGS: dict[str, Any] = {"patch_size": 14, "embed_dim": 1280, "depth": 32, "num_heads": 16}
# The Hugging Face config's model_args, plus the two layers it cannot store.
MODEL_KWARGS: dict[str, Any] = {
    "img_size": 224,
    "init_values": 1e-5,
    "num_classes": 0,
    "mlp_ratio": 5.3375,
    "global_pool": "",
    "dynamic_img_size": True,
    "mlp_layer": SwiGLUPacked,
    "act_layer": nn.SiLU,
}
TOKEN_DIM = 1280
EMBED_DIM = 2560  # class token ‖ mean of the patch tokens
NUM_TOKENS = 257  # class + 16 x 16 patches
NUM_PREFIX_TOKENS = 1  # the class token only: patch tokens start at index 1
INPUT_SIZE = 224
# CPU bf16 autocast vs fp32 on the test twin (max |diff| / max |fp32|): the tests hold it to this.
BF16_TOLERANCE = 0.05
# Virchow v1's keys are a subset of Virchow2's (and these four are in Prov-GigaPath's tile file
# too), so presence alone cannot single it out: check the more specific signatures first;
# pos_embed's shape (1, 257, 1280) tells it from Virchow2's (1, 261, 1280).
SIGNATURE_KEYS = ("cls_token", "pos_embed", "blocks.31.ls2.gamma", "blocks.0.mlp.fc1.weight")


class Virchow(VisionTransformer):
    """timm `vit_huge_patch14_224` with Virchow v1's kwargs; `forward` -> [B, 2560].

    Constructed from the class (not `timm.create_model`) so that an environment variable such as
    TIMM_USE_NAFLEXVIT cannot swap the implementation; the module tree is the same (tested).
    """

    def __init__(self, **overrides: Any) -> None:
        super().__init__(**{**ARCH_KWARGS, **MODEL_KWARGS, **overrides})

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised [B, 3, 224, 224] -> all tokens [B, 257, 1280] after the final norm."""
        return self.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised [B, 3, 224, 224] -> [B, 2560] = class token ‖ mean of the patch tokens."""
        return cls_mean_embedding(self.forward_tokens(x))


def cls_mean_embedding(tokens: torch.Tensor) -> torch.Tensor:
    """[B, 257, 1280] tokens -> [B, 2560] = tokens[:, 0] ‖ mean of tokens[:, 1:]."""
    return torch.cat([tokens[:, 0], tokens[:, NUM_PREFIX_TOKENS:].mean(dim=1)], dim=-1)


def build(device: torch.device | str | None = None, **overrides: Any) -> Virchow:
    """Virchow v1 on `device` (meta: no memory; then load with assign=True).

    `overrides` change timm kwargs, for small test twins (e.g. depth=2, embed_dim=64).
    """
    # weight_init='skip': every parameter is overwritten by the strict load that follows.
    with torch.device(device) if device is not None else nullcontext():
        return Virchow(weight_init="skip", **overrides)


def prepare_state_dict(checkpoint: Any, path: Path | None) -> dict[str, torch.Tensor]:
    """The bare timm state dict, used as is (nothing to strip, nothing to ignore)."""
    return require_tensor_dict(checkpoint, "virchow", path, "a bare timm state dict of tensors")
