"""Prov-GigaPath slide encoder: exact checkpoint loading, dilated attention, positions, order."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_fixtures import (
    BAD_KEY_KINDS,
    break_key,
    fabricate_state_dict,
    independent_dilated_attention,
    key_spec_or_skip,
    longnet_reference_forward,
    save_checkpoint,
    sincos_row,
)

from eagleflow.models import gigapath_slide as gs
from eagleflow.models.checkpoints import load_state_dict_exact
from eagleflow.models.loading import load_model
from eagleflow.weights import WeightsError, sha256_file

torch.set_num_threads(min(2, torch.get_num_threads()))

SMALL_SEGMENTS = (8, 16, 32)
SMALL_RATIOS = (1, 2, 4)
TILE = 256


@pytest.fixture(scope="module")
def spec() -> dict:
    return key_spec_or_skip("gigapath_slide")


@pytest.fixture(scope="module")
def file_sd(spec: dict) -> dict[str, torch.Tensor]:
    """All 247 keys; LayerNorm weights 1 + N(0, 0.02), so attention changes the output."""
    return fabricate_state_dict(spec, seed=1)


def reduced(
    file_sd: dict[str, torch.Tensor], depth: int, dtype: torch.dtype = torch.float64, **kwargs
) -> tuple[gs.GigaPathSlideEncoder, dict[str, torch.Tensor]]:
    """A `depth`-layer twin (same per-layer structure) with the file's first layers, eval."""
    sd = {
        k: v.to(dtype)
        for k, v in file_sd.items()
        if not k.startswith("encoder.layers.") or int(k.split(".")[2]) < depth
    }
    model = gs.build("meta", depth=depth, **kwargs)
    load_state_dict_exact(model, sd, "gigapath_slide", None)
    return model.to(dtype).eval(), sd


