"""eagleflow.models: exact checkpoint loading, safety, the weight registry and demo weights."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from model_fixtures import (
    BAD_KEY_KINDS,
    break_key,
    chief_reference,
    container_key,
    ctranspath054_forward,
    fabricate_state_dict,
    key_spec_or_skip,
    load_key_spec,
    save_checkpoint,
    swin054_attn_mask,
    swin054_relative_position_index,
    to_timm054_layout,
    wrap,
)
from timm.layers import GluMlp
from torch import nn

from eagleflow.models import ctranspath as ctp
from eagleflow.models import virchow2 as v2
from eagleflow.models.card import IMAGENET_MEAN, IMAGENET_STD
from eagleflow.models.checkpoints import demo_seed, random_state_dict
from eagleflow.models.chief import ChiefOutput
from eagleflow.models.loading import autocast_context, build_model, identify_checkpoint, load_model
from eagleflow.models.preprocess import preprocess_tiles
from eagleflow.models.virchow2 import cls_mean_embedding
from eagleflow.weights import (
    REGISTRY,
    WeightsError,
    check_weights_config,
    resolve_weights,
    sha256_file,
    weights_attrs,
)

torch.set_num_threads(min(2, torch.get_num_threads()))


def _as_dict(obj: object, spec: dict) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded, wrapped checkpoint."""
    key = container_key(spec)
    return obj if key is None else obj[key]


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def chief_file(ckpt_dir: Path) -> Path:
    spec = key_spec_or_skip("chief")
    return save_checkpoint(spec, fabricate_state_dict(spec, seed=1), ckpt_dir / "chief.pth")


@pytest.fixture(scope="session")
def ctranspath_file(ckpt_dir: Path) -> Path:
    spec = key_spec_or_skip("ctranspath")
    return save_checkpoint(spec, fabricate_state_dict(spec, seed=2), ckpt_dir / "ctranspath.pth")


@pytest.fixture(scope="session")
def virchow2_file(ckpt_dir: Path) -> Iterator[Path]:
    """The full-size (2.5 GB fp32) Virchow2 checkpoint, written once per session and removed."""
    spec = key_spec_or_skip("virchow2")
    path = save_checkpoint(spec, fabricate_state_dict(spec, seed=3), ckpt_dir / "virchow2.pth")
    yield path
    path.unlink(missing_ok=True)


def _load(name: str, path: Path, **kwargs: object) -> nn.Module:
    return load_model(name, path, verify_sha256=False, **kwargs)


# --- published layouts load exactly ----------------------------------------------------------


def test_chief_checkpoint_loads_exactly(chief_file: Path) -> None:
    spec = load_key_spec("chief")
    model = load_model("chief", chief_file, expected_sha256=sha256_file(chief_file))
    file_sd = torch.load(chief_file, weights_only=True)
    loaded = model.state_dict()
    assert set(loaded) == set(file_sd) - {"organ_embedding"}
    assert all(torch.equal(loaded[k], file_sd[k]) for k in loaded)
    assert len(spec["keys"]) == spec["n_keys"] == 21
    out = model(torch.randn(7, 768))
    assert isinstance(out, ChiefOutput)
    assert out.attention_raw.shape == out.attention_softmax.shape == (7,)
    assert out.slide_embedding.shape == (768,)
    info = model.eagleflow_weights
    assert info.sha256 == sha256_file(chief_file) and info.verified and not info.is_demo
    assert not model.training


def test_chief_loads_without_organ_embedding(tmp_path: Path) -> None:
    spec = key_spec_or_skip("chief")
    sd = fabricate_state_dict(spec)
    del sd["organ_embedding"]  # as STAMP/EAGLE re-save it
    path = tmp_path / "chief_no_organ.pth"
    torch.save(sd, path)
    model = _load("chief", path)
    assert torch.equal(model.classifiers.weight, sd["classifiers.weight"])


def test_chief_loads_from_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    spec = key_spec_or_skip("chief")
    sd = fabricate_state_dict(spec)
    path = tmp_path / "chief.safetensors"
    save_file(sd, str(path))
    model = _load("chief", path)
    assert torch.equal(model.att_head.fc1.weight, sd["att_head.fc1.weight"])


