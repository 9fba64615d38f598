"""PRISM slide encoder (Perceiver over Virchow v1 tiles): exact loading of the published dict with
its shared-module aliases and text side, the forward on a small twin against a Perceiver written
out in the test (cross-attention order, one head, no context norm, GEGLU value-then-gate, module
sharing), boolean padding masks, the tile-encoder guard, demo signal, bf16 and fp64."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_fixtures import fabricate_state_dict, key_spec_or_skip
from safetensors.torch import save_file
from torch import nn

from eagleflow.models import prism as pr
from eagleflow.models.checkpoints import (
    demo_seed,
    load_state_dict_exact,
    random_state_dict,
    read_checkpoint,
)
from eagleflow.weights import WeightsError

torch.set_num_threads(min(2, torch.get_num_threads()))

# Twin: the full model's structure (1 + latent_seq latents, 1 cross-attention head, shared
# cross-attention from layer 1 and shared self-attention blocks), small dims; depth 3 so that one
# layer (2) reuses layer 1's cross-attention and two reuse layer 0's blocks.
TWIN = {
    "latent_seq": 6,
    "latent_dim": 32,
    "context_dim": 48,
    "mhsa_heads": 4,
    "depth": 3,
    "transformer_depth": 2,
}
TEXT_SIDE = {  # the published file's other parts (shapes shrunk for the twin)
    "temperature": (),
    "text_decoder.model.biogpt.embed_tokens.weight": (10, 8),
    "text_decoder.model.biogpt.layers.0.fc1.weight": (8, 8),
    "img_to_latents.to_latents.weight": (16, 32),
    "text_to_latents.to_latents.weight": (16, 8),
}
MIN_RELATIVE_SPREAD = 0.05  # as tests/test_models_demo.py (importing it costs ~15 s)


def relative_spread(rows: np.ndarray) -> float:
    """test_models_demo's measure: mean distance to the centroid over the mean norm."""
    rows = np.asarray(rows, dtype=np.float64)
    spread = np.linalg.norm(rows - rows.mean(0), axis=1).mean()
    return float(spread / np.linalg.norm(rows, axis=1).mean())


def near_one_weights(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Norm weights near 1, biases and latents of visible size, unit-gain projections."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, ref in model.state_dict().items():
        if ref.ndim == 1 and key.endswith("weight"):
            out[key] = 1.0 + 0.2 * torch.randn(ref.shape, generator=gen)
        elif ref.ndim == 1:
            out[key] = 0.2 * torch.randn(ref.shape, generator=gen)
        elif key.endswith("latents"):
            out[key] = torch.randn(ref.shape, generator=gen)
        else:
            out[key] = torch.randn(ref.shape, generator=gen) / ref.shape[1] ** 0.5
    return out


def twin(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides: int) -> nn.Module:
    model = pr.build("meta", **{**TWIN, **overrides})
    model.load_state_dict(near_one_weights(model, seed), strict=True, assign=True)
    return model.to(dtype).eval()


def bag(n: int, seed: int, dtype: torch.dtype = torch.float64, dim: int = 48) -> torch.Tensor:
    return 2.0 * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def cells(n: int) -> torch.Tensor:
    return torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.int64)], 1)


def published_layout(
    sd: dict[str, torch.Tensor], depth: int, names: str = "all"
) -> dict[str, torch.Tensor]:
    """Our state dict as the original's Module.state_dict() names it, prefixed.

    names='all': every name of every shared tensor (layers.i.xattn for i >= 1 are layer 1's,
    layers.i.tf for i >= 0 layer 0's); 'canonical': each tensor once (our names); 'last': each
    shared tensor only under the name of the LAST layer that uses it.
    """
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if key.startswith("perceiver.layers.") and parts[3] in ("xattn", "tf"):
            first = int(parts[2])
            users = [first] if first == 0 and parts[3] == "xattn" else list(range(first, depth))
            if names == "canonical":
                users = users[:1]
            elif names == "last":
                users = users[-1:]
            for layer in users:
                out[".".join(["image_resampler.perceiver.layers", str(layer), *parts[3:]])] = value
        else:
            out["image_resampler." + key] = value
    return out


