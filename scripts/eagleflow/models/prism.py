"""PRISM slide encoder (Paige; Shaikovski et al. 2024): a Perceiver resampler over Virchow v1 tiles.

Our own implementation in plain torch of PRISM's `image_resampler` (the HF `paige-ai/Prism` code,
vendored at clemsgrs/prism-embedder@7022cf0 `prism_embedder/models/prism/perceiver.py`); no
transformers, xformers or BioGPT. Architecture (PerceiverConfig: latent_seq 512, latent_dim 1280,
context_dim 2560, 8 self-attention heads, perceiver_depth 8, transformer_depth 6, shared
cross-attention from layer 1, shared transformer from layer 0, 1 cross-attention head, GEGLU):

- 513 learned latents (1280): row 0 is the slide-embedding query, rows 1..512 the image latents;
- cross-attention (bias-free): q = to_q(LayerNorm(x)); k, v = to_kv(tiles) split in halves (k the
  first 1280 channels, v the last), the tiles NOT normalised; ONE head of 1280, scale 1280^-0.5;
  exact softmax; out = to_out(.). Then a GEGLU feed-forward: LayerNorm -> Linear 1280 -> 2560 ->
  value * gelu(gate) (value the FIRST half, exact erf GELU) -> Linear 1280 -> 1280;
- self-attention blocks: LayerNorm -> torch MultiheadAttention (8 heads x 160, no biases; in_proj
  = [q; k; v]) and the same GEGLU feed-forward; every sub-block is residual (x = f(x) + x);
- 8 layers, each a cross-attention block and then the 6 self-attention blocks. Modules are
  SHARED: layers 2-7 apply layer 1's cross-attention block and layers 1-7 layer 0's six blocks
  (87 distinct tensors, 99,037,440 parameters). Layers 1-7 attend to the same keys and values.

Exact forward: x = latents; for each layer: x = xattn(x, tiles) + x; x = ff(x) + x; for each of
the 6 blocks: x = mhsa(x) + x; x = ff(x) + x. The embedding users take is
`image_embedding` = cls_norm(x[0]), 1280-d (the model card, TRIDENT, STAMP and prism-embedder
all take `slide_representations(x)['image_embedding']`); `image_latents` = img_norm(x[1:]) feed
the text decoder. No positions: the output does not depend on the tiles' cells or their order.

Input: Virchow v1 2560-d embeddings (class token ‖ mean of the patch tokens) of 224 px tiles at
20x (0.5 µm/px); `encode_bag` refuses features of any other tile encoder.

Published file: `model.safetensors` in the gated Hugging Face repository `paige-ai/Prism`
(CC-BY-NC-ND-4.0; log in and accept the terms): a flat dict of the whole model. The slide
encoder sits under `image_resampler.`; the text side (`text_decoder.*`, `img_to_latents.*`,
`text_to_latents.*`, `temperature`) is ignored. `Module.state_dict()` of the original names each
shared tensor once per layer that uses it (573 names for 87 tensors), and which of those names the
file holds is not known: any of them is accepted, names of one tensor must hold equal values, and
each tensor must be present under at least one name.

Batches: the original adds its float `tile_mask` to the attention logits, so its documented
padding recipe (1 for tiles, 0 for padding) still gives padding weight e^-1. `forward` here takes
a BOOLEAN mask (True = tile) and gives padded keys zero weight; a padded bag's embedding equals
its unpadded run (tested). `encode_bag` takes one bag and needs no mask.

Patient level: STAMP concatenates all of a patient's slides' tiles and runs one forward (fp16,
no autocast: the model is already half); TRIDENT is slide-level only; the EAGLE paper files PRISM
under 0.5 µm/px. Here a bag is a slide or a patient's slides, in one pass (cells unused).

Speed on 2 CPU cores in fp32 (scripts/tools/bench_models.py, demo weights, load average 5-7 on
the 2 cores): one bag of 2,000 tiles in 22 s with 1.2 GB peak host memory, 10,000 tiles in 28 s
with 1.5 GB. The 48 self-attention blocks over 513 latents (~0.6 TFLOP) dominate whatever the
bag size; the tiles cost two to_kv projections and 8 cross-attentions (k, v: 200 MB at 10,000).
Precision: users run fp16 on CUDA. Softmax always runs in fp32 or better. fp32 vs fp64: max
1.4e-5 (values up to 3.7) at 2,000 tiles. CPU bf16 autocast vs fp32: max 0.11, 3.0 % of the
largest value (cosine 0.9995) on the full-size demo model at 2,000 tiles, 0.5-1.1 % on the test
twin; BF16_TOLERANCE bounds the twin's relative error in the tests.
"""

from __future__ import annotations

