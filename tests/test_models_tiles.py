"""Prov-GigaPath tile encoder and PathoDuet (H&E, IHC): exact loading, architecture guards,
preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from model_fixtures import (
    BAD_KEY_KINDS,
    break_key,
    fabricate_state_dict,
    key_spec_or_skip,
    pathoduet_reference_forward,
    save_checkpoint,
)
from timm.layers import GluMlp
from torch import nn

from eagleflow.models import gigapath_tile as gt
from eagleflow.models import pathoduet as pd
from eagleflow.models.card import IMAGENET_MEAN, IMAGENET_STD
from eagleflow.models.loading import build_model, load_model
from eagleflow.models.preprocess import preprocess_tiles
from eagleflow.weights import REGISTRY, WeightsError, sha256_file

torch.set_num_threads(min(2, torch.get_num_threads()))

PATHODUET = ("pathoduet_he", "pathoduet_ihc")


def _shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[list[int], str]]:
    return {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state_dict.items()}


def _manifest(spec: dict) -> dict[str, tuple[list[int], str]]:
    return {k: (e["shape"], e["dtype"]) for k, e in spec["keys"].items()}


# --- Prov-GigaPath tile encoder ---------------------------------------------------------------


@pytest.fixture(scope="module")
def gigapath_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The published 566-key bare state dict, compact (stride-0 rows: a few MB, not 4.5 GB)."""
    spec = key_spec_or_skip("gigapath_tile")
    sd = fabricate_state_dict(spec, seed=7, compact=True)
    path = tmp_path_factory.mktemp("gigapath") / "pytorch_model.bin"
    return save_checkpoint(spec, sd, path), sd


def test_gigapath_tile_keys_and_shapes_equal_the_manifest() -> None:
    spec = key_spec_or_skip("gigapath_tile")
    model = build_model("gigapath_tile")  # on meta: no memory
    assert spec["n_keys"] == len(spec["keys"]) == 566
    assert list(model.state_dict()) == list(spec["keys"])
    assert _shapes(model.state_dict()) == _manifest(spec)
    assert sum(p.numel() for p in model.parameters()) == 1_134_953_984
    assert spec["timm_kwargs"] == gt.MODEL_KWARGS


def test_gigapath_tile_module_tree_equals_timm_entrypoint() -> None:
    with torch.device("meta"):
        reference = timm.create_model(gt.TIMM_ARCH, pretrained=False, **gt.MODEL_KWARGS)
    ours = build_model("gigapath_tile")
    assert isinstance(ours, type(reference))
    assert repr(ours).split("\n", 1)[1] == repr(reference).split("\n", 1)[1]
    assert ours.global_pool == "token" and ours.num_prefix_tokens == 1


def test_gigapath_tile_mlp_is_swiglu_with_silu() -> None:
    model = build_model("gigapath_tile")
    assert len(model.blocks) == 40
    for block in model.blocks:
        assert isinstance(block.mlp, GluMlp) and not block.mlp.gate_last
        assert type(block.mlp.act) is nn.SiLU  # GELU here loads strictly and is silently wrong
        assert block.mlp.fc1.out_features == 8192 and block.mlp.fc2.in_features == 4096
    assert not any(isinstance(m, nn.GELU) for m in model.modules())


def test_gigapath_tile_checkpoint_loads_exactly(gigapath_file) -> None:
    path, file_sd = gigapath_file
    model = load_model("gigapath_tile", path, verify_sha256=False)
    loaded = model.state_dict()
    assert list(loaded) == list(file_sd)
    assert all(torch.equal(loaded[k], file_sd[k]) for k in loaded)
    assert not any(p.is_meta for p in model.parameters()) and not model.training
    assert model.eagleflow_weights.sha256 == sha256_file(path)


def test_gigapath_tile_forward_on_a_reduced_depth_twin(gigapath_file) -> None:
    """Two blocks with the full model's per-block structure (40 blocks: ~20 s per tile here)."""
    _, file_sd = gigapath_file
    twin = gt.build("meta", depth=2)
    sd = {
        k: v for k, v in file_sd.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < 2
    }
    twin.load_state_dict(sd, strict=True, assign=True)
    twin.eval()
    x = preprocess_tiles("gigapath_tile", np.full((1, 256, 256, 3), 180, dtype=np.uint8))
    with torch.inference_mode():
        tokens = twin.forward_features(x)
        out = twin(x)
    assert tokens.shape == (1, gt.NUM_TOKENS, 1536) and out.shape == (1, gt.EMBED_DIM)
    assert torch.equal(out, tokens[:, 0]) and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", BAD_KEY_KINDS)
def test_gigapath_tile_bad_key_is_named(gigapath_file, kind: str, tmp_path: Path) -> None:
    _, file_sd = gigapath_file
    spec = key_spec_or_skip("gigapath_tile")
    key = "blocks.17.ls2.gamma"
    sd = break_key(file_sd, key, kind, "blocks.17.ls2.weight", torch.ones(1280))
    path = save_checkpoint(spec, sd, tmp_path / f"gigapath_{kind}.bin")
    with pytest.raises(WeightsError) as err:
        load_model("gigapath_tile", path, verify_sha256=False)
    assert key in str(err.value) and str(path) in str(err.value)


