"""Checkpoints fabricated from the published key lists, and an independent CTransPath forward.

Nothing here imports eagleflow: these helpers describe the published files and the timm 0.5.4
computation from first principles, so the tests compare the package against them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
# Prefer the copies in the repository; fall back to the shared reference beside the checkout.
KEY_DIRS = (
    HERE / "data" / "checkpoint_keys",
    Path(__file__).resolve().parents[2] / "shared" / "reference" / "checkpoint_keys",
)
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
}

SWIN_WINDOW = 7
SWIN_GRID = 56  # 224 / patch 4
SWIN_HEADS = (3, 6, 12, 24)
SWIN_DEPTHS = (2, 2, 6, 2)


def find_key_spec(name: str) -> Path | None:
    """The first <name>.json among KEY_DIRS, or None."""
    for directory in KEY_DIRS:
        if (directory / f"{name}.json").is_file():
            return directory / f"{name}.json"
    return None


def key_spec_or_skip(name: str) -> dict[str, Any]:
    """load_key_spec, or skip the test when the published key list is not available."""
    if find_key_spec(name) is None:
        pytest.skip(
            f"{name}.json (published checkpoint keys) is in neither tests/data/checkpoint_keys "
            "nor ../shared/reference/checkpoint_keys"
        )
    return load_key_spec(name)


def load_key_spec(name: str) -> dict[str, Any]:
    path = find_key_spec(name)
    if path is None:
        raise FileNotFoundError(f"{name}.json not in {[str(d) for d in KEY_DIRS]}")
    return json.loads(path.read_text())


def container_key(spec: dict[str, Any]) -> str | None:
    """The wrapper key the JSON's `container` text describes, or None for a bare state dict."""
    text = spec["container"]
    match = re.search(r"under the top-level key '([^']+)'", text)
    if match:
        return match.group(1)
    match = re.search(r"torch\.load\([^)]*\)\['([^']+)'\]", text)  # "torch.load(path)['model']"
    if match:
        return match.group(1)
    if re.search(r"\bbare state dict\b", text):
        return None
    raise ValueError(f"unrecognised container description: {text!r}")