def test_ctranspath_checkpoint_loads_exactly(ctranspath_file: Path) -> None:
    spec = load_key_spec("ctranspath")
    assert spec["n_keys"] == len(spec["keys"]) == 200
    model = _load("ctranspath", ctranspath_file)
    file_sd = _as_dict(torch.load(ctranspath_file, weights_only=True), spec)
    converted = ctp.checkpoint_filter_fn(file_sd)
    loaded = model.state_dict()
    assert len(loaded) == len(converted) == 183
    assert all(torch.equal(loaded[k], converted[k]) for k in loaded)
    # every file key is used: dropped ones are exactly the 0.5.4 buffers
    dropped = set(file_sd) - {ctp.published_key(k) for k in loaded}
    assert dropped and all(k.endswith(("relative_position_index", "attn_mask")) for k in dropped)
    assert len(dropped) == 12 + 5
    out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 768) and torch.isfinite(out).all()


def test_ctranspath_filter_matches_timm(ctranspath_file: Path) -> None:
    """Our named remap equals timm's own swin checkpoint_filter_fn on the published layout."""
    spec = load_key_spec("ctranspath")
    ckpt = torch.load(ctranspath_file, weights_only=True)
    ours = ctp.checkpoint_filter_fn(_as_dict(ckpt, spec))
    theirs = timm.models.swin_transformer.checkpoint_filter_fn(ckpt, build_model("ctranspath"))
    assert list(ours) == list(theirs)
    assert all(ours[k] is theirs[k] for k in ours)


def test_ctranspath_buffers_equal_timm054(ctranspath_file: Path) -> None:
    """Non-persistent buffers (not in the state dict) hold the values the 0.5.4 file stores."""
    spec = load_key_spec("ctranspath")
    file_sd = _as_dict(torch.load(ctranspath_file, weights_only=True), spec)
    model = _load("ctranspath", ctranspath_file)
    buffers = dict(model.named_buffers())
    for key, value in file_sd.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            assert torch.equal(buffers[key], value), key
    masks = [k for k, v in buffers.items() if k.endswith("attn_mask") and v is not None]
    assert sorted(masks) == sorted(k for k in file_sd if k.endswith("attn_mask"))


def test_virchow2_checkpoint_loads_exactly(virchow2_file: Path) -> None:
    spec = load_key_spec("virchow2")
    assert spec["n_keys"] == len(spec["keys"]) == 455
    model = _load("virchow2", virchow2_file)
    file_sd = torch.load(virchow2_file, weights_only=True, mmap=True)
    loaded = model.state_dict()
    assert list(loaded) == list(file_sd)
    assert all(torch.equal(loaded[k], file_sd[k]) for k in loaded)
    assert model.eagleflow_weights.sha256 == sha256_file(virchow2_file)
    assert not model.eagleflow_weights.verified  # no published hash: recorded, not checked
    with torch.inference_mode():
        x = torch.randn(1, 3, 224, 224)
        tokens = model.forward_tokens(x)
        cls = model(x)
    assert tokens.shape == (1, 261, 1280) and cls.shape == (1, 1280)
    assert torch.equal(cls, tokens[:, 0])
    emb = cls_mean_embedding(tokens)
    assert emb.shape == (1, 2560)
    assert torch.allclose(emb[:, 1280:], tokens[:, 5:].mean(1))
    assert torch.isfinite(tokens).all()


# --- the architecture is the one the checkpoints were trained with ----------------------------


def test_virchow2_mlp_is_swiglu_with_silu() -> None:
    model = build_model("virchow2")
    mlps = [b.mlp for b in model.blocks]
    assert len(mlps) == 32
    for mlp in mlps:
        assert isinstance(mlp, GluMlp) and not mlp.gate_last
        assert type(mlp.act) is nn.SiLU  # GELU here loads strictly and is silently wrong
    assert not any(isinstance(m, nn.GELU) for m in model.modules())


def test_virchow2_module_tree_equals_timm_entrypoint() -> None:
    kwargs = {**v2.MODEL_KWARGS, "pretrained": False}
    with torch.device("meta"):
        reference = timm.create_model(v2.TIMM_ARCH, **kwargs)
    ours = build_model("virchow2")
    assert isinstance(ours, type(reference))
    assert [(n, type(m)) for n, m in ours.named_modules()][1:] == [
        (n, type(m)) for n, m in reference.named_modules()
    ][1:]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    assert repr(ours).split("\n", 1)[1] == repr(reference).split("\n", 1)[1]
    assert ours.num_prefix_tokens == 5 and ours.global_pool == ""


