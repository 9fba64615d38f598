"""Prov-GigaPath slide encoder (Xu et al. 2024): LongNet (12 layers, 768-d) over tile embeddings.

Our own implementation in plain torch of `gigapath_slide_enc12l768d` as the reference computes it
(prov-gigapath @ 09d8e87 with its vendored torchscale): no flash-attn, xformers, fairscale or
torchscale. What the reference does, and we do the same:

- tiles are projected 1536 -> 768 and get a 2-D sin-cos position from their grid cell
  (floor(coord / tile size)): the first 384 dims encode y, the last 384 x; a class token leads;
- every layer is pre-LN with a sub-LayerNorm inside attention and FFN, exact GELU;
- attention is dilated: for each (segment length, dilation) branch the sequence (and then each
  segment) is zero-padded at the end, head group r of 16/dilation heads sees the positions whose
  offset in the segment is r mod dilation, and the branches are merged by their log-sum-exp.
  Padded keys are zero vectors after the projections and are not masked: each enters the
  softmax with logit 0, as in the reference (which passes no key-padding mask to flash-attn).

Differences, on purpose: positions are computed only for the tiles given (the reference builds
a 1,000,001-row table, 15.8 GB of host memory), coordinates beyond the 1000 x 1000 grid raise
(the reference aliases them silently), and tiles are put in row-major order (y, then x) unless
told otherwise (the reference takes them as given; the paper serialises row-major). Above
185,363 tokens (185363 is not a multiple of 8) the reference's padding may shift later segments
[READ in gigapath.md, not run]; we pad each segment on its own there, and no slide gets close.

Speed on 2 CPU cores in fp32: 10,000 tiles in ~19 s with 1.8 GB peak host memory
(scripts/tools/bench_models.py; the reference: 64-77 s and 15.8 GB to build).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from eagleflow.models.card import ModelCard, SlideEncoderRole, WeightFile
from eagleflow.models.checkpoints import unwrap_state_dict

CARD = ModelCard(
    name="gigapath_slide",
    summary="Prov-GigaPath slide encoder (Xu et al. 2024): LongNet, 12 layers, 768-d",
    weights=WeightFile(
        file_name="slide_encoder.pth",
        source=(
            "Hugging Face prov-gigapath/prov-gigapath (gated: log in and accept the terms), file "
            "slide_encoder.pth (the LongNet slide encoder)"
        ),
        container="LongNetViT state dict under the top-level key 'model' (247 keys)",
        state_dict_key="model",
    ),
    role=SlideEncoderRole(
        encoder="gigapath_slide",
        tile_encoders=("gigapath_tile",),
        dim=768,
        embedding="mean of the tile tokens of layer 11 (of 12), then `norm` (TRIDENT's choice)",
        uses_positions=True,
        order_dependent=True,  # dilated attention segments follow token order
        grid_limit=1000,  # slide_ngrids: positions exist for a 1000 x 1000 grid of tiles
    ),
)

IN_DIM = 1536
EMBED_DIM = 768
DEPTH = 12
NUM_HEADS = 16
FFN_DIM = 3072
GRID = 1000  # slide_ngrids: positions exist for a 1000 x 1000 grid of tiles
# get_optimal_segment_length(262144, 256): 2 ** linspace(10, 20, 5) truncated to int.
SEGMENT_LENGTHS = (1024, 5792, 32768, 185363, 1048576)
DILATED_RATIOS = (1, 2, 4, 8, 16)
LAYER_NORM_EPS = 1e-5  # torchscale's LayerNorms
POOL_NORM_EPS = 1e-6  # LongNetViT.norm
# The embedding users take: layer 11's output (the second-to-last layer, before the encoder's
# final LayerNorm), mean of the tile tokens, then `norm`. TRIDENT takes this one, and it is the
# default of the authors' fine-tuning (`--feat_layer 11`); mean pooling because the demo code
# says the class token was not trained in pre-training (the demo and TRIDENT pool).
DEFAULT_LAYER = 11
# Half precision (autocast; the merge and the softmax statistics stay fp32): max |bf16 - fp32|
# of the 13 pooled layers on 2,000 demo tiles 0.023 (values up to 3.6, cosine >= 0.99998),
# fp16 0.0023, measured with CPU autocast; on CUDA the same code runs the fused
# memory-efficient kernel (not measured here: no GPU). fp32 vs fp64: 8e-7 at 10,000 tiles.
BF16_TOLERANCE = 0.05
CELL_SIZE = 256  # any tile size works: encode_bag passes cells as multiples of it
CONTAINER_KEY = "model"
SIGNATURE_KEYS = ("encoder.layers.0.self_attn.inner_attn_ln.weight", "patch_embed.proj.weight")


class SlideEncoderOutput(NamedTuple):
    """Pooled slide embeddings of one bag of tiles."""

    layers: torch.Tensor  # [13, 768]: pool(x0) (the input embedding) .. pool(x12)
    final: torch.Tensor  # [768]: pool(encoder.layer_norm(x12)), the reference's plain forward

    @property
    def default(self) -> torch.Tensor:
        """[768]: layers[DEFAULT_LAYER], the embedding to use (see DEFAULT_LAYER)."""
        return self.layers[DEFAULT_LAYER]


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """MAE's 1-D sin-cos code: [sin(p w_k)]_k ++ [cos(p w_k)]_k, w_k = 10000^(-k/(dim/2)), float64."""
    omega = 10000.0 ** -(torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.to(torch.float64)[:, None] * omega.to(positions.device)[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def grid_positions(coords: torch.Tensor, tile_size: float, grid: int = GRID) -> torch.Tensor:
    """Level-0 (x, y) tile coordinates [L, 2] -> integer grid cells (gx, gy) [L, 2].

    Raises ValueError for a cell outside [0, grid): the reference would alias or wrap it.
    """
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be [L, 2] (x, y), got {tuple(coords.shape)}")
    if not tile_size > 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    cells = torch.floor(coords.to(torch.float64) / float(tile_size)).to(torch.int64)
    if len(cells) and (cells.min() < 0 or cells.max() >= grid):
        worst = coords[(cells < 0).any(1) | (cells >= grid).any(1)][0].tolist()
        raise ValueError(
            f"tile at (x, y) = {tuple(worst)} with tile size {tile_size} lies outside the "
            f"{grid} x {grid} grid of positions the slide encoder has (cells 0..{grid - 1}); "
            f"coordinates must be level-0 pixels >= 0 and < {grid} * tile_size = "
            f"{grid * float(tile_size):g}"
        )
    return cells


def position_embedding(cells: torch.Tensor, dim: int = EMBED_DIM) -> torch.Tensor:
    """The rows 1 + gx * 1000 + gy of the reference's 2-D sin-cos table, [L, dim] float64.

    Row = [E(gy), E(gx)]: the first half encodes y, the second half x.
    """
    gx, gy = cells[:, 0], cells[:, 1]
    return torch.cat([sincos_1d(gy, dim // 2), sincos_1d(gx, dim // 2)], dim=1)


def row_major_order(coords: torch.Tensor) -> torch.Tensor:
    """Indices that sort tiles by y, then x (stable: equal coordinates keep their order)."""
    coords = coords.to(torch.float64)
    by_x = torch.sort(coords[:, 0], stable=True).indices
    return by_x[torch.sort(coords[by_x, 1], stable=True).indices]


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, fused: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention [B, H, L, D] -> (out [B, H, L, D], log-sum-exp of the scores [B, H, L]).

    Fused kernels where torch has one that returns the log-sum-exp (CPU flash, any float dtype;
    CUDA memory-efficient, fp32/fp16/bf16): aten ops of torch itself, not a public API, so
    tests compare them with the explicit path. Otherwise, or with fused=False, explicit softmax.
    """
    if fused and q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, scale=scale
        )
        return out, lse.to(accumulation_dtype(q.dtype))
    if fused and q.device.type == "cuda" and q.dtype != torch.float64:
        out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q.contiguous(), k.contiguous(), v.contiguous(), None, True, scale=scale
        )
        return out, lse[..., : q.shape[-2]].float()
    return _explicit_attention(q, k, v, scale)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32, fp64 for fp64: softmax and merge never run in half."""
    return torch.promote_types(dtype, torch.float32)


def _explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, block_bytes: int = 1 << 26
) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_with_lse by matmul and softmax, in query blocks of about `block_bytes` scores."""
    rows = max(1, block_bytes // max(1, q.shape[0] * q.shape[1] * k.shape[-2] * 4))
    outs, lses = [], []
    for start in range(0, q.shape[-2], rows):
        scores = q[..., start : start + rows, :] @ k.transpose(-1, -2)
        scores = scores.to(accumulation_dtype(q.dtype)) * scale
        lse = torch.logsumexp(scores, dim=-1)
        outs.append((torch.exp(scores - lse[..., None]).to(v.dtype)) @ v)
        lses.append(lse)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


@dataclass(frozen=True)
class _Branch:
    """One (segment length, dilation) branch laid over a sequence of n tokens and some heads."""

    n: int
    heads: int
    segment: int  # min(segment length, n)
    ratio: int

    @property
    def n_seg(self) -> int:
        return -(-self.n // self.segment)

    @property
    def per_group(self) -> int:  # positions per group in a segment, padding included
        return -(-self.segment // self.ratio)

    def to_groups(self, x: torch.Tensor) -> torch.Tensor:
        """[n, H, D] -> [n_seg * r, H / r, per_group, D]: zero-padded, each head group's positions."""
        n_seg, segment, ratio, heads = self.n_seg, self.segment, self.ratio, self.heads
        x = F.pad(x, (0, 0, 0, 0, 0, n_seg * segment - self.n)).view(n_seg, segment, heads, -1)
        x = F.pad(x, (0, 0, 0, 0, 0, self.per_group * ratio - segment))
        x = x.view(n_seg, self.per_group, ratio, ratio, heads // ratio, x.shape[-1])
        # the diagonal (offset residue == head group) -> [n_seg, per_group, H/r, D, r]
        x = x.diagonal(dim1=2, dim2=3).permute(0, 4, 2, 1, 3)
        return x.reshape(n_seg * ratio, heads // ratio, self.per_group, -1)

    def to_dense(self, grouped: torch.Tensor, fill: float) -> torch.Tensor:
        """Inverse of to_groups for [.., per_group, *rest] (rest: (D,) or ()), `fill` elsewhere."""
        n_seg, ratio, group_heads = self.n_seg, self.ratio, self.heads // self.ratio
        rest = tuple(grouped.shape[3:])
        dense = grouped.new_full((n_seg, self.per_group, ratio, ratio, group_heads, *rest), fill)
        grouped = grouped.view(n_seg, ratio, group_heads, self.per_group, *rest)
        order = (0, 3, 2, *range(4, 4 + len(rest)), 1)  # -> [n_seg, per_group, H/r, *rest, r]
        dense.diagonal(dim1=2, dim2=3).copy_(grouped.permute(order))
        dense = dense.reshape(n_seg, self.per_group * ratio, self.heads, *rest)[:, : self.segment]
        return dense.reshape(n_seg * self.segment, self.heads, *rest)[: self.n]


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int] = SEGMENT_LENGTHS,
    dilated_ratios: Sequence[int] = DILATED_RATIOS,
    fused: bool = True,
) -> torch.Tensor:
    """LongNet's dilated attention of one sequence: q, k, v [N, H, D] -> [N, H, D].

    Each branch (segment length sl, dilation r) zero-pads the sequence to a multiple of
    min(sl, N), each segment to a multiple of r, and lets head group g = h // (H / r) attend among
    the positions at offsets = g (mod r) of its segment, zero keys included. The branches are
    merged per (position, head) with weights softmax(log-sum-exp), which equals one softmax over
    the union of the key sets; branches that do not cover a (position, head) do not count.
    """
    n, heads, dim = q.shape
    merged = total = running_max = None
    for segment, ratio in zip(segment_lengths, dilated_ratios, strict=True):
        if heads % ratio:
            raise ValueError(f"{heads} heads cannot be split into {ratio} dilation groups")
        branch = _Branch(n, heads, min(segment, n), ratio)
        out, lse = attention_with_lse(
            branch.to_groups(q), branch.to_groups(k), branch.to_groups(v), dim**-0.5, fused
        )
        out, lse = branch.to_dense(out.to(lse.dtype), 0.0), branch.to_dense(lse, -math.inf)
        # Online softmax over the branches' log-sum-exps (one branch's tensors at a time).
        if merged is None:  # the first branch (dilation 1) covers every (position, head)
            merged, total, running_max = out, torch.ones_like(lse), lse
            continue
        new_max = torch.maximum(running_max, lse)
        old_weight, weight = torch.exp(running_max - new_max), torch.exp(lse - new_max)
        merged.mul_(old_weight[..., None]).add_(out * weight[..., None])
        total.mul_(old_weight).add_(weight)
        running_max = new_max
    return merged.div_(total[..., None]).to(q.dtype)


class DilatedSelfAttention(nn.Module):
    """torchscale DilatedAttention (self-attention, no mask): projections, dilated attention,
    sub-LayerNorm, output projection."""

    def __init__(
        self,
        dim: int = EMBED_DIM,
        heads: int = NUM_HEADS,
        segment_lengths: Sequence[int] = SEGMENT_LENGTHS,
        dilated_ratios: Sequence[int] = DILATED_RATIOS,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.segment_lengths = tuple(segment_lengths)
        self.dilated_ratios = tuple(dilated_ratios)
        self.fused = True
        # Same registration order as torchscale, so the state dict lists keys as the file does.
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.inner_attn_ln = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, dim] -> [N, dim]."""
        n, dim = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, self.heads, dim // self.heads)

        attended = dilated_attention(
            split(self.q_proj(x)),
            split(self.k_proj(x)),
            split(self.v_proj(x)),
            self.segment_lengths,
            self.dilated_ratios,
            self.fused,
        )
        return self.out_proj(self.inner_attn_ln(attended.reshape(n, dim)))


class FeedForward(nn.Module):
    """torchscale FeedForwardNetwork with subln: fc1, exact GELU, LayerNorm, fc2."""

    def __init__(self, dim: int = EMBED_DIM, hidden: int = FFN_DIM) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, rows: int = 2048) -> torch.Tensor:
        """Row blocks: the [N, 3072] hidden state of 10,000 tiles would be 120 MB per copy."""
        return torch.cat([self._block(x[start : start + rows]) for start in range(0, len(x), rows)])

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        hidden = F.gelu(hidden.to(accumulation_dtype(hidden.dtype))).type_as(hidden)
        return self.fc2(self.ffn_layernorm(hidden))


class EncoderLayer(nn.Module):
    """Pre-LN LongNet encoder layer (subln: residual weight 1); dropout and drop-path are eval no-ops."""

    def __init__(self, **attention: Any) -> None:
        super().__init__()
        self.self_attn = DilatedSelfAttention(**attention)
        self.self_attn_layer_norm = nn.LayerNorm(EMBED_DIM, eps=LAYER_NORM_EPS)
        self.ffn = FeedForward()
        self.final_layer_norm = nn.LayerNorm(EMBED_DIM, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.ffn(self.final_layer_norm(x))


class Encoder(nn.Module):
    def __init__(self, depth: int = DEPTH, **attention: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(**attention) for _ in range(depth)])
        self.layer_norm = nn.LayerNorm(EMBED_DIM, eps=LAYER_NORM_EPS)


class PatchEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN_DIM, EMBED_DIM)


class GigaPathSlideEncoder(nn.Module):
    """LongNetViT `gigapath_slide_enc12l768d` (in 1536, 768-d, 12 layers, 16 heads).

    `forward(tile_embeddings [L, 1536], coords [L, 2], tile_size)` -> the default embedding [768]
    (see DEFAULT_LAYER); `encode` gives all 13 pooled layers and the final-norm output.
    `coords` are the tiles' level-0 (x, y) top-left pixels and `tile_size` the tile's size in
    level-0 pixels (as TRIDENT sets it): the grid cell is floor(coord / tile_size).
    Segment lengths and dilations are parameters only so that tests can use small ones.
    """

    def __init__(
        self,
        depth: int = DEPTH,
        segment_lengths: Sequence[int] = SEGMENT_LENGTHS,
        dilated_ratios: Sequence[int] = DILATED_RATIOS,
    ) -> None:
        super().__init__()
        if len(segment_lengths) != len(dilated_ratios):
            raise ValueError("one dilation per segment length")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, EMBED_DIM))
        self.patch_embed = PatchEmbed()
        self.encoder = Encoder(
            depth, segment_lengths=segment_lengths, dilated_ratios=dilated_ratios
        )
        self.norm = nn.LayerNorm(EMBED_DIM, eps=POOL_NORM_EPS)

    def set_fused_attention(self, fused: bool) -> None:
        """Fused attention kernels (default) or explicit softmax; both give the same result."""
        for layer in self.encoder.layers:
            layer.self_attn.fused = fused

    def tokens(
        self,
        tile_embeddings: torch.Tensor,
        coords: torch.Tensor,
        tile_size: float,
        row_major: bool = True,
    ) -> torch.Tensor:
        """The encoder's input [L + 1, 768]: class token, then the tiles (row-major by default)."""
        if tile_embeddings.ndim == 3 and tile_embeddings.shape[0] == 1:
            tile_embeddings = tile_embeddings[0]
        if coords.ndim == 3 and coords.shape[0] == 1:
            coords = coords[0]
        if tile_embeddings.ndim != 2 or tile_embeddings.shape[1] != IN_DIM:
            raise ValueError(
                f"tile embeddings must be [L, {IN_DIM}], got {tuple(tile_embeddings.shape)}"
            )
        if len(coords) != len(tile_embeddings):
            raise ValueError(f"{len(tile_embeddings)} tile embeddings but {len(coords)} coords")
        if len(coords) == 0:
            raise ValueError("the slide encoder needs at least one tile")
        cells = grid_positions(coords, tile_size)
        if row_major:
            order = row_major_order(coords)
            tile_embeddings, cells = tile_embeddings[order.to(tile_embeddings.device)], cells[order]
        weight = self.patch_embed.proj.weight
        x = self.patch_embed.proj(tile_embeddings.to(weight.device, weight.dtype))
        x = x + position_embedding(cells).to(x.device, x.dtype)
        return torch.cat([self.cls_token[0].to(x.dtype), x])

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """global_pool=True: `norm` of the mean of the tile tokens (class token excluded)."""
        return self.norm(x[1:].mean(0))

    def encode(
        self,
        tile_embeddings: torch.Tensor,
        coords: torch.Tensor,
        tile_size: float,
        row_major: bool = True,
    ) -> SlideEncoderOutput:
        """All pooled outputs: the input embedding and each layer's output, and the final norm."""
        x = self.tokens(tile_embeddings, coords, tile_size, row_major)
        pooled = [self.pool(x)]
        for layer in self.encoder.layers:
            x = layer(x)
            pooled.append(self.pool(x))
        return SlideEncoderOutput(torch.stack(pooled), self.pool(self.encoder.layer_norm(x)))

    def encode_bag(
        self,
        feats: torch.Tensor,
        cells: torch.Tensor,
        tile_encoder: str,
        layer: int = DEFAULT_LAYER,
    ) -> torch.Tensor:
        """The slide-encoder interface: tiles at canvas cells, in the given order -> [768], the
        pooled output of `layer` (0: the input embedding, i: layer i's output)."""
        if tile_encoder != "gigapath_tile":
            raise ValueError(f"gigapath_slide runs over gigapath_tile features, not {tile_encoder}")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= DEPTH:
            raise ValueError(
                f"slide_encoders.gigapath_slide.layer must be an integer 0..{DEPTH} (0: the input "
                f"embedding, i: layer i's output; 11 as TRIDENT), got {layer!r}"
            )
        # cell = floor(coord / tile size): cells * CELL_SIZE at tile size CELL_SIZE are exact
        coords = cells.to(torch.int64) * CELL_SIZE
        return self.encode(feats, coords, CELL_SIZE, row_major=False).layers[layer]

    def forward(
        self,
        tile_embeddings: torch.Tensor,
        coords: torch.Tensor,
        tile_size: float,
        row_major: bool = True,
    ) -> torch.Tensor:
        """[L, 1536] tile embeddings, [L, 2] level-0 (x, y), tile size -> [768] (DEFAULT_LAYER)."""
        return self.encode(tile_embeddings, coords, tile_size, row_major).default


def build(device: torch.device | str | None = None, **overrides: Any) -> GigaPathSlideEncoder:
    """The slide encoder on `device` (meta: no memory, no init; then load with assign=True)."""
    with torch.device(device) if device is not None else nullcontext():
        return GigaPathSlideEncoder(**overrides)


def prepare_state_dict(checkpoint: Any, path: Path | None) -> dict[str, torch.Tensor]:
    """ckpt['model'], as the reference reads it (a bare state dict is accepted too)."""
    return unwrap_state_dict(checkpoint, CONTAINER_KEY, "gigapath_slide", path)
