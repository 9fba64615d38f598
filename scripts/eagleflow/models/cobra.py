"""COBRA (Lenz et al., KatherLab, CVPR 2025): Mamba-2 tile weighting over one foundation model's
tile features. COBRA-II (`cobra`, the default) and COBRA-I (`cobra_i`), in plain torch.

Architecture (KatherLab/COBRA@49d2311 `cobra/model/cobra.py`, `utils/mamba2.py`, `utils/abmil.py`;
Mamba-2 from mamba_ssm 2.2.4 / 2.3.1, whose `*_ref` functions state the exact math):

- `embed[str(D)]`, one per trained feature dimension D: LayerNorm(D) -> Linear(D, 768) -> SiLU ->
  Linear(768, 768) (keys `head.0/1/4`; index 2 is an eval no-op dropout).
- `mamba_enc`: Linear(768, 768) -> exact GELU, then per layer `h = h + Mamba2(LayerNorm(h))`, then
  `classifier` Linear(768, 768). `mamba_enc.norm` is in the file but unused, as in the original.
- Mamba2 (d_model 768, d_state 128, d_conv 4, expand 2, headdim 64 -> 24 heads, ngroups 1):
  `in_proj` 768 -> [z 1536 | x 1536 | B 128 | C 128 | dt 24]; xBC = silu(causal depthwise conv,
  kernel 4, with bias); A = -exp(A_log); dt = softplus(dt + dt_bias) (fp32); per head h (channels
  64h..64h+63) the state S [64, 128] runs S_t = exp(dt_t A) S_{t-1} + dt_t x_t (x) B_t,
  y_t = S_t C_t + D_h x_t; then gated RMSNorm over all 1536 channels, norm AFTER the gate:
  g = y * silu(z), g / sqrt(mean(g^2) + 1e-5) * weight (fp32); `out_proj` 1536 -> 768.
- `norm` LayerNorm(768) on the encoder's output (not skipped).
- pooling: `attn[i]`, i < heads (COBRA-II 4, COBRA-I 8), a gated ABMIL on the INTERLEAVED channels
  i, i + heads, i + 2 heads, ... (the original's `rearrange('b t (e c) -> b t e c', c=heads)`):
  logit_i = attention_c(tanh(attention_a x) * sigmoid(attention_b x)). The raw logits are averaged
  over heads, THEN softmaxed over the tiles: A [N].
- the embedding users take: A @ feats, the attention-weighted mean of the INPUT tile features
  (not of the Mamba output), so its dimension is the tile encoder's: 1280 with `virchow2` (the
  default, the cards' `dim`), 512 with `conch_v1`, 768 with `ctranspath` (COBRA-I), 1024 with
  `uni`, 1536 with `h_optimus_0`.

COBRA-II: 1 Mamba layer, 4 heads, att_dim 256, projections for 512 / 1024 / 1280 / 1536 (CONCH v1,
UNI, Virchow2, H-optimus-0); 11,063,116 parameters. COBRA-I: 2 layers, 8 heads, att_dim 96,
projections for 768 / 1024 / 1280 / 1536 (CTransPath, UNI, Virchow2, H-optimus-0); 14,779,800.

The Mamba scan runs chunk by chunk (CHUNK_SIZE tiles): each chunk is projected, convolved with the
last d_conv - 1 pre-convolution rows of the previous chunk (the conv state) and scanned from the
previous chunk's SSM state, in the closed form of the recurrence within the chunk (as the fused
kernels block it) with stable segment sums. Carrying both states makes the result the sequential
recurrence whatever the chunk size; memory stays bounded by the chunk. No mamba-ssm,
causal-conv1d or Triton: the same code runs on CPU and CUDA. Under autocast the projections run
in half precision and the convolution, scan, gated norm, softmax and weighted mean in fp32
(BF16_TOLERANCE).

Speed on 2 shared CPU cores in fp32 (load average 9-10 at the time, so wall times are inflated;
CPU seconds of all threads in brackets): COBRA-II 4.5 s (1.7) at 2,000 tiles and 24 s (9.9) at
10,000, peak host memory 0.69 / 0.83 GB for the whole process (torch and the model included);
COBRA-I 11 s (4.2) and 50 s (20), 0.82 / 0.89 GB. Build + strict load from a file: 0.05 s.

Where the original is silent and we refuse: `embed[str(D)]` routes features by their dimension
alone (Prov-GigaPath's or UNI2-h's 1536-d features would pass through H-optimus-0's projection,
Virchow v1 class tokens through Virchow2's); `encode_bag` picks the projection by the TILE ENCODER
NAME and refuses any encoder COBRA was not trained with, whatever its dimension.

Token order matters: the scan is causal, so COBRA is order-dependent. The original takes tiles in
the H5 file's row order, and for a patient the slides' tiles concatenated in slide-table order
(STAMP `encoder/cobra.py`; COBRA `extract_feats.get_pat_embs`: one forward over all of a
patient's tiles). Our slide-encoder stage gives tokens slide by slide (in the bag's slide order),
row-major (y, then x) within a slide, and `encode_bag` keeps the order given. Positions are not
used beyond that order (`cells` only checked for shape).

Published files (Hugging Face `KatherLab/COBRA`, gated): `cobraII.pth.tar`, the MoCo-v3 training
checkpoint {'epoch', 'state_dict', 'optimizer', 'scaler'} of the DDP-wrapped MoCo whose EMA encoder
`module.momentum_enc.*` is the model (the original loader keeps it and drops `base_enc`,
`predictor` and the SSL head `momentum_enc.proj`); `pytorch_model.bin` (COBRA-I), probably a bare
state dict (both forms accepted for both). Preprocessing: none here; the tile encoder's own.
Tile size: the original's CLI default is Virchow2 at 224 um (metadata only) and heatmaps use
0.5 um/px; EAGLE evaluated COBRA at 0.5, 1.14 and 2 um/px. TRIDENT has no COBRA encoder.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eagleflow.models.card import ModelCard, SlideEncoderRole, WeightFile
from eagleflow.models.checkpoints import random_state_dict, unwrap_state_dict
from eagleflow.weights import WeightsError

# One architecture family, two published files (different depth, heads and projections).
CARDS = (
    ModelCard(
        name="cobra",
        summary=(
            "COBRA-II (KatherLab, CVPR 2025): per-encoder projection, 1 Mamba-2 layer, 4-head "
            "gated ABMIL; the attention-weighted mean of the input tile features"
        ),
        weights=WeightFile(
            file_name="cobraII.pth.tar",
            source=("Hugging Face KatherLab/COBRA (gated: accept the terms), file cobraII.pth.tar"),
            container=(
                "MoCo training checkpoint {'epoch', 'state_dict', 'optimizer', 'scaler'}; the "
                "model is the EMA encoder under 'state_dict' with the prefix "
                "'module.momentum_enc.' (66 keys); module.base_enc.*, module.predictor.* and "
                "module.momentum_enc.proj.* are dropped"
            ),
            state_dict_key="state_dict",
        ),
        role=SlideEncoderRole(
            encoder="cobra",
            tile_encoders=("virchow2", "conch_v1", "uni", "h_optimus_0"),
            dim=1280,
            embedding=(
                "softmax-over-tiles of the head-averaged ABMIL logits, applied to the input tile "
                "features: the tile encoder's dim (1280 virchow2, 512 conch_v1, 1024 uni, 1536 "
                "h_optimus_0); dim here is the default tile encoder's"
            ),
            uses_positions=False,
            order_dependent=True,
        ),
    ),
    ModelCard(
        name="cobra_i",
        summary=(
            "COBRA-I (KatherLab, CVPR 2025): per-encoder projection, 2 Mamba-2 layers, 8-head "
            "gated ABMIL; the attention-weighted mean of the input tile features"
        ),
        weights=WeightFile(
            file_name="pytorch_model.bin",
            source=(
                "Hugging Face KatherLab/COBRA (gated: accept the terms), file pytorch_model.bin"
            ),
            container=(
                "bare state dict of 100 keys (probably; a 'state_dict' container with "
                "'module.momentum_enc.' keys, as cobraII.pth.tar, is accepted too)"
            ),
        ),
        role=SlideEncoderRole(
            encoder="cobra_i",
            tile_encoders=("virchow2", "ctranspath", "uni", "h_optimus_0"),
            dim=1280,
            embedding=(
                "softmax-over-tiles of the head-averaged ABMIL logits, applied to the input tile "
                "features: the tile encoder's dim (1280 virchow2, 768 ctranspath, 1024 uni, 1536 "
                "h_optimus_0); dim here is the default tile encoder's"
            ),
            uses_positions=False,
            order_dependent=True,
        ),
    ),
)

EMBED_DIM = 768
D_STATE = 128
D_CONV = 4
EXPAND = 2
HEADDIM = 64
NORM_EPS = 1e-5  # every LayerNorm and the gated RMSNorm
# Tiles per scan chunk: the fused kernels' block size; any size gives the same result (tested).
CHUNK_SIZE = 256
# The architecture of each card (the original get_cobraII / get_cobra constructors).
VARIANTS: dict[str, dict[str, Any]] = {
    "cobra": {"input_dims": (512, 1024, 1280, 1536), "layers": 1, "num_heads": 4, "att_dim": 256},
    "cobra_i": {"input_dims": (768, 1024, 1280, 1536), "layers": 2, "num_heads": 8, "att_dim": 96},
}
# The tile encoders each file was trained with -> the feature dim (= the projection) they take,
# in the order of the card's tile_encoders (tested). STAMP checks the same four names.
TILE_ENCODER_DIMS: dict[str, dict[str, int]] = {
    "cobra": {"virchow2": 1280, "conch_v1": 512, "uni": 1024, "h_optimus_0": 1536},
    "cobra_i": {"virchow2": 1280, "ctranspath": 768, "uni": 1024, "h_optimus_0": 1536},
}
PUBLISHED_PREFIX = "module.momentum_enc."
# The training container: keep the EMA encoder, drop the rest, and nothing else.
_MOMENTUM = re.compile(r"^(?:module\.)?momentum_enc\.")
_IGNORED = re.compile(r"^(?:module\.)?(?:base_enc\.|predictor\.|momentum_enc\.proj\.)")
SIGNATURE_KEYS = (
    "module.momentum_enc.mamba_enc.layers.0.1.A_log",
    "module.momentum_enc.embed.512.head.1.weight",
)
# bf16 autocast (projections, MLPs and scorers in bf16; conv, scan, norms, head mean, softmax and
# weighted mean in fp32) against fp32: max |diff| of the embedding / max |embedding| was 0.0136
# (COBRA-II) and 0.0094 (COBRA-I) at 2,000 tiles, 0.0101 and 0.0094 at 10,000, with full-size
# demo weights on zero-mean random features (the pessimistic case: their weighted mean nearly
# cancels), measured with CPU autocast (scripts/tools/bench_models.py; no GPU measured). fp32 vs
# fp64 there: max |diff| 2.1e-7 (max |embedding| 0.13).
BF16_TOLERANCE = 0.02
# Demo weights: the trained model ranks tiles over a few logits; unit-gain random weights give
# logits with a std of 0.1-0.17 (full size, 500 tiles): nearly a plain mean. This gain spreads them.
DEMO_SCORER_GAIN = 6.0


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32, fp64 for fp64: the scan and the norms never run in half."""
    return torch.promote_types(dtype, torch.float32)