import logging
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eagleflow.models.card import ModelCard, SlideEncoderRole, WeightFile
from eagleflow.models.checkpoints import require_tensor_dict
from eagleflow.weights import WeightsError

CARD = ModelCard(
    name="prism",
    summary=(
        "PRISM slide encoder (Paige): Perceiver resampler (513 latents, 8 shared cross-attention "
        "layers, 6 shared self-attention blocks) over Virchow v1 tile embeddings; "
        "image_embedding (1280-d)"
    ),
    weights=WeightFile(
        file_name="model.safetensors",
        source=(
            "Hugging Face paige-ai/Prism (gated: log in and accept the terms), file "
            "model.safetensors"
        ),
        container=(
            "flat safetensors dict of the whole PRISM model: the slide encoder under "
            "'image_resampler.' (87 tensors; shared modules may appear under several names), "
            "the text side (text_decoder, img_to_latents, text_to_latents, temperature) ignored"
        ),
    ),
    role=SlideEncoderRole(
        encoder="prism",
        tile_encoders=("virchow",),
        dim=1280,
        embedding=(
            "image_embedding: cls_norm of latent 0 after the Perceiver "
            "(slide_representations(x)['image_embedding'])"
        ),
        uses_positions=False,
        order_dependent=False,
    ),
)

log = logging.getLogger(__name__)

LATENT_SEQ = 512  # image latents; one more latent (row 0) makes the slide embedding
LATENT_DIM = 1280
CONTEXT_DIM = 2560  # Virchow v1: class token ‖ mean of the patch tokens
MHSA_HEADS = 8
PERCEIVER_DEPTH = 8
TRANSFORMER_DEPTH = 6
SHARE_XATTN_START = 1  # layers after this one reuse its cross-attention block
SHARE_TF_START = 0  # layers after this one reuse its self-attention blocks
XATTN_HEADS = 1
LAYER_NORM_EPS = 1e-5  # torch's default, as in the original
TILE_ENCODER = "virchow"
PREFIX = "image_resampler."
IGNORED_KEYS = ("temperature",)
IGNORED_PREFIXES = ("text_decoder.", "img_to_latents.", "text_to_latents.")
SIGNATURE_KEYS = (
    "image_resampler.perceiver.latents",
    "image_resampler.cls_norm.weight",
    "image_resampler.perceiver.layers.0.xattn.xattn.to_kv.weight",
)
# max |bf16 autocast - fp32| / max |fp32| of image_embedding (twin: the tests hold it below this).
BF16_TOLERANCE = 0.05


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32, fp64 for fp64: softmax never runs in half precision."""
    return torch.promote_types(dtype, torch.float32)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact softmax attention [B, H, L, D] x [B, H, N, D] -> [B, H, L, D], scale D^-0.5.

    key_mask: bool [B, N], True where a key is real; False keys get zero weight.
    """
    scores = (q @ k.transpose(-1, -2)).to(_accumulation_dtype(q.dtype)) * q.shape[-1] ** -0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], -torch.inf)
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


class CrossAttention(nn.Module):
    """Latents attend to the tiles: LayerNorm on the queries only, bias-free projections."""

    def __init__(self, query_dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        # Registration order as in the original (no c_norm: it is built with c_norm=False).
        self.x_norm = nn.LayerNorm(query_dim, eps=LAYER_NORM_EPS)
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * query_dim, bias=False)
        self.to_out = nn.Linear(query_dim, query_dim, bias=False)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N, C] tiles -> k, v [B, H, N, D]: to_kv's output channels are (2, heads, D)."""
        b, n, _ = context.shape
        kv = self.to_kv(context).view(b, n, 2, self.heads, -1)
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, n, dim = x.shape
        q = self.to_q(self.x_norm(x)).view(b, n, self.heads, -1).transpose(1, 2)
        out = attention(q, *kv, key_mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, dim))


class GEGLU(nn.Module):
    """value * gelu(gate), the value the first half of the channels (exact erf GELU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """LayerNorm -> Linear(d, 2d) -> GEGLU -> Linear(d, d); `net` indices as in the original."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.net = nn.Sequential(nn.Linear(dim, 2 * dim), GEGLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


