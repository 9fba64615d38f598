"""CTransPath (Wang et al. 2022): Swin-T with a convolutional stem, on current timm.

The published `ctranspath.pth` is a timm 0.5.4 state dict (200 keys, under 'model');
`checkpoint_filter_fn` converts it to the current timm layout (183 keys).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import to_2tuple
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from eagleflow.models.card import ImagePreprocess, ModelCard, TileEncoderRole, WeightFile
from eagleflow.models.checkpoints import unwrap_state_dict

CARD = ModelCard(
    name="ctranspath",
    summary="CTransPath (Wang et al. 2022): Swin-T with a convolutional stem; EAGLE's selection features",
    weights=WeightFile(
        file_name="ctranspath.pth",
        sha256="7c998680060c8743551a412583fac689db43cec07053b72dfec6dcd810113539",
        source=(
            "the TransPath README (github.com/Xiyue-Wang/TransPath): Google Drive file id "
            "1DoDx_70_TLj98gTf6YTXnu4tFhsFocDX "
            "(https://drive.google.com/file/d/1DoDx_70_TLj98gTf6YTXnu4tFhsFocDX)"
        ),
        container="timm 0.5.4 Swin state dict under the top-level key 'model'",
        state_dict_key="model",
    ),
    role=TileEncoderRole(
        encoder="ctranspath",
        dim=768,
        tile_px=224,
        tile_mpp=2.0,
        trained_stains=("HE",),
        reference="EAGLE and STAMP: 224 px at 2 µm/px (448 µm regions) for CHIEF's selection",
        # TransPath / CHIEF: Resize(224) (bilinear) + ImageNet Normalize; STAMP adds CenterCrop.
        preprocess=ImagePreprocess(resize=224, crop=224, interpolation="bilinear"),
    ),
    on_meta=False,  # the Swin constructor computes its attention masks
)

EMBED_DIM = 768
INPUT_SIZE = 224
CONTAINER_KEY = "model"
# Keys that only a CTransPath checkpoint has (either layout); used to recognise a wrong-model file.
SIGNATURE_KEYS = (
    "patch_embed.proj.0.weight",
    "layers.0.blocks.0.attn.relative_position_bias_table",
)


class ConvStem(nn.Module):
    """CTransPath's patch embedding: two stride-2 3x3 convs (BN, ReLU), a 1x1 conv, LayerNorm.

    Accepts the keyword arguments current timm passes to `embed_layer` and returns NHWC.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: type[nn.Module] | None = None,
        strict_img_size: bool = True,
        output_fmt: str = "NHWC",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        if to_2tuple(patch_size) != (4, 4) or embed_dim % 8 != 0:
            raise ValueError("ConvStem needs patch_size 4 and embed_dim divisible by 8")
        if output_fmt != "NHWC":
            raise ValueError(f"ConvStem returns NHWC, timm asked for {output_fmt}")
        dd = {"device": device, "dtype": dtype}
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // 4, self.img_size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        layers: list[nn.Module] = []
        c_in, c_out = in_chans, embed_dim // 8
        for _i in range(2):
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False, **dd),
                nn.BatchNorm2d(c_out, **dd),
                nn.ReLU(inplace=True),
            ]
            c_in, c_out = c_out, c_out * 2
        layers.append(nn.Conv2d(c_in, embed_dim, kernel_size=1, **dd))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, H/4, W/4, embed_dim]."""
        if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"CTransPath expects {self.img_size[0]}x{self.img_size[1]} input, "
                f"got {tuple(x.shape[-2:])}"
            )
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def build(device: torch.device | str | None = None) -> SwinTransformer:
    """Swin-T/4 window 7 with ConvStem, no head: normalized [B,3,224,224] -> pooled [B,768].

    Built on a real device, not meta: the Swin attention masks and relative-position indices are
    non-persistent buffers computed in the constructor, and this model is small (~0.1 s).
    """
    # weight_init='skip': every parameter is overwritten by the strict load that follows.
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        embed_layer=ConvStem,
        num_classes=0,
        weight_init="skip",
        device=device,
    )


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a timm 0.5.4 Swin state dict (as published) to the current timm layout.

    Drops the `relative_position_index` / `attn_mask` buffers (non-persistent now) and moves patch
    merging from the end of stage i to the start of stage i+1. A current-layout dict passes
    through unchanged. Same rules as timm's own swin `checkpoint_filter_fn`, minus its silent
    resizing of mismatched tensors, so a wrong shape still fails the strict load.
    """
    out: dict[str, torch.Tensor] = {}
    old_layout = is_timm054_layout(state_dict)
    for key, value in state_dict.items():
        if key.endswith(_OLD_BUFFERS):
            continue
        out[_DOWNSAMPLE.sub(_next_stage, key) if old_layout else key] = value
    return out


def is_timm054_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    """True for the 0.5.4 layout: stage 0 has a downsample, or the Swin buffers are stored."""
    return any(k.startswith("layers.0.downsample.") or k.endswith(_OLD_BUFFERS) for k in state_dict)


def published_key(key: str) -> str:
    """The name a current-layout key has in the published (0.5.4 layout) file."""
    return _DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)


_OLD_BUFFERS = ("relative_position_index", "attn_mask")
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def _next_stage(match: re.Match[str]) -> str:
    return f"layers.{int(match.group(1)) + 1}.downsample."


def prepare_state_dict(checkpoint: Any, path: Path | None) -> dict[str, torch.Tensor]:
    """Unwrap ckpt['model'] (a bare state dict is accepted too) and convert the layout."""
    state_dict = unwrap_state_dict(checkpoint, CONTAINER_KEY, "ctranspath", path)
    return checkpoint_filter_fn(state_dict)
