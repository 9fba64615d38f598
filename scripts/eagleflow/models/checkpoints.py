"""Checkpoints: read a weight file safely, load it exactly (strict, keys and shapes named), and
build seeded demo weights. The registry of published files is `eagleflow.weights`.

Everything here is model-agnostic: the architectures live in their own modules and import this one,
never the other way round.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eagleflow.weights import REGISTRY, WeightsError

log = logging.getLogger(__name__)


def read_checkpoint(path: Path, name: str) -> Any:
    """Load a checkpoint without running code: torch.load(weights_only=True), or safetensors.

    Zip-format files are memory-mapped, so a 2.5 GB checkpoint starts in well under a second.
    """
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(
                f"{name}: cannot read weight file {str(path)!r} (truncated or corrupt?): {exc}"
            ) from exc
    mmap = zipfile.is_zipfile(path)  # legacy (non-zip) torch files cannot be memory-mapped
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            detail = f" (it references {found.group(1)})" if found else ""
            raise WeightsError(
                f"{name}: refusing to load weight file {str(path)!r}: it holds Python objects "
                f"that unpickling would construct or call{detail}, not just tensors (for example "
                f"training arguments saved beside the weights). Weights are only read with "
                f"torch.load(weights_only=True), so that a weight file can never run code. If "
                f"you trust the file, re-save only its tensors in a trusted environment: "
                f"{resave_command(name, path)} then point the config at the new file and set "
                f"its sha256 (the published hash no longer applies)."
            ) from exc
        raise WeightsError(
            f"{name}: cannot read weight file {str(path)!r} (truncated or corrupt?): {exc}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(
            f"{name}: cannot read weight file {str(path)!r}: it is truncated, corrupt or not a "
            f"PyTorch checkpoint ({first})"
        ) from exc


def resave_command(name: str, path: Path) -> str:
    """A shell command that re-saves the state dict of `path` as a plain tensor dict."""
    key = REGISTRY[name].state_dict_key if name in REGISTRY else None
    out = path.with_name(f"{path.stem}.tensors{path.suffix}")
    state = "c" if key is None else f"c[{key!r}]"
    keep = "sd" if key is None else f"{{{key!r}: sd}}"
    return (
        f'python -c "import torch; c = torch.load({str(path)!r}, weights_only=False); '
        f"sd = {{k: v for k, v in {state}.items() if isinstance(v, torch.Tensor)}}; "
        f'torch.save({keep}, {str(out)!r})"'
    )


def require_tensor_dict(
    obj: Any, name: str, path: Path | None, what: str
) -> dict[str, torch.Tensor]:
    """`obj` as a {str: Tensor} dict, or a WeightsError saying what was found instead."""
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"{name}: weight file {str(path)!r}: expected {what}, found a {type(obj).__name__}"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        shown = ", ".join(f"{k!r} ({type(obj[k]).__name__})" for k in bad[:5]) + (
            f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        )
        raise WeightsError(
            f"{name}: weight file {str(path)!r}: expected {what}, but these entries are not "
            f"tensors: {shown}"
        )
    return dict(obj)


def unwrap_state_dict(
    checkpoint: Any, key: str, name: str, path: Path | None
) -> dict[str, torch.Tensor]:
    """The tensor dict under checkpoint[key] (a bare state dict is accepted too)."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
        checkpoint = checkpoint[key]
    elif isinstance(checkpoint, dict) and key in checkpoint:
        raise WeightsError(f"{name}: weight file {str(path)!r}: '{key}' is not a state dict")
    return require_tensor_dict(checkpoint, name, path, f"a state dict under the key '{key}'")


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def load_state_dict_exact(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    name: str,
    path: Path | None,
    file_key: Callable[[str], str] | None = None,
) -> None:
    """Load `state_dict` into `model` with strict=True, assign=True after checking keys and shapes.

    Floating-point tensors are cast to the model's dtype (assign=True would otherwise keep the
    file's dtype). Any missing, unexpected or misshapen key raises a WeightsError naming it;
    `file_key` maps a model key back to its name in the published file, for the message.
    """

    def shown(key: str) -> str:
        original = file_key(key) if file_key is not None else key
        return key if original == key else f"{key} (in the file: {original})"

    expected = model.state_dict()
    missing = [shown(k) for k in expected if k not in state_dict]
    unexpected = [shown(k) for k in state_dict if k not in expected]
    misshapen = [
        f"{shown(k)}: file {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if misshapen:
        problems.append(f"wrong shapes: {_listing(misshapen)}")
    if problems:
        raise WeightsError(
            f"{name}: weight file {str(path)!r} does not fit the {name} architecture "
            f"({len(state_dict)} keys in the file after conversion, {len(expected)} expected); "
            + "; ".join(problems)
        )
    cast = {}
    for k, v in state_dict.items():
        want = expected[k].dtype
        cast[k] = v.to(want) if v.is_floating_point() and v.dtype != want else v
    try:
        model.load_state_dict(cast, strict=True, assign=True)
    except RuntimeError as exc:
        raise WeightsError(f"{name}: weight file {str(path)!r}: {exc}") from exc
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(
            f"{name}: tensors left on the meta device after loading: {_listing(left)}"
        )


def demo_seed(name: str) -> int:
    """A fixed seed per model name, so demo weights never depend on the global RNG."""
    return (
        int.from_bytes(hashlib.sha256(f"eagleflow-demo-{name}".encode()).digest()[:8], "big") >> 1
    )


# Demo weights: every layer passes its input on at unit gain, so that different tiles give
# different embeddings (a blank tile or wrong coordinates then changes the output visibly).
DEMO_LAYERSCALE = 1.0  # LayerScale's init value (1e-5) would make every block a no-op
DEMO_EMBEDDING_STD = 0.02  # tokens and tables (cls, positions, relative-position bias): timm's init
_FAN_IN_MODULES = (nn.Linear, nn.modules.conv._ConvNd)


def random_state_dict(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random DEMO weights shaped like `model.state_dict()`, built without module init.

    Linear and convolution weights are N(0, 1/fan_in) (unit gain, so activations neither vanish
    nor explode through depth); LayerScale gammas DEMO_LAYERSCALE; normalisation layers weight 1 /
    bias 0 (BatchNorm running stats 0 / 1); biases 0; every other tensor (class, register and
    position tokens, bias tables) N(0, DEMO_EMBEDDING_STD). Not a trained model: outputs carry
    the input's signal but are not results.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
    out: dict[str, torch.Tensor] = {}
    for key, ref in model.state_dict().items():
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name)
        dtype = ref.dtype
        if not dtype.is_floating_point:
            out[key] = torch.zeros(ref.shape, dtype=dtype)
        elif attr == "gamma" and hasattr(module, "init_values"):
            out[key] = torch.full(ref.shape, DEMO_LAYERSCALE, dtype=dtype)
        elif isinstance(module, norm_types) and attr in ("weight", "running_var"):
            out[key] = torch.ones(ref.shape, dtype=dtype)
        elif attr in ("bias", "running_mean"):
            out[key] = torch.zeros(ref.shape, dtype=dtype)
        else:
            fan_in = ref[0].numel() if ref.ndim >= 2 else 1
            std = fan_in**-0.5 if isinstance(module, _FAN_IN_MODULES) else DEMO_EMBEDDING_STD
            out[key] = torch.empty(ref.shape, dtype=dtype).normal_(0.0, std, generator=generator)
    return out