def no_autocast(device: torch.device) -> Any:
    """A context in which autocast does not lower the dtype of explicit matmuls."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


def causal_conv_chunk(
    xbc: torch.Tensor, tail: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution of one chunk, continuing the sequence before it.

    xbc [L, C] pre-convolution rows, tail [K-1, C] the previous K-1 rows (zeros at the start),
    weight [C, 1, K] -> (out [L, C] before the activation, the next chunk's tail [K-1, C]).
    Row t sees rows t-K+1..t; weight[:, 0, K-1] multiplies row t (torch's conv1d is a
    cross-correlation). Written as K multiply-adds: torch's depthwise conv1d on CPU took ~50 times
    longer for these shapes.
    """
    padded = torch.cat([tail, xbc])
    length, kernel = xbc.shape[0], weight.shape[-1]
    out = padded[:length] * weight[:, 0, 0]
    for tap in range(1, kernel):
        out.addcmul_(padded[tap : tap + length], weight[:, 0, tap])
    if bias is not None:
        out.add_(bias)
    return out, padded[padded.shape[0] - tail.shape[0] :]


def segment_sums(a: torch.Tensor) -> torch.Tensor:
    """a [L, H] -> [H, L, L] with out[h, t, s] = a[s+1, h] + ... + a[t, h] (0 at s = t) for s <= t
    and -inf for s > t, summed per segment (no difference of two long cumulative sums)."""
    length = a.shape[0]
    strict = _lower_triangle(length, -1, a.device)
    summed = a.T.unsqueeze(-1).expand(-1, -1, length).masked_fill(~strict, 0.0).cumsum(dim=1)
    return summed.masked_fill_(~_lower_triangle(length, 0, a.device), -math.inf)


