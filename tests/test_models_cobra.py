"""COBRA-II and COBRA-I: exact checkpoint loading (the EMA encoder of the training container),
Mamba-2 against a step-by-step recurrence, the pooling's traps and the tile-encoder refusal."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_fixtures import BAD_KEY_KINDS, break_key, fabricate_state_dict, key_spec_or_skip
from test_models_demo import MIN_RELATIVE_SPREAD, relative_spread

from eagleflow.models import cobra
from eagleflow.models import ctranspath as ctp
from eagleflow.models import virchow2 as v2
from eagleflow.models.card import SlideEncoderRole
from eagleflow.models.catalog import read_cards
from eagleflow.models.checkpoints import load_state_dict_exact, read_checkpoint
from eagleflow.weights import WeightsError

torch.set_num_threads(min(2, torch.get_num_threads()))

NAMES = ("cobra", "cobra_i")
# A small twin: 2 Mamba layers of 32 channels (8 scan heads of 8, state 6), 4 pooling heads.
TWIN = {
    "input_dims": (12, 20, 24),
    "tile_encoders": {"virchow2": 20, "conch_v1": 12},
    "layers": 2,
    "num_heads": 4,
    "att_dim": 5,
    "embed_dim": 32,
    "d_state": 6,
    "headdim": 8,
}
SCORER_GAIN = 5.0  # so that the twin's attention is far from a plain mean


@pytest.fixture(scope="module")
def spec() -> dict:
    return key_spec_or_skip("cobra")


def variant_keys(spec: dict, name: str) -> dict:
    return spec["keys"] if name == "cobra" else spec["variants"]["cobraI"]["keys"]


def momentum_container(state_dict: dict[str, torch.Tensor], base_fill: float = 0.0) -> dict:
    """A MoCo training checkpoint around `state_dict`: base_enc (a different encoder),
    momentum_enc (the model) with the SSL head, the predictor, optimizer and scaler."""
    inner = {}
    for key, value in state_dict.items():
        inner[f"module.base_enc.{key}"] = torch.tensor(base_fill).expand_as(value)
    for key, value in state_dict.items():
        inner[f"module.momentum_enc.{key}"] = value
    for key in ("proj.1.weight", "proj.5.running_var"):
        inner[f"module.base_enc.{key}"] = torch.ones(3, 2)
        inner[f"module.momentum_enc.{key}"] = torch.ones(3, 2)
    inner["module.predictor.1.weight"] = torch.ones(2, 2)
    inner["module.predictor.5.num_batches_tracked"] = torch.tensor(7)
    optimizer = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4}]}
    return {"epoch": 12, "state_dict": inner, "optimizer": optimizer, "scaler": {"scale": 1024.0}}


# --- the cards and the full-size architecture --------------------------------------------------


def test_cards_read_without_import_and_agree_with_the_code() -> None:
    assert read_cards(Path(cobra.__file__)) == cobra.CARDS
    assert [card.name for card in cobra.CARDS] == list(NAMES) == list(cobra.VARIANTS)
    for card in cobra.CARDS:
        role = card.slide_role
        assert isinstance(role, SlideEncoderRole) and role.encoder == card.name
        assert role.tile_encoders == tuple(cobra.TILE_ENCODER_DIMS[card.name])
        assert role.tile_encoders[0] == "virchow2"
        assert role.dim == cobra.TILE_ENCODER_DIMS[card.name][role.tile_encoders[0]]
        assert role.order_dependent and not role.uses_positions
        dims = set(cobra.TILE_ENCODER_DIMS[card.name].values())
        assert dims == set(cobra.VARIANTS[card.name]["input_dims"])
    # the dims of the tile encoders that exist here
    assert cobra.TILE_ENCODER_DIMS["cobra"]["virchow2"] == v2.EMBED_DIM
    assert cobra.TILE_ENCODER_DIMS["cobra_i"]["ctranspath"] == ctp.EMBED_DIM


@pytest.mark.parametrize("name", NAMES)
def test_full_size_keys_and_shapes_are_the_manifests(spec: dict, name: str) -> None:
    keys = variant_keys(spec, name)
    state = cobra.build("meta", name).state_dict()
    assert list(state) == list(keys)  # the same keys in the original's order
    assert {k: list(v.shape) for k, v in state.items()} == {k: v["shape"] for k, v in keys.items()}
    expected = {"cobra": 11_063_116, "cobra_i": 14_779_800}[name]
    assert sum(v.numel() for v in state.values()) == expected
    assert set(spec["unused_keys"]) <= set(state)  # mamba_enc.norm: kept so the load is strict


def test_signature_and_published_keys(spec: dict) -> None:
    container = spec["container_keys_derived"]
    assert all(key in container for key in cobra.SIGNATURE_KEYS)
    for key in spec["keys"]:
        assert cobra.published_key(key) in container
        assert cobra.published_key(key, "cobra_i") == key
    head = {k.removeprefix("module.momentum_enc.") for k in container if ".momentum_enc.proj." in k}
    assert head == set(spec["ssl_encoder_extra_keys"])


# --- the published containers load strict --------------------------------------------------------


def test_training_container_loads_the_momentum_encoder(spec: dict, tmp_path: Path) -> None:
    """The derived MoCo container, saved and read safely: 66 keys of momentum_enc, none of
    base_enc, the SSL head or the predictor; nothing left over."""
    fabricated = fabricate_state_dict(
        {"keys": spec["container_keys_derived"]}, seed=3, compact=True
    )
    path = tmp_path / "cobraII.pth.tar"
    torch.save({"epoch": 40, "state_dict": fabricated, "optimizer": {}, "scaler": {}}, path)
    checkpoint = read_checkpoint(path, "cobra")
    state_dict = cobra.prepare_state_dict(checkpoint, path)
    assert list(state_dict) == list(spec["keys"])
    model = cobra.build("meta")
    load_state_dict_exact(model, state_dict, "cobra", path, cobra.published_key)
    loaded = model.state_dict()
    for key in spec["keys"]:
        assert torch.equal(loaded[key], fabricated[f"module.momentum_enc.{key}"])
        if key.endswith(".weight") and loaded[key].ndim == 2:  # base_enc drew other values
            assert not torch.equal(loaded[key], fabricated[f"module.base_enc.{key}"])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("form", ["bare", "container"])
def test_both_forms_load_for_both_variants(spec: dict, name: str, form: str) -> None:
    file_sd = fabricate_state_dict({"keys": variant_keys(spec, name)}, seed=4, compact=True)
    checkpoint = file_sd if form == "bare" else momentum_container(file_sd, math.nan)
    model = cobra.build("meta", name)
    load_state_dict_exact(model, cobra.prepare_state_dict(checkpoint, None, name), name, None)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], file_sd[k]) for k in file_sd)
    assert all(torch.isfinite(v).all() for v in loaded.values())  # base_enc (NaN) not taken


@pytest.mark.parametrize("kind", BAD_KEY_KINDS)
def test_bad_key_in_the_container_is_named(spec: dict, kind: str) -> None:
    file_sd = fabricate_state_dict({"keys": spec["keys"]}, seed=5, compact=True)
    key = "mamba_enc.layers.0.1.A_log"
    broken = break_key(file_sd, key, kind, "mamba_enc.layers.0.1.A", torch.zeros(8))
    checkpoint = momentum_container(broken)
    if kind == "missing":  # base_enc still has it: the ignore list must not fill the gap
        checkpoint["state_dict"][f"module.base_enc.{key}"] = file_sd[key]
    with pytest.raises(WeightsError) as err:
        state_dict = cobra.prepare_state_dict(checkpoint, Path("cobraII.pth.tar"))
        load_state_dict_exact(
            cobra.build("meta"), state_dict, "cobra", Path("x"), cobra.published_key
        )
    message = str(err.value)
    assert key in message and f"module.momentum_enc.{key}" in message
    if kind == "renamed":
        assert "mamba_enc.layers.0.1.A " in message + " " and "unexpected" in message
    if kind == "misshapen":
        assert "(8,)" in message and "(24,)" in message


def test_unknown_container_key_is_not_ignored(spec: dict) -> None:
    file_sd = fabricate_state_dict({"keys": spec["keys"]}, seed=6, compact=True)
    checkpoint = momentum_container(file_sd)
    checkpoint["state_dict"]["module.queue"] = torch.zeros(3)
    state_dict = cobra.prepare_state_dict(checkpoint, None)
    with pytest.raises(WeightsError, match=r"unexpected keys: module\.queue"):
        load_state_dict_exact(cobra.build("meta"), state_dict, "cobra", None)


def test_cobra_i_file_is_not_cobra_ii(spec: dict) -> None:
    file_sd = fabricate_state_dict({"keys": variant_keys(spec, "cobra_i")}, seed=7, compact=True)
    with pytest.raises(WeightsError) as err:
        load_state_dict_exact(cobra.build("meta", "cobra"), file_sd, "cobra", None)
    message = str(err.value)
    assert "missing keys: embed.512.head.0.weight" in message
    assert "unexpected keys: embed.768.head.0.weight" in message


# --- the refusal: tile encoders by name, not by dimension ----------------------------------------


@pytest.mark.parametrize(
    ("name", "encoder", "dim"),
    [
        ("cobra", "gigapath_tile", 1536),  # H-optimus-0's dimension
        ("cobra", "uni2h", 1536),
        ("cobra", "virchow", 1280),  # Virchow v1's class token: Virchow2's dimension
        ("cobra", "ctranspath", 768),  # COBRA-I's, not COBRA-II's
        ("cobra_i", "conch_v15", 768),  # CTransPath's dimension
        ("cobra_i", "conch_v1", 512),  # COBRA-II's, not COBRA-I's
    ],
)
def test_other_tile_encoders_are_refused(name: str, encoder: str, dim: int) -> None:
    model = cobra.build("meta", name)  # refused before any computation
    with pytest.raises(WeightsError) as err:
        model.encode_bag(torch.zeros(3, dim), torch.zeros(3, 2, dtype=torch.int64), encoder)
    message = str(err.value)
    assert repr(encoder) in message and name in message
    assert ", ".join(cobra.TILE_ENCODER_DIMS[name]) in message


def test_wrong_feature_shapes_are_refused() -> None:
    model = cobra.build("meta")
    cells = torch.zeros(3, 2, dtype=torch.int64)
    for feats in (torch.zeros(3, 1536), torch.zeros(0, 1280), torch.zeros(1, 3, 1280)):
        with pytest.raises(ValueError, match="virchow2 features must be"):
            model.encode_bag(feats, cells[: len(feats)], "virchow2")
    with pytest.raises(ValueError, match="cells must be"):
        model.encode_bag(torch.zeros(3, 1280), cells[:2], "virchow2")


# --- the forward against an independent computation ----------------------------------------------


def twin_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Weights where every part matters: norm weights 1 + N(0, 0.1), Mamba's own init ranges
    (A in [1, 16], dt in [0.001, 0.1]), D near 1, unit-gain linears, a sharpened scorer."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, ref in model.state_dict().items():
        shape = ref.shape

        def normal(std: float, shape=shape) -> torch.Tensor:
            return torch.randn(shape, generator=gen, dtype=torch.float64) * std

        if key.endswith(".A_log"):
            value = torch.empty(shape, dtype=torch.float64).uniform_(1, 16, generator=gen).log()
        elif key.endswith(".dt_bias"):
            dt = torch.empty(shape, dtype=torch.float64).uniform_(
                math.log(1e-3), math.log(1e-1), generator=gen
            )
            dt = dt.exp()
            value = dt + torch.log(-torch.expm1(-dt))
        elif key.endswith(".D") or (key.endswith(".weight") and len(shape) == 1):
            value = 1.0 + normal(0.1)
        elif key.endswith("conv1d.weight"):
            value = normal(0.5)
        elif len(shape) == 2:
            value = normal(shape[1] ** -0.5) * (SCORER_GAIN if "attention_c" in key else 1.0)
        else:
            value = normal(0.1)
        out[key] = value
    return out


def twin(dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> tuple:
    model = cobra.build("meta", "cobra", **{**TWIN, **overrides})
    # fp32-representable values: the model is built in fp32 and then made fp64
    state_dict = {k: v.float().double() for k, v in twin_state_dict(model, seed).items()}
    load_state_dict_exact(model, state_dict, "cobra", None)
    return model.to(dtype).eval(), state_dict


def ln(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)


def lin(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def reference_mamba2(u: torch.Tensor, sd: dict, p: str, reset_every: int | None = None):
    """mamba_split_conv1d_scan_ref, written per tile: the conv as a sum over its taps, and per
    head h (channels h*P .. h*P+P-1) the state S_t = exp(dt A) S_{t-1} + dt x (x) B."""
    n = u.shape[0]
    d_inner, heads = sd[f"{p}.norm.weight"].shape[0], sd[f"{p}.A_log"].shape[0]
    width, conv_w = d_inner // heads, sd[f"{p}.conv1d.weight"]
    conv_dim, kernel = conv_w.shape[0], conv_w.shape[2]
    d_state = (conv_dim - d_inner) // 2
    zxbcdt = u @ sd[f"{p}.in_proj.weight"].T
    z, xbc, dt = zxbcdt[:, :d_inner], zxbcdt[:, d_inner : d_inner + conv_dim], zxbcdt[:, -heads:]
    conv = sd[f"{p}.conv1d.bias"].repeat(n, 1)
    for t in range(n):
        for tap in range(kernel):
            source = t - (kernel - 1) + tap
            if source >= 0:
                conv[t] = conv[t] + conv_w[:, 0, tap] * xbc[source]
    xbc = F.silu(conv)
    x, b, c = xbc[:, :d_inner], xbc[:, d_inner : d_inner + d_state], xbc[:, d_inner + d_state :]
    a_head = -torch.exp(sd[f"{p}.A_log"])
    dt = F.softplus(dt + sd[f"{p}.dt_bias"])
    y = torch.zeros(n, d_inner, dtype=u.dtype)
    for h in range(heads):
        channels = slice(h * width, (h + 1) * width)
        state = torch.zeros(width, d_state, dtype=u.dtype)
        for t in range(n):
            if reset_every and t % reset_every == 0:
                state = torch.zeros_like(state)
            xt = x[t, channels]
            state = torch.exp(dt[t, h] * a_head[h]) * state + dt[t, h] * torch.outer(xt, b[t])
            y[t, channels] = state @ c[t] + sd[f"{p}.D"][h] * xt
    gated = y * F.silu(z)
    gated = gated / torch.sqrt(gated.square().mean(-1, keepdim=True) + 1e-5)
    return (gated * sd[f"{p}.norm.weight"]) @ sd[f"{p}.out_proj.weight"].T


def reference_cobra(
    sd: dict,
    feats: torch.Tensor,
    heads: int = 4,
    interleaved: bool = True,
    mean_first: bool = True,
    final_norm: bool = True,
    reset_every: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cobra.forward (multi_fm_mode=False) from the file's keys: (embedding [D], weights [N])."""
    e = f"embed.{feats.shape[1]}.head"
    x = lin(F.silu(lin(ln(feats, sd, f"{e}.0"), sd, f"{e}.1")), sd, f"{e}.4")
    h = F.gelu(lin(x, sd, "mamba_enc._fc1.0"))
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("mamba_enc.layers."))
    for i in range(layers):
        p = f"mamba_enc.layers.{i}"
        h = h + reference_mamba2(ln(h, sd, f"{p}.0"), sd, f"{p}.1", reset_every)
    h = lin(h, sd, "mamba_enc.classifier")
    if final_norm:
        h = ln(h, sd, "norm")
    per_head = h.shape[1] // heads
    logits = []
    for i in range(heads):
        if interleaved:  # head i: channels i, i + heads, i + 2 heads, ...
            channels = [i + heads * j for j in range(per_head)]
        else:
            channels = list(range(i * per_head, (i + 1) * per_head))
        hi, q = h[:, channels], f"attn.{i}"
        gate = torch.tanh(lin(hi, sd, f"{q}.attention_a.0")) * torch.sigmoid(
            lin(hi, sd, f"{q}.attention_b.0")
        )
        logits.append(lin(gate, sd, f"{q}.attention_c")[:, 0])
    logits = torch.stack(logits)
    if mean_first:
        weights = torch.softmax(logits.mean(0), dim=0)
    else:
        weights = torch.softmax(logits, dim=1).mean(0)
    return weights @ feats, weights


