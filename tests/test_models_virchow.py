"""Virchow v1 (PRISM's tile encoder): exact loading of the published 454-key file, the SiLU and
no-register guards, the forward on a small twin against a ViT written out in the test, the
embedding (class token ‖ mean of the patch tokens), demo signal, bf16 and fp64."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from model_fixtures import (
    BAD_KEY_KINDS,
    break_key,
    fabricate_state_dict,
    key_spec_or_skip,
    save_checkpoint,
)
from timm.layers import GluMlp
from torch import nn

from eagleflow.models import virchow as vc
from eagleflow.models.card import IMAGENET_MEAN, IMAGENET_STD
from eagleflow.models.checkpoints import (
    demo_seed,
    load_state_dict_exact,
    random_state_dict,
    read_checkpoint,
)
from eagleflow.weights import WeightsError

torch.set_num_threads(min(2, torch.get_num_threads()))

# A twin with Virchow's structure (class token, no registers, LayerScale, SwiGLUPacked + SiLU).
TWIN = {"embed_dim": 64, "depth": 2, "num_heads": 4, "img_size": 56, "mlp_ratio": 2.0}
TWIN_PATCHES = (56 // 14) ** 2
MIN_RELATIVE_SPREAD = 0.05  # as tests/test_models_demo.py (importing it costs ~15 s)


def relative_spread(rows: np.ndarray) -> float:
    """test_models_demo's measure: mean distance to the centroid over the mean norm."""
    rows = np.asarray(rows, dtype=np.float64)
    return float(
        np.linalg.norm(rows - rows.mean(0), axis=1).mean() / np.linalg.norm(rows, axis=1).mean()
    )


def _load_file(path: Path, model: nn.Module | None = None) -> nn.Module:
    """What the loader does: read safely, prepare, load strict into the meta-built model."""
    model = vc.build("meta") if model is None else model
    state = vc.prepare_state_dict(read_checkpoint(path, "virchow"), path)
    load_state_dict_exact(model, state, "virchow", path)
    return model.eval()


def _near_one_weights(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random weights where every part matters: norms and LayerScale near 1, unit-gain linears."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, ref in model.state_dict().items():
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma")):
            out[key] = 1.0 + 0.2 * torch.randn(ref.shape, generator=gen)
        elif ref.ndim == 1 or key in ("cls_token", "pos_embed"):
            out[key] = 0.3 * torch.randn(ref.shape, generator=gen)
        else:
            out[key] = torch.randn(ref.shape, generator=gen) / ref[0].numel() ** 0.5
    return out


def _twin(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    model = vc.build("meta", **{**TWIN, **overrides})
    model.load_state_dict(_near_one_weights(model, seed), strict=True, assign=True)
    return model.to(dtype).eval()


def reference_virchow(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """Virchow v1 from its keys, written out: [B, 3, H, W] -> class token ‖ mean(patches).

    Patch conv 14/14, class token, + pos_embed, pre-LN blocks (eps 1e-6) with LayerScale:
    x += ls1 * proj(attn(norm1 x)); x += ls2 * fc2(silu(fc1 first half) * fc1 second half);
    final LayerNorm on every token; patch tokens from index 1 (no registers).
    """

    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-6)

    def lin(t: torch.Tensor, name: str) -> torch.Tensor:
        return t @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    b = x.shape[0]
    patches = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), patches.flatten(2).transpose(1, 2)], 1)
    t = t + sd["pos_embed"]
    dim = t.shape[-1]
    hd = dim // heads
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}"
        qkv = lin(ln(t, f"{p}.norm1"), f"{p}.attn.qkv")
        attended = []
        for h in range(heads):  # one head at a time: channels h*hd .. (h+1)*hd of q, k, v
            q = qkv[..., h * hd : (h + 1) * hd]
            k = qkv[..., dim + h * hd : dim + (h + 1) * hd]
            v = qkv[..., 2 * dim + h * hd : 2 * dim + (h + 1) * hd]
            attended.append(torch.softmax(q @ k.transpose(1, 2) / hd**0.5, -1) @ v)
        t = t + sd[f"{p}.ls1.gamma"] * lin(torch.cat(attended, -1), f"{p}.attn.proj")
        hidden = lin(ln(t, f"{p}.norm2"), f"{p}.mlp.fc1")
        half = hidden.shape[-1] // 2
        gated = F.silu(hidden[..., :half]) * hidden[..., half:]
        t = t + sd[f"{p}.ls2.gamma"] * lin(gated, f"{p}.mlp.fc2")
    t = ln(t, "norm")
    return torch.cat([t[:, 0], t[:, 1:].mean(1)], -1)


