"""Benchmark every catalogued model: load times, tile encoders per tile, slide encoders at 2,000
and 10,000 tiles (time and peak host memory) and their fp32 rounding.

1. Per model, `load_model` with demo weights and with a full-size checkpoint written in the
   published container (seeded random weights, in a temporary directory, removed afterwards):
   the sha256 time and the load.
2. Per tile encoder, seconds per tile at batch 8 (fp32 CPU, the card's input size).
3. Per slide encoder, `encode_bag` over L tiles (default 2,000 and 10,000) on a square grid of
   cells, in a fresh process each: load, forward wall time, peak host memory (VmHWM) before
   and after.
4. Per slide encoder, max |fp32 - fp64| of `encode_bag` on the same 2,000 tiles, and the
   largest |bf16 autocast - fp32| relative to the largest |value| (CPU autocast: what CUDA's
   bf16 path rounds, measured without a GPU).

    .venv/bin/python scripts/tools/bench_models.py                         # everything
    .venv/bin/python scripts/tools/bench_models.py --part slide --models titan prism
    .venv/bin/python scripts/tools/bench_models.py --part load --models chief gigapath_slide
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
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

from eagleflow.encoders import SLIDE_ENCODERS, TILE_ENCODERS  # noqa: E402
from eagleflow.models.catalog import catalog  # noqa: E402
from eagleflow.models.checkpoints import demo_seed, random_state_dict  # noqa: E402
from eagleflow.models.loading import build_model, load_model, model_function  # noqa: E402
from eagleflow.weights import MODEL_NAMES, REGISTRY, sha256_file  # noqa: E402


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (VmHWM: reset by exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def write_checkpoint(name: str, path: Path) -> None:
    """Seeded random weights of `name` in its published container and key names."""
    model = build_model(name)
    demo = model_function(name, "demo_state_dict") or random_state_dict
    in_file = model_function(name, "published_key") or (lambda key: key)
    state_dict = {in_file(k): v for k, v in demo(model, demo_seed(name)).items()}
    key = REGISTRY[name].state_dict_key
    if path.suffix == ".safetensors":  # TITAN and PRISM publish safetensors (flat, no container)
        from safetensors.torch import save_file

        save_file({k: v.contiguous().clone() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict if key is None else {key: state_dict}, path)


def slide_input(encoder: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """n tile embeddings of the encoder's default tile encoder on a square grid of cells."""
    tile_encoder = SLIDE_ENCODERS[encoder].tile_encoder
    gen = torch.Generator().manual_seed(seed)
    columns = int(n**0.5) + 1
    index = torch.arange(n)
    cells = torch.stack([index % columns, index // columns], 1)
    feats = torch.randn(n, TILE_ENCODERS[tile_encoder].dim, generator=gen)
    return feats, cells, tile_encoder


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
            loads = [
                timed(
                    lambda name=name, path=path, digest=digest: load_model(
                        name, path, expected_sha256=digest
                    )
                )[0]
                for _ in range(repeats)
            ]
            size_mb = path.stat().st_size / 2**20
            path.unlink()
            rows.append((name, demo_s, size_mb, write_s, hash_s, min(loads)))
    print(f"\n## load_model, best of {repeats} (fp32 CPU, {torch.get_num_threads()} threads)")
    header = ("model", "demo load s", "file MB", "write s", "sha256 s", "file load s")
    print(" | ".join(f"{h:>14}" for h in header))
    for name, *values in rows:
        print(" | ".join([f"{name:>14}", *(f"{v:>14.2f}" for v in values)]))
    print("file load s includes the sha256 check")


def bench_tiles(models: list[str], batch: int, repeats: int) -> None:
    print(f"\n## tile encoders, fp32 CPU, {torch.get_num_threads()} threads, batch {batch}")
    print(" | ".join(f"{h:>14}" for h in ("model", "input px", "dim", "s per tile")))
    for name in models:
        role = catalog().card(name).tile_role
        if role is None:
            continue
        model = load_model(name, "demo")
        size = role.preprocess.crop
        x = torch.rand(batch, 3, size, size)
        with torch.inference_mode():
            model(x[:1])  # warm-up
            best = min(timed(lambda model=model, x=x: model(x))[0] for _ in range(repeats))
        print(" | ".join(f"{v:>14}" for v in (name, size, role.dim, f"{best / batch:.3f}")))
        del model


def slide_case(encoder: str, n: int) -> dict[str, float]:
    """One slide-encoder run in this process: load from a file, forward, memory."""
    name = SLIDE_ENCODERS[encoder].model
    with tempfile.TemporaryDirectory(prefix="bench_slide_") as tmp:
        path = Path(tmp) / REGISTRY[name].file_name
        write_checkpoint(name, path)
        gc.collect()
        feats, cells, tile_encoder = slide_input(encoder, n)
        before_load = peak_rss_gb()
        load_s, model = timed(lambda: load_model(name, path, verify_sha256=False))
        before = peak_rss_gb()
        with torch.inference_mode():
            forward_s, out = timed(lambda: model.encode_bag(feats, cells, tile_encoder))
    assert torch.isfinite(out).all()
    return {
        "load_s": load_s,
        "forward_s": forward_s,
        "peak_before_load_gb": before_load,
        "peak_before_forward_gb": before,
        "peak_gb": peak_rss_gb(),
        "dim": out.numel(),
    }


def bench_slide(encoders: list[str], tiles: list[int], threads: int) -> None:
    print(f"\n## slide encoders, fp32 CPU, {threads} threads, a fresh process per run")
    header = ("encoder", "tiles", "load s", "forward s", "peak GB", "before fwd GB", "fwd adds GB")
    print(" | ".join(f"{h:>14}" for h in header))
    for encoder in encoders:
        for n in tiles:
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--slide-case",
                    encoder,
                    str(n),
                    "--threads",
                    str(threads),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            r = json.loads(done.stdout.strip().splitlines()[-1])
            added = r["peak_gb"] - r["peak_before_forward_gb"]
            values = (r["load_s"], r["forward_s"], r["peak_gb"], r["peak_before_forward_gb"], added)
            print(" | ".join([f"{encoder:>14}", f"{n:>14}", *(f"{v:>14.2f}" for v in values)]))
    print("peak = VmHWM of the whole process (torch and eagleflow imports included)")


def bench_precision(encoders: list[str], n: int) -> None:
    print(f"\n## slide encoders: fp32 vs fp64 and bf16 autocast vs fp32 (demo weights, {n} tiles)")
    header = ("encoder", "max |32-64|", "bf16 rel. err", "max |value|")
    print(" | ".join(f"{h:>14}" for h in header))
    for encoder in encoders:
        model = load_model(SLIDE_ENCODERS[encoder].model, "demo")
        feats, cells, tile_encoder = slide_input(encoder, n, seed=1)
        with torch.inference_mode():
            single = model.encode_bag(feats, cells, tile_encoder).double()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half = model.encode_bag(feats, cells, tile_encoder).double()
            model.double()
            double = model.encode_bag(feats.double(), cells, tile_encoder)
        scale = double.abs().max().item()
        values = (
            f"{(single - double).abs().max().item():>14.2e}",
            f"{(half - single).abs().max().item() / scale:>14.4f}",
            f"{scale:>14.3f}",
        )
        print(" | ".join((f"{encoder:>14}", *values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part", choices=["all", "load", "tiles", "slide", "precision"], default="all"
    )
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--repeats", type=int, default=2, help="best of N")
    parser.add_argument("--tiles", nargs="+", type=int, default=[2000, 10000])
    parser.add_argument("--precision-tiles", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slide-case", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("eagleflow").setLevel(logging.ERROR)  # the DEMO warning, once per load
    if args.slide_case is not None:
        encoder, n = args.slide_case
        print(json.dumps(slide_case(encoder, int(n))))
        return
    encoders = [e for e, spec in SLIDE_ENCODERS.items() if spec.model in args.models]
    print(f"torch {torch.__version__}")
    if args.part in ("all", "load"):
        bench_loads(args.models, args.repeats)
    if args.part in ("all", "tiles"):
        bench_tiles(args.models, args.batch, args.repeats)
    if args.part in ("all", "slide"):
        bench_slide(encoders, args.tiles, args.threads)
    if args.part in ("all", "precision"):
        bench_precision(encoders, args.precision_tiles)


if __name__ == "__main__":
    main()
