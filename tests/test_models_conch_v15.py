"""CONCH v1.5: exact checkpoint loading, the position table resized as the original resizes it,
and the forward against an independent statement on a small twin."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_fixtures import BAD_KEY_KINDS, break_key, fabricate_state_dict, key_spec_or_skip

from eagleflow.models import conch_v15
from eagleflow.models.card import IMAGENET_MEAN, IMAGENET_STD
from eagleflow.models.checkpoints import (
    load_state_dict_exact,
    random_state_dict,
    read_checkpoint,
)
from eagleflow.weights import WeightsError

torch.set_num_threads(min(2, torch.get_num_threads()))

TWIN = {"embed_dim": 64, "depth": 2, "num_heads": 4}


@pytest.fixture(scope="module")
def spec() -> dict:
    return key_spec_or_skip("conch_v15")


def twin_state_dict(seed: int = 0, **shape) -> dict[str, torch.Tensor]:
    """Twin weights where every part matters: unit-gain matrices, LayerNorm weights and
    LayerScale gammas near 1, a position table and tokens of a visible size (fp32 values)."""
    model = conch_v15.build("meta", **{**TWIN, **shape})
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, ref in model.state_dict().items():
        noise = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        if ref.ndim >= 2 and key.endswith("weight"):
            out[key] = noise / math.sqrt(ref[0].numel())
        elif key.endswith(("weight", "gamma")):  # 1-D: LayerNorm weights and LayerScale
            out[key] = 1.0 + 0.1 * noise
        elif key.endswith("bias"):
            out[key] = 0.1 * noise
        else:  # cls_token, pos_embed, query
            out[key] = 0.5 * noise
    return {k: v.float() for k, v in out.items()}


def twin(sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.float64, **shape):
    model = conch_v15.build("meta", **{**TWIN, **shape})
    load_state_dict_exact(model, sd, "conch_v15", None)
    return model.to(dtype).eval()


# --- independent statements -------------------------------------------------------------------


def cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights (a = -0.75, as PyTorch) for offsets -1, 0, 1, 2."""

    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_resize(table: np.ndarray, scale: tuple[float, float], out: tuple[int, int]):
    """[H, W, D] -> [out_h, out_w, D]: bicubic, align_corners False, source coordinate
    (i + 0.5) / scale - 0.5 with the GIVEN scale factor, border indices clamped."""
    h, w, _ = table.shape

    def axis(n_in: int, n_out: int, factor: float) -> np.ndarray:
        matrix = np.zeros((n_out, n_in))
        for i in range(n_out):
            real = (i + 0.5) / factor - 0.5
            base = math.floor(real)
            for offset, weight in zip((-1, 0, 1, 2), cubic_weights(real - base), strict=True):
                matrix[i, min(max(base + offset, 0), n_in - 1)] += weight
        return matrix

    rows, cols = axis(h, out[0], scale[0]), axis(w, out[1], scale[1])
    return np.einsum("ih,jw,hwd->ijd", rows, cols, table)