def test_chief_attention_raw_is_not_softmaxed(tmp_path: Path) -> None:
    spec = key_spec_or_skip("chief")
    sd = fabricate_state_dict(spec, seed=5)
    sd["attention_net.3.attention_c.weight"] = torch.full((1, 256), 3.0)
    sd["attention_net.3.attention_c.bias"] = torch.tensor([-2.0])
    path = tmp_path / "chief_wide.pth"
    torch.save(sd, path)
    model = _load("chief", path)
    h = torch.randn(50, 768, generator=torch.Generator().manual_seed(0)) * 3
    out = model(h)
    expected_raw = chief_reference(sd, h)
    torch.testing.assert_close(out.attention_raw, expected_raw)
    assert ((out.attention_raw < 0) | (out.attention_raw > 1)).any()
    assert not torch.isclose(out.attention_raw.sum(), torch.tensor(1.0))
    torch.testing.assert_close(out.attention_softmax, torch.softmax(expected_raw, 0))
    torch.testing.assert_close(out.slide_embedding, torch.softmax(expected_raw, 0) @ h)


def test_ctranspath_equals_independent_timm054_forward(ctranspath_file: Path) -> None:
    """The current-timm model computes what timm 0.5.4 computes from the published layout."""
    spec = load_key_spec("ctranspath")
    file_sd = _as_dict(torch.load(ctranspath_file, weights_only=True), spec)
    model = _load("ctranspath", ctranspath_file)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = model(x)
        reference = ctranspath054_forward(file_sd, x)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_ctranspath_old_layout_roundtrip_is_bit_exact(tmp_path: Path) -> None:
    """A seeded model, saved in the published 0.5.4 layout and loaded back, gives identical output."""
    spec = key_spec_or_skip("ctranspath")
    source = build_model("ctranspath")
    sd = random_state_dict(source, seed=11)
    gen = torch.Generator().manual_seed(12)
    for key, value in sd.items():  # non-trivial biases and norms, so misplaced keys would show
        if value.is_floating_point():
            sd[key] = value + 0.05 * torch.randn(value.shape, generator=gen)
            if key.endswith("running_var"):
                sd[key] = sd[key].abs() + 0.5
    source.load_state_dict(sd, strict=True)
    source.eval()
    old = to_timm054_layout(source.state_dict())
    assert {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in old.items()} == {
        k: (tuple(e["shape"]), e["dtype"]) for k, e in spec["keys"].items()
    }
    path = tmp_path / "ctranspath_old.pth"
    torch.save(wrap(spec, old), path)
    model = _load("ctranspath", path)
    x = torch.randn(3, 3, 224, 224, generator=gen)
    with torch.inference_mode():
        diff = (model(x) - source(x)).abs().max().item()
    assert diff == 0.0


def test_swin054_buffers_match_timm_constructor() -> None:
    """Our written-out 0.5.4 buffers agree with what current timm computes (two derivations)."""
    from timm.models.swin_transformer import get_relative_position_index

    assert torch.equal(swin054_relative_position_index(), get_relative_position_index(7, 7))
    assert swin054_attn_mask(56).shape == (64, 49, 49)
    assert set(swin054_attn_mask(14).unique().tolist()) == {0.0, -100.0}


# --- errors name the key, the model and the file ----------------------------------------------


@pytest.mark.parametrize("kind", BAD_KEY_KINDS)
def test_chief_bad_key_is_named(kind: str, tmp_path: Path) -> None:
    spec = key_spec_or_skip("chief")
    key = "attention_net.3.attention_c.weight"
    sd = break_key(fabricate_state_dict(spec), key, kind, f"{key}s", torch.zeros(2, 256))
    path = tmp_path / f"chief_{kind}.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as err:
        _load("chief", path)
    message = str(err.value)
    assert key in message and "chief" in message and str(path) in message
    if kind == "renamed":
        assert "attention_net.3.attention_c.weights" in message and "unexpected" in message
    if kind == "misshapen":
        assert "(2, 256)" in message and "(1, 256)" in message


@pytest.mark.parametrize("kind", BAD_KEY_KINDS)
def test_ctranspath_bad_key_is_named_as_in_the_file(kind: str, tmp_path: Path) -> None:
    spec = key_spec_or_skip("ctranspath")
    key = "layers.0.downsample.reduction.weight"  # renamed by the layout conversion
    renamed, wrong = "layers.0.downsample.reduce.weight", torch.zeros(192, 385)
    sd = break_key(fabricate_state_dict(spec), key, kind, renamed, wrong)
    path = tmp_path / f"ctranspath_{kind}.pth"
    torch.save(wrap(spec, sd), path)
    with pytest.raises(WeightsError) as err:
        _load("ctranspath", path)
    message = str(err.value)
    assert key in message and "ctranspath" in message and str(path) in message


