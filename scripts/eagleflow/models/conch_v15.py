"""CONCH v1.5 (Mahmood lab, Ding et al. 2024/2025): TITAN's tile encoder, a ViT-L/16 with
LayerScale and a CoCa-style attentional pooler.

Architecture (TRIDENT `conchv1_5.py` @ a91fa84 and the TITAN hub `conch_v1_5.py`, which give
identical outputs): a ViT-L/16 trunk (1024-d, 24 pre-LN blocks, 16 heads, qkv bias, LayerScale
`ls1/ls2.gamma`, exact GELU, LayerNorm eps 1e-6, class token, learned 14 x 14 + 1 position
table), built here from timm's `VisionTransformer` (same module tree and key names), then

    tokens = trunk.norm(blocks(cat(cls, patch_embed(x)) + pos(448)))   # [B, 785, 1024], CLS kept
    q = to_q(ln_q(query)); k, v = to_kv(ln_k(tokens)).chunk(2)         # 8 heads x 96, no biases
    out = to_out(softmax(q k^T * 96^-0.5) v)                           # over all 785 tokens
    embedding = ln_contrast(out[:, 0])                                 # [B, 768]

The pooler's and ln_contrast's LayerNorms use eps 1e-5 (torch's default), the trunk's 1e-6.
The embedding users take (and TITAN consumes) is this 768-d `ln_contrast` output.

Position table, exactly as the original resizes it: the published `trunk.pos_embed` is
[1, 197, 1024] (a 14 x 14 grid, trained at 224). At every forward on a 448 input the original
resizes the 14 x 14 part with DINO's recipe, `F.interpolate(scale_factor=((28 + 0.1) / 14,) * 2,
mode="bicubic")` (align_corners False, no antialias): the 0.1 shifts the sampling grid, so this
is NOT `size=(28, 28)` (the tables differ). We do the same, at forward, from the stored 14 x 14
table. TRIDENT also resizes at load time, to the model's own 14 x 14 grid with timm's
`resample_abs_pos_embed(bilinear, antialias=False)`, only when the file's table has another
shape: a no-op for the published file; `prepare_state_dict` replicates it (with a warning) for
a square table of another size. The TITAN hub loads strictly without any resize.

Published file: `pytorch_model_vision.bin` from Hugging Face `MahmoodLab/conchv1_5` (gated;
TRIDENT) or `conch_v1_5_pytorch_model.bin` from `MahmoodLab/TITAN` (gated; `TITAN.return_conch()`,
used by STAMP): a flat torch state dict of the vision tower, 352 keys, no prefix.

Preprocessing: 512 px tiles at 0.5 µm/px (20x; 256 µm), `Resize(448, bilinear)` +
`CenterCrop(448)` + ImageNet normalisation (TRIDENT and the hub transform; PIL antialiases the
downscale). Patient level: CONCH v1.5 is a tile encoder; TITAN (see `titan.py`) aggregates.
TRIDENT runs it under fp16 autocast; STAMP's `conch1_5` extractor in fp32.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from eagleflow.models.card import ImagePreprocess, ModelCard, TileEncoderRole, WeightFile
from eagleflow.models.checkpoints import require_tensor_dict

CARD = ModelCard(
    name="conch_v15",
    summary="CONCH v1.5 (Mahmood lab): ViT-L/16 + attentional pooler, 768-d; TITAN's tile encoder",
    weights=WeightFile(
        file_name="pytorch_model_vision.bin",
        source=(
            "Hugging Face MahmoodLab/conchv1_5 (gated: log in and accept the terms), file "
            "pytorch_model_vision.bin; or Hugging Face MahmoodLab/TITAN (gated), file "
            "conch_v1_5_pytorch_model.bin (the same vision tower, same keys)"
        ),
        container="bare state dict of the vision tower (352 keys: trunk.*, attn_pool_contrast.*, ln_contrast.*)",
    ),
    role=TileEncoderRole(
        encoder="conch_v15",
        dim=768,
        tile_px=512,
        tile_mpp=0.5,
        trained_stains=("HE",),
        reference="TITAN README and TRIDENT (--mag 20 --patch_size 512): 512 px at 0.5 µm/px, resized to 448",
        # TRIDENT / TITAN hub eval transform: Resize(448, bilinear) + CenterCrop(448) + ImageNet.
        preprocess=ImagePreprocess(resize=448, crop=448, interpolation="bilinear"),
    ),
)

log = logging.getLogger(__name__)

EMBED_DIM = 768  # the pooled embedding
TRUNK_DIM = 1024
PATCH_SIZE = 16
INPUT_SIZE = 448
PRETRAIN_GRID = 14  # pos_embed is 14 x 14 (+ class): the trunk is built at img_size 224
POOL_HEADS = 8
POOL_QUERIES = 1
POOL_NORM_EPS = 1e-5  # nn.LayerNorm default (pooler ln_q/ln_k and ln_contrast)
DINO_OFFSET = 0.1  # interpolate_pos_encoding: w0 + 0.1 (facebookresearch/dino#8)
TRUNK_KWARGS: dict[str, Any] = {
    "img_size": PRETRAIN_GRID * PATCH_SIZE,
    "patch_size": PATCH_SIZE,
    "embed_dim": TRUNK_DIM,
    "depth": 24,
    "num_heads": 16,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "init_values": 1.0,  # LayerScale present; its value is overwritten by the checkpoint
    "num_classes": 0,
    "global_pool": "token",
}
SIGNATURE_KEYS = (
    "trunk.blocks.0.ls1.gamma",
    "attn_pool_contrast.to_kv.weight",
    "ln_contrast.weight",
)
# Speed, CPU fp32, 2 threads, batch 8 at 448: 8.9 s per tile at load average ~2-6 (12.5 s at
# ~9) on the shared 2-core machine (scripts/tools/bench_models.py); build + strict load of the 1.2 GB file 0.2 s.
# bf16 autocast vs fp32 (CPU autocast) on the tests' 4-block twin at 448 (256-d trunk, weights
# near unit gain): max |diff| of the LayerNormed 768-d embedding 0.019 (values up to 3.6), cosine
# >= 0.99998; fp32 vs fp64 1.3e-6 there. The full 24 blocks were not measured in bf16 (2 cores);
# on CUDA the same code runs (not measured: no GPU). Stated bound for half precision:
BF16_TOLERANCE = 0.1


def dino_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """The original's interpolate_pos_encoding: [1, 1 + g*g, D] -> [1, 1 + grid_h*grid_w, D].

    Unchanged when the grid is the table's own (square) grid; otherwise bicubic with
    scale_factor (grid + 0.1) / g per axis, align_corners False, no antialias (not size=...).
    """
    n_table = pos_embed.shape[1] - 1
    side = int(math.sqrt(n_table))
    if grid_h * grid_w == n_table and grid_h == grid_w:
        return pos_embed
    table = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    scale = (
        (grid_h + DINO_OFFSET) / math.sqrt(n_table),
        (grid_w + DINO_OFFSET) / math.sqrt(n_table),
    )
    table = F.interpolate(table, scale_factor=scale, mode="bicubic")
    if table.shape[-2:] != (grid_h, grid_w):  # the original asserts the same
        raise ValueError(
            f"position table resized to {tuple(table.shape[-2:])}, not {grid_h, grid_w}"
        )
    table = table.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
    return torch.cat([pos_embed[:, :1], table], dim=1)


class ConchTrunk(VisionTransformer):
    """timm ViT-L/16 (LayerScale) whose position table is resized the original's way."""

    def __init__(self, **overrides: Any) -> None:
        super().__init__(**{**TRUNK_KWARGS, **overrides})
        self.patch_embed.strict_img_size = False  # 448 inputs on the 224 (14 x 14) table

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Normalised [B, 3, H, W] -> all tokens [B, 1 + (H/16)(W/16), 1024] after `norm`."""
        grid_h, grid_w = x.shape[-2] // PATCH_SIZE, x.shape[-1] // PATCH_SIZE
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + dino_pos_embed(self.pos_embed, grid_h, grid_w)
        x = self.norm_pre(x)
        x = self.blocks(x)
        return self.norm(x)


class AttentionalPooler(nn.Module):
    """CoCa einsum pooler: learned queries attend over every token (CLS included); no biases."""

    def __init__(
        self,
        dim: int = EMBED_DIM,
        context_dim: int = TRUNK_DIM,
        heads: int = POOL_HEADS,
        queries: int = POOL_QUERIES,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.empty(queries, dim))
        self.ln_k = nn.LayerNorm(context_dim, eps=POOL_NORM_EPS)
        self.ln_q = nn.LayerNorm(dim, eps=POOL_NORM_EPS)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, context_dim] -> pooled [B, queries, dim]."""
        batch, n, _ = x.shape
        q = self.to_q(self.ln_q(self.query))  # [Q, dim]
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)
        head_dim = q.shape[-1] // self.heads
        q = q.view(1, -1, self.heads, head_dim).transpose(1, 2) * head_dim**-0.5
        k, v = (t.view(batch, n, self.heads, head_dim).transpose(1, 2) for t in (k, v))
        sim = q @ k.transpose(-1, -2)  # [B, heads, Q, N]
        sim = sim - sim.amax(dim=-1, keepdim=True)  # as the original (softmax is shift-invariant)
        out = sim.softmax(dim=-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(batch, -1, self.heads * head_dim))


