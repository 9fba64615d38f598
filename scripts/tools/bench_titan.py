"""Benchmark TITAN and CONCH v1.5 on CPU: load time, speed, peak host memory, rounding.

Each measurement runs in a fresh process (peak RSS from ru_maxrss), fp32, torch.set_num_threads(2):

- load: build on meta + read + prepare + strict load of a full-size fabricated checkpoint written
  in the published container (TITAN: safetensors with a stand-in text tower; CONCH v1.5: a torch
  state dict), in a temporary directory removed afterwards;
- titan N: one `encode_bag` of N CONCH-like features on a blob of tissue cells with holes;
- conch: seconds per tile at batch 8 (448 px);
- fp64: max |fp32 - fp64| of TITAN (2,000 tiles) and CONCH v1.5 (batch 2), demo weights.

    .venv/bin/python scripts/tools/bench_titan.py                     # everything
    .venv/bin/python scripts/tools/bench_titan.py --parts titan --tiles 2000 10000
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

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from eagleflow.models import conch_v15, titan  # noqa: E402
from eagleflow.models.checkpoints import (  # noqa: E402
    demo_seed,
    load_state_dict_exact,
    random_state_dict,
    read_checkpoint,
)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def demo(module, name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = module.build("meta")
    make = getattr(module, "demo_state_dict", random_state_dict)
    load_state_dict_exact(model, make(model, demo_seed(name)), name, None)
    return model.to(dtype).eval()


def tissue(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n features ~N(0, 1) on n distinct cells of a square blob with ~25 % holes."""
    gen = torch.Generator().manual_seed(seed)
    side = int((n / 0.75) ** 0.5) + 1
    index = torch.randperm(side * side, generator=gen)[:n]
    cells = torch.stack([index % side, index // side], 1)
    return torch.randn(n, titan.IN_DIM, generator=gen), cells


def run_load(name: str) -> dict:
    module = {"titan": titan, "conch_v15": conch_v15}[name]
    model = module.build("meta")
    state = random_state_dict(model, 0)
    with tempfile.TemporaryDirectory() as tmp:
        if name == "titan":
            from safetensors.torch import save_file

            path = Path(tmp) / "model.safetensors"
            text = {f"text_encoder.layer.{i}.weight": torch.zeros(768, 768) for i in range(4)}
            save_file({**{titan.published_key(k): v for k, v in state.items()}, **text}, path)
        else:
            path = Path(tmp) / "pytorch_model_vision.bin"
            torch.save(state, path)
        del state
        start = time.perf_counter()
        model = module.build("meta")
        sd = module.prepare_state_dict(read_checkpoint(path, name), path)
        load_state_dict_exact(model, sd, name, path, getattr(module, "published_key", None))
        model.eval()
        seconds = time.perf_counter() - start
    return {"part": f"load {name}", "seconds": round(seconds, 2), "peak_rss_gb": peak_rss_gb()}


def run_titan(n: int) -> dict:
    model = demo(titan, "titan")
    feats, cells = tissue(n)
    before = peak_rss_gb()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.encode_bag(feats, cells, "conch_v15")
        seconds = time.perf_counter() - start
    assert out.shape == (768,) and torch.isfinite(out).all()
    return {
        "part": f"titan {n} tiles",
        "seconds": round(seconds, 2),
        "peak_rss_gb_before": round(before, 3),
        "peak_rss_gb": round(peak_rss_gb(), 3),
    }


def run_conch(batch: int = 8) -> dict:
    model = demo(conch_v15, "conch_v15")
    x = torch.randn(batch, 3, conch_v15.INPUT_SIZE, conch_v15.INPUT_SIZE)
    with torch.inference_mode():
        model(x[:1])  # warm-up
        start = time.perf_counter()
        out = model(x)
        seconds = time.perf_counter() - start
    assert out.shape == (batch, 768)
    return {
        "part": f"conch_v15 batch {batch}",
        "s_per_tile": round(seconds / batch, 2),
        "peak_rss_gb": round(peak_rss_gb(), 3),
    }


def run_fp64(name: str) -> dict:
    module = {"titan": titan, "conch_v15": conch_v15}[name]
    low, high = demo(module, name), demo(module, name, torch.float64)
    with torch.inference_mode():
        if name == "titan":
            feats, cells = tissue(2000, seed=1)
            a, b = low.encode_bag(feats, cells), high.encode_bag(feats.double(), cells)
        else:
            x = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(1))
            a, b = low(x), high(x.double())
    return {
        "part": f"fp64 {name}",
        "max_abs_fp32_minus_fp64": float((a.double() - b).abs().max()),
        "max_abs_value": float(b.abs().max()),
    }


def child(argv: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", *argv],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["load", "titan", "conch", "fp64"])
    parser.add_argument("--tiles", nargs="+", type=int, default=[2000, 10000])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.child:
        kind, *rest = args.child
        result = {
            "load": lambda: run_load(rest[0]),
            "titan": lambda: run_titan(int(rest[0])),
            "conch": run_conch,
            "fp64": lambda: run_fp64(rest[0]),
        }[kind]()
        print(json.dumps(result))
        return
    print("load:", os.getloadavg())
    jobs = []
    if "load" in args.parts:
        jobs += [["load", "titan"], ["load", "conch_v15"]]
    if "titan" in args.parts:
        jobs += [["titan", str(n)] for n in args.tiles]
    if "conch" in args.parts:
        jobs.append(["conch"])
    if "fp64" in args.parts:
        jobs += [["fp64", "titan"], ["fp64", "conch_v15"]]
    for job in jobs:
        print(json.dumps(child(job)), "| load", tuple(round(x, 1) for x in os.getloadavg()))


if __name__ == "__main__":
    main()
