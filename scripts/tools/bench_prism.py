"""Benchmark PRISM and its tile encoder Virchow v1 on CPU (fp32, 2 threads), each part in a fresh
process so that peak host memory (VmHWM) is the part's own.

1. load: build on meta + read + prepare + strict load of a fabricated full-size file in the
   published container (PRISM: flat safetensors with the text side, 2.1 GB; Virchow: bare torch
   state dict, 2.5 GB), written once to a temporary directory and removed afterwards.
2. prism: one `encode_bag` at each bag size (default 2,000 and 10,000 tiles), demo weights:
   seconds and peak RSS.
3. prism_precision: max |fp32 - fp64| and max |bf16 autocast - fp32| of image_embedding on the
   same 2,000 tiles (demo weights).
4. virchow: seconds per tile at batch 8, max |fp32 - fp64| and |bf16 - fp32| on 2 tiles.

    .venv/bin/python scripts/tools/bench_prism.py                   # all of it
    .venv/bin/python scripts/tools/bench_prism.py --parts prism --tiles 2000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from eagleflow.models import prism, virchow  # noqa: E402
from eagleflow.models.checkpoints import (  # noqa: E402
    demo_seed,
    load_state_dict_exact,
    random_state_dict,
    read_checkpoint,
)

MODULES = {"prism": prism, "virchow": virchow}
PARTS = ("load", "prism", "prism_precision", "virchow")


def peak_rss_gb() -> float:
    """This process's peak resident memory: VmHWM, which starts afresh at exec (ru_maxrss
    keeps the parent's high-water mark across fork and exec, and the parent holds the files)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def demo_model(name: str) -> torch.nn.Module:
    module = MODULES[name]
    model = module.build("meta")
    load_state_dict_exact(model, random_state_dict(model, demo_seed(name)), name, None)
    return model.eval()


def write_file(name: str, directory: Path) -> Path:
    """A full-size file in the published container, random values (the demo generator)."""
    state = random_state_dict(MODULES[name].build("meta"), demo_seed(name))
    if name == "virchow":
        path = directory / "pytorch_model.bin"
        torch.save(state, path)
        return path
    from safetensors.torch import save_file

    manifest = REPO.parent / "shared/reference/checkpoint_keys/prism.json"
    text_side = json.loads(manifest.read_text())["ignored_keys"] if manifest.is_file() else {}
    flat = {prism.published_key(k): v for k, v in state.items()}
    gen = torch.Generator().manual_seed(0)
    for key, entry in text_side.items():  # the text side, as large as published
        flat[key] = torch.empty(entry["shape"]).normal_(0, 0.02, generator=gen)
    path = directory / "model.safetensors"
    save_file(flat, str(path))
    return path


def child(part: str, arg: str) -> dict[str, Any]:
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(1)
    if part == "load":
        name, path = arg.split(":", 1)
        module = MODULES[name]
        start = time.perf_counter()
        model = module.build("meta")
        state = module.prepare_state_dict(read_checkpoint(Path(path), name), Path(path))
        load_state_dict_exact(
            model, state, name, Path(path), getattr(module, "published_key", None)
        )
        return {"seconds": time.perf_counter() - start, "peak_rss_gb": peak_rss_gb()}
    if part == "prism":
        n = int(arg)
        model = demo_model("prism")
        feats, cells = torch.randn(n, 2560, generator=gen), torch.zeros(n, 2, dtype=torch.int64)
        before = peak_rss_gb()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.encode_bag(feats, cells, "virchow")
        seconds = time.perf_counter() - start
        return {
            "tiles": n,
            "seconds": seconds,
            "rss_before_gb": before,
            "peak_rss_gb": peak_rss_gb(),
            "finite": bool(out.isfinite().all()),
        }
    if part == "prism_precision":
        n = int(arg)
        model = demo_model("prism")
        feats, cells = torch.randn(n, 2560, generator=gen), torch.zeros(n, 2, dtype=torch.int64)
        with torch.inference_mode():
            full = model.encode_bag(feats, cells, "virchow")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half = model.encode_bag(feats, cells, "virchow").float()
            double = model.double().encode_bag(feats.double(), cells, "virchow")
        return precision(full, half, double, tiles=n)
    if part == "virchow":
        model = demo_model("virchow")
        x = torch.randn(8, 3, 224, 224, generator=gen)
        with torch.inference_mode():
            model(x[:1])  # warm-up
            start = time.perf_counter()
            full8 = model(x)
            per_tile = (time.perf_counter() - start) / 8
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half = model(x[:2]).float()
            double = model.double()(x[:2].double())
        out = precision(full8[:2], half, double, tiles=2)
        return {"seconds_per_tile_batch8": per_tile, **out, "peak_rss_gb": peak_rss_gb()}
    raise ValueError(part)


def precision(full: torch.Tensor, half: torch.Tensor, double: torch.Tensor, **extra: Any) -> dict:
    scale = full.abs().max().item()
    return {
        **extra,
        "max_abs": scale,
        "fp32_vs_fp64": (full.double() - double).abs().max().item(),
        "bf16_vs_fp32": (half - full).abs().max().item(),
        "bf16_vs_fp32_relative": (half - full).abs().max().item() / scale,
        "bf16_cosine": torch.nn.functional.cosine_similarity(half, full, dim=-1).min().item(),
    }


def run_child(part: str, arg: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, __file__, "--child", part, arg],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        return {"part": part, "arg": arg, "error": result.stderr[-2000:]}
    return {"part": part, **json.loads(result.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--tiles", nargs="+", type=int, default=[2000, 10000])
    parser.add_argument("--child", nargs=2, metavar=("PART", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    print(json.dumps({"load_average": os.getloadavg(), "threads": 2}))
    if "load" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("prism", "virchow"):
                path = write_file(name, Path(tmp))
                size = path.stat().st_size / 2**30
                print(
                    json.dumps(
                        {**run_child("load", f"{name}:{path}"), "model": name, "file_gb": size}
                    )
                )
                path.unlink()
    for n in args.tiles if "prism" in args.parts else ():
        print(json.dumps(run_child("prism", str(n))))
    if "prism_precision" in args.parts:
        print(json.dumps(run_child("prism_precision", "2000")))
    if "virchow" in args.parts:
        print(json.dumps(run_child("virchow", "-")))
    print(json.dumps({"load_average_after": os.getloadavg()}))


if __name__ == "__main__":
    main()