def grid_coords(n: int, columns: int, origin: tuple[int, int] = (0, 0), tile: int = TILE):
    """Level-0 (x, y) of n tiles on a row-major grid `columns` wide, offset by `origin`."""
    index = torch.arange(n)
    return torch.stack([index % columns * tile + origin[0], index // columns * tile + origin[1]], 1)


# --- the published file loads exactly ---------------------------------------------------------


def test_checkpoint_loads_exactly(spec: dict, file_sd: dict, tmp_path: Path) -> None:
    assert spec["n_keys"] == len(spec["keys"]) == len(file_sd) == 247
    path = save_checkpoint(spec, file_sd, tmp_path / "slide_encoder.pth")
    assert set(torch.load(path, weights_only=True)) == {"model"}
    model = load_model("gigapath_slide", path, verify_sha256=False)
    loaded = model.state_dict()
    assert list(loaded) == list(file_sd)  # nothing missing, nothing left over, same order
    assert all(torch.equal(loaded[k], file_sd[k]) for k in loaded)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not model.training
    info = model.eagleflow_weights
    assert info.sha256 == sha256_file(path) and not info.verified and not info.is_demo
    assert model.encoder.layers[0].self_attn.segment_lengths == gs.SEGMENT_LENGTHS
    assert gs.SEGMENT_LENGTHS == (1024, 5792, 32768, 185363, 1048576)
    assert gs.DILATED_RATIOS == (1, 2, 4, 8, 16)


@pytest.mark.parametrize("kind", BAD_KEY_KINDS)
def test_bad_key_is_named(kind: str, spec: dict, file_sd: dict, tmp_path: Path) -> None:
    key = "encoder.layers.3.self_attn.inner_attn_ln.weight"
    renamed = key.replace("inner_attn_ln", "inner_attn_norm")
    sd = break_key(file_sd, key, kind, renamed, torch.ones(384))
    path = save_checkpoint(spec, sd, tmp_path / f"slide_{kind}.pth")
    with pytest.raises(WeightsError) as err:
        load_model("gigapath_slide", path, verify_sha256=False)
    message = str(err.value)
    assert key in message and "gigapath_slide" in message and str(path) in message
    if kind == "renamed":
        assert "inner_attn_norm" in message and "unexpected" in message
    if kind == "misshapen":
        assert "(384,)" in message and "(768,)" in message


def test_file_with_args_gets_a_resave_command(spec: dict, file_sd: dict, tmp_path: Path) -> None:
    """A checkpoint that also pickles training arguments is refused, with a command that works."""
    path = tmp_path / "slide_encoder.pth"
    torch.save({"model": file_sd, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(WeightsError) as err:
        load_model("gigapath_slide", path, verify_sha256=False)
    message = str(err.value)
    assert "refusing" in message and "argparse.Namespace" in message
    command = message.split("trusted environment: ", 1)[1].split(" then point", 1)[0]
    assert command.startswith("python -c ")
    subprocess.run([sys.executable, "-c", shlex.split(command)[2]], check=True)
    resaved = tmp_path / "slide_encoder.tensors.pth"
    model = load_model("gigapath_slide", resaved, verify_sha256=False)
    assert torch.equal(model.norm.weight, file_sd["norm.weight"])


# --- dilated attention against a per-head, per-query statement --------------------------------


@pytest.mark.parametrize(
    ("n", "segments", "ratios"),
    [
        (45, SMALL_SEGMENTS, SMALL_RATIOS),  # 6 segments of 8, the last one padded
        (37, (6, 9, 64), SMALL_RATIOS),  # 9 and 6 not multiples of their dilation
        (5, SMALL_SEGMENTS, SMALL_RATIOS),  # shorter than every segment
        (70, (8, 24, 48, 96, 192), (1, 2, 4, 8, 16)),  # five branches, as in the model
    ],
)
@pytest.mark.parametrize("fused", [True, False])
def test_dilated_attention_equals_independent(n, segments, ratios, fused) -> None:
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(n, 16, 6, generator=gen, dtype=torch.float64) for _ in range(3))
    ours = gs.dilated_attention(q, k, v, segments, ratios, fused=fused)
    reference = independent_dilated_attention(q, k, v, segments, ratios)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    # the padding is counted: masking it (the natural alternative) gives another result
    masked = independent_dilated_attention(q, k, v, segments, ratios, count_padding=False)
    assert (ours - masked).abs().max() > 1e-3


def test_dilated_attention_real_segments_beyond_1024() -> None:
    """The model's own segments on 2101 tokens: 3 segments of the 1024 branch, padded tails."""
    n = 2101
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 16, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    ours = gs.dilated_attention(q, k, v)
    rows = sorted({*range(0, n, 97), *range(1020, 1030), *range(2040, 2060), *range(n - 10, n)})
    reference = independent_dilated_attention(
        q, k, v, gs.SEGMENT_LENGTHS, gs.DILATED_RATIOS, positions=rows
    )
    torch.testing.assert_close(ours[rows], reference[rows], rtol=0, atol=1e-12)


def test_fused_and_explicit_attention_agree_in_fp32() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1300, 16, 48, generator=gen) for _ in range(3))
    fused = gs.dilated_attention(q, k, v, fused=True)
    explicit = gs.dilated_attention(q, k, v, fused=False)
    torch.testing.assert_close(fused, explicit, rtol=0, atol=2e-6)


# --- positions and order ----------------------------------------------------------------------


def test_positions_equal_the_closed_formula() -> None:
    cells = torch.tensor([[0, 0], [3, 7], [7, 3], [999, 5], [12, 999], [417, 250]])
    ours = gs.position_embedding(cells)
    assert ours.shape == (6, 768) and ours.dtype == torch.float64
    for row, (gx, gy) in zip(ours, cells.tolist(), strict=True):
        torch.testing.assert_close(row, sincos_row(gx, gy), rtol=0, atol=1e-12)
    # first 384 dims encode y, last 384 x: (3, 7) is not (7, 3) with the halves swapped
    torch.testing.assert_close(ours[1, :384], ours[2, 384:])
    assert not torch.allclose(ours[1], ours[2])
    assert torch.equal(ours[0, :192], torch.zeros(192))  # sin(0)
    assert torch.equal(ours[0, 192:384], torch.ones(192))  # cos(0)


def test_grid_cells_from_level0_coordinates() -> None:
    coords = torch.tensor([[3 * 512 + 37, 7 * 512 + 511], [0, 999 * 512], [512 * 999 + 511, 0]])
    cells = gs.grid_positions(coords, 512)
    assert cells.tolist() == [[3, 7], [0, 999], [999, 0]]


@pytest.mark.parametrize(
    "xy", [(1000 * TILE, 0), (0, 1000 * TILE), (-1, 5), (5, -TILE), (TILE * 5000, TILE * 5)]
)
def test_coordinates_outside_the_grid_are_an_error(xy: tuple[int, int]) -> None:
    coords = torch.tensor([[0, 0], list(xy)])
    with pytest.raises(ValueError, match="outside the 1000 x 1000 grid") as err:
        gs.grid_positions(coords, TILE)
    assert str(tuple(xy)) in str(err.value)


def test_row_major_order_is_y_then_x() -> None:
    coords = torch.tensor([[512, 256], [0, 0], [256, 0], [0, 256], [512, 0], [256, 256]])
    order = gs.row_major_order(coords)
    assert coords[order].tolist() == [[0, 0], [256, 0], [512, 0], [0, 256], [256, 256], [512, 256]]


def test_tokens_are_row_major_whatever_the_input_order(file_sd: dict) -> None:
    model, _ = reduced(file_sd, 2, segment_lengths=SMALL_SEGMENTS, dilated_ratios=SMALL_RATIOS)
    n, columns = 40, 7
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n, 1536, generator=gen, dtype=torch.float64)
    coords = grid_coords(n, columns, origin=(100, 300))
    shuffle = torch.randperm(n, generator=gen)
    with torch.inference_mode():
        as_given = model.encode(x, coords, TILE, row_major=False)
        shuffled = model.encode(x[shuffle], coords[shuffle], TILE)
        column_major = torch.argsort(coords[:, 0] * 10**6 + coords[:, 1])
        by_columns = model.encode(x[column_major], coords[column_major], TILE, row_major=False)
    torch.testing.assert_close(shuffled.layers, as_given.layers, rtol=0, atol=1e-12)
    assert (by_columns.layers[2] - as_given.layers[2]).abs().max() > 1e-3  # order matters


