"""TITAN slide encoder (Mahmood lab, Ding et al. 2024/2025): a 6-layer ViT over the 2-D grid of
CONCH v1.5 tile features, with 2-D ALiBi and a CoCa attentional pooler.

Our own plain-torch implementation of the vision tower of the Hugging Face remote code
(`MahmoodLab/TITAN`, `vision_transformer.py`, as vendored in DIAGNijmegen/unicorn_baseline @
273912d; `encode_slide_from_patch_features(f, c, ps)` = `vision_encoder(f, c, ps, no_proj=True)`).
For one bag of N tiles with CONCH v1.5 features f [N, 768] on integer cells (gx, gy):

1. grid: the original floors (coords - min) / patch_size_lv0, subtracts the minimum, scatters
   the features into an H x W grid (H along x), and calls a cell tissue iff its feature vector
   is not all zeros. Background cells are REMOVED (not masked); the tokens are the tissue cells
   in x-major order (gx, then gy). We take the stage's cells, drop all-zero feature rows as the
   original does, and sort the same way; the output does not depend on the input order.
2. tokens = [cls, GELU(Linear(f))] (exact GELU; no position embedding);
3. 6 pre-LN blocks (LayerNorm eps 1e-6, 12 heads of 64, qkv bias, no LayerScale):
   x += proj(softmax(q k^T / 8 + bias) v); x += fc2(GELU(fc1(norm2 x))); then `norm`.
   bias[h, i, j] = -slope_h * ||cell_i - cell_j||_2 (Euclidean, in cells; the distance in
   float64, rounded to fp32, times the fp32 slope), 0 in the CLS row and column. Slopes in the
   original order: [2^-1 .. 2^-8, 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5] (the ALiBi recipe for 12).
4. slide embedding = attn_pool_contrastive(x): ln_q(query [1, 768]) attends over every token,
   CLS included, through ln_k (pooler LayerNorms eps 1e-5) and nn.MultiheadAttention (8 heads
   of 96, packed in_proj). We return it WITHOUT `proj` (`no_proj=True`): the 768-d embedding
   users take. `x @ proj` (then L2-normalised) is the zero-shot space; `attn_pool` (128
   queries) feeds the text decoder; both load but do not run here.

Differences, on purpose:
- Memory. The original builds the [12, n+1, n+1] fp32 bias at once plus int64/float64 pairwise
  buffers, ~120 bytes x n^2 (about 12 GB at 10,000 tissue tiles; TITAN issue #33). We compute the
  bias per block of query rows (`BIAS_BLOCK_BYTES` of bias at a time) inside each attention, with
  the same arithmetic, so the bias is bit-identical and the peak stays bounded: 10,000 tiles
  peak at 1.43 GB host memory for the whole process (0.5 GB for the forward itself).
- Two tiles in one cell: the original sums their features silently (`index_add_`); we raise.
- Float coordinates: the original fails inside `index_add_`; `grid_cells` says why.

Input and tiling: CONCH v1.5 features of 512 px tiles at 0.5 µm/px (256 µm), resized to 448;
the stage maps level-0 coordinates to cells by exact integer division by the slide's level-0
tile size (`grid_cells` documents the original's mapping). Only cell differences matter: the
output is invariant to translation and (up to fp rounding) to x/y swap and mirroring.

Published file: `model.safetensors` of Hugging Face `MahmoodLab/TITAN` (gated), the whole TITAN:
slide encoder under `vision_encoder.` (96 keys, stripped), text tower under `text_encoder.`
(ignored: never needed for slide embeddings). CONCH v1.5 is a separate file (`conch_v15.py`).

Patient level: where the paper's TITAN embeddings were made is not recorded (EAGLE reads
per-patient files made elsewhere). STAMP v2 makes one virtual slide per patient (features and
coordinates concatenated, slide i+1 shifted along x by slide i's shifted max x + one tile, y
untouched, equal µm/px required), so the slides attend to each other under the ALiBi distance
penalty; TRIDENT is slide-level only, and Patho-Bench fuses late (the mean of slide embeddings,
which its README requires for TITAN). Our stage does STAMP's single pass: it puts a patient's
slides side by side on one canvas of cells with empty cells between them; the gap only lowers
the cross-slide attention (larger distances), and no two tiles can share a cell.

Speed and memory, CPU fp32, 2 threads (scripts/tools/bench_models.py): see the note above
BF16_TOLERANCE below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eagleflow.models.card import ModelCard, SlideEncoderRole, WeightFile
from eagleflow.models.checkpoints import random_state_dict, require_tensor_dict
from eagleflow.weights import WeightsError

CARD = ModelCard(
    name="titan",
    summary="TITAN slide encoder (Mahmood lab): 6-layer ViT, 2-D ALiBi, attentional pooler, 768-d",
    weights=WeightFile(
        file_name="model.safetensors",
        source=(
            "Hugging Face MahmoodLab/TITAN (gated: log in and accept the terms), file "
            "model.safetensors (the whole TITAN; the slide encoder is its vision_encoder)"
        ),
        container=(
            "flat safetensors of the whole TITAN: slide encoder under 'vision_encoder.' (96 keys, "
            "prefix stripped), text tower under 'text_encoder.' (ignored)"
        ),
    ),
    role=SlideEncoderRole(
        encoder="titan",
        tile_encoders=("conch_v15",),
        dim=768,
        embedding="attn_pool_contrastive output without proj (encode_slide_from_patch_features)",
        uses_positions=True,
        order_dependent=False,  # tokens are sorted by cell (x-major), as the original's grid
    ),
)

IN_DIM = 768  # CONCH v1.5 features
EMBED_DIM = 768
DEPTH = 6
NUM_HEADS = 12
MLP_RATIO = 4
POOL_HEADS = 8
POOL_QUERIES = 128  # attn_pool (captioning tokens); attn_pool_contrastive has 1
NORM_EPS = 1e-6  # the ViT's LayerNorms
POOL_NORM_EPS = 1e-5  # the poolers' ln_q / ln_k (nn.LayerNorm default)
TILE_ENCODERS = ("conch_v15",)
PREFIX = "vision_encoder."
IGNORED_PREFIXES = ("text_encoder.",)  # the text tower: not needed for slide embeddings
SIGNATURE_KEYS = (
    "vision_encoder.blocks.modules_list.0.attn.qkv.weight",
    "vision_encoder.attn_pool_contrastive.attn.in_proj_weight",
)
# Bias of one block of query rows: [12, rows, n + 1] fp32 of at most this many bytes.
BIAS_BLOCK_BYTES = 1 << 26
# bf16 autocast vs fp32 (CPU autocast): max |diff| of the 768-d embedding 0.010 on the tests'
# 2-block twin (300 tiles, values up to 2.0) and 0.014 with the full-size demo weights (1,000
# tiles, values up to 2.8), cosine >= 0.99998; on CUDA the same code runs (not measured: no GPU).
# fp32 vs fp64: 6e-7 (twin). Stated bound for half precision:
BF16_TOLERANCE = 0.05
# CPU fp32, torch.set_num_threads(2), demo weights, a blob of tissue cells with holes, one
# encode_bag in a fresh process (scripts/tools/bench_models.py), shared 2-core machine: 2,000
# tiles 1.8 s, peak RSS 1.15 GB; 10,000 tiles 50 s, peak RSS 1.43 GB (load average 1-2; at load
# ~7: 10 s and 198 s). 0.93 GB of the peak is there before the call (torch, the model and its
# demo weights). The original's bias alone would take ~12 GB at 10,000 tiles.


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi head slopes in the original order (Press et al.'s recipe, as the TITAN code has it).

    For a power of two n: 2^(-8/n), 2^(-16/n), ...; otherwise the slopes of the largest power
    of two below n, followed by every other slope of twice that power (not sorted).
    """

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_two(heads)
    base = 2 ** math.floor(math.log2(heads))
    return power_of_two(base) + power_of_two(2 * base)[0::2][: heads - base]


