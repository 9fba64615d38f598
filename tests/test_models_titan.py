"""TITAN slide encoder: exact checkpoint loading, the grid, the ALiBi bias per head, the forward
against a literal restatement of the original, and the silent traps of the reference notes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_fixtures import BAD_KEY_KINDS, break_key, fabricate_state_dict, key_spec_or_skip

from eagleflow.models import titan
from eagleflow.models.checkpoints import load_state_dict_exact, read_checkpoint
from eagleflow.weights import WeightsError

torch.set_num_threads(min(2, torch.get_num_threads()))

PREFIX = "vision_encoder."
# The slopes of the TITAN code for 12 heads, in its order (not sorted).
ORIGINAL_SLOPES = [2.0**-e for e in (1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5)]
TWIN = {"depth": 2, "dim": 96, "heads": 12, "in_dim": 32, "pool_heads": 8, "pool_queries": 3}


@pytest.fixture(scope="module")
def spec() -> dict:
    return key_spec_or_skip("titan")


def twin_state_dict(seed: int = 0, **shape: int) -> dict[str, torch.Tensor]:
    """Weights for a small twin where every part matters: unit-gain matrices, LayerNorm weights
    near 1, biases and tokens of a visible size (fp32 values: the model is built in fp32)."""
    model = titan.build("meta", **{**TWIN, **shape})
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, ref in model.state_dict().items():
        noise = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        if ref.ndim == 2 and not key.endswith("query") and key != "proj":
            out[key] = noise / math.sqrt(ref.shape[1])
        elif ("norm" in key or ".ln_" in key) and key.endswith("weight"):
            out[key] = 1.0 + 0.1 * noise
        else:
            out[key] = 0.1 * noise if key.endswith("bias") else noise
    return {k: v.float() for k, v in out.items()}


def twin(sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.float64, **shape: int):
    model = titan.build("meta", **{**TWIN, **shape})
    load_state_dict_exact(model, sd, "titan", None)
    return model.to(dtype).eval()


def tissue_coords(n: int, columns: int, ps: int = 512, origin=(1000, 3000), seed: int = 0):
    """n distinct level-0 coordinates drawn from a `columns`-wide lattice with holes, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(columns * (2 * n // columns + 2), generator=gen)[:n]
    cells = torch.stack([index % columns, index // columns], 1)
    return cells * ps + torch.tensor(origin)


# --- the original, restated literally (float64 except where the original rounds to fp32) ------


def original_alibi(tissue: np.ndarray, h: int, w: int, slopes: list[float]) -> torch.Tensor:
    """get_alibi: meshgrid 'ij' over the H x W grid, tissue cells, numpy float64 distances
    -> torch fp32, times fp32 slopes, times -1, zero class row and column."""
    x, y = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    points = np.stack([x[tissue], y[tissue]], axis=1)
    dists = np.sqrt(np.sum((points[:, None, :] - points[None, :, :]) ** 2, axis=-1))
    n = len(points)
    slope = torch.tensor(slopes, dtype=torch.float32).view(-1, 1, 1)
    bias = torch.zeros(len(slopes), n + 1, n + 1)
    bias[:, 1:, 1:] = torch.tensor(dists, dtype=torch.float32).view(1, n, n) * slope * -1
    return bias


def original_forward(
    sd: dict[str, torch.Tensor],
    feats: torch.Tensor,
    coords: torch.Tensor,
    ps: int,
    slopes: list[float] = ORIGINAL_SLOPES,
    keep_background: bool = False,
    pool_cls: bool = True,
    apply_proj: bool = False,
) -> torch.Tensor:
    """encode_slide_from_patch_features, step by step from the state dict, heads one by one."""
    heads, pool_heads = len(slopes), TWIN["pool_heads"]
    sd = {k: v.double() for k, v in sd.items()}

    def ln(t: torch.Tensor, name: str, eps: float) -> torch.Tensor:
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)

    def lin(t: torch.Tensor, name: str) -> torch.Tensor:
        return t @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    # preprocess_features: offset, floor division, scatter into an H x W grid (x first)
    offset = coords.min(0).values
    grid = torch.div(coords - offset, ps, rounding_mode="floor")
    grid = grid - grid.min(0).values
    h, w = (grid.max(0).values + 1).tolist()
    cells = torch.zeros(h * w, feats.shape[1], dtype=torch.float64)
    cells.index_add_(0, grid[:, 0] * w + grid[:, 1], feats.double())
    tissue = (cells != 0).any(1)
    if keep_background:
        tissue = torch.ones_like(tissue)
    bias = original_alibi(tissue.view(h, w).numpy(), h, w, slopes).double()
    x = F.gelu(lin(cells, "patch_embed.0"))
    x = torch.cat([sd["cls_token"][0], x])[torch.cat([torch.tensor([True]), tissue])]
    n, dim = x.shape
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.modules_list.{i}"
        qkv = lin(ln(x, f"{p}.norm1", 1e-6), f"{p}.attn.qkv").view(n, 3, heads, dim // heads)
        out = torch.empty(n, heads, dim // heads, dtype=torch.float64)
        for head in range(heads):
            q, k, v = qkv[:, 0, head], qkv[:, 1, head], qkv[:, 2, head]
            scores = q @ k.T / math.sqrt(dim // heads) + bias[head]
            out[:, head] = torch.softmax(scores, dim=-1) @ v
        x = x + lin(out.reshape(n, dim), f"{p}.attn.proj")
        x = x + lin(F.gelu(lin(ln(x, f"{p}.norm2", 1e-6), f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
    x = ln(x, "norm", 1e-6)
    if not pool_cls:
        x = x[1:]
    # attn_pool_contrastive: nn.MultiheadAttention written out, q/k/v rows of in_proj in order
    a = "attn_pool_contrastive"
    w_in, b_in = sd[f"{a}.attn.in_proj_weight"], sd[f"{a}.attn.in_proj_bias"]
    query = ln(sd[f"{a}.query"], f"{a}.ln_q", 1e-5)
    keys = ln(x, f"{a}.ln_k", 1e-5)
    q = query @ w_in[:dim].T + b_in[:dim]
    k = keys @ w_in[dim : 2 * dim].T + b_in[dim : 2 * dim]
    v = keys @ w_in[2 * dim :].T + b_in[2 * dim :]
    d = dim // pool_heads
    pooled = torch.cat(
        [
            torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(d), dim=-1) @ v[:, s]
            for s in (slice(j * d, (j + 1) * d) for j in range(pool_heads))
        ],
        dim=1,
    )
    pooled = lin(pooled, f"{a}.attn.out_proj")[0]
    return pooled @ sd["proj"] if apply_proj else pooled


# --- the published file loads exactly ---------------------------------------------------------


def test_full_size_keys_equal_the_manifest(spec: dict) -> None:
    model = titan.build("meta")
    published = {titan.published_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    assert published == {k: tuple(v["shape"]) for k, v in spec["keys"].items()}
    assert spec["n_keys"] == len(published) == 96
    assert sum(v.numel() for v in model.state_dict().values()) == 48_539_904
    assert all(v["dtype"] == "float32" for v in spec["keys"].values())


def test_fabricated_safetensors_loads_strict(spec: dict, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    file_sd = fabricate_state_dict(spec, seed=1)
    text = {
        "text_encoder.transformer.resblocks.0.attn.in_proj_weight": torch.ones(6, 2),
        "text_encoder.token_embedding.weight": torch.ones(5, 3),
    }
    path = tmp_path / "model.safetensors"
    save_file({**file_sd, **text}, str(path))
    state_dict = titan.prepare_state_dict(read_checkpoint(path, "titan"), path)
    model = titan.build("meta")
    load_state_dict_exact(model, state_dict, "titan", path, titan.published_key)
    loaded = model.state_dict()
    assert [titan.published_key(k) for k in loaded] == list(file_sd)  # nothing left over
    assert all(torch.equal(loaded[k], file_sd[titan.published_key(k)]) for k in loaded)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("kind", BAD_KEY_KINDS)
def test_bad_key_is_named(kind: str, spec: dict) -> None:
    file_sd = fabricate_state_dict(spec, seed=2, compact=True)
    key = PREFIX + "blocks.modules_list.4.attn.qkv.weight"
    renamed = key.replace("qkv", "qkv_proj")
    sd = break_key(file_sd, key, kind, renamed, torch.ones(768, 768))
    with pytest.raises(WeightsError) as err:
        load_state_dict_exact(
            titan.build("meta"),
            titan.prepare_state_dict(sd, None),
            "titan",
            None,
            titan.published_key,
        )
    message = str(err.value)
    assert key in message and "titan" in message
    if kind == "renamed":
        assert "qkv_proj" in message and "unexpected" in message
    if kind == "misshapen":
        assert "(768, 768)" in message and "(2304, 768)" in message


def test_ignored_text_tower_cannot_hide_a_missing_vision_key(spec: dict) -> None:
    """text_encoder.* is dropped, but a vision key missing is still named, even when a text key
    of the same suffix is present."""
    file_sd = fabricate_state_dict(spec, seed=3, compact=True)
    missing = PREFIX + "norm.weight"
    sd = {k: v for k, v in file_sd.items() if k != missing}
    sd["text_encoder.norm.weight"] = file_sd[missing]
    sd["text_encoder.ln_final.weight"] = torch.ones(768)
    prepared = titan.prepare_state_dict(sd, None)
    assert not any(k.startswith("text_encoder.") for k in prepared)
    with pytest.raises(
        WeightsError,
        match=r"missing keys: norm\.weight \(in the file: "
        r"vision_encoder\.norm\.weight\)",
    ):
        load_state_dict_exact(titan.build("meta"), prepared, "titan", None, titan.published_key)
    # a stray top-level key (not under an ignored prefix) is named too
    stray = {**file_sd, "logit_scale": torch.ones(())}
    with pytest.raises(WeightsError, match="unexpected keys: logit_scale"):
        load_state_dict_exact(
            titan.build("meta"), titan.prepare_state_dict(stray, None), "titan", None
        )
    both = {**file_sd, "norm.weight": torch.ones(768)}
    with pytest.raises(WeightsError, match="both with and without"):
        titan.prepare_state_dict(both, None)


# --- grid, cells and the float-rounding trap --------------------------------------------------


def test_grid_cells_as_the_original() -> None:
    coords = torch.tensor([[1000 + 512 * 3 + 7, 3000], [1000, 3000 + 512 * 2 + 511], [1511, 3512]])
    assert titan.grid_cells(coords, 512).tolist() == [[3, 0], [0, 2], [0, 1]]
    # 40x: the same tiles at twice the coordinates and patch_size_lv0 1024
    assert torch.equal(titan.grid_cells(coords * 2, 1024), titan.grid_cells(coords, 512))
    with pytest.raises(ValueError, match="integer level-0 pixels"):
        titan.grid_cells(coords.double(), 512)
    with pytest.raises(ValueError, match="positive"):
        titan.grid_cells(coords, 0)
    with pytest.raises(ValueError, match="integer"):
        titan.grid_cells(coords, 511.5)


def test_float_rounding_trap_is_refused() -> None:
    """STAMP's int64(float32(µm) / (256 / 224)) turns 224 k into 224 k - 1 for many k: tiles move
    into a neighbour's cell, where the original sums them. Exact integers do not."""
    k = torch.arange(40)
    xy = torch.stack(torch.meshgrid(k, k, indexing="ij"), -1).reshape(-1, 2)
    exact = xy * 224
    stamp = (torch.tensor((xy * 256).numpy(), dtype=torch.float32) / (256 / 224)).to(torch.int64)
    assert (stamp != exact).any()  # the trap exists
    assert torch.equal(titan.grid_cells(exact, 224), xy)
    moved = titan.grid_cells(stamp, 224)
    assert len(torch.unique(moved, dim=0)) < len(xy)  # collisions: the original would sum
    model = twin(twin_state_dict(in_dim=4), in_dim=4)
    feats = torch.randn(len(xy), 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"share .* grid cell"):
        model.encode_coords(feats, stamp, 224)
    assert model.encode_coords(feats, exact, 224).shape == (96,)


def test_two_tiles_in_one_cell_are_refused() -> None:
    model = twin(twin_state_dict())
    cells = torch.tensor([[0, 0], [1, 0], [0, 0], [2, 2]])
    with pytest.raises(ValueError, match=r"2 tiles share 1 grid cell.*\(x, y\) = \(0, 0\)"):
        model.encode_bag(torch.randn(4, 32, dtype=torch.float64), cells)


def test_tile_encoder_is_checked() -> None:
    model = twin(twin_state_dict())
    feats, cells = torch.randn(3, 32, dtype=torch.float64), torch.tensor([[0, 0], [1, 0], [0, 1]])
    with pytest.raises(ValueError, match="conch_v15"):
        model.encode_bag(feats, cells, "uni")
    with pytest.raises(ValueError, match=r"\[N, 32\]"):
        model.encode_bag(torch.randn(3, 16), cells, "conch_v15")
    assert model.encode_bag(feats, cells, "conch_v15").shape == (96,)


# --- ALiBi: slopes, the bias per head, bounded memory -----------------------------------------


def test_slopes_in_the_original_order() -> None:
    assert titan.alibi_slopes(12) == pytest.approx(ORIGINAL_SLOPES, rel=1e-15, abs=0)
    model_slopes = titan.build("meta").slopes()
    assert torch.equal(model_slopes, torch.tensor(ORIGINAL_SLOPES, dtype=torch.float32))
    assert titan.alibi_slopes(12) != sorted(ORIGINAL_SLOPES, reverse=True)
    assert titan.alibi_slopes(8) == pytest.approx([2.0**-i for i in range(1, 9)], rel=1e-15)
    assert titan.alibi_slopes(16) == pytest.approx(
        [2.0 ** (-i / 2) for i in range(1, 17)], rel=1e-15
    )


def test_bias_per_head_equals_the_original_bitwise() -> None:
    coords = tissue_coords(60, 9)
    cells = titan.grid_cells(coords, 512)
    cells = cells[titan.x_major_order(cells)]
    h, w = (cells.max(0).values + 1).tolist()
    tissue = np.zeros((h, w), dtype=bool)
    tissue[cells[:, 0].numpy(), cells[:, 1].numpy()] = True
    reference = original_alibi(tissue, h, w, ORIGINAL_SLOPES)
    slopes = torch.tensor(ORIGINAL_SLOPES, dtype=torch.float32)
    full = titan.alibi_bias(cells, 0, 61, slopes)
    assert torch.equal(full, reference)
    blocks = torch.cat(
        [titan.alibi_bias(cells, s, min(61, s + 7), slopes) for s in range(0, 61, 7)], 1
    )
    assert torch.equal(blocks, reference)
    # head 0 has slope 1/2, head 8 slope 2^-0.5: distance 1 -> -0.5 and -0.7071
    i, j = next(
        (a, b) for a in range(60) for b in range(60) if (cells[a] - cells[b]).abs().sum() == 1
    )
    assert full[0, i + 1, j + 1] == -0.5 and full[8, i + 1, j + 1] == pytest.approx(-(2**-0.5))
    assert torch.equal(full[:, 0], torch.zeros(12, 61)) and torch.equal(
        full[:, :, 0], torch.zeros(12, 61)
    )


def test_row_blocks_give_the_same_output() -> None:
    model = twin(twin_state_dict())
    coords = tissue_coords(50, 8)
    feats = torch.randn(50, 32, dtype=torch.float64)
    cells = titan.grid_cells(coords, 512)
    model.block_bytes = 1 << 40  # one block
    whole = model.encode_bag(feats, cells)
    model.block_bytes = 12 * 51 * 4 * 3  # blocks of 3 rows
    torch.testing.assert_close(model.encode_bag(feats, cells), whole, rtol=0, atol=1e-13)


# --- the forward against the original, restated -----------------------------------------------


@pytest.fixture(scope="module")
def twin_sd() -> dict[str, torch.Tensor]:
    return twin_state_dict(seed=4)


def bag(n: int = 45, columns: int = 7, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, 32, generator=gen, dtype=torch.float64)
    return feats, tissue_coords(n, columns, seed=seed)


def test_forward_equals_the_original(twin_sd: dict) -> None:
    model = twin(twin_sd)
    feats, coords = bag()
    feats[[3, 17]] = 0.0  # background: all-zero features, removed by the original
    reference = original_forward(twin_sd, feats, coords, 512)
    with torch.inference_mode():
        ours = model.encode_coords(feats, coords, 512)
        shuffle = torch.randperm(len(feats), generator=torch.Generator().manual_seed(0))
        shuffled = model.encode_bag(feats[shuffle], titan.grid_cells(coords, 512)[shuffle])
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-10)
    torch.testing.assert_close(shuffled, reference, rtol=0, atol=1e-10)  # order-free


def test_traps_each_move_the_output(twin_sd: dict) -> None:
    """Each alternative a reimplementation might take changes the embedding visibly."""
    feats, coords = bag(seed=6)
    right = original_forward(twin_sd, feats, coords, 512)
    alternatives = {
        "slopes sorted": original_forward(twin_sd, feats, coords, 512, sorted(ORIGINAL_SLOPES)),
        "slopes reversed": original_forward(twin_sd, feats, coords, 512, ORIGINAL_SLOPES[::-1]),
        "background kept as tokens": original_forward(
            twin_sd, feats, coords, 512, keep_background=True
        ),
        "pool without class token": original_forward(twin_sd, feats, coords, 512, pool_cls=False),
        "proj applied": original_forward(twin_sd, feats, coords, 512, apply_proj=True),
        "grid at half spacing": original_forward(twin_sd, feats, coords, 256),
    }
    for name, value in alternatives.items():
        assert (value - right).abs().max() > 1e-3, name


def test_translation_and_scale_invariance(twin_sd: dict) -> None:
    model = twin(twin_sd)
    feats, coords = bag(seed=7)
    cells = titan.grid_cells(coords, 512)
    with torch.inference_mode():
        base = model.encode_bag(feats, cells)
        moved = model.encode_bag(feats, cells + torch.tensor([40, 3]))
        at_40x = model.encode_coords(feats, coords * 2, 1024)
    assert torch.equal(moved, base) and torch.equal(at_40x, base)


def test_norm_eps_and_pooler_structure() -> None:
    model = titan.build("meta")
    assert model.norm.eps == 1e-6 and model.blocks.modules_list[0].norm1.eps == 1e-6
    for pool in (model.attn_pool, model.attn_pool_contrastive):
        assert pool.ln_q.eps == pool.ln_k.eps == 1e-5 and pool.attn.num_heads == 8
    assert model.attn_pool.query.shape == (128, 768)
    assert model.attn_pool_contrastive.query.shape == (1, 768)


# --- demo weights, precision ------------------------------------------------------------------


def relative_spread(embeddings: torch.Tensor) -> float:
    """Mean distance to the centroid over the mean norm (tests/test_models_demo.py's measure)."""
    e = embeddings.double()
    return float((e - e.mean(0)).norm(dim=1).mean() / e.norm(dim=1).mean())


def test_demo_weights_carry_the_signal() -> None:
    model = titan.build("meta")
    load_state_dict_exact(model, titan.demo_state_dict(model, 11), "titan", None)
    model.eval()
    gen = torch.Generator().manual_seed(8)
    with torch.inference_mode():
        out = torch.stack(
            [
                model.encode_bag(
                    torch.randn(120, 768, generator=gen),
                    titan.grid_cells(tissue_coords(120, 12, seed=s), 512),
                )
                for s in range(4)
            ]
        )
    assert relative_spread(out) > 0.05
    # the demo pooler is not a plain mean: moving tiles (same features) changes the embedding
    feats = torch.randn(120, 768, generator=gen)
    with torch.inference_mode():
        a = model.encode_bag(feats, titan.grid_cells(tissue_coords(120, 12, seed=1), 512))
        b = model.encode_bag(feats, titan.grid_cells(tissue_coords(120, 12, seed=2), 512))
    assert (a - b).abs().max() > 1e-3


def test_bf16_autocast_within_tolerance_and_fp32_close_to_fp64(twin_sd: dict) -> None:
    shape = {"dim": 768, "in_dim": 768, "depth": 2}
    sd = twin_state_dict(seed=9, **shape)
    model64, model32 = twin(sd, **shape), twin(sd, torch.float32, **shape)
    gen = torch.Generator().manual_seed(10)
    feats = torch.randn(300, 768, generator=gen, dtype=torch.float64)
    cells = titan.grid_cells(tissue_coords(300, 20, seed=3), 512)
    with torch.inference_mode():
        high = model64.encode_bag(feats, cells)
        full = model32.encode_bag(feats.float(), cells)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model32.encode_bag(feats.float(), cells).float()
    assert full.dtype == torch.float32
    assert (full.double() - high).abs().max() < 1e-4
    assert 0 < (half - full).abs().max() < titan.BF16_TOLERANCE