def test_wrong_sha256_names_expected_and_actual(chief_file: Path) -> None:
    expected = "0" * 64
    with pytest.raises(WeightsError) as err:
        load_model("chief", chief_file, expected_sha256=expected)
    message = str(err.value)
    assert expected in message and sha256_file(chief_file) in message
    assert "verify_sha256: false" in message and "models.chief" in message


def test_registry_hash_is_checked_by_default(chief_file: Path) -> None:
    with pytest.raises(WeightsError, match=REGISTRY["chief"].sha256):
        load_model("chief", chief_file)


def test_sha256_file_streams_correctly(tmp_path: Path) -> None:
    import hashlib

    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path, chunk_size=1000) == hashlib.sha256(data).hexdigest()


class _WritesMarker:
    """Unpickling this opens (creates) a marker file: harmless proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    spec = key_spec_or_skip("chief")
    sd = fabricate_state_dict(spec)
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({**sd, "payload": _WritesMarker(marker)}, path)

    # the payload is live: an unsafe load would write the marker
    probe_marker = tmp_path / "probe_marker"
    probe = tmp_path / "probe.pth"
    torch.save({"payload": _WritesMarker(probe_marker)}, probe)
    torch.load(probe, weights_only=False)
    assert probe_marker.exists()

    with pytest.raises(WeightsError) as err:
        _load("chief", path)
    assert "weights_only" in str(err.value) and str(path) in str(err.value)
    assert "refusing" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file_fails_clearly(chief_file: Path, tmp_path: Path, legacy: bool) -> None:
    source = chief_file
    if legacy:
        source = tmp_path / "legacy.pth"
        torch.save(torch.load(chief_file), source, _use_new_zipfile_serialization=False)
    data = source.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated") as err:
        _load("chief", path)
    assert str(path) in str(err.value)


def test_wrong_models_file_is_recognised(chief_file: Path, ctranspath_file: Path) -> None:
    with pytest.raises(WeightsError, match=r"looks like a chief checkpoint, not virchow2") as err:
        _load("virchow2", chief_file)
    assert "virchow2" in str(err.value) and str(chief_file) in str(err.value)
    with pytest.raises(WeightsError, match=r"looks like a ctranspath checkpoint, not chief"):
        _load("chief", ctranspath_file)
    spec = load_key_spec("chief")
    assert identify_checkpoint(torch.load(chief_file, weights_only=True)) == "chief"
    assert identify_checkpoint(wrap(load_key_spec("ctranspath"), {})) is None
    assert spec["n_keys"] == 21


def test_missing_file_names_key_source_and_demo(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "ctranspath.pth"
    with pytest.raises(WeightsError) as err:
        load_model("ctranspath", path)
    message = str(err.value)
    for part in ("models.ctranspath.weights", str(path), "ctranspath.pth", "Xiyue-Wang/TransPath"):
        assert part in message
    assert "1DoDx_70_TLj98gTf6YTXnu4tFhsFocDX" in message and "demo" in message


def test_unknown_model_is_rejected() -> None:
    with pytest.raises(WeightsError, match="uni"):
        load_model("uni", "demo")


# --- demo weights -----------------------------------------------------------------------------


def test_demo_weights_deterministic_and_flagged(caplog: pytest.LogCaptureFixture) -> None:
    x = torch.randn(2, 3, 224, 224)
    h = torch.randn(9, 768)
    with caplog.at_level(logging.WARNING):
        torch.manual_seed(1)
        a = load_model("ctranspath", "demo")
        c1 = load_model("chief", "demo")
        torch.manual_seed(2)  # global RNG state must not matter
        b = load_model("ctranspath", "demo")
        c2 = load_model("chief", "demo")
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))
        assert torch.equal(c1(h).attention_raw, c2(h).attention_raw)
    info = a.eagleflow_weights
    assert info.is_demo and info.sha256 == "demo" and info.path is None
    assert weights_attrs(info)["ctranspath_weights_demo"] == "true"
    assert weights_attrs(info)["ctranspath_weights_sha256"] == "demo"
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "ctranspath uses random DEMO weights: outputs are not results" in messages
    assert "chief uses random DEMO weights: outputs are not results" in messages
    assert demo_seed("ctranspath") != demo_seed("chief")


def test_virchow2_demo_is_deterministic(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(3)
    with caplog.at_level(logging.WARNING):
        a = load_model("virchow2", "demo")
    torch.manual_seed(4)
    b = load_model("virchow2", "demo")
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    del b, sb
    assert a.eagleflow_weights.is_demo
    assert any("virchow2 uses random DEMO weights" in r.getMessage() for r in caplog.records)
    with torch.inference_mode():
        out = a(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1280) and torch.isfinite(out).all()


# --- workflow start-up check ------------------------------------------------------------------


def test_check_weights_config(tmp_path: Path, chief_file: Path) -> None:
    cfg = {
        "ctranspath": {"weights": "demo"},
        "chief": {"weights": str(chief_file), "sha256": None, "verify_sha256": True},
        "virchow2": {"weights": "demo", "verify_sha256": True},
    }
    infos = check_weights_config(cfg)
    assert infos["ctranspath"].is_demo and infos["virchow2"].is_demo
    # start-up only checks existence: the wrong registry hash of this fabricated file passes
    assert infos["chief"].sha256 is None and infos["chief"].path == chief_file
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        check_weights_config(cfg, hash_files=True)
    cfg["chief"]["sha256"] = sha256_file(chief_file)
    assert check_weights_config(cfg, hash_files=True)["chief"].verified

    cfg["virchow2"] = {"weights": str(tmp_path / "missing.bin")}
    with pytest.raises(WeightsError) as err:
        check_weights_config(cfg)
    message = str(err.value)
    assert "models.virchow2.weights" in message and "paige-ai/Virchow2" in message
    assert "demo" in message


def test_check_weights_config_rejects_bad_sections() -> None:
    with pytest.raises(WeightsError, match="unknown model"):
        check_weights_config({"uni": {"weights": "demo"}}, required=())
    with pytest.raises(WeightsError, match="no settings for virchow2"):
        check_weights_config({"ctranspath": {"weights": "demo"}, "chief": {"weights": "demo"}})
    with pytest.raises(WeightsError, match="verify_sha256"):
        check_weights_config({"chief": {"weights": "demo", "verify_sha256": "no"}}, required=())


def test_resolve_weights_records_hash_without_check(chief_file: Path) -> None:
    info = resolve_weights("chief", chief_file, verify_sha256=False)
    assert info.sha256 == sha256_file(chief_file) and not info.verified
    attrs = weights_attrs(info)
    assert attrs == {
        "chief_weights_sha256": info.sha256,
        "chief_weights_demo": "false",
        "chief_weights_file": "chief.pth",
        "chief_weights_verified": "false",
    }


# --- preprocessing and precision --------------------------------------------------------------


@pytest.mark.parametrize("name", ["ctranspath", "virchow2"])
def test_preprocess_normalizes_with_imagenet_stats(name: str) -> None:
    tiles = np.zeros((2, 224, 224, 3), dtype=np.uint8)
    tiles[1] = 255
    x = preprocess_tiles(name, tiles)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 0, 0], -mean / std)
    torch.testing.assert_close(x[1, :, 5, 7], (1 - mean) / std)
    torch.testing.assert_close(preprocess_tiles(name, torch.from_numpy(tiles)), x)


def test_preprocess_resizes_with_the_reference_interpolation() -> None:
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(1, 256, 300, 3), dtype=np.uint8)
    a = preprocess_tiles("ctranspath", tiles)
    b = preprocess_tiles("virchow2", tiles)
    assert a.shape == b.shape == (1, 3, 224, 224)
    assert not torch.equal(a, b)  # bilinear vs bicubic
    assert preprocess_tiles("ctranspath", tiles[0]).shape == (1, 3, 224, 224)
    with pytest.raises(TypeError, match="uint8"):
        preprocess_tiles("virchow2", tiles.astype(np.float32))
    with pytest.raises(ValueError, match=r"chief.: it takes tile features"):
        preprocess_tiles("chief", tiles)


def test_autocast_context() -> None:
    with autocast_context("cpu"):
        assert not torch.is_autocast_enabled("cpu")
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CUDA may be absent here
        ctx = autocast_context(torch.device("cuda", 0))
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16


def test_load_model_accepts_resolved_weights(chief_file: Path) -> None:
    info = resolve_weights("chief", chief_file, expected_sha256=sha256_file(chief_file))
    model = load_model("chief", info)
    assert model.eagleflow_weights is info and info.verified
    unhashed = check_weights_config({"chief": {"weights": str(chief_file)}}, required=())["chief"]
    model = load_model("chief", unhashed, verify_sha256=False)
    assert model.eagleflow_weights.sha256 == info.sha256  # hashed at load, as it was not yet
    with pytest.raises(WeightsError, match="unknown model"):
        load_model("uni", info)


def test_loaded_model_is_eval_and_on_device(chief_file: Path) -> None:
    model = _load("chief", chief_file, device="cpu")
    assert not model.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    assert re.fullmatch(r"[0-9a-f]{64}", model.eagleflow_weights.sha256)
