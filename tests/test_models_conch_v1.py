"""CONCH v1 vision tower: strict loading past the text tower, the 224 position table, the
pooled 512-d embedding before the projection, OpenAI-CLIP normalisation."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_fixtures import BAD_KEY_KINDS, break_key, fabricate_state_dict, key_spec_or_skip
from test_models_demo import MIN_RELATIVE_SPREAD, relative_spread
from timm.layers import resample_abs_pos_embed

from eagleflow.models import conch_v1 as cv
from eagleflow.models.catalog import read_cards
from eagleflow.models.checkpoints import demo_seed, load_state_dict_exact
from eagleflow.models.loading import load_model
from eagleflow.models.preprocess import preprocess_tiles
from eagleflow.weights import WeightsError

torch.set_num_threads(min(2, torch.get_num_threads()))

# CONCH's constants.py, written out: OpenAI CLIP's, not ImageNet's (0.485, 0.456, 0.406).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# A twin: patch 8 on 32 px (4 x 4 patches + class token), 2 blocks, small poolers.
TWIN = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 4,
    "pool_dim": 16,
    "pool_heads": 4,
    "caption_dim": 24,
    "caption_queries": 3,
}
# Keys of the text side in the published file (a few of each group; the loader drops them).
TEXT_KEYS = {
    "text.token_embedding.weight": (32007, 8),
    "text.transformer.resblocks.0.attn.in_proj_weight": (2304, 768),
    "text.ln_final.weight": (768,),
    "text_decoder.resblocks.0.ln_1.weight": (768,),
    "logit_scale": (),
}


@pytest.fixture(scope="module")
def spec() -> dict:
    return key_spec_or_skip("conch_v1")


@pytest.fixture(scope="module")
def published(spec: dict) -> dict[str, torch.Tensor]:
    """The whole-CoCa file: the 175 `visual.*` keys (compact rows) and text-side keys."""
    sd = fabricate_state_dict(spec, seed=2, compact=True)
    sd.update({k: torch.full(shape, 0.5) for k, shape in TEXT_KEYS.items()})
    return sd


def twin(seed: int = 0) -> tuple[cv.ConchV1Vision, dict[str, torch.Tensor]]:
    """A float64 twin with unit-gain weights, LayerNorm weights near 1 and non-zero biases."""
    model = cv.build("meta", **TWIN).to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, ref in model.state_dict().items():
        value = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        if "bias" in key:
            value = 0.1 * value
        elif ref.ndim == 1:  # LayerNorm weights
            value = 1.0 + 0.1 * value
        elif key.endswith(("cls_token", "pos_embed", "query")):
            value = 0.5 * value
        else:
            value = value / math.sqrt(ref[0].numel())
        sd[key] = value
    load_state_dict_exact(model, sd, "conch_v1", None)
    return model.eval(), sd


def reference_pooled(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`encode_image(x, proj_contrast=False, normalize=False)` written out from the keys.

    ViT: patch conv, class token, + pos_embed, pre-LN blocks (eps 1e-6, exact GELU), final
    norm; pooler: ln_k on ALL tokens, ln_q on the query (eps 1e-5), multi-head attention with
    separate q/k/v weights and one packed bias, out_proj, then ln_contrast.
    """
    heads, pool_heads = TWIN["num_heads"], TWIN["pool_heads"]

    def ln(t: torch.Tensor, name: str, eps: float) -> torch.Tensor:
        mean = t.mean(-1, keepdim=True)
        var = ((t - mean) ** 2).mean(-1, keepdim=True)
        return (t - mean) / torch.sqrt(var + eps) * sd[f"{name}.weight"] + sd[f"{name}.bias"]

    def lin(t: torch.Tensor, name: str) -> torch.Tensor:
        return t @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int) -> torch.Tensor:
        """[Lq, D], [Lk, D], [Lk, D] -> [Lq, D], heads over contiguous slices of D."""
        d = q.shape[-1] // n_heads
        out = []
        for h in range(n_heads):
            sl = slice(h * d, (h + 1) * d)
            scores = q[:, sl] @ k[:, sl].T / math.sqrt(d)
            out.append(torch.softmax(scores, dim=-1) @ v[:, sl])
        return torch.cat(out, dim=-1)

    p = "trunk"
    patches = F.conv2d(x, sd[f"{p}.patch_embed.proj.weight"], stride=TWIN["patch_size"])
    patches = patches + sd[f"{p}.patch_embed.proj.bias"].view(1, -1, 1, 1)
    results = []
    for image in patches:
        t = image.flatten(1).T  # row-major patches
        t = torch.cat([sd[f"{p}.cls_token"][0], t]) + sd[f"{p}.pos_embed"][0]
        for i in range(TWIN["depth"]):
            b = f"{p}.blocks.{i}"
            q, k, v = lin(ln(t, f"{b}.norm1", 1e-6), f"{b}.attn.qkv").chunk(3, dim=-1)
            t = t + lin(attend(q, k, v, heads), f"{b}.attn.proj")
            hidden = lin(ln(t, f"{b}.norm2", 1e-6), f"{b}.mlp.fc1")
            t = t + lin(0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2))), f"{b}.mlp.fc2")
        t = ln(t, f"{p}.norm", 1e-6)
        a = "attn_pool_contrast"
        context = ln(t, f"{a}.ln_k", 1e-5)
        query = ln(sd[f"{a}.query"], f"{a}.ln_q", 1e-5)
        bq, bk, bv = sd[f"{a}.attn.in_proj_bias"].chunk(3)
        q = query @ sd[f"{a}.attn.q_proj_weight"].T + bq
        k = context @ sd[f"{a}.attn.k_proj_weight"].T + bk
        v = context @ sd[f"{a}.attn.v_proj_weight"].T + bv
        pooled = lin(attend(q, k, v, pool_heads), f"{a}.attn.out_proj")[0]
        results.append(ln(pooled, "ln_contrast", 1e-5))
    return torch.stack(results)