class SelfAttentionProjections(nn.Module):
    """torch MultiheadAttention(bias=False)'s parameters and math (heads = contiguous channels)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))  # [q; k; v]
        self.out_proj = nn.Linear(dim, dim, bias=False)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as torch does; a no-op on meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        qkv = F.linear(x, self.in_proj_weight).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2])
        return self.out_proj(out.transpose(1, 2).reshape(b, n, dim))


class MHSA(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mha = SelfAttentionProjections(dim, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(self.norm(x))


class Perceiver(nn.Module):
    """The latents and the DISTINCT layer modules; `forward` applies them in the shared pattern.

    The original's `layers.i` for i > SHARE_XATTN_START reuse `layers.SHARE_XATTN_START.xattn`,
    and for i > SHARE_TF_START `layers.SHARE_TF_START.tf`. Only the distinct modules are
    registered here, so the state dict names each tensor once, by its first name in the
    original's state dict (layers.0.xattn, layers.0.tf, layers.1.xattn).
    """

    def __init__(
        self,
        latent_seq: int,
        latent_dim: int,
        context_dim: int,
        mhsa_heads: int,
        depth: int,
        transformer_depth: int,
        xattn_heads: int,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.latents = nn.Parameter(torch.empty(latent_seq, latent_dim).normal_())
        layers = []
        for i in range(min(depth, max(SHARE_XATTN_START, SHARE_TF_START) + 1)):
            layer = nn.ModuleDict()
            if i <= SHARE_XATTN_START:
                layer["xattn"] = nn.ModuleDict(
                    {
                        "xattn": CrossAttention(latent_dim, context_dim, xattn_heads),
                        "ff": FeedForward(latent_dim),
                    }
                )
            if i <= SHARE_TF_START:
                layer["tf"] = nn.ModuleList(
                    nn.ModuleDict(
                        {"mhsa": MHSA(latent_dim, mhsa_heads), "ff": FeedForward(latent_dim)}
                    )
                    for _ in range(transformer_depth)
                )
            layers.append(layer)
        self.layers = nn.ModuleList(layers)

    def forward(self, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, C] tiles (bool key_mask [B, N] or None) -> latents [B, latent_seq, D]."""
        x = self.latents.unsqueeze(0).expand(context.shape[0], -1, -1)
        kv_of: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i in range(self.depth):
            xi, ti = min(i, SHARE_XATTN_START), min(i, SHARE_TF_START)
            block = self.layers[xi]["xattn"]
            if xi not in kv_of:  # a shared block sees the same tiles: its k, v once
                kv_of[xi] = block["xattn"].keys_values(context)
            x = block["xattn"](x, kv_of[xi], key_mask) + x
            x = block["ff"](x) + x
            for sub in self.layers[ti]["tf"]:
                x = sub["mhsa"](x) + x
                x = sub["ff"](x) + x
        return x


