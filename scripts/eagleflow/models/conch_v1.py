"""CONCH v1 (Mahmood lab; Lu et al., Nature Medicine 2024): the ViT-B/16 vision tower, MADELEINE's
tile encoder.

Architecture (conch/open_clip_custom, CONCH @ 141cc09, `conch_ViT-B-16.json`): a timm
VisionTransformer trunk (768-d, 12 pre-LN blocks of 12 heads, MLP ratio 4, exact GELU, qkv bias,
patch 16, a class token, LayerNorm eps 1e-6, `dynamic_img_size=True`) whose forward is
`forward_features` (all tokens after the final norm), then two CoCa attentional poolers:
`attn_pool_contrast` (1 learned query of 512, `nn.MultiheadAttention(512, 8, kdim=vdim=768)` over
ALL tokens, the class token included, with LayerNorms `ln_q` on the query and `ln_k` on the tokens,
eps 1e-5) followed by `ln_contrast`, and `attn_pool_caption` (256 queries of 768, for the caption
decoder only). 90,392,832 parameters at 448, 89,941,248 at 224 (all kept, so the vision
tower loads strict).

Exact forward of the embedding (`encode_image(x, proj_contrast=False, normalize=False)` ->
`VisualModel.forward_no_head`): tokens = trunk(x) [B, 197, 768]; pooled =
ln_contrast(attn_pool_contrast(tokens)[:, 0]) -> [B, 512]. That 512-d vector is the attentional
pooler's output after `ln_contrast`, BEFORE `proj_contrast`, not L2-normalised: what MADELEINE was trained on, and what
TRIDENT (`with_proj=False, normalize=False`) and STAMP take. The zero-shot (image-text) embedding
is `zero_shot_embedding`: `@ proj_contrast`, then L2 normalisation; it is not what users of the
slide encoders take.

Published file: `pytorch_model.bin` in the gated Hugging Face repository `MahmoodLab/conch` (log in
and accept the terms). It holds the whole CoCa: `visual.*` (175 keys), the text tower `text.*`,
the caption decoder `text_decoder.*` and `logit_scale`. The original reads `['state_dict']` if
present, strips a leading `module` and loads with strict=False, so a missing key silently stays
random. Here: the same unwrap and prefix strip, `visual.` stripped, the text-side keys dropped by
an explicit list (TEXT_PREFIXES), and a strict load of every vision key: a file missing one fails
naming it, whatever else it holds.

Preprocessing and grid (the default, MADELEINE's: `conch_patch_embedder.py`,
`create_model_from_pretrained(..., force_image_size=224)`): 256 px tiles at 10x (1 µm/px),
Resize(224, bicubic) + CenterCrop(224), OpenAI-CLIP mean/std (NOT ImageNet, although CONCH's
`transform.py` defaults are ImageNet: `create_model` sets the OpenAI values). The model is built
at 224: the published 28 x 28 (+ class) position table [1, 785, 768] is resampled ONCE at load
time to 14 x 14 (+ class) [1, 197, 768] with bilinear interpolation, antialias off (CONCH's
`resize_pos_embed`; done here by `resize_pos_embed`).

The 448 setting (TRIDENT's `conch_v1` and STAMP's `conch` extractor build the model at its config
size): no load-time resample, the 785-token table is used as published, and tiles are resized to
448 (TRIDENT: 256 px tiles at 10x or 20x upsampled to 448; STAMP: 224 px tiles of 256 µm
upsampled to 448), giving 785 tokens per tile. Those are NOT the features MADELEINE was trained
on. `build(img_size=448)` with `prepare_state_dict(..., img_size=448)` gives that model; feeding a
size other than the model's makes timm resample the table on every call with bicubic + antialias,
which differs from the load-time bilinear resample (both as in the original).

Patient level: CONCH v1 is a tile encoder; MADELEINE (STAMP) concatenates a patient's tiles.

Checked against the original classes (CONCH @ 141cc09, run with timm 1.0.31) on random weights:
bit-identical in fp32 and fp64, at 224 (load-time resample), at 448 and at a 256 px input.

Precision: TRIDENT and MADELEINE extract in fp32. BF16_TOLERANCE is what the tests hold CPU bf16
autocast to on a small twin (max |bf16 - fp32| over max |fp32|).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from eagleflow.models.card import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImagePreprocess,
    ModelCard,
    TileEncoderRole,
    WeightFile,
)
from eagleflow.models.checkpoints import random_state_dict, unwrap_state_dict
from eagleflow.weights import WeightsError

CARD = ModelCard(
    name="conch_v1",
    summary=(
        "CONCH v1 (Lu et al. 2024) vision tower: ViT-B/16 + attentional pooler, the 512-d "
        "pooled vector before the contrastive projection (MADELEINE's tile features)"
    ),
    weights=WeightFile(
        file_name="pytorch_model.bin",
        source=(
            "Hugging Face MahmoodLab/conch (gated: log in and accept the terms), file "
            "pytorch_model.bin (the whole CoCa; the vision tower is used)"
        ),
        container=(
            "flat state dict of the whole CoCa (visual.*, text.*, text_decoder.*, logit_scale; "
            "the exact wrapper is unverified: a ['state_dict'] wrapper and a 'module.' prefix "
            "are accepted, as the original reads them); visual.* stripped of 'visual.' (175 "
            "keys, position table resampled 785 -> 197 tokens), the text keys dropped"
        ),
    ),
    role=TileEncoderRole(
        encoder="conch_v1",
        dim=512,
        tile_px=256,
        tile_mpp=1.0,
        trained_stains=("HE", "IHC"),
        reference=(
            "MADELEINE (conch_patch_embedder.py, README): 256 px tiles at 10x (1 µm/px), CONCH "
            "built at 224 (TRIDENT and STAMP build it at 448 instead)"
        ),
        preprocess=ImagePreprocess(
            resize=224,
            crop=224,
            interpolation="bicubic",
            mean=OPENAI_CLIP_MEAN,
            std=OPENAI_CLIP_STD,
        ),
    ),
)

INPUT_SIZE = 224  # MADELEINE's force_image_size
PUBLISHED_SIZE = 448  # conch_ViT-B-16.json image_size: the published position table's grid
PATCH_SIZE = 16
EMBED_DIM = 512  # the embedding: attn_pool_contrast -> ln_contrast
TRUNK_KWARGS: dict[str, Any] = {
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "mlp_ratio": 4.0,
    "patch_size": PATCH_SIZE,
    "num_classes": 0,
    "dynamic_img_size": True,
}
POOLER_KWARGS: dict[str, Any] = {
    "pool_dim": 512,  # embed_dim of the CoCa config
    "pool_heads": 8,  # attn_pooler_heads
    "caption_dim": 768,  # embed_dim_caption
    "caption_queries": 256,  # n_queries_caption
}
VISUAL_PREFIX = "visual."
MODULE_PREFIX = "module."
# The published file's keys outside the vision tower: dropped by name, nothing else is.
TEXT_PREFIXES = ("text.", "text_decoder.", "logit_scale")
SIGNATURE_KEYS = (
    "visual.trunk.pos_embed",
    "visual.attn_pool_contrast.attn.k_proj_weight",
    "visual.ln_contrast.weight",
)
# CPU bf16 autocast vs fp32 on the test twin (max |diff| / max |fp32|): the tests hold it to this.
BF16_TOLERANCE = 0.05


class CastLayerNorm(nn.LayerNorm):
    """open_clip's `LayerNorm`: the output is cast back to the input dtype (matters under autocast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).to(x.dtype)


