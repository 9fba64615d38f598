"""MADELEINE slide encoder: exact checkpoint loading, strided heads, the projector embedding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_fixtures import BAD_KEY_KINDS, break_key, fabricate_state_dict, key_spec_or_skip
from test_models_demo import MIN_RELATIVE_SPREAD, relative_spread

from eagleflow.models import madeleine as md
from eagleflow.models.catalog import read_cards
from eagleflow.models.checkpoints import demo_seed, load_state_dict_exact, read_checkpoint
from eagleflow.models.loading import load_model
from eagleflow.weights import WeightsError

torch.set_num_threads(min(2, torch.get_num_threads()))

# A twin with the same structure at small sizes: 4 heads, so strided != contiguous.
TWIN = {"in_dim": 12, "hidden_dim": 8, "heads": 4, "attn_dim": 6, "token_dim": 5}
SCORER_GAIN = 50.0  # reference notes §9: a larger attention_c makes the attention non-uniform


@pytest.fixture(scope="module")
def spec() -> dict:
    return key_spec_or_skip("madeleine")


@pytest.fixture(scope="module")
def file_sd(spec: dict) -> dict[str, torch.Tensor]:
    """All 40 published keys (without `module.`); LayerNorm weights 1 + N(0, 0.02)."""
    return fabricate_state_dict(spec, seed=3)


def twin_weights(seed: int = 0, **sizes: int) -> tuple[md.Madeleine, dict[str, torch.Tensor]]:
    """A float64 twin with weights where every step matters: unit-gain linears, LayerNorm
    weights near 1, non-zero biases and a scorer large enough to rank the tiles."""
    model = md.build("meta", **{**TWIN, **sizes}).to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, ref in model.state_dict().items():
        value = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        if key.endswith("bias"):
            value = 0.1 * value
        elif ref.ndim == 1:  # LayerNorm weights
            value = 1.0 + 0.1 * value
        else:
            value = value / ref.shape[1] ** 0.5
            if key.endswith("attention_c.weight"):
                value = value * SCORER_GAIN
        sd[key] = value
    load_state_dict_exact(model, sd, "madeleine", None)
    return model.eval(), sd


def reference_embedding(
    sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int = 4, strided: bool = True
) -> torch.Tensor:
    """`encode_he` for one bag [N, D] -> [hidden], written out from the published keys.

    Head i reads channels e*heads + i (strided=True, the original) or the contiguous block
    i*hidden .. (i+1)*hidden - 1 (strided=False, a wrong reading kept to show it differs).
    """

    def lin(t: torch.Tensor, name: str) -> torch.Tensor:
        return t @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        mean = t.mean(-1, keepdim=True)
        var = ((t - mean) ** 2).mean(-1, keepdim=True)
        return (t - mean) / torch.sqrt(var + 1e-5) * sd[f"{name}.weight"] + sd[f"{name}.bias"]

    def gelu(t: torch.Tensor) -> torch.Tensor:
        return 0.5 * t * (1.0 + torch.erf(t / 2**0.5))

    h = x
    for linear, norm in ((0, 1), (4, 5), (8, 9)):
        h = gelu(ln(lin(h, f"wsi_embedders.pre_attn.{linear}"), f"wsi_embedders.pre_attn.{norm}"))
    hidden = h.shape[1] // heads
    pooled = torch.zeros(hidden * heads, dtype=h.dtype)
    for i in range(heads):
        channels = [e * heads + i if strided else i * hidden + e for e in range(hidden)]
        h_i = h[:, channels]
        p = f"wsi_embedders.attn.{i}"
        gate = torch.tanh(lin(h_i, f"{p}.attention_a.0")) * torch.sigmoid(
            lin(h_i, f"{p}.attention_b.0")
        )
        logits = lin(gate, f"{p}.attention_c")[:, 0]
        weights = torch.exp(logits - logits.max())
        weights = weights / weights.sum()
        for e in range(hidden):
            # The original's stack(-1).view puts head i's channel e at e*heads + i.
            pooled[e * heads + i] = (weights * h_i[:, e]).sum()
    return lin(pooled, "projector")


def bag(n: int, dim: int = TWIN["in_dim"], seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen, dtype=dtype)


def cells_for(n: int) -> torch.Tensor:
    return torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.int64)], dim=1)


# --- the card and the published file ----------------------------------------------------------


def test_card_is_read_without_importing() -> None:
    (card,) = read_cards(Path(md.__file__))
    role = card.slide_role
    assert card.name == "madeleine" and card.weights.file_name == "model.pt"
    assert role.encoder == "madeleine" and role.tile_encoders == ("conch_v1",)
    assert role.dim == md.EMBED_DIM == 512
    assert not role.uses_positions and not role.order_dependent
    assert "token_projector" in role.embedding and "not" in role.embedding


def test_architecture_has_the_published_keys(spec: dict) -> None:
    model = md.build("meta")
    sd = model.state_dict()
    assert spec["n_keys"] == len(spec["keys"]) == 40
    assert list(sd) == list(spec["keys"])  # same keys, same order
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        k: tuple(e["shape"]) for k, e in spec["keys"].items()
    }
    assert sum(v.numel() for v in sd.values()) == 4_996_740


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_published_file_loads_exactly(
    spec: dict, file_sd: dict, tmp_path: Path, prefix: str
) -> None:
    path = tmp_path / "model.pt"
    torch.save({prefix + k: v for k, v in file_sd.items()}, path)  # flat, as torch.save'd
    model = load_model("madeleine", path, verify_sha256=False)
    loaded = model.state_dict()
    assert list(loaded) == list(file_sd)  # nothing missing, nothing left over
    assert all(torch.equal(loaded[k], file_sd[k]) for k in loaded)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert not model.training


@pytest.mark.parametrize("kind", BAD_KEY_KINDS)
def test_wrong_file_fails_naming_the_key(file_sd: dict, kind: str) -> None:
    key = "wsi_embedders.attn.2.attention_b.0.weight"
    broken = break_key(
        {"module." + k: v for k, v in file_sd.items()},
        "module." + key,
        kind,
        renamed="module.wsi_embedders.attn.2.attention_b.weight",
        wrong=torch.zeros(512, 511),
    )
    with pytest.raises(WeightsError, match=key.replace(".", r"\.")):
        load_state_dict_exact(
            md.build("meta"), md.prepare_state_dict(broken, None), "madeleine", None
        )


def test_a_prefix_on_some_keys_only_is_refused(file_sd: dict) -> None:
    mixed = {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(file_sd.items())}
    with pytest.raises(WeightsError, match=r"some keys start with 'module\.'"):
        md.prepare_state_dict(mixed, None)


def test_a_saved_module_with_its_checkpoint_round_trips(file_sd: dict, tmp_path: Path) -> None:
    """read_checkpoint (weights_only) reads the file torch.save writes of an OrderedDict."""
    path = tmp_path / "model.pt"
    model = md.build("meta")
    load_state_dict_exact(model, dict(file_sd), "madeleine", None)
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)
    sd = md.prepare_state_dict(read_checkpoint(path, "madeleine"), path)
    assert list(sd) == list(file_sd)


# --- the forward --------------------------------------------------------------------------------


def test_forward_matches_a_straightforward_computation() -> None:
    model, sd = twin_weights()
    for n, seed in ((1, 0), (7, 1), (40, 2)):
        x = bag(n, seed=seed)
        got = model.encode_bag(x, cells_for(n), "conch_v1")
        assert got.shape == (TWIN["hidden_dim"],) and got.dtype == torch.float64
        torch.testing.assert_close(got, reference_embedding(sd, x), rtol=0, atol=1e-12)
    x = torch.stack([bag(9, seed=3), bag(9, seed=4)])  # a batch of equal-size bags
    want = torch.stack([reference_embedding(sd, b) for b in x])
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-12)


def test_heads_read_strided_channels_not_contiguous_blocks() -> None:
    model, sd = twin_weights(seed=5)
    x = bag(30, seed=6)
    got = model.encode_bag(x, cells_for(30), "conch_v1")
    contiguous = reference_embedding(sd, x, strided=False)
    assert (got - contiguous).abs().max() > 1e-2  # the wrong reading is visibly wrong


def test_attention_ranks_tiles_in_these_tests() -> None:
    """Guard for the tests themselves: with near-uniform attention a head-order bug hides."""
    model, _ = twin_weights()
    weights = model.attention(bag(30, seed=6).unsqueeze(0))[0]
    assert weights.shape == (4, 30)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, dtype=torch.float64))
    assert (weights.max(-1).values > 3 / 30).all()  # far from 1/30 each


def test_embedding_is_the_projector_not_the_token_projector() -> None:
    model, _ = twin_weights()
    x = bag(12, seed=7)
    before = model.encode_bag(x, cells_for(12), "conch_v1")
    with torch.no_grad():
        model.token_projector.weight.add_(1.0)
    torch.testing.assert_close(model.encode_bag(x, cells_for(12), "conch_v1"), before)
    with torch.no_grad():
        model.projector.bias.add_(1.0)
    torch.testing.assert_close(model.encode_bag(x, cells_for(12), "conch_v1"), before + 1.0)
    assert md.build("meta").projector.out_features == 512


def test_cells_and_tile_order_do_not_change_the_embedding() -> None:
    model, _ = twin_weights()
    x = bag(25, seed=8)
    out = model.encode_bag(x, cells_for(25), "conch_v1")
    shuffled = torch.randperm(25, generator=torch.Generator().manual_seed(0))
    far = torch.randint(0, 10_000, (25, 2), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model.encode_bag(x[shuffled], cells_for(25), "conch_v1"), out)
    torch.testing.assert_close(model.encode_bag(x, far, "conch_v1"), out, rtol=0, atol=0)


def test_other_tile_encoders_and_shapes_are_refused() -> None:
    model = md.build("cpu").eval()
    x = torch.randn(5, 512)
    for other in ("conch_v15", "virchow2", "gigapath_tile"):  # even at 512-d input
        with pytest.raises(ValueError, match="conch_v1"):
            model.encode_bag(x, cells_for(5), other)
    with pytest.raises(ValueError, match=r"\[N, 512\]"):
        model.encode_bag(torch.randn(5, 768), cells_for(5), "conch_v1")
    with pytest.raises(ValueError, match="at least one tile"):
        model.encode_bag(torch.randn(0, 512), cells_for(0), "conch_v1")
    with pytest.raises(ValueError, match="cells"):
        model.encode_bag(x, cells_for(4), "conch_v1")


# --- demo weights and precision ----------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_model() -> md.Madeleine:
    model = md.build("meta")
    load_state_dict_exact(
        model, md.demo_state_dict(model, demo_seed("madeleine")), "madeleine", None
    )
    return model.eval()


def conch_like_bags(count: int, n: int, seed: int) -> list[torch.Tensor]:
    """Bags of 512-d features: a shared centre, a per-bag shift and per-tile noise."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.randn(512, generator=gen)
    return [
        centre + 0.5 * torch.randn(512, generator=gen) + torch.randn(n, 512, generator=gen)
        for _ in range(count)
    ]