# --- the whole model against the reference computation ----------------------------------------


def test_encoder_equals_reference_forward(file_sd: dict) -> None:
    """Two layers, small segments (the real ones: test_dilated_attention_real_segments_*)."""
    n, segments, ratios, depth = 60, SMALL_SEGMENTS, SMALL_RATIOS, 2
    model, sd = reduced(file_sd, depth, segment_lengths=segments, dilated_ratios=ratios)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 1536, generator=gen, dtype=torch.float64)
    tile = 448  # 224 px at 1 µm/px on a 0.5 µm/px slide: not a multiple of 256
    coords = grid_coords(n, 37, origin=(1000, 13), tile=tile)
    cells = [(int(x_) // tile, int(y_) // tile) for x_, y_ in coords.tolist()]
    with torch.inference_mode():
        ours = model.encode(x, coords, tile)
    reference = longnet_reference_forward(sd, x, cells, segments, ratios)
    assert ours.layers.shape == (depth + 1, 768) and ours.final.shape == (768,)
    torch.testing.assert_close(ours.layers, torch.stack(reference[:-1]), rtol=0, atol=1e-10)
    torch.testing.assert_close(ours.final, reference[-1], rtol=0, atol=1e-10)


def test_fp32_is_close_to_fp64(file_sd: dict) -> None:
    """Our own rounding at the real config (the bench reports the full-depth figure)."""
    model64, _ = reduced(file_sd, 2)
    model32, _ = reduced(file_sd, 2, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1200, 1536, generator=gen, dtype=torch.float64)
    coords = grid_coords(1200, 40)
    with torch.inference_mode():
        high = model64.encode(x, coords, TILE)
        low = model32.encode(x.float(), coords, TILE)
    assert low.layers.dtype == torch.float32
    assert (low.layers.double() - high.layers).abs().max() < 1e-4


def test_outputs_and_default_layer(file_sd: dict) -> None:
    model, _ = reduced(file_sd, 12, dtype=torch.float32, segment_lengths=SMALL_SEGMENTS,
                       dilated_ratios=SMALL_RATIOS)  # fmt: skip
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(30, 1536, generator=gen)
    coords = grid_coords(30, 6)
    with torch.inference_mode():
        out = model.encode(x, coords, TILE)
        default = model(x[None], coords[None], TILE)  # a leading batch of one is accepted
        tokens = model.tokens(x, coords, TILE)
    assert out.layers.shape == (13, 768) and gs.DEFAULT_LAYER == 11
    torch.testing.assert_close(default, out.layers[11], rtol=0, atol=0)
    torch.testing.assert_close(out.default, out.layers[11], rtol=0, atol=0)
    torch.testing.assert_close(out.layers[0], model.norm(tokens[1:].mean(0)))
    assert torch.equal(tokens[0], file_sd["cls_token"][0, 0])  # class token, position row 0
    assert not torch.allclose(out.final, out.layers[12])  # encoder.layer_norm in between


def test_bad_inputs_are_rejected(file_sd: dict) -> None:
    model, _ = reduced(file_sd, 1, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\[L, 1536\]"):
        model(torch.zeros(3, 768), torch.zeros(3, 2), TILE)
    with pytest.raises(ValueError, match="3 tile embeddings but 2 coords"):
        model(torch.zeros(3, 1536), torch.zeros(2, 2), TILE)
    with pytest.raises(ValueError, match="at least one tile"):
        model(torch.zeros(0, 1536), torch.zeros(0, 2), TILE)
    with pytest.raises(ValueError, match="tile_size must be positive"):
        model(torch.zeros(1, 1536), torch.zeros(1, 2), 0)


def test_bf16_autocast_stays_within_the_stated_tolerance() -> None:
    """bf16 autocast (CPU here; CUDA uses the same code with its fused kernel) vs fp32."""
    model = load_model("gigapath_slide", "demo")
    gen = torch.Generator().manual_seed(5)
    x, coords = torch.randn(300, 1536, generator=gen), grid_coords(300, 17)
    with torch.inference_mode():
        full = model.encode(x, coords, TILE).layers
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model.encode(x, coords, TILE).layers.float()
    assert (half - full).abs().max() < gs.BF16_TOLERANCE
    assert torch.nn.functional.cosine_similarity(half, full, dim=1).min() > 0.9999
    assert (half - full).abs().max() > 0  # it did run in bf16
