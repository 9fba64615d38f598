"""Benchmark the feature stages on a set of slides: reading, models, end to end per slide.

Prints tiles/s of reading+decoding, of CTransPath and Virchow2 (compute only, on tiles already in
memory), CHIEF time per slide, model load times, and the end-to-end seconds per slide of the real
stage functions (tiling, CTransPath, CHIEF, top-k Virchow2) amortized over the set.

    .venv/bin/python scripts/bench_features.py --sheet resources/demo/slides.csv --device cpu
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from eagleflow.attention import run_chief_batch
from eagleflow.eagle import run_virchow2_batch
from eagleflow.features import (
    TileGeometry,
    configure_torch,
    iter_tile_batches,
    resolve_device,
    run_ctranspath_batch,
)
from eagleflow.h5io import read_h5
from eagleflow.logutil import setup_logging
from eagleflow.models import autocast_context, load_model, preprocess_tiles
from eagleflow.sheets import read_slide_sheet
from eagleflow.tiling import TilingParams, run_tiling


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(sync_device: torch.device, fn, *args, **kwargs):
    sync(sync_device)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    sync(sync_device)
    return result, time.perf_counter() - start


def compute_rate(model, name: str, tiles: torch.Tensor, device: torch.device, batch: int) -> float:
    """Tiles/s of preprocessing + forward on uint8 tiles already in memory."""
    with torch.inference_mode(), autocast_context(device):
        model(preprocess_tiles(name, tiles[:batch], device))  # warm-up
        sync(device)
        start = time.perf_counter()
        for i in range(0, len(tiles), batch):
            model(preprocess_tiles(name, tiles[i : i + batch], device))
        sync(device)
    return len(tiles) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sheet", default="resources/demo/slides.csv")
    parser.add_argument("--limit", type=int, default=0, help="first N slides only (0 = all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=2, help="tile-reading worker processes")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=25)
    parser.add_argument(
        "--compute-tiles", type=int, default=64, help="tiles for compute-only rates"
    )
    args = parser.parse_args()
    setup_logging(None, level=30)
    configure_torch(args.threads)
    device = resolve_device(args.device)
    sheet = read_slide_sheet(args.sheet)
    if args.limit:
        sheet = sheet.iloc[: args.limit]
    demo = {"weights": "demo", "sha256": None, "verify_sha256": True}
    extraction = {"device": str(device), "batch_size": args.batch_size, "num_workers": args.workers}
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        slides = []
        start = time.perf_counter()
        for slide_id, row in sheet.iterrows():
            tiles = tmp / "tiles" / f"{slide_id}.h5"
            run_tiling(
                row.PATH,
                slide_id,
                TilingParams().as_dict(),
                None,
                str(tiles),
                str(tmp / "q.png"),
                args.threads,
            )
            slides.append(
                {
                    "slide_id": slide_id,
                    "slide_path": row.PATH,
                    "tiles": str(tiles),
                    "features": str(tmp / "f" / f"{slide_id}.h5"),
                    "attention": str(tmp / "a" / f"{slide_id}.h5"),
                    "topk": str(tmp / "t" / f"{slide_id}.h5"),
                }
            )
        t_tiling = time.perf_counter() - start
        geometries = [TileGeometry.from_tiles_file(s["tiles"], s["slide_path"]) for s in slides]
        n_tiles = sum(len(g.coords) for g in geometries)
        start = time.perf_counter()
        kept: list[torch.Tensor] = []
        for _, _, batch in iter_tile_batches(geometries, args.batch_size, args.workers):
            if sum(len(k) for k in kept) < args.compute_tiles:
                kept.append(batch)
        read_rate = n_tiles / (time.perf_counter() - start)
        sample = torch.cat(kept)[: args.compute_tiles]

        loads = {}
        models = {}
        for name in ("ctranspath", "chief", "virchow2"):
            models[name], loads[name] = timed(device, load_model, name, "demo", device=device)
        ctp_rate = compute_rate(models["ctranspath"], "ctranspath", sample, device, args.batch_size)
        v2_rate = compute_rate(
            models["virchow2"], "virchow2", sample[: min(len(sample), 50)], device, 25
        )
        feats = torch.from_numpy(
            np.random.default_rng(0).normal(size=(2000, 768)).astype(np.float32)
        )
        with torch.inference_mode():
            _, chief_time = timed(device, models["chief"], feats.to(device))
        del models

        start = time.perf_counter()
        run_ctranspath_batch(
            [{**s, "output": s["features"]} for s in slides],
            demo,
            extraction,
            str(tmp / "f.tsv"),
            args.threads,
        )
        t_ctp = time.perf_counter() - start
        start = time.perf_counter()
        run_chief_batch(
            [{**s, "output": s["attention"]} for s in slides],
            demo,
            str(tmp / "a.tsv"),
            args.threads,
        )
        t_chief = time.perf_counter() - start
        eagle = {**extraction, "top_k": args.top_k, "reference_transpose": False, "batch_size": 25}
        start = time.perf_counter()
        run_virchow2_batch(
            [{**s, "output": s["topk"]} for s in slides],
            demo,
            eagle,
            str(tmp / "t.tsv"),
            args.threads,
        )
        t_v2 = time.perf_counter() - start
        k_total = sum(int(read_h5(s["topk"])[1]["k_used"]) for s in slides)

    n = len(slides)
    rows += [
        (
            "device",
            f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{args.threads} CPU threads'})",
        ),
        ("slides / tiles / top-k tiles", f"{n} / {n_tiles} / {k_total}"),
        ("read+decode tiles/s", f"{read_rate:.1f} ({args.workers} workers)"),
        ("CTransPath tiles/s (compute only)", f"{ctp_rate:.1f}"),
        ("Virchow2 tiles/s (compute only)", f"{v2_rate:.2f}"),
        ("CHIEF s per 2,000-tile slide", f"{chief_time:.4f}"),
        (
            "load s: ctranspath / chief / virchow2",
            f"{loads['ctranspath']:.2f} / {loads['chief']:.2f} / {loads['virchow2']:.2f} (demo weights)",
        ),
        (
            "stage s: tiling / CTransPath / CHIEF / Virchow2",
            f"{t_tiling:.1f} / {t_ctp:.1f} / {t_chief:.1f} / {t_v2:.1f}",
        ),
        ("end-to-end s per slide (amortized)", f"{(t_tiling + t_ctp + t_chief + t_v2) / n:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