def test_demo_weights_carry_the_input_signal(demo_model: md.Madeleine) -> None:
    bags = conch_like_bags(8, 60, seed=0)
    with torch.inference_mode():
        out = torch.stack([demo_model.encode_bag(b, cells_for(60), "conch_v1") for b in bags])
        weights = demo_model.attention(bags[0].unsqueeze(0))[0]
    assert torch.isfinite(out).all()
    assert relative_spread(out.numpy()) > MIN_RELATIVE_SPREAD
    assert (weights.max(-1).values > 2 / 60).all()  # the demo heads rank tiles


def test_bf16_autocast_stays_within_tolerance(demo_model: md.Madeleine) -> None:
    x = conch_like_bags(1, 300, seed=1)[0]
    with torch.inference_mode():
        fp32 = demo_model.encode_bag(x, cells_for(300), "conch_v1")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = demo_model.encode_bag(x, cells_for(300), "conch_v1").float()
    error = ((bf16 - fp32).abs().max() / fp32.abs().max()).item()
    assert error < md.BF16_TOLERANCE, error
    assert F.cosine_similarity(bf16, fp32, dim=0) > 0.999


def test_fp32_matches_fp64(demo_model: md.Madeleine) -> None:
    x = conch_like_bags(1, 500, seed=2)[0]
    with torch.inference_mode():
        fp32 = demo_model.encode_bag(x, cells_for(500), "conch_v1")
        fp64 = demo_model.to(torch.float64).encode_bag(x, cells_for(500), "conch_v1")
    demo_model.float()
    assert (fp32.double() - fp64).abs().max() < 1e-5