class ConchV15(nn.Module):
    """CONCH v1.5 vision tower; `forward` gives the 768-d tile embedding TITAN consumes."""

    def __init__(self, **trunk_overrides: Any) -> None:
        super().__init__()
        self.trunk = ConchTrunk(**trunk_overrides)
        trunk_dim = self.trunk.embed_dim
        self.attn_pool_contrast = AttentionalPooler(EMBED_DIM, trunk_dim)
        self.ln_contrast = nn.LayerNorm(EMBED_DIM, eps=POOL_NORM_EPS)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised [B, 3, 448, 448] -> trunk tokens [B, 785, 1024]."""
        return self.trunk.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised [B, 3, 448, 448] -> [B, 768] (ln_contrast of the pooled query)."""
        return self.ln_contrast(self.attn_pool_contrast(self.forward_tokens(x))[:, 0])


def build(device: torch.device | str | None = None, **trunk_overrides: Any) -> ConchV15:
    """CONCH v1.5 on `device` (meta: no memory, no init; load with assign=True).

    `trunk_overrides` (e.g. depth=2, embed_dim=64, num_heads=4) build small twins for tests.
    """
    # weight_init='skip': every parameter is overwritten by the strict load that follows.
    with torch.device(device) if device is not None else nullcontext():
        return ConchV15(weight_init="skip", **trunk_overrides)


def prepare_state_dict(checkpoint: Any, path: Path | None) -> dict[str, torch.Tensor]:
    """The bare state dict; a square position table of another grid is resized as TRIDENT does."""
    state_dict = require_tensor_dict(checkpoint, "conch_v15", path, "a bare state dict of tensors")
    key = "trunk.pos_embed"
    table = state_dict.get(key)
    n_want = PRETRAIN_GRID**2 + 1
    if table is not None and table.ndim == 3 and table.shape[1] != n_want:
        side = math.isqrt(table.shape[1] - 1)
        if table.shape[0] == 1 and side * side == table.shape[1] - 1:
            log.warning(
                "conch_v15: %s is %s; resized to the 14 x 14 grid (bilinear, no antialias) as "
                "TRIDENT does at load time",
                key,
                tuple(table.shape),
            )
            state_dict[key] = resample_abs_pos_embed(
                table,
                new_size=[PRETRAIN_GRID, PRETRAIN_GRID],
                num_prefix_tokens=1,
                interpolation="bilinear",
                antialias=False,
            )
    return state_dict