@pytest.fixture(scope="module")
def spec() -> dict:
    return key_spec_or_skip("virchow")


@pytest.fixture(scope="module")
def virchow_file(spec: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The published bare 454-key state dict, compact (stride-0 rows: a few MB, not 2.5 GB)."""
    sd = fabricate_state_dict(spec, seed=11, compact=True)
    path = tmp_path_factory.mktemp("virchow") / "pytorch_model.bin"
    return save_checkpoint(spec, sd, path), sd


# --- (a) architecture = the published file ------------------------------------------------------


def test_keys_and_shapes_equal_the_manifest(spec: dict) -> None:
    model = vc.build("meta")
    assert spec["n_keys"] == len(spec["keys"]) == 454
    assert list(model.state_dict()) == list(spec["keys"])
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: e["shape"] for k, e in spec["keys"].items()}
    assert sum(p.numel() for p in model.parameters()) == 631_229_184
    assert spec["timm_architecture"] == vc.TIMM_ARCH
    kwargs = {k: v for k, v in vc.MODEL_KWARGS.items() if k not in ("mlp_layer", "act_layer")}
    assert {k: v for k, v in spec["timm_kwargs"].items() if k in kwargs} == kwargs
    assert spec["timm_kwargs"]["mlp_layer"] == "timm.layers.SwiGLUPacked"
    assert spec["timm_kwargs"]["act_layer"] == "torch.nn.SiLU"


def test_module_tree_equals_timm_entrypoint() -> None:
    with torch.device("meta"):
        reference = timm.create_model(vc.TIMM_ARCH, pretrained=False, **vc.MODEL_KWARGS)
    ours = vc.build("meta")
    assert isinstance(ours, type(reference))
    assert repr(ours).split("\n", 1)[1] == repr(reference).split("\n", 1)[1]
    assert [(n, type(m)) for n, m in ours.named_modules()][1:] == [
        (n, type(m)) for n, m in reference.named_modules()
    ][1:]


def test_no_registers_and_swiglu_with_silu() -> None:
    model = vc.build("meta")
    assert model.num_prefix_tokens == 1 and model.reg_token is None
    assert model.pos_embed.shape == (1, vc.NUM_TOKENS, 1280)
    assert len(model.blocks) == 32
    for block in model.blocks:
        assert isinstance(block.mlp, GluMlp) and not block.mlp.gate_last
        assert type(block.mlp.act) is nn.SiLU  # GELU loads strict and is silently wrong
        assert block.mlp.fc1.out_features == 6832 and block.mlp.fc2.in_features == 3416
        assert block.norm1.eps == 1e-6 and block.attn.num_heads == 16
    assert not any(isinstance(m, nn.GELU) for m in model.modules())


def test_card_matches_the_published_preprocessing(spec: dict) -> None:
    cfg, role = spec["pretrained_cfg"], vc.CARD.role
    assert cfg["tag"] == "virchow_v1" and cfg["crop_mode"] == "center"
    assert role.preprocess.interpolation == cfg["interpolation"] == "bicubic"
    assert role.preprocess.resize == cfg["input_size"][1] == 224
    assert role.preprocess.crop == round(role.preprocess.resize * cfg["crop_pct"]) == 224
    assert tuple(cfg["mean"]) == role.preprocess.mean == IMAGENET_MEAN
    assert tuple(cfg["std"]) == role.preprocess.std == IMAGENET_STD
    assert (role.encoder, role.dim, role.tile_px, role.tile_mpp) == ("virchow", 2560, 224, 0.5)
    assert vc.CARD.name == "virchow" and role.trained_stains == ("HE",)


# --- (b) the published container loads strict; bad keys are named --------------------------------


def test_checkpoint_loads_exactly(virchow_file: tuple[Path, dict]) -> None:
    path, file_sd = virchow_file
    model = _load_file(path)
    loaded = model.state_dict()
    assert list(loaded) == list(file_sd)
    assert all(torch.equal(loaded[k], file_sd[k]) for k in loaded)
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("kind", BAD_KEY_KINDS)
def test_bad_key_is_named(virchow_file: tuple[Path, dict], kind: str, tmp_path: Path) -> None:
    _, file_sd = virchow_file
    key = "blocks.21.mlp.fc1.weight"
    sd = break_key(file_sd, key, kind, "blocks.21.mlp.w12.weight", torch.zeros(6832, 1024))
    path = save_checkpoint(key_spec_or_skip("virchow"), sd, tmp_path / f"virchow_{kind}.bin")
    with pytest.raises(WeightsError) as err:
        _load_file(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_a_virchow2_file_is_refused(virchow_file: tuple[Path, dict], tmp_path: Path) -> None:
    """Virchow2 = Virchow v1 + 4 registers: its reg_token and longer pos_embed are named."""
    _, file_sd = virchow_file
    sd = dict(file_sd)
    sd["reg_token"] = torch.zeros(1, 4, 1280)
    sd["pos_embed"] = torch.zeros(1, 261, 1280)
    path = tmp_path / "virchow2.bin"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match=r"reg_token[\s\S]*pos_embed: file \(1, 261, 1280\)"):
        _load_file(path)


def test_a_file_with_objects_is_refused(virchow_file: tuple[Path, dict], tmp_path: Path) -> None:
    path = tmp_path / "pickled.bin"
    torch.save({"model": virchow_file[1], "args": Path("x")}, path)
    with pytest.raises(WeightsError, match="refusing to load"):
        _load_file(path)


# --- (c) forward = a ViT written out; (d) guards ----------------------------------------------


def test_forward_equals_the_written_out_vit() -> None:
    model = _twin(seed=1, dtype=torch.float64)
    x = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.inference_mode():
        ours = model(x)
        tokens = model.forward_tokens(x)
    ref = reference_virchow(model.state_dict(), x, TWIN["num_heads"])
    assert ours.shape == (3, 2 * TWIN["embed_dim"]) and tokens.shape == (3, 1 + TWIN_PATCHES, 64)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-10)
    assert torch.equal(ours, vc.cls_mean_embedding(tokens))


def test_gelu_or_a_register_slice_would_change_the_output() -> None:
    """The traps: timm's GELU default loads the same keys; Virchow2's [:, 5:] drops 4 patches."""
    ours = _twin(seed=3)
    gelu = _twin(seed=3, act_layer=nn.GELU)
    assert list(gelu.state_dict()) == list(ours.state_dict())
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        right, wrong = ours(x), gelu(x)
        tokens = ours.forward_tokens(x)
    scale = right.abs().max()
    assert (right - wrong).abs().max() > 0.01 * scale
    sliced = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], -1)
    assert (right - sliced).abs().max() > 0.01 * scale
    assert torch.equal(right[:, :64], tokens[:, 0])  # the first half is the class token


def test_full_size_model_on_meta_gives_2560() -> None:
    model = vc.build("meta")
    out = model(torch.empty(2, 3, 224, 224, device="meta"))
    assert out.shape == (2, vc.EMBED_DIM) == (2, vc.CARD.role.dim)
    assert model.forward_tokens(torch.empty(1, 3, 224, 224, device="meta")).shape == (1, 257, 1280)


# --- (e) demo weights; (f) precision ----------------------------------------------------------


def test_demo_weights_carry_the_input_signal() -> None:
    """The demo weights of the loader (random_state_dict, LayerScale 1) on a 4-block twin."""
    model = vc.build("meta", **{**TWIN, "depth": 4})
    model.load_state_dict(random_state_dict(model, demo_seed("virchow")), assign=True)
    model.eval()
    gen = torch.Generator().manual_seed(6)
    tiles = torch.rand(6, 3, 56, 56, generator=gen)
    mean, std = (
        torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.tensor(IMAGENET_STD)[:, None, None],
    )
    with torch.inference_mode():
        out = model((tiles - mean) / std).numpy()
    assert relative_spread(out) > MIN_RELATIVE_SPREAD
    again = random_state_dict(model, demo_seed("virchow"))
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())


def test_bf16_autocast_and_fp64() -> None:
    model = _twin(seed=5)
    x = torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x).float()
        double = model.double()(x.double())
    scale = full.abs().max()
    assert 0 < (half - full).abs().max() < vc.BF16_TOLERANCE * scale
    assert np.isclose((full.double() - double).abs().max().item(), 0, atol=1e-4 * scale.item())