def bag(n: int, dim: int = 20, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, dim, generator=gen, dtype=torch.float64) + 0.5
    cells = torch.stack([torch.arange(n) % 5, torch.arange(n) // 5], 1)
    return feats, cells


@pytest.mark.parametrize("chunk", [1, 3, 5, 13, 256])
def test_forward_equals_step_by_step_reference(chunk: int) -> None:
    """13 tiles through 2 Mamba layers with the scan cut into chunks of 1 .. 256 tiles."""
    model, sd = twin(chunk_size=chunk)
    feats, cells = bag(13)
    expected, weights = reference_cobra(sd, feats)
    with torch.inference_mode():
        torch.testing.assert_close(model.attention(feats, "virchow2"), weights, rtol=0, atol=1e-12)
        ours = model.encode_bag(feats, cells, "virchow2")
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    assert ours.shape == (20,)
    # the attention is far from a plain mean, so the traps below move the output visibly
    assert weights.max() / weights.min() > 3


def test_each_trap_moves_the_output() -> None:
    """A per-head softmax, contiguous head channels, a skipped final norm or a scan state reset
    every 5 tiles each give another embedding: the reference test above can tell them apart."""
    _, sd = twin()
    feats, _ = bag(13)
    right, _ = reference_cobra(sd, feats)
    scale = right.abs().max()
    for wrong in (
        {"mean_first": False},
        {"interleaved": False},
        {"final_norm": False},
        {"reset_every": 5},
    ):
        assert (reference_cobra(sd, feats, **wrong)[0] - right).abs().max() > 1e-3 * scale, wrong


def test_embedding_is_the_weighted_mean_of_the_input_features() -> None:
    model, _ = twin()
    for encoder, dim in TWIN["tile_encoders"].items():
        feats, cells = bag(9, dim)
        with torch.inference_mode():
            weights = model.attention(feats, encoder)
            embedding = model.encode_bag(feats, cells, encoder)
        assert embedding.shape == (dim,)
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-12) and (weights > 0).all()
        torch.testing.assert_close(embedding, weights @ feats, rtol=0, atol=1e-12)
    # each encoder has its own projection: the 24-d projection with no encoder is unused
    assert "24" in dict(model.embed.named_children())


def test_order_matters_and_cells_do_not() -> None:
    model, sd = twin()
    feats, cells = bag(11)
    with torch.inference_mode():
        forward = model.encode_bag(feats, cells, "virchow2")
        shuffled_cells = model.encode_bag(feats, cells.flip(0), "virchow2")
        backward = model.encode_bag(feats.flip(0), cells.flip(0), "virchow2")
    torch.testing.assert_close(shuffled_cells, forward, rtol=0, atol=0)
    assert (backward - forward).abs().max() > 1e-3 * forward.abs().max()
    torch.testing.assert_close(backward, reference_cobra(sd, feats.flip(0))[0], rtol=0, atol=1e-12)


# --- the chunked scan and the conv state carry ----------------------------------------------------


def test_chunked_scan_carries_the_state_across_chunks() -> None:
    """ssd_chunk over chunks of 4 (boundaries at 4, 8, 12) against a loop over the tiles."""
    gen = torch.Generator().manual_seed(2)
    n, heads, width, d_state = 14, 3, 4, 5

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x, b, c = randn(n, heads, width), randn(n, d_state), randn(n, d_state)
    dt = F.softplus(randn(n, heads) - 2.0)
    a_head = -torch.rand(heads, generator=gen, dtype=torch.float64) * 4 - 0.5
    state = torch.zeros(heads, width, d_state, dtype=torch.float64)
    expected = torch.zeros(n, heads, width, dtype=torch.float64)
    for t in range(n):
        for h in range(heads):
            state[h] = torch.exp(dt[t, h] * a_head[h]) * state[h] + dt[t, h] * torch.outer(
                x[t, h], b[t]
            )
            expected[t, h] = state[h] @ c[t]
    carried = torch.zeros(heads, width, d_state, dtype=torch.float64)
    ys, restarted = [], []
    for start in range(0, n, 4):
        part = slice(start, start + 4)
        y, carried = cobra.ssd_chunk(x[part], dt[part], a_head, b[part], c[part], carried)
        ys.append(y)
        fresh = torch.zeros_like(carried)
        restarted.append(cobra.ssd_chunk(x[part], dt[part], a_head, b[part], c[part], fresh)[0])
    torch.testing.assert_close(torch.cat(ys), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(carried, state, rtol=0, atol=1e-12)  # the state after the last tile
    assert (torch.cat(restarted)[4:] - expected[4:]).abs().max() > 1e-2


def test_segment_sums_are_exact_and_causal() -> None:
    a = -torch.rand(6, 2, dtype=torch.float64)
    seg = cobra.segment_sums(a)
    for h in range(2):
        for t in range(6):
            for s in range(6):
                want = a[s + 1 : t + 1, h].sum() if s <= t else -math.inf
                assert seg[h, t, s].item() == pytest.approx(float(want), abs=1e-15)


@pytest.mark.parametrize("n", [2, 3, 10])
def test_causal_conv_carries_its_state(n: int) -> None:
    """Chunks of 3 (shorter than the kernel's reach across two boundaries when n = 10) equal one
    convolution with 3 zeros of left padding, cut to n; the first row sees only itself."""
    gen = torch.Generator().manual_seed(n)
    channels, kernel = 5, 4
    xbc = torch.randn(n, channels, generator=gen, dtype=torch.float64)
    weight = torch.randn(channels, 1, kernel, generator=gen, dtype=torch.float64)
    bias = torch.randn(channels, generator=gen, dtype=torch.float64)
    whole = F.conv1d(xbc.T[None], weight, bias, padding=kernel - 1, groups=channels)[0, :, :n].T
    tail = torch.zeros(kernel - 1, channels, dtype=torch.float64)
    parts, restarted = [], []
    for start in range(0, n, 3):
        out, new_tail = cobra.causal_conv_chunk(xbc[start : start + 3], tail, weight, bias)
        parts.append(out)
        restarted.append(
            cobra.causal_conv_chunk(xbc[start : start + 3], torch.zeros_like(tail), weight, bias)[0]
        )
        tail = new_tail
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(whole[0], weight[:, 0, -1] * xbc[0] + bias, rtol=0, atol=1e-12)
    if n > 3:
        assert (torch.cat(restarted)[3:] - whole[3:]).abs().max() > 1e-3


def test_gated_rms_norm_gates_before_normalising() -> None:
    gen = torch.Generator().manual_seed(0)
    y, z = torch.randn(4, 12, generator=gen), torch.randn(4, 12, generator=gen)
    norm = cobra.GatedRMSNorm(12)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(12, generator=gen))
        gated = y * F.silu(z)
        want = gated / torch.sqrt(gated.square().mean(-1, keepdim=True) + 1e-5) * norm.weight
        torch.testing.assert_close(norm(y, z), want)
        normed_first = y / torch.sqrt(y.square().mean(-1, keepdim=True) + 1e-5) * norm.weight
        assert (norm(y, z) - normed_first * F.silu(z)).abs().max() > 1e-2


# --- precision and demo weights -----------------------------------------------------------------


def test_fp32_and_bf16_autocast_against_fp64() -> None:
    model64, sd = twin(chunk_size=16)
    model32 = cobra.build("meta", "cobra", **TWIN, chunk_size=16)
    load_state_dict_exact(model32, {k: v.float() for k, v in sd.items()}, "cobra", None)
    model32.eval()
    feats, cells = bag(40)
    with torch.inference_mode():
        exact = model64.encode_bag(feats, cells, "virchow2")
        fp32 = model32.encode_bag(feats.float(), cells, "virchow2")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model32.encode_bag(feats.float(), cells, "virchow2")
    assert fp32.dtype == bf16.dtype == torch.float32
    scale = exact.abs().max()
    assert (fp32.double() - exact).abs().max() < 1e-5 * scale
    assert (bf16.double() - exact).abs().max() < cobra.BF16_TOLERANCE * scale


def test_demo_weights_carry_the_input_signal() -> None:
    """Full-size COBRA-II with its demo weights on a few small bags (the only full-size forward
    here: 11 M parameters, 60 tiles): the tile weights are not a plain mean, and bags differ."""
    model = cobra.build("meta")
    load_state_dict_exact(model, cobra.demo_state_dict(model, 0), "cobra", None)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    bags = [torch.randn(n, 1280, generator=gen).abs() for n in (20, 25, 30, 60)]
    with torch.inference_mode():
        embeddings = [model.encode_bag(f, torch.zeros(len(f), 2), "virchow2") for f in bags]
        weights = model.attention(bags[-1], "virchow2")
        reversed_weights = model.attention(bags[-1].flip(0), "virchow2").flip(0)
    assert relative_spread(np.stack([e.numpy() for e in embeddings])) > MIN_RELATIVE_SPREAD
    assert weights.max() / weights.min() > 3  # the demo attention ranks tiles
    assert (weights - reversed_weights).abs().max() > 0.1 * weights.max()  # and depends on order
    again = cobra.demo_state_dict(model, 0)
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())  # seeded
