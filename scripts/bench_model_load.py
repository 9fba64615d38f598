"""Benchmark: how long `eagleflow.models.load_model` takes per model, demo vs. a full-size file.

The checkpoint files are fabricated from the published key lists (tests/data/checkpoint_keys)
in a temporary directory, in the published container and layout, and removed afterwards.
Usage: python scripts/bench_model_load.py [--models ctranspath chief virchow2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))  # model_fixtures: fabricates checkpoints from key lists

from model_fixtures import fabricate_state_dict, load_key_spec, save_checkpoint  # noqa: E402

from eagleflow.models import MODEL_NAMES, load_model, sha256_file  # noqa: E402


def _timed(fn) -> tuple[float, object]:
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _first_forward(name: str, model: torch.nn.Module) -> float:
    x = torch.randn(8, 768) if name == "chief" else torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        seconds, _ = _timed(lambda: model(x))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--repeats", type=int, default=2, help="best of N loads")
    args = parser.parse_args()
    logging.getLogger("eagleflow").setLevel(logging.ERROR)  # the DEMO warning, once per load

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_model_load_") as tmp:
        for name in args.models:
            spec = load_key_spec(name)
            demo = []
            for _ in range(args.repeats):
                seconds, model = _timed(lambda name=name: load_model(name, "demo"))
                demo.append(seconds)
            demo_forward = _first_forward(name, model)
            del model

            path = Path(tmp) / f"{name}.pth"
            write_s, _ = _timed(
                lambda spec=spec, path=path: save_checkpoint(spec, fabricate_state_dict(spec), path)
            )
            hash_s, digest = _timed(lambda path=path: sha256_file(path))
            loads = []
            for _ in range(args.repeats):
                seconds, model = _timed(
                    lambda name=name, path=path, digest=digest: load_model(
                        name, path, expected_sha256=digest
                    )
                )
                loads.append(seconds)
            file_forward = _first_forward(name, model)
            del model
            size_mb = path.stat().st_size / 2**20
            path.unlink()
            rows.append(
                (name, min(demo), demo_forward, size_mb, write_s, hash_s, min(loads), file_forward)
            )

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU")
    header = (
        "model", "demo load s", "1st fwd s", "file MB", "fabricate s", "sha256 s",
        "file load s", "1st fwd s",
    )  # fmt: skip
    print(" | ".join(f"{h:>11}" for h in header))
    for row in rows:
        name, *values = row
        print(" | ".join([f"{name:>11}", *(f"{v:>11.2f}" for v in values)]))
    print("file load s includes the sha256 check; 1st fwd: batch 1 (CHIEF: 8 tiles)")


if __name__ == "__main__":
    main()