def _lower_triangle(length: int, diagonal: int, device: torch.device) -> torch.Tensor:
    """[L, L] bool, True where s <= t + diagonal (built per call: 256 x 256 is cheap)."""
    ones = torch.ones(length, length, dtype=torch.bool, device=device)
    return torch.tril(ones, diagonal)


def ssd_chunk(
    x: torch.Tensor,
    dt: torch.Tensor,
    a_head: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective-state recurrence over one chunk, from `state` (skip term D x not included).

    x [L, H, P], dt [L, H] (after softplus), a_head [H] (A, negative), b and c [L, N] (one group,
    shared by the heads), state [H, P, N] -> (y [L, H, P], the state after the chunk [H, P, N]).
    Same as S_t = exp(dt_t A) S_{t-1} + dt_t x_t (x) b_t, y_t = S_t c_t, t = 0..L-1, S_{-1} = state.
    """
    length, heads, width = x.shape
    n_state = b.shape[1]
    dta = dt * a_head  # [L, H], <= 0
    decay = segment_sums(dta).exp_()  # [H, t, s]: exp(A * (dt_{s+1} + ... + dt_t)), 0 for s > t
    scores = (decay * (c @ b.T)).mul_(dt.T.unsqueeze(1))  # [H, t, s]
    y = torch.bmm(scores, x.transpose(0, 1)).transpose(0, 1)  # [L, H, P]
    from_start = dta.cumsum(dim=0).exp()  # [L, H]: exp(A * (dt_0 + ... + dt_t))
    carried = (c @ state.reshape(heads * width, n_state).T).view(length, heads, width)
    y = y + from_start.unsqueeze(-1) * carried
    weights = (decay[:, -1, :].T * dt).unsqueeze(-1) * x  # [s, H, P]: exp(.. to the end) dt_s x_s
    gathered = (weights.reshape(length, heads * width).T @ b).view(heads, width, n_state)
    return y, from_start[-1].view(heads, 1, 1) * state + gathered


class GatedRMSNorm(nn.Module):
    """mamba_ssm RMSNorm(norm_before_gate=False, group_size = dim): norm(y * silu(z)) * weight."""

    def __init__(self, dim: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = accumulation_dtype(y.dtype)
        gated = y.to(dtype) * F.silu(z.to(dtype))
        scale = torch.rsqrt(gated.square().mean(dim=-1, keepdim=True) + self.eps)
        return gated * scale * self.weight.to(dtype)


class Mamba2(nn.Module):
    """mamba_ssm.Mamba2 (rmsnorm, no biases but the conv's, D per head, one group), eval forward."""

    def __init__(
        self,
        d_model: int = EMBED_DIM,
        d_state: int = D_STATE,
        d_conv: int = D_CONV,
        expand: int = EXPAND,
        headdim: int = HEADDIM,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.headdim = headdim
        self.nheads = self.d_inner // headdim
        self.chunk_size = chunk_size
        conv_dim = self.d_inner + 2 * d_state
        # Parameters first, as the original's state dict lists them.
        self.dt_bias = nn.Parameter(torch.zeros(self.nheads))
        self.A_log = nn.Parameter(torch.zeros(self.nheads))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * d_state + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(
            conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=True
        )
        self.norm = GatedRMSNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """[N, d_model] tokens in sequence order -> [N, d_model]."""
        dtype = accumulation_dtype(self.in_proj.weight.dtype)
        d_inner, d_state, heads = self.d_inner, self.d_state, self.nheads
        kernel = self.conv1d.weight.shape[-1]
        tail = u.new_zeros(kernel - 1, d_inner + 2 * d_state, dtype=dtype)
        state = u.new_zeros(heads, self.headdim, d_state, dtype=dtype)
        outputs = []
        for start in range(0, u.shape[0], self.chunk_size):
            zxbcdt = self.in_proj(u[start : start + self.chunk_size])
            with no_autocast(u.device):
                z, xbc, dt = zxbcdt.to(dtype).split([d_inner, d_inner + 2 * d_state, heads], -1)
                xbc, tail = causal_conv_chunk(
                    xbc, tail, self.conv1d.weight.to(dtype), self.conv1d.bias.to(dtype)
                )
                x, b, c = F.silu(xbc).split([d_inner, d_state, d_state], dim=-1)
                x = x.unflatten(-1, (heads, self.headdim))  # head h: channels 64h..64h+63
                dt = F.softplus(dt + self.dt_bias.to(dtype))
                a_head = -torch.exp(self.A_log.to(dtype))
                y, state = ssd_chunk(x, dt, a_head, b, c, state)
                y = y + self.D.to(dtype).view(heads, 1) * x
                y = self.norm(y.flatten(-2), z)
            outputs.append(self.out_proj(y.to(self.out_proj.weight.dtype)))
        return torch.cat(outputs)


class Mamba2Enc(nn.Module):
    """COBRA's Mamba2Enc: Linear + GELU, residual pre-LN Mamba2 layers, a final Linear."""

    def __init__(self, dim: int, layers: int, **mamba: Any) -> None:
        super().__init__()
        # Index 2 is the original's Dropout (no keys): Identity, so train() cannot change outputs.
        self._fc1 = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Identity())
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)  # in the file, unused by the original forward
        self.layers = nn.ModuleList(
            [
                nn.Sequential(nn.LayerNorm(dim, eps=NORM_EPS), Mamba2(dim, **mamba))
                for _ in range(layers)
            ]
        )
        self.classifier = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._fc1(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.classifier(h)


class Embed(nn.Module):
    """One tile encoder's projection: LayerNorm -> Linear -> (dropout) -> SiLU -> Linear."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.head = nn.Sequential(
            nn.LayerNorm(in_dim, eps=NORM_EPS),
            nn.Linear(in_dim, embed_dim),
            nn.Identity(),
            nn.SiLU(),
            nn.Linear(embed_dim, embed_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class GatedAttention(nn.Module):
    """BatchedABMIL's scorer: attention_c(tanh(attention_a x) * sigmoid(attention_b x)), raw."""

    def __init__(self, in_dim: int, att_dim: int) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(in_dim, att_dim), nn.Tanh())
        self.attention_b = nn.Sequential(nn.Linear(in_dim, att_dim), nn.Sigmoid())
        self.attention_c = nn.Linear(att_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, in_dim] -> [N] raw logits."""
        return self.attention_c(self.attention_a(x) * self.attention_b(x))[:, 0]


class Cobra(nn.Module):
    """COBRA (one card's variant). `encode_bag(feats, cells, tile_encoder)` -> [feats.shape[1]].

    Also `attention(feats, tile_encoder)` -> the tile weights [N] (softmax, sums to 1; the
    original's `get_attention=True`) and `tile_logits` -> the head-averaged logits [N].
    """

    def __init__(
        self,
        name: str,
        input_dims: Sequence[int],
        tile_encoders: Mapping[str, int],
        layers: int,
        num_heads: int,
        att_dim: int,
        embed_dim: int = EMBED_DIM,
        **mamba: Any,
    ) -> None:
        super().__init__()
        unknown = {k: v for k, v in tile_encoders.items() if v not in input_dims}
        if unknown or embed_dim % num_heads:
            raise ValueError(f"{name}: no projection for {unknown} or {embed_dim} % {num_heads}")
        self.name = name
        self.tile_encoders = dict(tile_encoders)
        self.num_heads = num_heads
        self.embed = nn.ModuleDict({str(d): Embed(d, embed_dim) for d in input_dims})
        self.norm = nn.LayerNorm(embed_dim, eps=NORM_EPS)
        self.mamba_enc = Mamba2Enc(embed_dim, layers, **mamba)
        self.attn = nn.ModuleList(
            [GatedAttention(embed_dim // num_heads, att_dim) for _ in range(num_heads)]
        )

    def set_chunk_size(self, chunk_size: int) -> None:
        """Tiles per scan chunk (the result does not depend on it; memory and speed do)."""
        for layer in self.mamba_enc.layers:
            layer[1].chunk_size = chunk_size

    def projection(self, tile_encoder: str, feats: torch.Tensor) -> Embed:
        """The projection trained for `tile_encoder`; refuses any other encoder, or feats of the
        wrong shape, instead of routing by dimension as the original does."""
        if tile_encoder not in self.tile_encoders:
            raise WeightsError(
                f"{self.name}: tile encoder {tile_encoder!r} is not one this slide encoder was "
                f"trained with (accepted: {', '.join(self.tile_encoders)}). Its features would go "
                f"through another encoder's projection: the original routes by feature "
                f"dimension only, so 1536-d features of any encoder pass as H-optimus-0's"
            )
        dim = self.tile_encoders[tile_encoder]
        if feats.ndim != 2 or feats.shape[1] != dim or feats.shape[0] == 0:
            raise ValueError(
                f"{self.name}: {tile_encoder} features must be [N >= 1, {dim}], got "
                f"{tuple(feats.shape)}"
            )
        return self.embed[str(dim)]

    def tile_logits(self, feats: torch.Tensor, tile_encoder: str) -> torch.Tensor:
        """[N, D] features in token order -> [N] logits, the mean over heads of the raw ABMIL
        logits, each head on the interleaved channels i, i + heads, ..."""
        projection = self.projection(tile_encoder, feats)
        h = self.norm(self.mamba_enc(projection(feats.to(self.norm.weight.dtype))))
        h = h.unflatten(-1, (-1, self.num_heads))  # [N, 768 / heads, heads]
        logits = torch.stack([attn(h[..., i]) for i, attn in enumerate(self.attn)], dim=-1)
        return logits.to(accumulation_dtype(logits.dtype)).mean(dim=-1)  # not in half

    def attention(self, feats: torch.Tensor, tile_encoder: str) -> torch.Tensor:
        """[N] tile weights: the softmax over tiles of `tile_logits` (fp32 or fp64)."""
        logits = self.tile_logits(feats, tile_encoder)
        with no_autocast(logits.device):
            return torch.softmax(logits.to(accumulation_dtype(logits.dtype)), dim=0)

    def forward(self, feats: torch.Tensor, tile_encoder: str) -> torch.Tensor:
        """[N, D] features in token order -> [D], the attention-weighted mean of `feats`."""
        weights = self.attention(feats, tile_encoder)
        with no_autocast(weights.device):
            return weights @ feats.to(weights.dtype)

    def encode_bag(
        self, feats: torch.Tensor, cells: torch.Tensor, tile_encoder: str
    ) -> torch.Tensor:
        """The slide-encoder interface. Tokens are taken in the order given (the stage's: slide by
        slide, row-major within a slide); `cells` are only checked, COBRA uses no positions."""
        if cells.shape != (feats.shape[0], 2):
            raise ValueError(
                f"{self.name}: cells must be [N, 2] for {feats.shape[0]} tiles, got "
                f"{tuple(cells.shape)}"
            )
        return self(feats, tile_encoder)


def build(device: torch.device | str | None = None, name: str = "cobra", **overrides: Any) -> Cobra:
    """The architecture of card `name` ('cobra': COBRA-II, 'cobra_i': COBRA-I) on `device`
    (meta: no memory, no init; then load with assign=True). `overrides` make small twins."""
    if name not in VARIANTS:
        raise ValueError(f"unknown COBRA variant {name!r}; known: {', '.join(VARIANTS)}")
    kwargs = {**VARIANTS[name], "tile_encoders": TILE_ENCODER_DIMS[name], **overrides}
    with torch.device(device) if device is not None else nullcontext():
        return Cobra(name, **kwargs)


def prepare_state_dict(
    checkpoint: Any, path: Path | None, name: str = "cobra"
) -> dict[str, torch.Tensor]:
    """The model's state dict from either published form.

    A training container (a 'state_dict' holding `momentum_enc.*` keys, DDP `module.` prefix or
    not): the EMA encoder with its prefix removed; `base_enc.*`, `predictor.*` and
    `momentum_enc.proj.*` are dropped by name, every other key is kept as it is (so the strict
    load names it). Otherwise the dict is the state dict. As the original loader, which takes
    `momentum_enc`, never `base_enc`.
    """
    state_dict = unwrap_state_dict(checkpoint, "state_dict", name, path)
    if not any(_MOMENTUM.match(key) for key in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        if _IGNORED.match(key):
            continue
        found = _MOMENTUM.match(key)
        out[key[found.end() :] if found else key] = value
    return out


def published_key(key: str, name: str = "cobra") -> str:
    """A model key's name in the published file (COBRA-II's container; COBRA-I's bare dict)."""
    return PUBLISHED_PREFIX + key if name == "cobra" else key


def demo_state_dict(model: Cobra, seed: int) -> dict[str, torch.Tensor]:
    """Seeded DEMO weights: checkpoints.random_state_dict, then Mamba-2's own init ranges (A in
    [1, 16], dt in [0.001, 0.1], D 1), the gated norm's weight 1 and the scorers x DEMO_SCORER_GAIN.
    """
    state_dict = random_state_dict(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for key, value in state_dict.items():
        if key.endswith(".A_log"):
            state_dict[key] = torch.empty_like(value).uniform_(1.0, 16.0, generator=generator).log()
        elif key.endswith(".dt_bias"):
            low, high = math.log(1e-3), math.log(1e-1)
            dt = torch.empty_like(value).uniform_(low, high, generator=generator).exp()
            state_dict[key] = dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt)
        elif key.endswith((".1.D", ".1.norm.weight")):
            state_dict[key] = torch.ones_like(value)
        elif key.endswith("attention_c.weight"):
            state_dict[key] = value * DEMO_SCORER_GAIN
    return state_dict