def test_gigapath_tile_preprocessing_crops_256_px_tiles() -> None:
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(2, 256, 256, 3), dtype=np.uint8)
    x = preprocess_tiles("gigapath_tile", tiles)
    assert x.shape == (2, 3, 224, 224)
    mean, std = (
        torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.tensor(IMAGENET_STD)[:, None, None],
    )
    center = torch.from_numpy(tiles[:, 16:240, 16:240]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(x, (center - mean) / std)  # 256 px: no resize, centre crop 224
    smaller = preprocess_tiles("gigapath_tile", tiles[:, :224, :224])  # bicubic up to 256 first
    assert smaller.shape == (2, 3, 224, 224)


# --- PathoDuet --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pathoduet_sd() -> dict[str, torch.Tensor]:
    spec = key_spec_or_skip("pathoduet")
    sd = fabricate_state_dict(spec, seed=9)
    sd["pos_embed"] = sd["pos_embed"] * 20  # positions large enough that token order shows
    return sd


def test_pathoduet_keys_and_shapes_equal_the_manifest() -> None:
    spec = key_spec_or_skip("pathoduet")
    assert spec["n_keys"] == len(spec["keys"]) == 151
    for name in PATHODUET:
        model = build_model(name)
        assert list(model.state_dict()) == list(spec["keys"])
        assert _shapes(model.state_dict()) == _manifest(spec)


def test_pathoduet_architecture_guards() -> None:
    model = build_model("pathoduet_he")
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 12 + 1 and all(m.eps == 1e-6 for m in norms)
    assert isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.LayerNorm)
    assert isinstance(model.head, nn.Identity) and model.global_pool == "avg"
    assert model.num_prefix_tokens == 2  # pooling skips pretext and class token
    assert all(type(b.mlp.act) is nn.GELU and b.mlp.act.approximate == "none" for b in model.blocks)
    assert all(isinstance(b.ls1, nn.Identity) for b in model.blocks)  # no LayerScale


@pytest.mark.parametrize("name", PATHODUET)
def test_pathoduet_checkpoint_loads_and_equals_reference(
    name: str, pathoduet_sd: dict, tmp_path: Path
) -> None:
    spec = key_spec_or_skip("pathoduet")
    path = save_checkpoint(spec, pathoduet_sd, tmp_path / REGISTRY[name].file_name)
    model = load_model(name, path, verify_sha256=False)
    loaded = model.state_dict()
    assert list(loaded) == list(pathoduet_sd)
    assert all(torch.equal(loaded[k], pathoduet_sd[k]) for k in loaded)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out, tokens = model(x), model.forward_tokens(x)
        expected, expected_tokens = pathoduet_reference_forward(pathoduet_sd, x)
    assert out.shape == (2, 768) and tokens.shape == (2, pd.NUM_TOKENS, 768)
    torch.testing.assert_close(tokens, expected_tokens, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # pooling the class or pretext token too gives another embedding: the test can tell
    fc_norm = model.fc_norm
    for wrong in (tokens[:, 1:].mean(1), tokens.mean(1)):
        assert (fc_norm(wrong) - out).abs().max() > 1e-3


def test_pathoduet_input_is_not_normalised() -> None:
    tiles = np.zeros((2, 256, 256, 3), dtype=np.uint8)
    tiles[1] = 255
    for name in PATHODUET:
        x = preprocess_tiles(name, tiles)
        assert x.shape == (2, 3, 224, 224)
        assert torch.equal(x[0], torch.zeros(3, 224, 224))
        assert torch.equal(x[1], torch.ones(3, 224, 224))


def test_pathoduet_he_and_ihc_demo_weights_differ() -> None:
    he, ihc = load_model("pathoduet_he", "demo"), load_model("pathoduet_ihc", "demo")
    assert he.eagleflow_weights.is_demo and ihc.eagleflow_weights.is_demo
    assert not torch.equal(he.blocks[0].attn.qkv.weight, ihc.blocks[0].attn.qkv.weight)


def test_registry_names_where_to_get_each_file(tmp_path: Path) -> None:
    expected = {
        "gigapath_tile": ("pytorch_model.bin", "prov-gigapath/prov-gigapath"),
        "gigapath_slide": ("slide_encoder.pth", "prov-gigapath/prov-gigapath"),
        "pathoduet_he": ("checkpoint_HE.pth", "openmedlab/PathoDuet"),
        "pathoduet_ihc": ("checkpoint_IHC.pth", "openmedlab/PathoDuet"),
    }
    for name, (file_name, source) in expected.items():
        entry = REGISTRY[name]
        assert entry.file_name == file_name and source in entry.source
        assert entry.sha256 is None  # nothing published to check against: recorded only
        with pytest.raises(WeightsError) as err:
            load_model(name, tmp_path / file_name)
        message = str(err.value)
        assert f"models.{name}.weights" in message and file_name in message
        assert source in message and "demo" in message
