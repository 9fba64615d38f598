"""CHIEF slide aggregator (Wang et al. 2024): gated attention MIL over CTransPath tile features.

Only the attention path runs; the other modules exist so that every key of the published
`CHIEF_pretraining.pth` loads strictly. The text branch (`organ_embedding`) is not used, as in
EAGLE and STAMP.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from eagleflow.models.card import ModelCard, WeightFile
from eagleflow.models.checkpoints import random_state_dict, require_tensor_dict

CARD = ModelCard(
    name="chief",
    summary="CHIEF (Wang et al. 2024): gated attention MIL over CTransPath features; EAGLE's tile ranking",
    weights=WeightFile(
        file_name="CHIEF_pretraining.pth",
        sha256="6a46d200b32a65e5ce4774611b889b5f1bbf7a39f9111321a2a1b5dbdb9996b8",
        source=(
            "the CHIEF README (github.com/hms-dbmi/CHIEF): the model-weights download "
            "(access on request), file CHIEF_pretraining.pth"
        ),
        container="bare state dict (21 keys; organ_embedding is dropped before loading)",
    ),
)

IN_DIM = 768
HIDDEN_DIM = 512
ATTENTION_DIM = 256
DROPPED_KEYS = ("organ_embedding",)  # CLIP text embeddings of 19 sites; unused by EAGLE
SIGNATURE_KEYS = ("attention_net.0.weight", "attention_net.3.attention_c.weight")
# Unit-gain demo weights give attention logits that differ by ~0.01 between demo tiles, so the
# demo softmax is uniform; this gain on the scorer spreads them over ~1 logit, as a trained
# scorer ranks tiles (measured on demo-cohort CTransPath features: std 0.007 -> 0.4).
DEMO_SCORER_GAIN = 64.0


class ChiefOutput(NamedTuple):
    """CHIEF's output for one bag of N tiles."""

    attention_raw: torch.Tensor  # [N] pre-softmax attention logits (EAGLE ranks tiles by these)
    attention_softmax: torch.Tensor  # [N] softmax over the tiles
    slide_embedding: torch.Tensor  # [768] softmax-weighted mean of the input features


class AttnNetGated(nn.Module):
    """Gated attention (Ilse et al.): score = c(tanh(a x) * sigmoid(b x)); returns (scores, x)."""

    def __init__(
        self, in_dim: int = HIDDEN_DIM, attn_dim: int = ATTENTION_DIM, dropout: float = 0.25
    ) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(
            nn.Linear(in_dim, attn_dim), nn.Tanh(), nn.Dropout(dropout)
        )
        self.attention_b = nn.Sequential(
            nn.Linear(in_dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout)
        )
        self.attention_c = nn.Linear(attn_dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, in_dim] -> ([N, 1] scores, [N, in_dim] features)."""
        return self.attention_c(self.attention_a(x) * self.attention_b(x)), x


class AttHead(nn.Module):
    """CHIEF's auxiliary attention head (kept for its checkpoint keys, unused in forward)."""

    def __init__(self, in_dim: int = HIDDEN_DIM, hidden_dim: int = ATTENTION_DIM) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, in_dim] -> [N, 1] in (0, 1)."""
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(x))))


class Chief(nn.Module):
    """CHIEF(size_arg='small', dropout=True, n_classes=2): 768 -> 512 -> 256 gated ABMIL."""

    def __init__(self, n_classes: int = 2, dropout: float = 0.25) -> None:
        super().__init__()
        self.attention_net = nn.Sequential(
            nn.Linear(IN_DIM, HIDDEN_DIM),
            nn.ReLU(),
            nn.Dropout(dropout),
            AttnNetGated(HIDDEN_DIM, ATTENTION_DIM, dropout),
        )
        self.classifiers = nn.Linear(HIDDEN_DIM, n_classes)
        self.instance_classifiers = nn.ModuleList(
            [nn.Linear(HIDDEN_DIM, 2) for _ in range(n_classes)]
        )
        self.att_head = AttHead(HIDDEN_DIM, ATTENTION_DIM)
        self.text_to_vision = nn.Sequential(
            nn.Linear(IN_DIM, HIDDEN_DIM), nn.ReLU(), nn.Dropout(dropout)
        )

    def forward(self, features: torch.Tensor) -> ChiefOutput:
        """CTransPath features [N, 768] of one bag -> ChiefOutput."""
        if features.ndim != 2 or features.shape[1] != IN_DIM:
            raise ValueError(f"CHIEF expects features [N, {IN_DIM}], got {tuple(features.shape)}")
        if features.shape[0] == 0:
            raise ValueError("CHIEF needs at least one tile feature")
        features = features.to(self.classifiers.weight.dtype)
        scores, _ = self.attention_net(features)
        attention_raw = scores[:, 0]
        attention = torch.softmax(attention_raw, dim=0)
        return ChiefOutput(attention_raw, attention, attention @ features)


def build(device: torch.device | str | None = None) -> Chief:
    """The CHIEF aggregator, created on `device` (meta: no memory, no init; then load weights)."""
    with torch.device(device) if device is not None else nullcontext():
        return Chief()


def demo_state_dict(model: Chief, seed: int) -> dict[str, torch.Tensor]:
    """Seeded DEMO weights (checkpoints.random_state_dict) with the scorer scaled by DEMO_SCORER_GAIN."""
    state_dict = random_state_dict(model, seed)
    state_dict["attention_net.3.attention_c.weight"] *= DEMO_SCORER_GAIN
    return state_dict


def prepare_state_dict(checkpoint: Any, path: Path | None) -> dict[str, torch.Tensor]:
    """The bare state dict, minus `organ_embedding` if present."""
    state_dict = require_tensor_dict(checkpoint, "chief", path, "a bare state dict of tensors")
    return {k: v for k, v in state_dict.items() if k not in DROPPED_KEYS}