def grid_cells(coords: torch.Tensor, patch_size_lv0: int) -> torch.Tensor:
    """Level-0 (x, y) pixel coordinates [N, 2] -> cells [N, 2], as the original computes them.

    floor((coords - min) / patch_size_lv0), minus the minimum cell. Coordinates must be integers
    (the original's `index_add_` fails on floats); patch_size_lv0 is the level-0 distance between
    adjacent tiles (512 at 20x, 1024 at 40x for TITAN's 256 µm tiles). The cells are exact only
    if the coordinates are: STAMP's int64(float32(µm) / (µm/px)) turns 224 k into 224 k - 1 for
    many k at 256 µm / 224 px, which moves tiles into a neighbour's cell.
    """
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be [N, 2] (x, y), got {tuple(coords.shape)}")
    if coords.dtype.is_floating_point or coords.dtype == torch.bool:
        raise ValueError(
            f"coords must be integer level-0 pixels, got {coords.dtype}: round them first "
            "(the original fails on float coordinates)"
        )
    if isinstance(patch_size_lv0, bool) or int(patch_size_lv0) != patch_size_lv0:
        raise ValueError(f"patch_size_lv0 must be an integer, got {patch_size_lv0!r}")
    if patch_size_lv0 <= 0:
        raise ValueError(f"patch_size_lv0 must be positive, got {patch_size_lv0}")
    coords = coords.to(torch.int64)
    cells = torch.floor_divide(coords - coords.min(dim=0).values, int(patch_size_lv0))
    return cells - cells.min(dim=0).values