class AttentionalPooler(nn.Module):
    """CoCa's pooler: learned queries attend over all tokens (one nn.MultiheadAttention call)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.empty(n_queries, d_model))
        # kdim != embed_dim: separate q/k/v_proj_weight and one packed in_proj_bias, as published.
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = CastLayerNorm(d_model)
        self.ln_k = CastLayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, context_dim] -> [B, n_queries, d_model]."""
        context = self.ln_k(tokens).transpose(0, 1)  # sequence-first, as nn.MultiheadAttention
        query = self.ln_q(self.query).unsqueeze(1).expand(-1, tokens.shape[0], -1)
        out = self.attn(query, context, context, need_weights=False)[0]
        return out.transpose(0, 1)


class ConchV1Vision(nn.Module):
    """The CoCa `visual` module of CONCH v1; `forward` is `encode_image(proj_contrast=False)`."""

    def __init__(
        self,
        img_size: int = INPUT_SIZE,
        pool_dim: int = POOLER_KWARGS["pool_dim"],
        pool_heads: int = POOLER_KWARGS["pool_heads"],
        caption_dim: int = POOLER_KWARGS["caption_dim"],
        caption_queries: int = POOLER_KWARGS["caption_queries"],
        **trunk_overrides: Any,
    ) -> None:
        super().__init__()
        # From the class, not timm.create_model: an environment variable cannot swap it.
        self.trunk = VisionTransformer(
            img_size=img_size, weight_init="skip", **{**TRUNK_KWARGS, **trunk_overrides}
        )
        width = self.trunk.embed_dim
        self.attn_pool_contrast = AttentionalPooler(pool_dim, width, pool_heads, 1)
        self.ln_contrast = nn.LayerNorm(pool_dim)  # torch's own LayerNorm in VisualModel
        self.proj_contrast = nn.Parameter(torch.empty(pool_dim, pool_dim))
        self.attn_pool_caption = AttentionalPooler(caption_dim, width, pool_heads, caption_queries)
        self.ln_caption = nn.LayerNorm(caption_dim)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised [B, 3, H, W] -> all tokens after the trunk's final norm [B, 1 + HW/256, 768]."""
        return self.trunk.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised [B, 3, 224, 224] -> [B, 512]: ln_contrast(attn_pool_contrast(tokens)[:, 0])."""
        return self.ln_contrast(self.attn_pool_contrast(self.forward_tokens(x))[:, 0])

    def zero_shot_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """CONCH's image-text embedding `encode_image(x)`: forward(x) @ proj_contrast, L2-normalised."""
        return F.normalize(self(x) @ self.proj_contrast, dim=-1)