def load(checkpoint: dict, model: nn.Module, depth: int, path: Path | None = None) -> nn.Module:
    state = pr.prepare_state_dict(checkpoint, path, depth=depth)
    load_state_dict_exact(model, state, "prism", path, pr.published_key)
    return model.eval()


# --- the Perceiver, written out ------------------------------------------------------------------


def reference_prism(
    sd: dict[str, torch.Tensor],
    tiles: torch.Tensor,
    mhsa_heads: int,
    xattn_heads: int = 1,
    gate_first: bool = False,
    tanh_gelu: bool = False,
    context_norm: bool = False,
    additive_mask: torch.Tensor | None = None,
    embedding: str = "cls_norm",
) -> torch.Tensor:
    """PRISM's image_embedding for one bag [N, C], from our state-dict names, one step at a time.

    The keyword arguments are the traps (all off: the original). Layer i uses cross-attention
    block min(i, 1) and self-attention blocks 0; x = f(x) + x for every sub-block.
    """
    depth = sd["_depth"]
    n_blocks = 1 + max(int(k.split(".")[4]) for k in sd if ".tf." in k)

    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)

    def ff(t: torch.Tensor, p: str) -> torch.Tensor:
        h = ln(t, f"{p}.norm") @ sd[f"{p}.net.0.weight"].T + sd[f"{p}.net.0.bias"]
        half = h.shape[-1] // 2
        value, gate = (h[:, half:], h[:, :half]) if gate_first else (h[:, :half], h[:, half:])
        gelu = F.gelu(gate, approximate="tanh" if tanh_gelu else "none")
        return (value * gelu) @ sd[f"{p}.net.2.weight"].T + sd[f"{p}.net.2.bias"]

    def heads_attention(q, k, v, heads, bias=None):
        hd = q.shape[-1] // heads
        outs = []
        for h in range(heads):
            cut = slice(h * hd, (h + 1) * hd)
            logits = q[:, cut] @ k[:, cut].T / math.sqrt(hd)
            if bias is not None:
                logits = logits + bias
            outs.append(torch.softmax(logits, dim=-1) @ v[:, cut])
        return torch.cat(outs, dim=-1)

    x = sd["perceiver.latents"].clone()
    dim = x.shape[1]
    context = tiles
    if context_norm:  # a LayerNorm with unit weight on the tiles: the trap
        context = F.layer_norm(tiles, tiles.shape[-1:])
    for i in range(depth):
        p = f"perceiver.layers.{min(i, 1)}.xattn"
        q = ln(x, f"{p}.xattn.x_norm") @ sd[f"{p}.xattn.to_q.weight"].T
        kv = context @ sd[f"{p}.xattn.to_kv.weight"].T
        k, v = kv[:, :dim], kv[:, dim:]
        attended = heads_attention(q, k, v, xattn_heads, additive_mask)
        x = attended @ sd[f"{p}.xattn.to_out.weight"].T + x
        x = ff(x, f"{p}.ff") + x
        for j in range(n_blocks):
            b = f"perceiver.layers.0.tf.{j}"
            wq, wk, wv = sd[f"{b}.mhsa.mha.in_proj_weight"].chunk(3)
            a = ln(x, f"{b}.mhsa.norm")
            attended = heads_attention(a @ wq.T, a @ wk.T, a @ wv.T, mhsa_heads)
            x = attended @ sd[f"{b}.mhsa.mha.out_proj.weight"].T + x
            x = ff(x, f"{b}.ff") + x
    if embedding == "mean_latents":
        return ln(x[1:], "img_norm").mean(0)
    if embedding == "raw":
        return x[0]
    return ln(x[0], "cls_norm")


