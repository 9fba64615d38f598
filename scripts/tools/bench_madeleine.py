"""Benchmark MADELEINE and its tile encoder CONCH v1 on CPU (fp32 unless stated).

1. Load time of each from a full-size checkpoint written in the published container (seeded demo
   values; CONCH v1 with its text side added), through `load_model`, sha256 included.
2. MADELEINE `encode_bag` at 2,000 and 10,000 tiles, each in a fresh process: wall time and peak
   host memory (VmHWM, which includes the interpreter, torch and timm: ~0.7 GB).
3. CONCH v1 seconds per tile at batch 8 (after one warm-up batch).
4. max |fp32 - fp64| and max |bf16 autocast - fp32| / max |fp32| of each on the same input.

    .venv/bin/python scripts/tools/bench_madeleine.py            # ~2 min on 2 cores
    .venv/bin/python scripts/tools/bench_madeleine.py --tiles 2000 10000 --threads 2
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

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from eagleflow.models import conch_v1, madeleine  # noqa: E402
from eagleflow.models.checkpoints import demo_seed, load_state_dict_exact  # noqa: E402
from eagleflow.models.loading import load_model  # noqa: E402


def peak_rss_gb() -> float:
    """This process's peak resident memory: VmHWM, which exec resets (ru_maxrss inherits the
    parent's peak through fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def demo(module, name: str, **overrides) -> torch.nn.Module:
    model = module.build("meta", **overrides)
    load_state_dict_exact(model, module.demo_state_dict(model, demo_seed(name)), name, None)
    return model.eval()


def bag(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(512, generator=gen) + torch.randn(n, 512, generator=gen)


def load_times(directory: Path) -> dict[str, float]:
    out = {}
    sd = {"module." + k: v for k, v in demo(madeleine, "madeleine").state_dict().items()}
    torch.save(sd, directory / "model.pt")
    vision = demo(conch_v1, "conch_v1", img_size=conch_v1.PUBLISHED_SIZE).state_dict()
    sd = {conch_v1.published_key(k): v for k, v in vision.items()}
    sd["text.token_embedding.weight"] = torch.zeros(32007, 768)
    sd["logit_scale"] = torch.tensor(1.0)
    torch.save(sd, directory / "pytorch_model.bin")
    for name, file in (("madeleine", "model.pt"), ("conch_v1", "pytorch_model.bin")):
        start = time.perf_counter()
        load_model(name, directory / file, verify_sha256=False)
        out[name] = time.perf_counter() - start
    return out


def encode_once(tiles: int, threads: int) -> dict[str, float]:
    """In this (fresh) process: one encode_bag of `tiles` tiles."""
    torch.set_num_threads(threads)
    model = demo(madeleine, "madeleine")
    x = bag(tiles)
    cells = torch.zeros(tiles, 2, dtype=torch.int64)
    before = peak_rss_gb()
    start = time.perf_counter()
    with torch.inference_mode():
        model.encode_bag(x, cells, "conch_v1")
    return {
        "tiles": tiles,
        "seconds": time.perf_counter() - start,
        "peak_rss_gb_before": before,
        "peak_rss_gb": peak_rss_gb(),
    }


def precision(threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    out = {}
    slide = demo(madeleine, "madeleine")
    x = bag(10_000, seed=1)
    cells = torch.zeros(len(x), 2, dtype=torch.int64)
    with torch.inference_mode():
        fp32 = slide.encode_bag(x, cells, "conch_v1")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = slide.encode_bag(x, cells, "conch_v1").float()
        fp64 = slide.double().encode_bag(x, cells, "conch_v1")
    out["madeleine_fp32_vs_fp64"] = (fp32.double() - fp64).abs().max().item()
    out["madeleine_bf16_rel"] = ((bf16 - fp32).abs().max() / fp32.abs().max()).item()
    tile = demo(conch_v1, "conch_v1")
    images = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        tile(images)  # warm-up
        start = time.perf_counter()
        fp32 = tile(images)
        out["conch_v1_s_per_tile_batch8"] = (time.perf_counter() - start) / len(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = tile(images).float()
        fp64 = tile.double()(images[:2].double())
    out["conch_v1_fp32_vs_fp64"] = (fp32[:2].double() - fp64).abs().max().item()
    out["conch_v1_bf16_rel"] = ((bf16 - fp32).abs().max() / fp32.abs().max()).item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(encode_once(args.child, args.threads)))
        return
    torch.set_num_threads(args.threads)
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory() as tmp:
        print("load seconds:", json.dumps(load_times(Path(tmp))))
    for tiles in args.tiles:
        cmd = [sys.executable, __file__, "--child", str(tiles), "--threads", str(args.threads)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        print("madeleine encode_bag:", result.stdout.strip().splitlines()[-1])
    print("precision:", json.dumps(precision(args.threads)))
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