class PrismSlideEncoder(nn.Module):
    """PRISM's `image_resampler`: Virchow v1 tile embeddings -> image_embedding [1280].

    `encode_bag(feats [N, 2560], cells [N, 2], "virchow")` -> [1280] for one bag (cells unused);
    `forward(tiles [B, N, 2560], tile_mask bool [B, N] | None)` -> dict with `image_embedding`
    [B, 1280] and `image_latents` [B, 512, 1280], as the original's `slide_representations`
    (but a padded batch needs a BOOLEAN mask, True = tile).
    """

    def __init__(
        self,
        latent_seq: int = LATENT_SEQ,
        latent_dim: int = LATENT_DIM,
        context_dim: int = CONTEXT_DIM,
        mhsa_heads: int = MHSA_HEADS,
        depth: int = PERCEIVER_DEPTH,
        transformer_depth: int = TRANSFORMER_DEPTH,
        xattn_heads: int = XATTN_HEADS,
    ) -> None:
        super().__init__()
        self.context_dim = context_dim
        self.cls_norm = nn.LayerNorm(latent_dim, eps=LAYER_NORM_EPS)
        self.img_norm = nn.LayerNorm(latent_dim, eps=LAYER_NORM_EPS)
        self.perceiver = Perceiver(
            1 + latent_seq,
            latent_dim,
            context_dim,
            mhsa_heads,
            depth,
            transformer_depth,
            xattn_heads,
        )

    def forward(
        self, tile_embeddings: torch.Tensor, tile_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if tile_embeddings.ndim != 3 or tile_embeddings.shape[-1] != self.context_dim:
            raise ValueError(
                f"tile embeddings must be [B, N, {self.context_dim}], "
                f"got {tuple(tile_embeddings.shape)}"
            )
        if tile_embeddings.shape[1] == 0:
            raise ValueError("PRISM needs at least one tile")
        if tile_mask is None and tile_embeddings.shape[0] > 1:
            raise ValueError("a batch of several bags needs a tile_mask (bool, True = tile)")
        if tile_mask is not None:
            if tile_mask.dtype != torch.bool:
                # The original adds a float mask to the logits: padding keeps weight e^-1.
                raise TypeError(
                    f"tile_mask must be bool (True = tile), got {tile_mask.dtype}: a float mask "
                    "is added to the attention logits and does not mask padding"
                )
            if tile_mask.shape != tile_embeddings.shape[:2]:
                raise ValueError(
                    f"tile_mask {tuple(tile_mask.shape)} does not match the tiles "
                    f"{tuple(tile_embeddings.shape[:2])}"
                )
            if not tile_mask.any(dim=1).all():
                raise ValueError("every bag in the batch needs at least one tile")
        weight = self.perceiver.latents
        context = tile_embeddings.to(weight.device, weight.dtype)
        mask = None if tile_mask is None else tile_mask.to(weight.device)
        x = self.perceiver(context, mask)
        return {"image_embedding": self.cls_norm(x[:, 0]), "image_latents": self.img_norm(x[:, 1:])}

    def encode_bag(
        self, feats: torch.Tensor, cells: torch.Tensor, tile_encoder: str
    ) -> torch.Tensor:
        """One bag: [N, 2560] Virchow v1 embeddings, [N, 2] cells (unused) -> [1280]."""
        if tile_encoder != TILE_ENCODER:
            raise ValueError(
                f"PRISM was trained on {TILE_ENCODER} (Virchow v1, 2560-d) tile embeddings, "
                f"not {tile_encoder!r}"
            )
        if feats.ndim != 2 or feats.shape[1] != self.context_dim:
            raise ValueError(f"feats must be [N, {self.context_dim}], got {tuple(feats.shape)}")
        if cells.ndim != 2 or cells.shape != (len(feats), 2):
            raise ValueError(f"cells must be [{len(feats)}, 2], got {tuple(cells.shape)}")
        return self(feats[None])["image_embedding"][0]


def build(device: torch.device | str | None = None, **overrides: Any) -> PrismSlideEncoder:
    """The slide encoder on `device` (meta: no memory, no init; then load with assign=True).

    `overrides` (latent_seq, latent_dim, context_dim, mhsa_heads, depth, transformer_depth,
    xattn_heads) make small test twins.
    """
    with torch.device(device) if device is not None else nullcontext():
        return PrismSlideEncoder(**overrides)


_LAYER_KEY = re.compile(r"^perceiver\.layers\.(\d+)\.(xattn|tf)\.(.+)$")


def canonical_key(key: str, depth: int = PERCEIVER_DEPTH) -> str:
    """A resampler key (prefix stripped) -> the name our model gives its tensor.

    `perceiver.layers.i.xattn.*` for SHARE_XATTN_START < i < depth is `layers.1.xattn.*`, and
    `perceiver.layers.i.tf.*` for SHARE_TF_START < i < depth is `layers.0.tf.*`; any other key
    is returned unchanged (so a key beyond `depth` stays unexpected).
    """
    match = _LAYER_KEY.match(key)
    if match is None:
        return key
    layer, kind, rest = int(match[1]), match[2], match[3]
    start = SHARE_XATTN_START if kind == "xattn" else SHARE_TF_START
    if start < layer < depth:
        return f"perceiver.layers.{start}.{kind}.{rest}"
    return key


def published_key(key: str) -> str:
    """Model key -> its (first) name in the published file."""
    return PREFIX + key


def is_ignored(key: str) -> bool:
    """The text side of the published file, not needed for slide embeddings."""
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True  # one tensor under two names (as Module.state_dict() gives them)
    return torch.equal(a, b)


def prepare_state_dict(
    checkpoint: Any, path: Path | None, *, depth: int = PERCEIVER_DEPTH
) -> dict[str, torch.Tensor]:
    """The published dict -> the resampler's 87 tensors under our names.

    Drops the text side (IGNORED_KEYS, IGNORED_PREFIXES), strips `image_resampler.`, and folds
    the names of each shared tensor into one (`canonical_key`); names of one tensor must hold
    equal values. Keys of any other kind are kept, so the strict load names them. A bare
    resampler state dict (no prefix) is accepted too.
    """
    flat = require_tensor_dict(checkpoint, "prism", path, "a flat dict of tensors")
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    ignored = 0
    for file_key, tensor in flat.items():
        if is_ignored(file_key):
            ignored += 1
            continue
        key = canonical_key(file_key.removeprefix(PREFIX), depth)
        if key in out:
            if not _same(out[key], tensor):
                raise WeightsError(
                    f"prism: weight file {str(path)!r}: {source[key]} and {file_key} name the "
                    f"same shared tensor of the Perceiver but hold different values "
                    f"({tuple(out[key].shape)} {out[key].dtype} vs {tuple(tensor.shape)} "
                    f"{tensor.dtype})"
                )
            continue
        out[key], source[key] = tensor, file_key
    log.debug("prism: %d text-side keys ignored, %d resampler tensors", ignored, len(out))
    return out