def x_major_order(cells: torch.Tensor) -> torch.Tensor:
    """Indices that sort cells by gx, then gy: the original's flat index gx * W + gy."""
    shifted = cells - cells.min(dim=0).values
    width = int(shifted[:, 1].max()) + 1
    return torch.argsort(shifted[:, 0] * width + shifted[:, 1])


def check_unique_cells(cells: torch.Tensor) -> None:
    """Raise ValueError when two tiles share a cell (the original would sum their features)."""
    unique, counts = torch.unique(cells, dim=0, return_counts=True)
    if len(unique) == len(cells):
        return
    shared = unique[counts > 1]
    raise ValueError(
        f"{int((counts[counts > 1]).sum())} tiles share {len(shared)} grid cell(s), e.g. cell "
        f"(x, y) = {tuple(shared[0].tolist())}: TITAN needs one tile per cell (the original sums "
        "their features silently). Tiles must lie on one lattice whose spacing is the tile size "
        "used to compute the cells: check the level-0 tile size and that coordinates are exact "
        "integers (float µm-to-pixel conversions round some tiles into a neighbour's cell)"
    )


def alibi_bias(cells: torch.Tensor, start: int, stop: int, slopes: torch.Tensor) -> torch.Tensor:
    """Rows [start, stop) of the [H, n+1, n+1] ALiBi bias of tokens [cls, tile cells], fp32.

    bias[h, i, j] = -(fp32(sqrt(dx^2 + dy^2)) * slope_h) between tiles i-1 and j-1, 0 where i or
    j is the class token: the original's arithmetic (integer squares summed exactly, sqrt in
    float64, rounded to fp32, times the fp32 slope, negated), one block of rows at a time.
    """
    n = cells.shape[0]
    out = torch.empty(len(slopes), stop - start, n + 1, dtype=torch.float32, device=cells.device)
    out[:, :, 0] = 0.0  # the class token's column ...
    if start == 0:
        out[:, 0] = 0.0  # ... and row
    first = max(start, 1)
    if first < stop:
        # Integer cells in float64: the squares and their sum are exact (< 2^53), as in numpy.
        pos = cells.to(torch.float64)
        gx, gy = pos[:, 0].contiguous(), pos[:, 1].contiguous()  # 1-D: fast broadcasting
        dx = gx[first - 1 : stop - 1, None] - gx[None, :]
        dy = gy[first - 1 : stop - 1, None] - gy[None, :]
        dist = dx.mul_(dx).addcmul_(dy, dy).sqrt_().to(torch.float32)
        # (d * s) * -1 == d * (-s) bit for bit: negation is exact.
        neg = slopes.to(torch.float32).neg()[:, None, None]
        torch.mul(dist[None], neg, out=out[:, first - start :, 1:])
    return out


@dataclass(frozen=True)
class Alibi:
    """What the attention bias is computed from: tile cells in token order and head slopes."""

    cells: torch.Tensor  # [n, 2] int64
    slopes: torch.Tensor  # [heads] fp32
    block_bytes: int = BIAS_BLOCK_BYTES  # bias bytes per block of query rows