def ref_sd(model: nn.Module, depth: int) -> dict:
    return {**model.state_dict(), "_depth": depth}


# --- (a) architecture = the published file ------------------------------------------------------


@pytest.fixture(scope="module")
def spec() -> dict:
    return key_spec_or_skip("prism")


def test_keys_and_shapes_equal_the_manifest(spec: dict) -> None:
    model = pr.build("meta")
    sd = model.state_dict()
    assert spec["n_keys"] == len(spec["keys"]) == 87
    assert [pr.published_key(k) for k in sd] == list(spec["keys"])
    assert {pr.published_key(k): list(v.shape) for k, v in sd.items()} == {
        k: e["shape"] for k, e in spec["keys"].items()
    }
    assert sum(p.numel() for p in model.parameters()) == spec["n_params_vision"] == 99_037_440
    assert model.perceiver.latents.shape == (513, 1280)


def test_every_alias_folds_onto_its_tensor(spec: dict) -> None:
    assert len(spec["aliases"]) == 486
    assert spec["n_state_dict_keys_vision_with_aliases"] == 87 + 486
    for alias, canonical in spec["aliases"].items():
        assert pr.canonical_key(alias.removeprefix(pr.PREFIX)) == canonical.removeprefix(pr.PREFIX)
    for key in spec["keys"]:
        assert pr.canonical_key(key.removeprefix(pr.PREFIX)) == key.removeprefix(pr.PREFIX)
    beyond = "perceiver.layers.8.tf.0.ff.norm.weight"  # no layer 8: stays unexpected
    assert pr.canonical_key(beyond) == beyond


def test_ignore_list_is_the_text_side(spec: dict) -> None:
    ignored = [*spec["ignored_keys"], *spec["ignored_key_aliases"]]
    assert len(spec["ignored_keys"]) == 512
    assert all(pr.is_ignored(k) for k in ignored)
    assert not any(pr.is_ignored(k) for k in [*spec["keys"], *spec["aliases"]])


# --- (b) the published container loads strict; bad keys are named --------------------------------


@pytest.fixture(scope="module")
def full_file(spec: dict) -> dict[str, torch.Tensor]:
    """The whole published dict at full size, compact (stride-0 rows), every alias present."""
    sd = fabricate_state_dict(spec, seed=3, compact=True)
    out = dict(sd)
    out.update({alias: sd[canonical] for alias, canonical in spec["aliases"].items()})
    out.update(fabricate_state_dict({"keys": spec["ignored_keys"]}, seed=4, compact=True))
    return out


@pytest.mark.parametrize("names", ["all", "canonical", "last"])
def test_full_size_dict_loads_exactly(spec: dict, full_file: dict, names: str) -> None:
    """Whichever names of the shared tensors the file holds (the manifest leaves it open)."""
    canonical = {k.removeprefix(pr.PREFIX): v for k, v in full_file.items() if k in spec["keys"]}
    layout = published_layout(canonical, pr.PERCEIVER_DEPTH, names)
    if names == "all":
        assert set(layout) == {*spec["keys"], *spec["aliases"]}
    text = {k: v for k, v in full_file.items() if k in spec["ignored_keys"]}
    model = load({**layout, **text}, pr.build("meta"), pr.PERCEIVER_DEPTH)
    loaded = model.state_dict()
    assert list(loaded) == list(canonical)
    assert all(torch.equal(loaded[k], canonical[k]) for k in loaded)
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize(
    "key",
    [
        "image_resampler.cls_norm.weight",
        "image_resampler.perceiver.latents",
        "image_resampler.perceiver.layers.1.xattn.xattn.to_kv.weight",
        "image_resampler.perceiver.layers.0.tf.4.mhsa.mha.in_proj_weight",
    ],
)
def test_a_missing_tensor_is_named_though_the_text_side_is_there(
    spec: dict, full_file: dict, key: str
) -> None:
    """Remove the key and every alias of it: the ignored text keys cannot hide it."""
    names = {key} | {a for a, c in spec["aliases"].items() if c == key}
    broken = {k: v for k, v in full_file.items() if k not in names}
    assert any(pr.is_ignored(k) for k in broken)
    with pytest.raises(WeightsError, match="missing keys") as err:
        load(broken, pr.build("meta"), pr.PERCEIVER_DEPTH)
    assert f"(in the file: {key})" in str(err.value)