def reference_forward(
    sd: dict[str, torch.Tensor],
    x: torch.Tensor,
    heads: int,
    pos: str = "dino",
    layerscale: bool = True,
    pool_cls: bool = True,
) -> torch.Tensor:
    """The CONCH v1.5 vision tower from its keys, heads one by one (float64)."""
    sd = {k: v.double() for k, v in sd.items()}

    def ln(t: torch.Tensor, name: str, eps: float) -> torch.Tensor:
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)

    def lin(t: torch.Tensor, name: str, bias: bool = True) -> torch.Tensor:
        out = t @ sd[f"{name}.weight"].T
        return out + sd[f"{name}.bias"] if bias else out

    batch = x.shape[0]
    patches = F.conv2d(
        x, sd["trunk.patch_embed.proj.weight"], sd["trunk.patch_embed.proj.bias"], stride=16
    )
    gh, gw = patches.shape[-2:]
    t = torch.cat(
        [sd["trunk.cls_token"].expand(batch, -1, -1), patches.flatten(2).transpose(1, 2)], 1
    )
    table = sd["trunk.pos_embed"]
    if (gh, gw) != (14, 14):
        grid = table[0, 1:].reshape(14, 14, -1)
        if pos == "dino":
            resized = bicubic_resize(grid.numpy(), ((gh + 0.1) / 14, (gw + 0.1) / 14), (gh, gw))
            resized = torch.from_numpy(resized)
        else:  # size=(gh, gw): what a reimplementation might write instead
            resized = F.interpolate(grid.permute(2, 0, 1)[None], size=(gh, gw), mode="bicubic")
            resized = resized[0].permute(1, 2, 0)
        table = torch.cat([table[:, :1], resized.reshape(1, gh * gw, -1)], 1)
    t = t + table
    n, dim = t.shape[1:]
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("trunk.blocks."))
    for i in range(depth):
        p = f"trunk.blocks.{i}"
        g1 = sd[f"{p}.ls1.gamma"] if layerscale else 1.0
        g2 = sd[f"{p}.ls2.gamma"] if layerscale else 1.0
        qkv = lin(ln(t, f"{p}.norm1", 1e-6), f"{p}.attn.qkv").view(batch, n, 3, heads, -1)
        out = torch.empty(batch, n, heads, dim // heads, dtype=torch.float64)
        for head in range(heads):
            q, k, v = qkv[:, :, 0, head], qkv[:, :, 1, head], qkv[:, :, 2, head]
            out[:, :, head] = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dim // heads), -1) @ v
        t = t + g1 * lin(out.reshape(batch, n, dim), f"{p}.attn.proj")
        t = t + g2 * lin(F.gelu(lin(ln(t, f"{p}.norm2", 1e-6), f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
    t = ln(t, "trunk.norm", 1e-6)
    if not pool_cls:
        t = t[:, 1:]
    a = "attn_pool_contrast"
    q = lin(ln(sd[f"{a}.query"], f"{a}.ln_q", 1e-5), f"{a}.to_q", bias=False)  # [1, 768]
    kv = lin(ln(t, f"{a}.ln_k", 1e-5), f"{a}.to_kv", bias=False)
    k, v = kv[..., :768], kv[..., 768:]
    pooled = torch.cat(
        [
            torch.softmax(q[:, s] @ k[..., s].transpose(1, 2) / math.sqrt(96), -1) @ v[..., s]
            for s in (slice(h * 96, (h + 1) * 96) for h in range(8))
        ],
        dim=-1,
    )  # [B, 1, 768]
    return ln(lin(pooled, f"{a}.to_out", bias=False)[:, 0], "ln_contrast", 1e-5)


def images(batch: int, size: int = 448, seed: int = 0) -> torch.Tensor:
    return torch.randn(
        batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


# --- the published file loads exactly ---------------------------------------------------------


def test_full_size_keys_equal_the_manifest(spec: dict) -> None:
    model = conch_v15.build("meta")
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert keys == {k: tuple(v["shape"]) for k, v in spec["keys"].items()}
    assert spec["n_keys"] == len(keys) == 352
    assert sum(v.numel() for v in model.state_dict().values()) == 306_109_184
    assert all(k in spec["keys"] for k in conch_v15.SIGNATURE_KEYS)


def test_fabricated_checkpoint_loads_strict(spec: dict, tmp_path: Path) -> None:
    file_sd = fabricate_state_dict(spec, seed=1, compact=True)
    path = tmp_path / "pytorch_model_vision.bin"
    torch.save(file_sd, path)
    model = conch_v15.build("meta")
    state_dict = conch_v15.prepare_state_dict(read_checkpoint(path, "conch_v15"), path)
    load_state_dict_exact(model, state_dict, "conch_v15", path)
    loaded = model.state_dict()
    assert list(loaded) == list(file_sd)  # nothing missing, nothing left over
    assert all(torch.equal(loaded[k], file_sd[k]) for k in loaded)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("kind", BAD_KEY_KINDS)
def test_bad_key_is_named(kind: str, spec: dict) -> None:
    file_sd = fabricate_state_dict(spec, seed=2, compact=True)
    key = "trunk.blocks.17.ls2.gamma"
    renamed = key.replace("ls2.gamma", "ls2.weight")
    sd = break_key(file_sd, key, kind, renamed, torch.ones(768))
    with pytest.raises(WeightsError) as err:
        load_state_dict_exact(
            conch_v15.build("meta"), conch_v15.prepare_state_dict(sd, None), "conch_v15", None
        )
    message = str(err.value)
    assert key in message and "conch_v15" in message
    if kind == "renamed":
        assert "ls2.weight" in message and "unexpected" in message
    if kind == "misshapen":
        assert "(768,)" in message and "(1024,)" in message


def test_position_table_of_another_grid_is_resized_as_trident_does(spec: dict) -> None:
    """TRIDENT's load-time resize (bilinear, no antialias, to 14 x 14) where the table differs;
    a table of another width or a non-square count is still a named error."""
    file_sd = fabricate_state_dict(spec, seed=3, compact=True)
    table = torch.randn(1, 1 + 16 * 16, 1024, generator=torch.Generator().manual_seed(0))
    prepared = conch_v15.prepare_state_dict({**file_sd, "trunk.pos_embed": table}, None)
    grid = table[0, 1:].reshape(16, 16, 1024).permute(2, 0, 1)[None]
    bilinear = F.interpolate(grid, size=(14, 14), mode="bilinear", align_corners=False)
    expected = torch.cat([table[:, :1], bilinear[0].permute(1, 2, 0).reshape(1, 196, 1024)], 1)
    assert torch.equal(prepared["trunk.pos_embed"], expected)
    unchanged = conch_v15.prepare_state_dict(dict(file_sd), None)
    assert unchanged["trunk.pos_embed"] is file_sd["trunk.pos_embed"]  # the published shape
    for bad in (torch.zeros(1, 197, 768), torch.zeros(1, 200, 1024)):
        sd = conch_v15.prepare_state_dict({**file_sd, "trunk.pos_embed": bad}, None)
        with pytest.raises(WeightsError, match=r"wrong shapes: trunk\.pos_embed"):
            load_state_dict_exact(conch_v15.build("meta"), sd, "conch_v15", None)


# --- the position table at 448 ----------------------------------------------------------------


def test_bicubic_statement_matches_pytorch_on_a_small_table() -> None:
    """The independent bicubic (given scale, not size) is what F.interpolate computes."""
    table = np.random.default_rng(0).normal(size=(4, 4, 3))
    ours = bicubic_resize(table, (8.1 / 4, 8.1 / 4), (8, 8))
    theirs = F.interpolate(
        torch.from_numpy(table).permute(2, 0, 1)[None],
        scale_factor=(8.1 / 4, 8.1 / 4),
        mode="bicubic",
    )
    np.testing.assert_allclose(ours, theirs[0].permute(1, 2, 0).numpy(), rtol=0, atol=1e-12)


def test_position_table_at_448_is_dino_bicubic() -> None:
    table = torch.randn(1, 197, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = conch_v15.dino_pos_embed(table, 28, 28)
    grid = table[0, 1:].reshape(14, 14, 8).numpy()
    expected = bicubic_resize(grid, (28.1 / 14, 28.1 / 14), (28, 28)).reshape(784, 8)
    assert ours.shape == (1, 785, 8) and torch.equal(ours[0, 0], table[0, 0])
    np.testing.assert_allclose(ours[0, 1:].numpy(), expected, rtol=0, atol=1e-12)
    sized = F.interpolate(
        table[0, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2), size=(28, 28), mode="bicubic"
    )
    assert (sized[0].permute(1, 2, 0).reshape(784, 8) - ours[0, 1:]).abs().max() > 1e-2
    assert conch_v15.dino_pos_embed(table, 14, 14) is table  # 224: the table as it is


# --- the forward on a small twin --------------------------------------------------------------


@pytest.fixture(scope="module")
def twin_sd() -> dict[str, torch.Tensor]:
    return twin_state_dict(seed=4)


def test_forward_equals_reference(twin_sd: dict) -> None:
    model = twin(twin_sd)
    x = images(2)
    with torch.inference_mode():
        ours = model(x)
        ours_224 = model(x[..., :224, :224])
    assert ours.shape == (2, 768)
    torch.testing.assert_close(ours, reference_forward(twin_sd, x, 4), rtol=0, atol=1e-10)
    torch.testing.assert_close(
        ours_224, reference_forward(twin_sd, x[..., :224, :224], 4), rtol=0, atol=1e-10
    )


def test_traps_each_move_the_output(twin_sd: dict) -> None:
    x = images(1, seed=1)
    right = reference_forward(twin_sd, x, 4)
    alternatives = {
        "position table by size=(28, 28)": reference_forward(twin_sd, x, 4, pos="size"),
        "LayerScale left out": reference_forward(twin_sd, x, 4, layerscale=False),
        "pool without class token": reference_forward(twin_sd, x, 4, pool_cls=False),
    }
    for name, value in alternatives.items():
        assert (value - right).abs().max() > 1e-3, name
    model = conch_v15.build("meta")
    assert model.trunk.norm.eps == 1e-6 and model.trunk.blocks[0].norm1.eps == 1e-6
    pool = model.attn_pool_contrast
    assert pool.ln_q.eps == pool.ln_k.eps == model.ln_contrast.eps == 1e-5
    assert isinstance(model.trunk.blocks[0].mlp.act, torch.nn.GELU)
    assert model.trunk.blocks[0].mlp.act.approximate == "none"


def test_card_preprocessing() -> None:
    role = conch_v15.CARD.tile_role
    assert role is not None and role.dim == conch_v15.EMBED_DIM == 768
    assert (role.tile_px, role.tile_mpp) == (512, 0.5)
    pre = role.preprocess
    assert (pre.resize, pre.crop, pre.interpolation) == (448, 448, "bilinear")
    assert (pre.mean, pre.std) == (IMAGENET_MEAN, IMAGENET_STD)


# --- demo weights, precision ------------------------------------------------------------------


def relative_spread(embeddings: torch.Tensor) -> float:
    """Mean distance to the centroid over the mean norm (tests/test_models_demo.py's measure)."""
    e = embeddings.double()
    return float((e - e.mean(0)).norm(dim=1).mean() / e.norm(dim=1).mean())


def test_demo_weights_carry_the_signal() -> None:
    """checkpoints.random_state_dict on a 4-block twin of full width."""
    shape = {"embed_dim": 1024, "depth": 4, "num_heads": 16}
    model = conch_v15.build("meta", **shape)
    load_state_dict_exact(model, random_state_dict(model, 5), "conch_v15", None)
    model.eval()
    base = torch.linspace(-1.5, 1.5, 448)
    tiles = torch.stack(
        [
            torch.stack(
                [
                    base[None, :].expand(448, 448),
                    base[:, None].expand(448, 448),
                    torch.full((448, 448), 0.5),
                ]
            ),
            torch.randn(3, 448, 448, generator=torch.Generator().manual_seed(0)),
            torch.zeros(3, 448, 448),
        ]
    )
    with torch.inference_mode():
        out = model(tiles)
    assert out.shape == (3, 768) and relative_spread(out) > 0.05


def test_bf16_autocast_within_tolerance_and_fp32_close_to_fp64() -> None:
    shape = {"embed_dim": 256, "depth": 4, "num_heads": 4}
    sd = twin_state_dict(seed=6, **shape)
    model64, model32 = twin(sd, **shape), twin(sd, torch.float32, **shape)
    x = images(2, seed=2)
    with torch.inference_mode():
        high = model64(x)
        full = model32(x.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model32(x.float()).float()
    assert (full.double() - high).abs().max() < 1e-4
    assert 0 < (half - full).abs().max() < conch_v15.BF16_TOLERANCE