def bilinear_resize_written_out(grid: torch.Tensor, size: int) -> torch.Tensor:
    """[g, g, C] -> [size, size, C], bilinear with half-pixel centres, no antialias, edges clamped."""
    g = grid.shape[0]

    def taps(i: int) -> tuple[int, int, float]:
        src = max((i + 0.5) * g / size - 0.5, 0.0)
        lo = min(math.floor(src), g - 1)
        return lo, min(lo + 1, g - 1), src - lo

    out = torch.empty(size, size, grid.shape[2], dtype=grid.dtype)
    for r in range(size):
        r0, r1, wr = taps(r)
        for c in range(size):
            c0, c1, wc = taps(c)
            top = (1 - wc) * grid[r0, c0] + wc * grid[r0, c1]
            bottom = (1 - wc) * grid[r1, c0] + wc * grid[r1, c1]
            out[r, c] = (1 - wr) * top + wr * bottom
    return out


# --- the card -----------------------------------------------------------------------------------


def test_card_is_madeleines_setting_with_openai_normalisation() -> None:
    (card,) = read_cards(Path(cv.__file__))
    role = card.tile_role
    assert card.name == role.encoder == "conch_v1" and role.dim == cv.EMBED_DIM == 512
    assert (role.tile_px, role.tile_mpp) == (256, 1.0)  # 256 px at 10x
    pre = role.preprocess
    assert (pre.resize, pre.crop, pre.interpolation) == (224, 224, "bicubic")
    assert pre.mean == OPENAI_MEAN and pre.std == OPENAI_STD
    assert pre.mean != (0.485, 0.456, 0.406) and pre.std != (0.229, 0.224, 0.225)


