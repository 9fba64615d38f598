"""Benchmark the models: load times, and the Prov-GigaPath slide encoder's CPU time, memory and
rounding.

1. Per model, `eagleflow.models.load_model` with demo weights and with a full-size checkpoint
   written in the published container (random weights from the package's demo generator, in a
   temporary directory, removed afterwards), the sha256 time and the first forward.
2. The slide encoder on L tiles (default 2,000 and 10,000) in fp32 on CPU, each in a fresh
   process: load, forward wall time and peak host memory (ru_maxrss) before and after.
3. max |fp32 - fp64| of the slide encoder on the same input (all 13 pooled layers).

    .venv/bin/python scripts/tools/bench_models.py                    # all of it, ~10 min on 2 cores
    .venv/bin/python scripts/tools/bench_models.py --part slide --tiles 2000 10000
    .venv/bin/python scripts/tools/bench_models.py --part load --models chief gigapath_slide
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from eagleflow.models.checkpoints import demo_seed, random_state_dict  # noqa: E402
from eagleflow.models.loading import build_model, load_model  # noqa: E402
from eagleflow.weights import MODEL_NAMES, REGISTRY, sha256_file  # noqa: E402

TILE = 256


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sample_input(name: str) -> tuple[torch.Tensor, ...]:
    """A small input of the right kind for the first forward."""
    if name == "chief":
        return (torch.randn(8, 768),)
    if name == "gigapath_slide":
        return slide_input(200)
    return (torch.rand(1, 3, 224, 224),)


def slide_input(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """n tile embeddings [n, 1536] on a square row-major grid of 256 px tiles, and the tile size."""
    gen = torch.Generator().manual_seed(seed)
    columns = int(n**0.5) + 1
    index = torch.arange(n)
    coords = torch.stack([index % columns, index // columns], 1) * TILE
    return torch.randn(n, 1536, generator=gen), coords, TILE


def write_checkpoint(name: str, path: Path) -> None:
    """Random weights of `name` in its published container (current key layout)."""
    model = build_model(name)
    state_dict = random_state_dict(model, demo_seed(name))
    key = REGISTRY[name].state_dict_key
    torch.save(state_dict if key is None else {key: state_dict}, path)


def bench_loads(models: list[str], repeats: int) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_models_") as tmp:
        for name in models:
            demo_s = min(
                timed(lambda name=name: load_model(name, "demo"))[0] for _ in range(repeats)
            )
            path = Path(tmp) / REGISTRY[name].file_name
            write_s, _ = timed(lambda name=name, path=path: write_checkpoint(name, path))
            hash_s, digest = timed(lambda path=path: sha256_file(path))
            loads = []
            for _ in range(repeats):
                seconds, model = timed(
                    lambda name=name, path=path, digest=digest: load_model(
                        name, path, expected_sha256=digest
                    )
                )
                loads.append(seconds)
            with torch.inference_mode():
                forward_s, _ = timed(lambda model=model, name=name: model(*sample_input(name)))
            size_mb = path.stat().st_size / 2**20
            del model
            path.unlink()
            rows.append((name, demo_s, size_mb, write_s, hash_s, min(loads), forward_s))
    print(f"\n## load_model, best of {repeats} (fp32 CPU, {torch.get_num_threads()} threads)")
    header = ("model", "demo load s", "file MB", "write s", "sha256 s", "file load s", "1st fwd s")
    print(" | ".join(f"{h:>14}" for h in header))
    for name, *values in rows:
        print(" | ".join([f"{name:>14}", *(f"{v:>14.2f}" for v in values)]))
    print("file load s includes the sha256 check; 1st fwd: one tile (CHIEF: 8, slide: 200 tiles)")


def slide_case(n: int) -> dict[str, float]:
    """One slide-encoder run in this process: load from a file, forward, memory."""
    with tempfile.TemporaryDirectory(prefix="bench_slide_") as tmp:
        path = Path(tmp) / "slide_encoder.pth"
        write_checkpoint("gigapath_slide", path)
        gc.collect()
        inputs = slide_input(n)
        before_load = peak_rss_gb()
        load_s, model = timed(lambda: load_model("gigapath_slide", path, verify_sha256=False))
        before = peak_rss_gb()
        with torch.inference_mode():
            forward_s, out = timed(lambda: model.encode(*inputs))
    assert torch.isfinite(out.layers).all()
    return {
        "tiles": n,
        "load_s": load_s,
        "forward_s": forward_s,
        "peak_before_load_gb": before_load,
        "peak_before_forward_gb": before,
        "peak_gb": peak_rss_gb(),
    }


def bench_slide(tiles: list[int], threads: int) -> None:
    print(
        f"\n## gigapath_slide forward, fp32 CPU, {torch.get_num_threads()} threads, fresh process"
    )
    header = ("tiles", "load s", "forward s", "peak GB", "peak before fwd", "fwd adds GB")
    print(" | ".join(f"{h:>15}" for h in header))
    for n in tiles:
        done = subprocess.run(
            [sys.executable, __file__, "--slide-case", str(n), "--threads", str(threads)],
            check=True,
            capture_output=True,
            text=True,
        )
        r = json.loads(done.stdout.strip().splitlines()[-1])
        added = r["peak_gb"] - r["peak_before_forward_gb"]
        values = (r["load_s"], r["forward_s"], r["peak_gb"], r["peak_before_forward_gb"], added)
        print(" | ".join([f"{n:>15}", *(f"{v:>15.2f}" for v in values)]))
    print("peak = ru_maxrss of the whole process (torch and eagleflow imports included)")


def bench_precision(n: int) -> None:
    model = load_model("gigapath_slide", "demo")
    x, coords, tile = slide_input(n, seed=1)
    with torch.inference_mode():
        low = model.encode(x, coords, tile)
        model.double()
        high = model.encode(x.double(), coords, tile)
    diff = (low.layers.double() - high.layers).abs().max().item()
    final = (low.final.double() - high.final).abs().max().item()
    scale = high.layers.abs().max().item()
    print(f"\n## gigapath_slide fp32 vs fp64 (demo weights, {n} tiles, real segments)")
    print(f"max |fp32 - fp64| over the 13 pooled layers: {diff:.2e} (final: {final:.2e}; "
          f"largest |value| {scale:.2f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "load", "slide", "precision"], default="all")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--repeats", type=int, default=2, help="best of N loads")
    parser.add_argument("--tiles", nargs="+", type=int, default=[2000, 10000])
    parser.add_argument("--precision-tiles", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slide-case", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("eagleflow").setLevel(logging.ERROR)  # the DEMO warning, once per load
    if args.slide_case is not None:
        print(json.dumps(slide_case(args.slide_case)))
        return
    print(f"torch {torch.__version__}")
    if args.part in ("all", "load"):
        bench_loads(args.models, args.repeats)
    if args.part in ("all", "slide"):
        bench_slide(args.tiles, args.threads)
    if args.part in ("all", "precision"):
        bench_precision(args.precision_tiles)


if __name__ == "__main__":
    main()
