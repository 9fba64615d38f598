"""MADELEINE slide encoder (Mahmood lab; Jaume et al., ECCV 2024): multi-head gated ABMIL over
CONCH v1 tile features.

Architecture (mahmoodlab/MADELEINE @ 419287d, `models/Model.py`, `abmil.py`, as `create_model`
builds it: `wsi_encoder='abmil'`, `patch_embedding_dim=512`, `wsi_encoder_hidden_dim=512`,
`n_heads=4`, `activation='softmax'`, no stain encoding): 4,996,740 parameters.
- `wsi_embedders.pre_attn`: Linear(512, 512) -> LayerNorm -> GELU -> Dropout -> Linear(512, 512) ->
  LayerNorm -> GELU -> Dropout -> Linear(512, 2048) -> LayerNorm(2048) -> GELU -> Dropout
  (LayerNorm eps 1e-5, exact GELU; dropout is off in eval);
- `wsi_embedders.attn.{0..3}`: per head a gated attention scorer (Ilse et al.):
  logit_t = attention_c(tanh(attention_a(h_t)) * sigmoid(attention_b(h_t))), 512 -> 512 -> 1;
- `projector`: Linear(2048, 512); `token_projector`: Linear(2048, 128), trained for the local
  (token) loss and kept only so that the published file loads strict; never used here.

Exact forward (`encode_he`), for a bag of N tiles x [N, 512]:
  H = pre_attn(x) [N, 2048]; head i reads the STRIDED channels e*4 + i (e < 512), i.e.
  H_i[t, e] = H[t, 4e + i] (`rearrange('b t (e c) -> b t e c', c=4)`), not the contiguous block
  512i .. 512i+511; A_i = softmax over the N tiles of the head's logits; s_i = sum_t A_i[t] H_i[t];
  the four s_i [512] are interleaved back, S[4e + i] = s_i[e] (`stack(-1).view`), and the slide
  embedding is projector(S), [512]. No positions, no mask: the output does not depend on the
  tiles' cells or order (up to float rounding).

The embedding users take: `encode_he`'s `projector` output (512-d), as TRIDENT and STAMP do; the
128-d `token_projector` output is not a slide embedding (a third-party loader returns it).

Published file: `model.pt` (with `model_config.json`) in the gated Hugging Face repository
`MahmoodLab/madeleine` (log in and accept the terms). A torch.save'd flat state dict of the 40
keys, very probably with DDP's `module.` prefix (unverified: the file is gated). The original
strips the first 7 characters of EVERY key when any key contains the substring 'module'; here a
`module.` prefix is stripped when every key has it, a file where only some keys do is refused, and
the load is strict. (`factory.create_model_from_pretrained` always downloads and hard-codes
`device="cuda"`; `Model.create_model` is the CPU path, and this file needs neither.)

Tile features (the reference grid of `conch_v1`): CONCH v1 on 256 px tiles at 10x (1 µm/px), the
model built at 224, `encode_image(proj_contrast=False, normalize=False)` (512-d, fp32). TRIDENT's
and STAMP's CONCH v1 run at 448 instead: not the features MADELEINE was trained on.

Patient level: STAMP runs `encode_he` once on all of a patient's slides' features concatenated
along the tile axis; TRIDENT is slide-level only; `encode_bag` does STAMP's (one bag of all
tiles). Positions do not enter, so how slides are placed on the canvas does not matter.

Checked against the original `MADELEINE.encode_he` (419287d) on random weights with a ranking
scorer, 3,000 tiles: max difference 1.2e-14 in fp64, 7e-7 in fp32 (outputs up to 2.3).

Precision: MADELEINE runs under autocast at its config's precision, probably bf16 (the launch
scripts; the released config is gated); TRIDENT fp16 autocast on CUDA. BF16_TOLERANCE is what the tests hold CPU bf16 autocast to on a small twin
(max |bf16 - fp32| over max |fp32|).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eagleflow.models.card import ModelCard, SlideEncoderRole, WeightFile
from eagleflow.models.checkpoints import random_state_dict, require_tensor_dict
from eagleflow.weights import WeightsError

CARD = ModelCard(
    name="madeleine",
    summary=(
        "MADELEINE (Jaume et al. 2024): 4-head gated ABMIL with strided channels over CONCH v1 "
        "features; the 512-d projector output"
    ),
    weights=WeightFile(
        file_name="model.pt",
        source=(
            "Hugging Face MahmoodLab/madeleine (gated: log in and accept the terms), file "
            "model.pt (model_config.json beside it is not needed)"
        ),
        container=(
            "flat state dict of 40 keys, very probably with a 'module.' prefix on every key "
            "(stripped; unverified, the file is gated)"
        ),
    ),
    role=SlideEncoderRole(
        encoder="madeleine",
        tile_encoders=("conch_v1",),
        dim=512,
        embedding="encode_he: `projector` of the 4 attention-pooled heads (not token_projector)",
        uses_positions=False,
    ),
)

IN_DIM = 512  # patch_embedding_dim: CONCH v1's pooled vector
HIDDEN_DIM = 512  # wsi_encoder_hidden_dim, and each head's width
NUM_HEADS = 4
ATTENTION_DIM = 512  # BatchedABMIL hidden_dim
EMBED_DIM = 512
TOKEN_DIM = 128
TILE_ENCODERS = ("conch_v1",)
MODULE_PREFIX = "module."
SIGNATURE_KEYS = ("wsi_embedders.attn.0.attention_c.weight", "token_projector.weight")
# CPU bf16 autocast vs fp32 on the test twin (max |diff| / max |fp32|): the tests hold it to this.
BF16_TOLERANCE = 0.05
# Unit-gain demo scorers give attention logits that barely differ between tiles (a plain mean);
# this gain spreads them over a few logits, as a trained scorer ranks tiles.
DEMO_SCORER_GAIN = 16.0


class GatedAttention(nn.Module):
    """MADELEINE's `BatchedABMIL` (n_classes 1): logit = c(tanh(a h) * sigmoid(b h))."""

    def __init__(self, dim: int = HIDDEN_DIM, attn_dim: int = ATTENTION_DIM) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(0.25))
        self.attention_b = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(0.25))
        self.attention_c = nn.Linear(attn_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[..., N, dim] -> attention logits [..., N]."""
        return self.attention_c(self.attention_a(h) * self.attention_b(h)).squeeze(-1)


class ABMILEmbedder(nn.Module):
    """`wsi_embedders`: the shared pre-attention MLP and one gated scorer per head."""

    def __init__(self, in_dim: int, hidden_dim: int, heads: int, attn_dim: int) -> None:
        super().__init__()
        self.heads = heads
        wide = hidden_dim * heads
        # Indices 0..11 as published: Linear, LayerNorm, GELU, Dropout, three times.
        self.pre_attn = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(hidden_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(hidden_dim, wide),
            nn.LayerNorm(wide),
            nn.GELU(),
            nn.Dropout(0.1),
        )
        self.attn = nn.ModuleList(GatedAttention(hidden_dim, attn_dim) for _ in range(heads))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N, in_dim] -> (pooled [B, hidden * heads] in the e*heads + i order, weights [B, heads, N])."""
        h = self.pre_attn(x)
        # Channel e*heads + i -> [e, i]: head i reads every heads-th channel, from i.
        h = h.unflatten(-1, (-1, self.heads))
        pooled, weights = [], []
        for i, scorer in enumerate(self.attn):
            h_i = h[..., i]  # [B, N, hidden]
            logits = scorer(h_i)
            # Over the tiles, never in half precision (fp64 stays fp64).
            a_i = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
            # A weighted sum, not a matmul: under autocast it stays fp32 as in the original.
            pooled.append((a_i.unsqueeze(-1) * h_i).sum(dim=-2))
            weights.append(a_i)
        # stack(-1) then flatten puts s_i[e] back at e*heads + i, as the original's view does.
        return torch.stack(pooled, dim=-1).flatten(-2), torch.stack(weights, dim=1)


class Madeleine(nn.Module):
    """MADELEINE as `create_model` builds it; `forward`/`encode_bag` give `encode_he`'s embedding."""

    def __init__(
        self,
        in_dim: int = IN_DIM,
        hidden_dim: int = HIDDEN_DIM,
        heads: int = NUM_HEADS,
        attn_dim: int = ATTENTION_DIM,
        token_dim: int = TOKEN_DIM,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        # Published order: token_projector, wsi_embedders, projector.
        self.token_projector = nn.Linear(hidden_dim * heads, token_dim)  # unused: local loss only
        self.wsi_embedders = ABMILEmbedder(in_dim, hidden_dim, heads, attn_dim)
        self.projector = nn.Linear(hidden_dim * heads, hidden_dim)

    def attention(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, N, in_dim] -> each head's softmax weights over the tiles [B, heads, N]."""
        return self.wsi_embedders(self._cast(feats))[1]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """`encode_he`: [B, N, 512] CONCH v1 features -> [B, 512] slide embeddings (equal N)."""
        return self.projector(self.wsi_embedders(self._cast(feats))[0])

    def encode_bag(
        self, feats: torch.Tensor, cells: torch.Tensor, tile_encoder: str
    ) -> torch.Tensor:
        """One bag (a slide, or all of a patient's tiles) -> [512]. `cells` are not used."""
        if tile_encoder not in TILE_ENCODERS:
            raise ValueError(
                f"madeleine was trained on {', '.join(TILE_ENCODERS)} features, not "
                f"{tile_encoder!r}"
            )
        if feats.ndim != 2 or feats.shape[1] != self.in_dim:
            raise ValueError(
                f"madeleine takes [N, {self.in_dim}] tile features, got {tuple(feats.shape)}"
            )
        if len(feats) == 0:
            raise ValueError("madeleine needs at least one tile")
        if cells.ndim != 2 or cells.shape != (len(feats), 2):
            raise ValueError(
                f"cells must be [N, 2] for {len(feats)} tiles, got {tuple(cells.shape)}"
            )
        return self(feats.unsqueeze(0))[0]

    def _cast(self, feats: torch.Tensor) -> torch.Tensor:
        weight = self.projector.weight
        return feats.to(weight.device, weight.dtype)


def build(device: torch.device | str | None = None, **overrides: Any) -> Madeleine:
    """MADELEINE on `device` (meta: no memory; then load with assign=True).

    `overrides` (in_dim, hidden_dim, heads, attn_dim, token_dim) make small test twins.
    """
    with torch.device(device) if device is not None else nullcontext():
        return Madeleine(**overrides)


def prepare_state_dict(checkpoint: Any, path: Path | None) -> dict[str, torch.Tensor]:
    """The flat state dict, `module.` stripped when every key has it (refused when only some do)."""
    sd = require_tensor_dict(checkpoint, "madeleine", path, "a flat state dict of tensors")
    prefixed = [key.startswith(MODULE_PREFIX) for key in sd]
    if not any(prefixed):
        return sd
    if not all(prefixed):
        plain = next(key for key, p in zip(sd, prefixed, strict=True) if not p)
        raise WeightsError(
            f"madeleine: weight file {str(path)!r}: some keys start with {MODULE_PREFIX!r} and "
            f"some do not (e.g. {plain!r}); the published file has it on every key or none"
        )
    return {key[len(MODULE_PREFIX) :]: value for key, value in sd.items()}


def demo_state_dict(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded DEMO weights: `random_state_dict` with the scorers' last layer x DEMO_SCORER_GAIN."""
    out = random_state_dict(model, seed)
    for key in out:
        if key.endswith("attention_c.weight"):
            out[key] = out[key] * DEMO_SCORER_GAIN
    return out