def swin054_relative_position_index(window: int = SWIN_WINDOW) -> torch.Tensor:
    """timm 0.5.4 WindowAttention.relative_position_index, written out from the Swin paper code."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]


def swin054_attn_mask(resolution: int, window: int = SWIN_WINDOW) -> torch.Tensor:
    """timm 0.5.4 SwinTransformerBlock.attn_mask for a shifted block (shift = window // 2)."""
    shift = window // 2
    img = torch.zeros(resolution, resolution)
    bounds = ((0, resolution - window), (resolution - window, resolution - shift))
    bounds += ((resolution - shift, resolution),)
    region = 0
    for h0, h1 in bounds:
        for w0, w1 in bounds:
            img[h0:h1, w0:w1] = region
            region += 1
    n = resolution // window
    windows = img.view(n, window, n, window).permute(0, 2, 1, 3).reshape(n * n, window * window)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


def swin054_buffer(key: str) -> torch.Tensor:
    """The exact value of a 0.5.4 Swin buffer stored in the published CTransPath file."""
    if key.endswith("relative_position_index"):
        return swin054_relative_position_index()
    stage = int(re.match(r"layers\.(\d+)\.", key).group(1))
    return swin054_attn_mask(SWIN_GRID // 2**stage)


def fabricate_state_dict(
    spec: dict[str, Any], seed: int = 0, compact: bool = False
) -> dict[str, torch.Tensor]:
    """Every key, shape and dtype of the JSON, with seeded values that keep activations finite.

    Swin buffers get their exact values (the loader drops them, but a real file has them).
    compact=True: each tensor of two or more dims repeats one random row (a stride-0 view, saved
    with its small storage), so a 4.5 GB checkpoint costs a few MB to write, read and load.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, entry in spec["keys"].items():
        shape, dtype = tuple(entry["shape"]), DTYPES[entry["dtype"]]
        if key.endswith(("relative_position_index", "attn_mask")):
            value = swin054_buffer(key).to(dtype)
        elif not dtype.is_floating_point:
            value = torch.zeros(shape, dtype=dtype)
        else:
            drawn = shape[-1:] if compact and len(shape) >= 2 else shape
            value = torch.empty(drawn, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
            if key.endswith("running_var"):
                value = 1.0 + value.abs()
            elif key.endswith(".weight") and len(shape) == 1:  # LayerNorm / BatchNorm scale
                value = 1.0 + value
            value = value.to(dtype)
        if value.shape != shape:  # compact: one row, repeated
            value = value.expand(shape)
        if tuple(value.shape) != shape:
            raise AssertionError(f"{key}: built {tuple(value.shape)}, spec {shape}")
        out[key] = value
    return out


BAD_KEY_KINDS = ("renamed", "missing", "misshapen")


def break_key(
    state_dict: dict[str, torch.Tensor], key: str, kind: str, renamed: str, wrong: torch.Tensor
) -> dict[str, torch.Tensor]:
    """A copy of `state_dict` with `key` renamed to `renamed`, missing, or replaced by `wrong`."""
    out = dict(state_dict)
    if kind == "renamed":
        out[renamed] = out.pop(key)
    elif kind == "missing":
        del out[key]
    elif kind == "misshapen":
        out[key] = wrong
    else:
        raise ValueError(kind)
    return out


def wrap(spec: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> Any:
    """The state dict inside the container the JSON describes."""
    key = container_key(spec)
    return state_dict if key is None else {key: state_dict}


def save_checkpoint(spec: dict[str, Any], state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(wrap(spec, state_dict), path)
    return path


def to_timm054_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of the loader's remap: a current-timm CTransPath dict in the published layout.

    Patch merging moves from the start of stage i+1 to the end of stage i, and the relative
    position indices and shifted-window masks are stored with their exact 0.5.4 values.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = re.sub(
            r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) - 1}.downsample.", key
        )
        out[key] = value
        block = re.match(
            r"^(layers\.(\d+)\.blocks\.(\d+))\.attn\.relative_position_bias_table$", key
        )
        if block:
            prefix, stage, index = block[1], int(block[2]), int(block[3])
            out[f"{prefix}.attn.relative_position_index"] = swin054_relative_position_index()
            if index % 2 == 1 and SWIN_GRID // 2**stage > SWIN_WINDOW:
                out[f"{prefix}.attn_mask"] = swin054_attn_mask(SWIN_GRID // 2**stage)
    return out


def _block054(x: torch.Tensor, sd: dict[str, torch.Tensor], p: str, heads: int) -> torch.Tensor:
    """One timm 0.5.4 Swin block on NHWC input, using the buffers stored in the checkpoint."""
    b, h, w, c = x.shape
    win = SWIN_WINDOW
    mask = sd.get(f"{p}.attn_mask")
    shift = win // 2 if mask is not None else 0
    y = F.layer_norm(x, (c,), sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"], 1e-5)
    if shift:
        y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
    n_h, n_w = h // win, w // win
    windows = y.view(b, n_h, win, n_w, win, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, win * win, c)
    qkv = F.linear(windows, sd[f"{p}.attn.qkv.weight"], sd[f"{p}.attn.qkv.bias"])
    q, k, v = qkv.reshape(-1, win * win, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    index = sd[f"{p}.attn.relative_position_index"].view(-1)
    bias = sd[f"{p}.attn.relative_position_bias_table"][index].view(win * win, win * win, -1)
    attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
    if mask is not None:
        n_win = mask.shape[0]
        attn = attn.view(-1, n_win, heads, win * win, win * win) + mask[None, :, None]
        attn = attn.view(-1, heads, win * win, win * win)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, win * win, c)
    out = F.linear(out, sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"])
    out = out.view(b, n_h, n_w, win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    x = x + out
    y = F.layer_norm(x, (c,), sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"], 1e-5)
    y = F.gelu(F.linear(y, sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"]))
    return x + F.linear(y, sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])


def _conv_bn_relu(x: torch.Tensor, sd: dict[str, torch.Tensor], conv: str, bn: str) -> torch.Tensor:
    x = F.conv2d(x, sd[f"{conv}.weight"], stride=2, padding=1)
    x = F.batch_norm(
        x, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], sd[f"{bn}.weight"], sd[f"{bn}.bias"]
    )
    return F.relu(x)


def ctranspath054_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """CTransPath as timm 0.5.4 + TransPath compute it, from the 200-key published layout.

    [B, 3, 224, 224] -> [B, 768]: ConvStem, four Swin stages with patch merging at the end of
    stages 0-2 (x0, x1, x2, x3 = even/odd rows and columns, concatenated), final norm, mean.
    """
    x = _conv_bn_relu(x, sd, "patch_embed.proj.0", "patch_embed.proj.1")
    x = _conv_bn_relu(x, sd, "patch_embed.proj.3", "patch_embed.proj.4")
    x = F.conv2d(x, sd["patch_embed.proj.6.weight"], sd["patch_embed.proj.6.bias"])
    x = x.permute(0, 2, 3, 1)
    x = F.layer_norm(x, (96,), sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"], 1e-5)
    for stage, (depth, heads) in enumerate(zip(SWIN_DEPTHS, SWIN_HEADS, strict=True)):
        for index in range(depth):
            x = _block054(x, sd, f"layers.{stage}.blocks.{index}", heads)
        p = f"layers.{stage}.downsample"
        if f"{p}.reduction.weight" in sd:
            x0, x1 = x[:, 0::2, 0::2], x[:, 1::2, 0::2]
            x2, x3 = x[:, 0::2, 1::2], x[:, 1::2, 1::2]
            x = torch.cat([x0, x1, x2, x3], dim=-1)
            x = F.layer_norm(x, (x.shape[-1],), sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"])
            x = F.linear(x, sd[f"{p}.reduction.weight"])
    x = F.layer_norm(x, (768,), sd["norm.weight"], sd["norm.bias"], 1e-5)
    return x.flatten(1, 2).mean(dim=1)


def chief_reference(sd: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """CHIEF's gated attention logits [N] from the published key names (no softmax)."""
    h512 = F.relu(F.linear(h, sd["attention_net.0.weight"], sd["attention_net.0.bias"]))
    a = torch.tanh(
        F.linear(
            h512,
            sd["attention_net.3.attention_a.0.weight"],
            sd["attention_net.3.attention_a.0.bias"],
        )
    )
    g = torch.sigmoid(
        F.linear(
            h512,
            sd["attention_net.3.attention_b.0.weight"],
            sd["attention_net.3.attention_b.0.bias"],
        )
    )
    c_w, c_b = sd["attention_net.3.attention_c.weight"], sd["attention_net.3.attention_c.bias"]
    return F.linear(a * g, c_w, c_b)[:, 0]


# --- Prov-GigaPath LongNet, stated per head and per query -------------------------------------


def independent_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: tuple[int, ...],
    dilated_ratios: tuple[int, ...],
    positions: list[int] | None = None,
    count_padding: bool = True,
) -> torch.Tensor:
    """LongNet dilated attention [N, H, D] -> [N, H, D], one (head, query) at a time.

    For each branch (sl, r) with sl' = min(sl, N): the query at p lies in segment p // sl'; head
    h belongs to group g = h // (H / r); the branch counts only if (p - start) % r == g, and then
    contributes the keys at start + g + j r for j < ceil(sl' / r): a key past the segment (the
    segment's padding to a multiple of r) or past the sequence (padding to a multiple of sl') is
    a zero vector with a zero value. One explicit softmax over all contributed keys.
    Only the query rows in `positions` are computed (all by default); the others stay zero.
    count_padding=False drops the padded keys instead (not the reference: for tests that must
    tell the two apart).
    """
    n, heads, dim = q.shape
    out = torch.zeros_like(q)
    for h in range(heads):
        for p in range(n) if positions is None else positions:
            keys, values = [], []
            for segment, ratio in zip(segment_lengths, dilated_ratios, strict=True):
                segment = min(segment, n)
                start = (p // segment) * segment
                group = h // (heads // ratio)
                if (p - start) % ratio != group:
                    continue
                index = start + group + ratio * torch.arange(-(-segment // ratio))
                real = ((index - start) < segment) & (index < n)
                safe = index.clamp(max=n - 1)
                if not count_padding:
                    index, safe, real = index[real], safe[real], real[real]
                keys.append(torch.where(real[:, None], k[safe, h], 0.0))
                values.append(torch.where(real[:, None], v[safe, h], 0.0))
            logits = torch.cat(keys) @ q[p, h] * dim**-0.5
            out[p, h] = torch.softmax(logits, dim=0) @ torch.cat(values)
    return out


def sincos_row(gx: int, gy: int, dim: int = 768) -> torch.Tensor:
    """Row 1 + gx * 1000 + gy of get_2d_sincos_pos_embed(dim, 1000, cls_token=True), float64.

    Written out from the closed formula: [E(gy), E(gx)], E(p) = [sin(p w_k)] ++ [cos(p w_k)],
    w_k = 10000 ** (-k / (dim / 4)), k < dim / 4.
    """
    quarter = dim // 4

    def code(p: int) -> list[float]:
        omegas = [10000.0 ** (-k / quarter) for k in range(quarter)]
        return [math.sin(p * w) for w in omegas] + [math.cos(p * w) for w in omegas]

    return torch.tensor(code(gy) + code(gx), dtype=torch.float64)


def longnet_reference_forward(
    sd: dict[str, torch.Tensor],
    tile_embeddings: torch.Tensor,
    cells: list[tuple[int, int]],
    segment_lengths: tuple[int, ...],
    dilated_ratios: tuple[int, ...],
) -> list[torch.Tensor]:
    """The reference LongNetViT (global_pool=True, all_layer_embed=True) from the file's keys.

    Tokens in the given order; returns the 13 pooled layer outputs, then the final-norm output.
    """
    heads, eps = 16, 1e-5
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))

    def ln(x: torch.Tensor, name: str, e: float = eps) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), sd[f"{name}.weight"], sd[f"{name}.bias"], e)

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])

    x = lin(tile_embeddings, "patch_embed.proj")
    x = x + torch.stack([sincos_row(gx, gy) for gx, gy in cells]).to(x.dtype)
    x = torch.cat([sd["cls_token"][0], x])
    n, dim = x.shape

    def pool(t: torch.Tensor) -> torch.Tensor:
        return ln(t[1:].mean(0), "norm", 1e-6)

    pooled = [pool(x)]
    for i in range(depth):
        p = f"encoder.layers.{i}"
        a = ln(x, f"{p}.self_attn_layer_norm")
        q, k, v = (lin(a, f"{p}.self_attn.{w}_proj").view(n, heads, -1) for w in "qkv")
        att = independent_dilated_attention(q, k, v, segment_lengths, dilated_ratios)
        x = x + lin(
            ln(att.reshape(n, dim), f"{p}.self_attn.inner_attn_ln"), f"{p}.self_attn.out_proj"
        )
        h = F.gelu(lin(ln(x, f"{p}.final_layer_norm"), f"{p}.ffn.fc1"))
        x = x + lin(ln(h, f"{p}.ffn.ffn_layernorm"), f"{p}.ffn.fc2")
        pooled.append(pool(x))
    return [*pooled, pool(ln(x, "encoder.layer_norm"))]


