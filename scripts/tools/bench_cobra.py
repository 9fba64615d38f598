"""Time and memory of the COBRA slide encoders on CPU (ad hoc, not a test).

    PYTHONPATH=scripts python scripts/tools/bench_cobra.py [--tiles 2000 10000] [--threads 2]

Prints: build + load time from a fabricated full-size file on disk (COBRA-II's training container,
COBRA-I's bare state dict), then per variant and bag size, in a fresh process each, the seconds
(and CPU seconds, all threads) of one `encode_bag` (fp32, demo weights, random Virchow2-sized features) and the peak resident
memory of that process; then max |fp32 - fp64| and max |bf16 autocast - fp32| of the embedding.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from eagleflow.models import cobra
from eagleflow.models.checkpoints import load_state_dict_exact, read_checkpoint


def demo_model(name: str, dtype: torch.dtype = torch.float32) -> cobra.Cobra:
    model = cobra.build("meta", name)
    load_state_dict_exact(model, cobra.demo_state_dict(model, 0), name, None)
    return model.to(dtype).eval()


def features(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1280, generator=torch.Generator().manual_seed(seed))


def one_run(name: str, tiles: int, threads: int) -> dict:
    """In this (fresh) process: one encode_bag; seconds and peak RSS."""
    torch.set_num_threads(threads)
    model = demo_model(name)
    feats = features(tiles)
    cells = torch.zeros(tiles, 2, dtype=torch.int64)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    began, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        model.encode_bag(feats, cells, "virchow2")
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # cpu_seconds: all threads' CPU time, a guide to the cost on a machine nobody else uses
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": peak, "rss_before_mib": before}


def load_time(name: str, directory: Path) -> float:
    """Seconds to read, convert and strictly load a full-size file with random values."""
    model = cobra.build(None, name)
    state_dict = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    if name == "cobra":
        inner = {f"module.base_enc.{k}": v.clone() for k, v in state_dict.items()}
        inner |= {f"module.momentum_enc.{k}": v for k, v in state_dict.items()}
        checkpoint = {"epoch": 1, "state_dict": inner, "optimizer": {}, "scaler": {}}
    else:
        checkpoint = state_dict
    path = directory / f"{name}.pth"
    torch.save(checkpoint, path)
    began = time.perf_counter()
    model = cobra.build("meta", name)
    prepared = cobra.prepare_state_dict(read_checkpoint(path, name), path, name)
    load_state_dict_exact(model, prepared, name, path)
    model.eval()
    return time.perf_counter() - began


def precision(name: str, tiles: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    feats = features(tiles, seed=1)
    cells = torch.zeros(tiles, 2, dtype=torch.int64)
    with torch.inference_mode():
        fp64 = demo_model(name, torch.float64).encode_bag(feats.double(), cells, "virchow2")
        model = demo_model(name)
        fp32 = model.encode_bag(feats, cells, "virchow2")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model.encode_bag(feats, cells, "virchow2")
    scale = fp64.abs().max().item()
    return {
        "max_abs_embedding": scale,
        "fp32_vs_fp64": (fp32.double() - fp64).abs().max().item(),
        "bf16_vs_fp32_relative": (bf16 - fp32).abs().max().item() / scale,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--names", nargs="+", default=list(cobra.VARIANTS))
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # NAME TILES, in the child
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one[0], int(args.one[1]), args.threads)))
        return
    with tempfile.TemporaryDirectory() as directory:
        for name in args.names:
            print(f"{name}: build + load {load_time(name, Path(directory)):.2f} s")
    for name in args.names:
        for tiles in args.tiles:
            child = [sys.executable, __file__, "--one", name, str(tiles)]
            out = subprocess.run(
                [*child, "--threads", str(args.threads)], capture_output=True, text=True, check=True
            )
            print(f"{name} {tiles} tiles: {out.stdout.strip()}")
        print(
            f"{name} precision at {args.tiles[0]} tiles: {precision(name, args.tiles[0], args.threads)}"
        )


if __name__ == "__main__":
    main()