def test_renamed_and_misshapen_keys_are_named(full_file: dict) -> None:
    key = "image_resampler.perceiver.layers.0.xattn.ff.net.2.bias"
    renamed = dict(full_file)
    renamed["image_resampler.perceiver.layers.0.xattn.ff.net.3.bias"] = renamed.pop(key)
    with pytest.raises(WeightsError) as err:
        load(renamed, pr.build("meta"), pr.PERCEIVER_DEPTH)
    assert key in str(err.value) and "perceiver.layers.0.xattn.ff.net.3.bias" in str(err.value)
    misshapen = {**full_file, key: torch.zeros(2560)}
    with pytest.raises(WeightsError, match=r"wrong shapes: .*net\.2\.bias.*\(2560,\)"):
        load(misshapen, pr.build("meta"), pr.PERCEIVER_DEPTH)


def test_aliases_that_disagree_are_refused(full_file: dict) -> None:
    alias = "image_resampler.perceiver.layers.6.tf.2.ff.net.0.bias"
    changed = {**full_file, alias: full_file[alias].clone()}
    changed[alias][7] += 1e-3
    with pytest.raises(WeightsError, match="hold different values") as err:
        load(changed, pr.build("meta"), pr.PERCEIVER_DEPTH)
    assert alias in str(err.value) and "layers.0.tf.2.ff.net.0.bias" in str(err.value)
    reshaped = {**full_file, alias: torch.zeros(5)}
    with pytest.raises(WeightsError, match="hold different values"):
        load(reshaped, pr.build("meta"), pr.PERCEIVER_DEPTH)


def test_a_layer_beyond_the_depth_is_unexpected(full_file: dict) -> None:
    extra = "image_resampler.perceiver.layers.8.xattn.xattn.to_q.weight"
    bigger = {**full_file, extra: full_file[extra.replace(".8.", ".1.")]}
    with pytest.raises(WeightsError, match=r"unexpected keys: perceiver\.layers\.8\.xattn"):
        load(bigger, pr.build("meta"), pr.PERCEIVER_DEPTH)


def test_safetensors_file_of_a_twin_loads_and_runs(tmp_path: Path) -> None:
    """The published container (flat safetensors, every alias stored as its own tensor)."""
    source = twin(seed=1, dtype=torch.float32)
    layout = published_layout(source.state_dict(), TWIN["depth"])
    layout.update({k: torch.ones(shape) for k, shape in TEXT_SIDE.items()})
    path = tmp_path / "model.safetensors"
    save_file({k: v.clone().contiguous() for k, v in layout.items()}, str(path))
    checkpoint = read_checkpoint(path, "prism")
    model = load(checkpoint, pr.build("meta", **TWIN), TWIN["depth"], path)
    x = bag(20, seed=2, dtype=torch.float32)
    with torch.inference_mode():
        assert torch.equal(
            model.encode_bag(x, cells(20), "virchow"), source.encode_bag(x, cells(20), "virchow")
        )


# --- (c) the forward against the written-out Perceiver; (d) the traps -----------------------------


def test_forward_equals_the_written_out_perceiver() -> None:
    model = twin(seed=5)
    x = bag(37, seed=6)
    with torch.inference_mode():
        ours = model.encode_bag(x, cells(37), "virchow")
        out = model(x[None])
    ref = reference_prism(ref_sd(model, TWIN["depth"]), x, TWIN["mhsa_heads"])
    assert ours.shape == (TWIN["latent_dim"],)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-10)
    assert torch.equal(out["image_embedding"][0], ours)
    assert out["image_latents"].shape == (1, TWIN["latent_seq"], TWIN["latent_dim"])