def build(device: torch.device | str | None = None, **overrides: Any) -> ConchV1Vision:
    """The vision tower on `device` (meta: no memory, no init; then load with assign=True).

    `overrides`: img_size (448 for TRIDENT's and STAMP's setting), pooler sizes, and trunk kwargs
    (depth, embed_dim, num_heads, patch_size) for small test twins.
    """
    with torch.device(device) if device is not None else nullcontext():
        return ConchV1Vision(**overrides)


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + g*g, C] -> [1, 1 + grid*grid, C]: CONCH's load-time resample (bilinear, no antialias).

    The class token's row is kept; the patch rows are interpolated as a g x g image (row-major,
    timm's layout). Unchanged when the grid already fits.
    """
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    side = round(patches.shape[1] ** 0.5)
    if side * side != patches.shape[1]:
        raise WeightsError(
            f"conch_v1: trunk.pos_embed has {patches.shape[1]} patch rows, not a square grid"
        )
    if side == grid:
        return pos_embed
    image = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    image = F.interpolate(
        image, size=(grid, grid), mode="bilinear", align_corners=False, antialias=False
    )
    return torch.cat([cls, image.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def prepare_state_dict(
    checkpoint: Any,
    path: Path | None,
    img_size: int = INPUT_SIZE,
    patch_size: int = PATCH_SIZE,
) -> dict[str, torch.Tensor]:
    """The published CoCa file -> the vision tower's state dict at `img_size`.

    ['state_dict'] if present; a `module.` prefix on every key stripped (on some keys only:
    refused); keys under TEXT_PREFIXES dropped; `visual.` stripped from the rest; any other key
    refused, named; `trunk.pos_embed` resampled to the model's grid. Missing, extra or misshapen
    vision keys are left for the strict load to name.
    """
    sd = unwrap_state_dict(checkpoint, "state_dict", "conch_v1", path)
    prefixed = [k.startswith(MODULE_PREFIX) for k in sd]
    if any(prefixed):
        if not all(prefixed):
            plain = next(k for k, p in zip(sd, prefixed, strict=True) if not p)
            raise WeightsError(
                f"conch_v1: weight file {str(path)!r}: some keys start with {MODULE_PREFIX!r} "
                f"and some do not (e.g. {plain!r})"
            )
        sd = {k[len(MODULE_PREFIX) :]: v for k, v in sd.items()}
    other = [k for k in sd if not k.startswith((VISUAL_PREFIX, *TEXT_PREFIXES))]
    if other:
        shown = ", ".join(other[:8]) + (f" ... and {len(other) - 8} more" if len(other) > 8 else "")
        raise WeightsError(
            f"conch_v1: weight file {str(path)!r} does not fit the CONCH v1 CoCa: keys neither "
            f"under {VISUAL_PREFIX!r} nor on the text side {TEXT_PREFIXES}: {shown}"
        )
    # The text side is dropped by name; every visual key goes on to the strict load.
    out = {k[len(VISUAL_PREFIX) :]: v for k, v in sd.items() if k.startswith(VISUAL_PREFIX)}
    if "trunk.pos_embed" in out:
        out["trunk.pos_embed"] = resize_pos_embed(out["trunk.pos_embed"], img_size // patch_size)
    return out


def published_key(key: str) -> str:
    """A model key's name in `pytorch_model.bin` (the position table at 448 there)."""
    return VISUAL_PREFIX + key


def demo_state_dict(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded DEMO weights: `random_state_dict`, with the poolers' q/k/v projections at unit gain.

    nn.MultiheadAttention keeps them as bare parameters, which `random_state_dict` draws at 0.02,
    so the demo pooler would be a plain mean of the tokens.
    """
    out = random_state_dict(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for key, value in out.items():
        if key.endswith(("q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_weight")):
            std = value.shape[1] ** -0.5
            out[key] = torch.empty_like(value).normal_(0.0, std, generator=generator)
    return out