class Attention(nn.Module):
    """Multi-head self-attention with the ALiBi bias added to the scores, per block of rows."""

    def __init__(self, dim: int = EMBED_DIM, heads: int = NUM_HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, alibi: Alibi) -> torch.Tensor:
        """Tokens [n+1, dim] (class first) -> [n+1, dim], one block of query rows at a time."""
        n, dim = x.shape
        head_dim = dim // self.heads
        q, k, v = self.qkv(x).view(n, 3, self.heads, head_dim).permute(1, 2, 0, 3).unbind(0)
        rows = max(1, alibi.block_bytes // (self.heads * n * 4))
        out = torch.empty_like(q)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            bias = alibi_bias(alibi.cells, start, stop, alibi.slopes).to(q.dtype)
            out[:, start:stop] = F.scaled_dot_product_attention(
                q[None, :, start:stop], k[None], v[None], attn_mask=bias[None]
            )[0]
        return self.proj(out.transpose(0, 1).reshape(n, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int = EMBED_DIM, hidden: int = MLP_RATIO * EMBED_DIM) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block (no LayerScale, no drop path)."""

    def __init__(self, dim: int = EMBED_DIM, heads: int = NUM_HEADS) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, MLP_RATIO * dim)

    def forward(self, x: torch.Tensor, alibi: Alibi) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), alibi)
        return x + self.mlp(self.norm2(x))


class Blocks(nn.Module):
    """The original's CustomSequential: blocks under `modules_list` (the checkpoint's names)."""

    def __init__(self, depth: int, dim: int, heads: int) -> None:
        super().__init__()
        self.modules_list = nn.ModuleList(Block(dim, heads) for _ in range(depth))


class AttentionalPooler(nn.Module):
    """CoCa pooler: ln_q(queries) attend over ln_k(tokens) through nn.MultiheadAttention."""

    def __init__(self, dim: int = EMBED_DIM, heads: int = POOL_HEADS, queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.empty(queries, dim))
        self.attn = nn.MultiheadAttention(dim, heads, kdim=dim, vdim=dim)
        self.ln_q = nn.LayerNorm(dim, eps=POOL_NORM_EPS)
        self.ln_k = nn.LayerNorm(dim, eps=POOL_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [n, dim] -> [queries, dim] (no mask: every token, class included)."""
        keys = self.ln_k(x)[:, None]  # [n, batch 1, dim]: MultiheadAttention's (L, B, E)
        out, _ = self.attn(self.ln_q(self.query)[:, None], keys, keys, need_weights=False)
        return out[:, 0]


class TitanSlideEncoder(nn.Module):
    """TITAN's vision tower; `encode_bag` gives the 768-d slide embedding."""

    def __init__(
        self,
        depth: int = DEPTH,
        dim: int = EMBED_DIM,
        heads: int = NUM_HEADS,
        in_dim: int = IN_DIM,
        pool_heads: int = POOL_HEADS,
        pool_queries: int = POOL_QUERIES,
    ) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.proj = nn.Parameter(torch.empty(dim, dim))  # zero-shot projection (not applied)
        self.patch_embed = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU())
        self.blocks = Blocks(depth, dim, heads)
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn_pool = AttentionalPooler(dim, pool_heads, pool_queries)
        self.attn_pool_contrastive = AttentionalPooler(dim, pool_heads, 1)
        self.in_dim, self.heads = in_dim, heads
        self.block_bytes = BIAS_BLOCK_BYTES

    def slopes(self) -> torch.Tensor:
        return torch.tensor(alibi_slopes(self.heads), dtype=torch.float32)

    def forward_tokens(self, feats: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Tissue features [n, in_dim] on cells [n, 2], tokens in the given order -> [n+1, dim]."""
        device = self.cls_token.device
        x = self.patch_embed(feats.to(device=device, dtype=self.cls_token.dtype))
        x = torch.cat([self.cls_token[0], x], dim=0)
        alibi = Alibi(cells.to(device, torch.int64), self.slopes().to(device), self.block_bytes)
        for block in self.blocks.modules_list:
            x = block(x, alibi)
        return self.norm(x)

    def forward(self, feats: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """One bag: features [N, in_dim] float, cells [N, 2] int (x, y) -> slide embedding [dim].

        Tiles whose features are all zero are background, dropped as the original does; the
        others are sorted x-major. Raises ValueError when two tiles share a cell.
        """
        if feats.ndim == 3 and feats.shape[0] == 1:  # the original's leading batch of one
            feats = feats[0]
        if cells.ndim == 3 and cells.shape[0] == 1:
            cells = cells[0]
        if feats.ndim != 2 or feats.shape[1] != self.in_dim:
            raise ValueError(f"TITAN expects features [N, {self.in_dim}], got {tuple(feats.shape)}")
        if cells.shape != (feats.shape[0], 2):
            raise ValueError(
                f"{feats.shape[0]} tile features but cells of shape {tuple(cells.shape)}"
            )
        if cells.dtype.is_floating_point or cells.dtype == torch.bool:
            raise ValueError(f"cells must be integers, got {cells.dtype}")
        if feats.shape[0] == 0:
            raise ValueError("TITAN needs at least one tile")
        cells = cells.to(torch.int64)
        check_unique_cells(cells)
        tissue = (feats != 0).any(dim=1)  # the original's bg_mask: an all-zero cell is background
        feats, cells = feats[tissue], cells[tissue]
        if len(cells):
            order = x_major_order(cells)
            feats, cells = feats[order], cells[order]
        return self.attn_pool_contrastive(self.forward_tokens(feats, cells))[0]

    def encode_bag(
        self, feats: torch.Tensor, cells: torch.Tensor, tile_encoder: str = TILE_ENCODERS[0]
    ) -> torch.Tensor:
        """The slide-encoder interface: CONCH v1.5 features [N, 768], cells [N, 2] -> [768]."""
        if tile_encoder not in TILE_ENCODERS:
            raise ValueError(
                f"TITAN was trained on {', '.join(TILE_ENCODERS)} features, not {tile_encoder!r}"
            )
        return self(feats, cells)

    def encode_coords(
        self, feats: torch.Tensor, coords: torch.Tensor, patch_size_lv0: int
    ) -> torch.Tensor:
        """`encode_slide_from_patch_features(feats, coords, patch_size_lv0)` of the original, for
        integer level-0 coordinates (raises where the original would sum tiles in one cell)."""
        if coords.ndim == 3 and coords.shape[0] == 1:
            coords = coords[0]
        return self(feats, grid_cells(coords, patch_size_lv0))


def build(device: torch.device | str | None = None, **overrides: Any) -> TitanSlideEncoder:
    """The slide encoder on `device` (meta: no memory, no init; then load with assign=True).

    `overrides` (depth, dim, heads, in_dim, pool_heads, pool_queries) build small twins.
    """
    with torch.device(device) if device is not None else nullcontext():
        return TitanSlideEncoder(**overrides)


def published_key(key: str) -> str:
    """A model key -> its name in model.safetensors."""
    return PREFIX + key


def prepare_state_dict(
    checkpoint: Any, path: Path | None, ignored_prefixes: Sequence[str] = IGNORED_PREFIXES
) -> dict[str, torch.Tensor]:
    """The `vision_encoder.` tensors with the prefix stripped; `text_encoder.*` dropped.

    Any other key is kept as it is (a bare vision-tower dict loads too) so that the strict load
    names it; only keys under IGNORED_PREFIXES are dropped, so they cannot stand in for a
    missing vision key.
    """
    state_dict = require_tensor_dict(checkpoint, "titan", path, "a flat dict of tensors")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(tuple(ignored_prefixes)):
            continue
        name = key.removeprefix(PREFIX)
        if name in out:
            raise WeightsError(
                f"titan: weight file {str(path)!r} holds {name!r} both with and without the "
                f"{PREFIX!r} prefix"
            )
        out[name] = value
    return out


def demo_state_dict(model: TitanSlideEncoder, seed: int) -> dict[str, torch.Tensor]:
    """checkpoints.random_state_dict, with the poolers' packed projections at unit gain.

    `in_proj_weight` belongs to nn.MultiheadAttention (not an nn.Linear), so the generic demo
    weights give it std 0.02: the poolers' attention would be uniform, a plain mean of tokens.
    """
    state_dict = random_state_dict(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for key, value in state_dict.items():
        if key.endswith("attn.in_proj_weight"):
            fan_in = value.shape[1]
            state_dict[key] = torch.empty_like(value).normal_(
                0.0, fan_in**-0.5, generator=generator
            )
    return state_dict