def test_self_attention_is_torch_multihead_attention() -> None:
    """The blocks' `mha` computes what the original's nn.MultiheadAttention(bias=False) does."""
    model = twin(seed=7)
    ours = model.perceiver.layers[0]["tf"][1]["mhsa"].mha
    torch_mha = nn.MultiheadAttention(32, 4, bias=False, batch_first=True, dtype=torch.float64)
    torch_mha.load_state_dict(ours.state_dict(), strict=True)
    x = bag(9, seed=8, dim=32)[None]
    with torch.inference_mode():
        expected, _ = torch_mha(x, x, x, need_weights=False)
        assert torch.allclose(ours(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "trap",
    [
        {"xattn_heads": 4},  # cross-attention split into heads (the original has one of 1280)
        {"gate_first": True},  # GEGLU halves swapped
        {"tanh_gelu": True},  # GELU's tanh approximation
        {"context_norm": True},  # a LayerNorm on the tiles before to_kv
        {"embedding": "raw"},  # latent 0 without cls_norm
        {"embedding": "mean_latents"},  # the mean of image_latents
    ],
)
def test_each_trap_moves_the_output(trap: dict) -> None:
    """The written-out reference with one trap set differs from the model by far more than the
    1e-10 the forward test allows (the tanh GELU moves it least: ~2e-4 of its scale)."""
    model = twin(seed=9)
    x = bag(25, seed=10)
    with torch.inference_mode():
        ours = model.encode_bag(x, cells(25), "virchow")
    wrong = reference_prism(ref_sd(model, TWIN["depth"]), x, TWIN["mhsa_heads"], **trap)
    assert (ours - wrong).abs().max() > 5e-5 * ours.abs().max()


def test_layers_share_their_blocks_as_the_original() -> None:
    """Layer 2 reuses layer 1's cross-attention; a model with depth 2 stops after layer 1."""
    model = twin(seed=11)
    assert len(model.perceiver.layers) == 2 and "tf" not in model.perceiver.layers[1]
    x = bag(12, seed=12)
    shallow = twin(seed=11, depth=2)
    with torch.inference_mode():
        deep_out = model.encode_bag(x, cells(12), "virchow")
        shallow_out = shallow.encode_bag(x, cells(12), "virchow")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in shallow.state_dict().items())
    ref2 = reference_prism({**shallow.state_dict(), "_depth": 2}, x, TWIN["mhsa_heads"])
    assert torch.allclose(shallow_out, ref2, rtol=0, atol=1e-10)
    assert (deep_out - shallow_out).abs().max() > 1e-3  # the third layer ran


def test_padded_batch_with_a_bool_mask_equals_each_bag() -> None:
    model = twin(seed=13)
    lengths = (5, 31, 17)
    bags = [bag(n, seed=20 + n) for n in lengths]
    junk = 50.0 * torch.randn(3, max(lengths), 48, dtype=torch.float64)  # visible padding
    batch, mask = junk.clone(), torch.zeros(3, max(lengths), dtype=torch.bool)
    for row, (n, b) in enumerate(zip(lengths, bags, strict=True)):
        batch[row, :n], mask[row, :n] = b, True
    with torch.inference_mode():
        batched = model(batch, mask)["image_embedding"]
        for row, (n, b) in enumerate(zip(lengths, bags, strict=True)):
            alone = model.encode_bag(b, cells(n), "virchow")
            assert torch.allclose(batched[row], alone, rtol=0, atol=1e-10)