def test_preprocessing_normalises_with_openai_clip_values() -> None:
    tiles = np.zeros((2, 256, 256, 3), dtype=np.uint8)
    tiles[0] = (200, 120, 40)
    tiles[1] = (10, 250, 128)
    x = preprocess_tiles("conch_v1", tiles)
    assert x.shape == (2, 3, 224, 224)
    for tile, value in zip(x, ([200, 120, 40], [10, 250, 128]), strict=True):
        want = (torch.tensor(value) / 255.0 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
        torch.testing.assert_close(tile[:, 100, 100], want.float(), rtol=0, atol=1e-5)


# --- the published file -------------------------------------------------------------------------


def test_architecture_has_the_published_vision_keys(spec: dict) -> None:
    assert spec["n_keys"] == len(spec["keys"]) == 175
    published_shapes = {k: tuple(e["shape"]) for k, e in spec["keys"].items()}
    assert all(k.startswith("visual.") for k in published_shapes)
    assert published_shapes["visual.trunk.pos_embed"] == (1, 785, 768)
    for size, table in ((224, (1, 197, 768)), (448, (1, 785, 768))):
        sd = cv.build("meta", img_size=size).state_dict()
        assert [cv.published_key(k) for k in sd] == list(published_shapes)  # keys and order
        shapes = {cv.published_key(k): tuple(v.shape) for k, v in sd.items()}
        assert shapes == {**published_shapes, "visual.trunk.pos_embed": table}
    assert sum(v.numel() for v in cv.build("meta", img_size=448).state_dict().values()) == (
        90_392_832
    )


def test_published_file_loads_exactly_and_drops_only_the_text_side(
    published: dict, tmp_path: Path
) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save(published, path)
    model = load_model("conch_v1", path, verify_sha256=False)
    loaded = model.state_dict()
    visual = {k: v for k, v in published.items() if k.startswith("visual.")}
    assert [cv.published_key(k) for k in loaded] == list(visual)
    for key, value in loaded.items():
        if key != "trunk.pos_embed":
            assert torch.equal(value, visual[cv.published_key(key)]), key
    want = cv.resize_pos_embed(visual["visual.trunk.pos_embed"], 14)
    assert torch.equal(loaded["trunk.pos_embed"], want)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert not model.training


@pytest.mark.parametrize("wrapper", ["state_dict", "module."])
def test_the_originals_other_containers_load(published: dict, wrapper: str) -> None:
    if wrapper == "state_dict":
        checkpoint = {"state_dict": published}
    else:
        checkpoint = {"module." + k: v for k, v in published.items()}
    sd = cv.prepare_state_dict(checkpoint, None)
    load_state_dict_exact(cv.build("meta"), sd, "conch_v1", None, cv.published_key)


@pytest.mark.parametrize("kind", BAD_KEY_KINDS)
def test_wrong_vision_key_fails_naming_it_beside_the_ignored_text_keys(
    published: dict, kind: str
) -> None:
    key = "visual.trunk.blocks.5.attn.qkv.weight"
    broken = break_key(
        published,
        key,
        kind,
        renamed="visual.trunk.blocks.5.attn.qkv_weight",
        wrong=torch.zeros(2304, 767),
    )
    assert any(k.startswith(cv.TEXT_PREFIXES) for k in broken)  # the ignored keys are there
    with pytest.raises(WeightsError, match=r"trunk\.blocks\.5\.attn\.qkv"):
        load_state_dict_exact(
            cv.build("meta"), cv.prepare_state_dict(broken, None), "conch_v1", None
        )


@pytest.mark.parametrize(
    "key", ["visual.proj_contrast", "visual.attn_pool_caption.query", "visual.ln_contrast.bias"]
)
def test_every_vision_key_is_required_even_those_the_embedding_skips(
    published: dict, key: str
) -> None:
    """The original loads strict=False: a missing key would stay random without a word."""
    broken = {k: v for k, v in published.items() if k != key}
    with pytest.raises(WeightsError, match=f"in the file: {key}"):
        load_state_dict_exact(
            cv.build("meta"),
            cv.prepare_state_dict(broken, None),
            "conch_v1",
            None,
            cv.published_key,
        )


@pytest.mark.parametrize("extra", ["textual.weight", "image_proj", "trunk.norm.weight"])
def test_only_the_text_side_is_ignored(published: dict, extra: str) -> None:
    with pytest.raises(WeightsError, match=r"neither under 'visual\.'.*: " + re.escape(extra)):
        cv.prepare_state_dict({**published, extra: torch.zeros(3)}, None)
    with pytest.raises(WeightsError, match=r"unexpected keys: head\.weight \(in the file: visual"):
        load_state_dict_exact(
            cv.build("meta"),
            cv.prepare_state_dict({**published, "visual.head.weight": torch.zeros(3)}, None),
            "conch_v1",
            None,
            cv.published_key,
        )


def test_a_prefix_on_some_keys_only_is_refused(published: dict) -> None:
    mixed = {
        ("module." + k if k.startswith("visual.trunk") else k): v for k, v in published.items()
    }
    with pytest.raises(WeightsError, match="some keys start with"):
        cv.prepare_state_dict(mixed, None)


# --- the position table -------------------------------------------------------------------------


def test_load_time_resample_is_bilinear_without_antialias() -> None:
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(1, 1 + 28 * 28, 5, generator=gen, dtype=torch.float64)
    got = cv.resize_pos_embed(table, 14)
    assert got.shape == (1, 197, 5)
    assert torch.equal(got[:, 0], table[:, 0])  # the class token's row is kept
    grid = table[0, 1:].reshape(28, 28, 5)
    want = bilinear_resize_written_out(grid, 14).reshape(1, 196, 5)
    torch.testing.assert_close(got[:, 1:], want, rtol=0, atol=1e-12)
    # 28 -> 14 without antialias: each output is the mean of a 2 x 2 block.
    torch.testing.assert_close(got[0, 1], grid[:2, :2].mean((0, 1)), rtol=0, atol=1e-12)
    # timm's run-time resample (bicubic, antialias) is a different table.
    runtime = resample_abs_pos_embed(table.float(), (14, 14), num_prefix_tokens=1)
    assert (runtime.double() - got).abs().max() > 0.05
    # An odd size ratio, and the table at the published size stays as it is.
    odd = cv.resize_pos_embed(table[:, : 1 + 36], 4)[0, 1:].reshape(4, 4, 5)
    want_odd = bilinear_resize_written_out(table[0, 1:37].reshape(6, 6, 5), 4)
    torch.testing.assert_close(odd, want_odd, rtol=0, atol=1e-12)
    assert cv.resize_pos_embed(table, 28) is table


def test_prepare_keeps_the_published_table_at_448(published: dict) -> None:
    sd = cv.prepare_state_dict(published, None, img_size=448)
    assert torch.equal(sd["trunk.pos_embed"], published["visual.trunk.pos_embed"])
    load_state_dict_exact(cv.build("meta", img_size=448), sd, "conch_v1", None)


# --- the forward --------------------------------------------------------------------------------


def test_forward_matches_a_straightforward_computation() -> None:
    model, sd = twin()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = model(x)
    assert got.shape == (3, TWIN["pool_dim"]) and got.dtype == torch.float64
    torch.testing.assert_close(got, reference_pooled(sd, x), rtol=0, atol=1e-10)


def test_embedding_is_before_the_projection_and_not_normalised() -> None:
    model, sd = twin(seed=3)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pooled = model(x)
    zero_shot = model.zero_shot_embedding(x)
    torch.testing.assert_close(zero_shot, F.normalize(pooled @ sd["proj_contrast"], dim=-1))
    assert not torch.allclose(pooled.norm(dim=-1), torch.ones(2, dtype=torch.float64))
    assert (pooled.shape == zero_shot.shape) and (pooled - zero_shot).abs().max() > 0.1


def test_the_pooler_reads_the_class_token_too() -> None:
    """CoCa pools over all tokens, the class token included; dropping it changes the output."""
    model, _ = twin(seed=4)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    tokens = model.forward_tokens(x)
    all_tokens = model.ln_contrast(model.attn_pool_contrast(tokens)[:, 0])
    without_class = model.ln_contrast(model.attn_pool_contrast(tokens[:, 1:])[:, 0])
    torch.testing.assert_close(model(x), all_tokens, rtol=0, atol=0)
    assert (all_tokens - without_class).abs().max() > 1e-3


# --- demo weights and precision ----------------------------------------------------------------


def test_demo_weights_carry_the_input_signal() -> None:
    model = cv.build("meta")
    load_state_dict_exact(model, cv.demo_state_dict(model, demo_seed("conch_v1")), "conch_v1", None)
    gen = np.random.default_rng(0)
    tiles = gen.integers(0, 256, size=(4, 256, 256, 3), dtype=np.uint8)
    tiles[1] = (230, 200, 220)  # a pale, blank tile
    tiles[2, :, :128] = (120, 40, 140)  # half dark
    with torch.inference_mode():
        out = model.eval()(preprocess_tiles("conch_v1", tiles))
    assert out.shape == (4, 512) and torch.isfinite(out).all()
    assert relative_spread(out.numpy()) > MIN_RELATIVE_SPREAD


def test_bf16_autocast_and_fp64_on_the_twin() -> None:
    model, _ = twin(seed=6)
    model = model.float()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        fp32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x).float()
        fp64 = model.double()(x.double())
    error = ((bf16 - fp32).abs().max() / fp32.abs().max()).item()
    assert error < cv.BF16_TOLERANCE, error
    assert (fp32.double() - fp64).abs().max() < 1e-5