def pathoduet_reference_forward(
    sd: dict[str, torch.Tensor], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """PathoDuet's VisionTransformerMoCo(pretext_token=True, global_pool='avg') from its keys.

    [B, 3, 224, 224] in [0, 1] -> (embedding [B, 768], tokens [B, 198, 768]): tokens [pretext,
    cls, patches] + pos_embed, 12 pre-LN blocks (eps 1e-6, exact GELU), no final norm, mean of the
    196 patch tokens, fc_norm (eps 1e-6).
    """
    heads, eps = 12, 1e-6

    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, (t.shape[-1],), sd[f"{name}.weight"], sd[f"{name}.bias"], eps)

    def lin(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(t, sd[f"{name}.weight"], sd[f"{name}.bias"])

    batch = x.shape[0]
    patches = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    t = patches.flatten(2).transpose(1, 2)
    prefix = [sd["pretext_token"].expand(batch, -1, -1), sd["cls_token"].expand(batch, -1, -1)]
    t = torch.cat([*prefix, t], dim=1) + sd["pos_embed"]
    n, dim = t.shape[1:]
    for i in range(12):
        p = f"blocks.{i}"
        qkv = lin(ln(t, f"{p}.norm1"), f"{p}.attn.qkv").view(batch, n, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-1, -2) * (dim // heads) ** -0.5, dim=-1)
        t = t + lin((attention @ v).transpose(1, 2).reshape(batch, n, dim), f"{p}.attn.proj")
        t = t + lin(F.gelu(lin(ln(t, f"{p}.norm2"), f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
    return ln(t[:, 2:].mean(1), "fc_norm"), t