def test_float_masks_are_refused() -> None:
    """The original's float mask is added to the logits: with 1 for tiles, 0 for padding, the
    padding keeps weight e^-1 (shown with the written-out reference) -- so only bool masks."""
    model = twin(seed=14)
    x, pad = bag(10, seed=15), bag(4, seed=16)
    padded = torch.cat([x, pad])
    float_mask = torch.cat([torch.ones(10), torch.zeros(4)]).to(torch.float64)
    with pytest.raises(TypeError, match="must be bool"):
        model(padded[None], float_mask[None])
    sd = ref_sd(model, TWIN["depth"])
    shifted = reference_prism(sd, padded, TWIN["mhsa_heads"], additive_mask=float_mask)
    with torch.inference_mode():
        alone = model.encode_bag(x, cells(10), "virchow")
        masked = model(padded[None], float_mask.bool()[None])["image_embedding"][0]
    assert (shifted - alone).abs().max() > 1e-2
    assert torch.allclose(masked, alone, rtol=0, atol=1e-10)


def test_order_and_cells_do_not_matter() -> None:
    model = twin(seed=17)
    x = bag(40, seed=18)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = model.encode_bag(x, cells(40), "virchow")
        b = model.encode_bag(x[order], cells(40).flip(1) * 7, "virchow")
    assert torch.allclose(a, b, rtol=0, atol=1e-10)
    assert pr.CARD.role.uses_positions is False and pr.CARD.role.order_dependent is False


def test_bad_inputs_are_refused() -> None:
    model = twin(seed=19)
    x = bag(6, seed=20)
    with pytest.raises(ValueError, match="trained on virchow"):
        model.encode_bag(x, cells(6), "virchow2")  # Virchow2's cls‖mean is 2560-d too
    with pytest.raises(ValueError, match=r"feats must be \[N, 48\]"):
        model.encode_bag(x[:, :40], cells(6), "virchow")
    with pytest.raises(ValueError, match=r"cells must be \[6, 2\]"):
        model.encode_bag(x, cells(5), "virchow")
    with pytest.raises(ValueError, match="at least one tile"):
        model.encode_bag(x[:0], cells(0), "virchow")
    with pytest.raises(ValueError, match="needs a tile_mask"):
        model(torch.stack([x, x]))
    with pytest.raises(ValueError, match="at least one tile"):
        model(torch.stack([x, x]), torch.tensor([[True] * 6, [False] * 6]))


def test_card() -> None:
    role = pr.CARD.role
    assert pr.CARD.name == "prism" and role.encoder == "prism"
    assert role.tile_encoders == ("virchow",) and role.dim == pr.LATENT_DIM == 1280
    assert pr.CARD.weights.file_name == "model.safetensors"
    assert "paige-ai/Prism" in pr.CARD.weights.source


# --- (e) demo weights; (f) precision ----------------------------------------------------------


def test_demo_weights_carry_the_input_signal() -> None:
    """The loader's demo weights (random_state_dict) on a twin with 8 layers like the model."""
    model = pr.build("meta", **{**TWIN, "depth": 8, "transformer_depth": 6})
    model.load_state_dict(random_state_dict(model, demo_seed("prism")), assign=True)
    model.eval()
    with torch.inference_mode():
        out = [
            model.encode_bag(bag(30, seed=s, dtype=torch.float32), cells(30), "virchow").numpy()
            for s in range(5)
        ]
    assert relative_spread(np.stack(out)) > MIN_RELATIVE_SPREAD


def test_bf16_autocast_and_fp64() -> None:
    model = twin(seed=21, dtype=torch.float32)
    x = bag(200, seed=22, dtype=torch.float32)
    with torch.inference_mode():
        full = model.encode_bag(x, cells(200), "virchow")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model.encode_bag(x, cells(200), "virchow").float()
        double = model.double().encode_bag(x.double(), cells(200), "virchow")
    scale = full.abs().max()
    assert 0 < (half - full).abs().max() < pr.BF16_TOLERANCE * scale
    assert (full.double() - double).abs().max() < 1e-5 * scale
