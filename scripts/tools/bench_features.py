"""Benchmark the feature path as a user meets it: a TCGA-sized cohort, the real stages, two references.

Makes (once, cached) synthetic 40x cohorts of `--slides` slides (bench_cohort.py) in two level
geometries: *rounded* (the default and the first), W+1 x H+3 px with levels stored as
ceil(W / 4^k) like a real Aperio SVS, so OpenSlide's downsamples are fractional (3.99997), and
*exact*, `--size` px with levels of exactly W / 4^k (`--geometry` picks one or both). It runs the
real stage functions (tiling, CTransPath, CHIEF, top-k Virchow2) on the first geometry's cohort
and the reading paths on both, and prints:

1. per stage: tiles, tiles/s, wall s, share of the total, peak host memory (GPU memory and
   utilisation on CUDA), the model load times and the end-to-end s per slide;
2. per geometry, the reading paths and the whole tiling stage against two references,
   interleaved and repeated (median of `--repeat`): the *floor* (each stored JPEG tile the tiles
   touch decoded once on all cores, cut and resampled to 224 px, Canny where tiling tests) and
   the *naive* baseline (one `read_region` per tile on one thread); and how far our tiles are
   from read_region's (byte-identical on exact levels; a sub-pixel shift on rounded ones);
3. end-to-end s per slide for ours, the floor (floor reading + model forward passes alone on
   tensors in memory) and naive (naive reading, eager fp32, a model load per slide);
4. the compute table: GFLOPs per slide of EAGLE, Virchow2 on every tile and Prov-GigaPath,
   counted with torch.utils.flop_counter on the real models.

On a CPU the models are slow (CTransPath ~2-5 tiles/s, Virchow2 ~0.2 tiles/s on 2 cores), so by
default the model stages run on the first `--model-tiles` kept tiles of each slide with top-k
`--top-k`, and the end-to-end figures are extrapolated to all kept tiles and top-25 from the
measured per-tile costs; every extrapolated figure says so.

    .venv/bin/python scripts/tools/bench_features.py                  # CPU defaults, a few minutes
    .venv/bin/python scripts/tools/bench_features.py --slides 20 --device cuda --model-tiles 0
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cohort import make_cohort  # noqa: E402

from eagleflow.attention import run_chief_batch  # noqa: E402
from eagleflow.eagle import run_topk_batch  # noqa: E402
from eagleflow.features import (  # noqa: E402
    TileGeometry,
    iter_tile_batches,
    run_tile_encoder_batch,
)
from eagleflow.h5io import read_h5, write_tiles  # noqa: E402
from eagleflow.logutil import setup_logging  # noqa: E402
from eagleflow.model_stage import configure_torch, resolve_device  # noqa: E402
from eagleflow.models.loading import autocast_context, load_model  # noqa: E402
from eagleflow.models.preprocess import preprocess_tiles  # noqa: E402
from eagleflow.provenance import provenance_attrs  # noqa: E402
from eagleflow.slides import level0_tile_size, open_slide, read_tile  # noqa: E402
from eagleflow.tilereader import SlideTileReader, iter_slide_tiles  # noqa: E402
from eagleflow.tiling import (  # noqa: E402
    TileTable,
    TilingParams,
    _box_fractions,
    edge_fraction,
    grid_origins,
    iter_tiles,
    run_tiling,
    tile_slide,
)

EAGLE_TOP_K = 25
TILE_PX = 224


# --------------------------------------------------------------------------- measuring


class PeakMemory:
    """Peak resident memory of this process since the last reset (Linux VmHWM, reset by clear_refs)."""

    def reset(self) -> None:
        # not Linux or not allowed: the peak is then the one since the process started
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")

    def peak_gb(self) -> float:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class GpuSampler:
    """Mean GPU utilisation (nvidia-smi's %, via torch/pynvml) and peak allocated memory."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples = device, []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.samples.append(torch.cuda.utilization(self.device))
            except Exception:  # no pynvml: utilisation unknown
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> str:
        if self.device.type != "cuda":
            return ""
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        util = f"{statistics.mean(self.samples):.0f} %" if self.samples else "n/a"
        return f"{peak:.1f} GB, {util}"


@dataclasses.dataclass
class Stage:
    name: str
    tiles: int
    wall_s: float
    peak_gb: float
    gpu: str


def run_stage(
    name: str, tiles: int, device: torch.device, memory: PeakMemory, fn: Callable[[], Any]
) -> Stage:
    memory.reset()
    with GpuSampler(device) as gpu:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    return Stage(name, tiles, wall, memory.peak_gb(), gpu.summary())


# --------------------------------------------------------------------------- references


def floor_read(
    path: str,
    coords: np.ndarray,
    size_level0: int,
    level: int,
    threads: int,
    transform: Callable[[np.ndarray], Any] | None = None,
) -> list[Any]:
    """The decode floor: every stored JPEG tile that `coords` touch decoded once (all threads),
    then each tile cut and resampled; no lookahead limit, no checks, everything in memory."""
    import tifffile

    slide = open_slide(path)
    # the cohort's levels are 4^k-fold area averages (their sizes rounded), so level pixel i
    # holds level-0 pixels [n*i, n*i + n) with n the rounded downsample
    n = round(float(slide.level_downsamples[level]))
    side = round(size_level0 / n)
    level_w, level_h = slide.level_dimensions[level]
    with tifffile.TiffFile(path) as tif:
        page = next(p for p in tif.pages if p.is_tiled and p.imagewidth == level_w)
        tw, th = page.tilewidth, page.tilelength
        columns = -(-level_w // tw)
        offsets, counts = list(page.dataoffsets), list(page.databytecounts)
        decode, tables = page.decode, page.jpegtables
    positions = np.floor(coords / n + 0.5).astype(np.int64)
    keys = sorted(
        {
            (c, r)
            for x, y in positions.tolist()
            for r in range(y // th, min(-(-level_h // th), -(-(y + side) // th)))
            for c in range(x // tw, min(columns, -(-(x + side) // tw)))
        }
    )
    fd = os.open(path, os.O_RDONLY)

    def load(key: tuple[int, int]) -> np.ndarray:
        index = key[1] * columns + key[0]
        pixels = decode(os.pread(fd, counts[index], offsets[index]), index, jpegtables=tables)[0]
        return pixels.reshape(th, tw, -1)[..., :3]

    def cut(xy: list[int]) -> Any:
        x, y = xy
        region = np.full((side, side, 3), 255, np.uint8)
        for r in range(y // th, -(-(y + side) // th)):
            for c in range(x // tw, -(-(x + side) // tw)):
                pixels = decoded.get((c, r))
                if pixels is None:
                    continue
                x0, y0 = max(x, c * tw), max(y, r * th)
                x1 = min(x + side, c * tw + tw, level_w)
                y1 = min(y + side, r * th + th, level_h)
                if x1 > x0 and y1 > y0:
                    region[y0 - y : y1 - y, x0 - x : x1 - x] = pixels[
                        y0 - r * th : y1 - r * th, x0 - c * tw : x1 - c * tw
                    ]
        tile = cv2.resize(region, (TILE_PX, TILE_PX), interpolation=cv2.INTER_AREA)
        return tile if transform is None else transform(tile)

    try:
        with ThreadPoolExecutor(threads) as pool:
            decoded = dict(zip(keys, pool.map(load, keys), strict=True))
            return list(pool.map(cut, positions.tolist()))
    finally:
        os.close(fd)


def naive_read(
    path: str,
    coords: np.ndarray,
    size_level0: int,
    level: int,
    transform: Callable[[np.ndarray], Any] | None = None,
) -> list[Any]:
    """One read_region per tile on one thread (what the workflow did before the tile reader)."""
    slide = open_slide(path)
    ds = float(slide.level_downsamples[level])
    out = []
    for x, y in coords.tolist():
        tile = read_tile(slide, x, y, size_level0, level, ds, TILE_PX)
        out.append(tile if transform is None else transform(tile))
    return out


def forward_seconds_per_tile(
    model: torch.nn.Module, name: str, tiles: torch.Tensor, device: torch.device
) -> float:
    """Preprocessing + forward alone, on uint8 tiles already in memory."""
    with torch.inference_mode(), autocast_context(device):
        model(preprocess_tiles(name, tiles[:1], device))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(preprocess_tiles(name, tiles, device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / len(tiles)


# --------------------------------------------------------------------------- compute table


def count_gflops(model: torch.nn.Module, *inputs: Any) -> float:
    """Total GFLOPs (2 per multiply-add) of one forward, attention kernels included."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
        return sdpa_flop_count(query, key, value)  # torch counts the CUDA kernels only

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with torch.inference_mode(), counter:
        model(*inputs)
    return counter.get_total_flops() / 1e9


def _gigapath(kind: str) -> tuple[torch.nn.Module, str]:
    """The Prov-GigaPath model of the package if it is there, else timm's architecture."""
    from eagleflow.models import loading as models

    try:
        return models.build_model(f"gigapath_{kind}"), "eagleflow.models.build_model"
    except Exception:
        pass
    try:
        module = __import__(f"eagleflow.models.gigapath_{kind}", fromlist=["x"])
        return getattr(module, f"build_gigapath_{kind}")(
            device="meta"
        ), f"eagleflow.models.gigapath_{kind}"
    except Exception:
        if kind != "tile":
            raise
    import timm

    with torch.device("meta"):
        model = timm.create_model(
            "vit_giant_patch14_dinov2",
            pretrained=False,
            img_size=224,
            patch_size=16,
            embed_dim=1536,
            depth=40,
            num_heads=24,
            init_values=1e-5,
            mlp_ratio=5.33334,
            num_classes=0,
        )
    return model, "timm vit_giant_patch14_dinov2 (hub kwargs)"


def compute_table(kept: float, gigapath_tiles: float) -> list[list[str]]:
    from eagleflow.models.loading import build_model

    per_tile = {}
    ctp = build_model("ctranspath").eval()
    per_tile["ctranspath"] = count_gflops(ctp, torch.zeros(1, 3, 224, 224))
    v2 = build_model("virchow2").eval()
    per_tile["virchow2"] = count_gflops(v2, torch.zeros(1, 3, 224, 224, device="meta"))
    chief = build_model("chief").eval()
    n = max(1, round(kept))
    chief_slide = count_gflops(chief, torch.zeros(n, 768, device="meta"))
    rows = [["pipeline (per slide)", "tiles", "GFLOPs", "vs EAGLE"]]
    eagle = n * per_tile["ctranspath"] + chief_slide + EAGLE_TOP_K * per_tile["virchow2"]
    pipelines = [
        (f"EAGLE: CTransPath x {n} + CHIEF + Virchow2 x {EAGLE_TOP_K}", n + EAGLE_TOP_K, eagle),
        (f"Virchow2 on every tile (STAMP) x {n}", n, n * per_tile["virchow2"]),
    ]
    notes = [
        f"per tile: CTransPath {per_tile['ctranspath']:.2f}, Virchow2 {per_tile['virchow2']:.1f} "
        f"GFLOPs; CHIEF {chief_slide:.3f} GFLOPs per slide ({n} tiles)"
    ]
    try:
        tile_model, tile_source = _gigapath("tile")
        g_tile = count_gflops(tile_model.eval(), torch.zeros(1, 3, 224, 224, device="meta"))
        m = max(1, round(gigapath_tiles))
        g_total, slide_note = m * g_tile, "slide encoder not counted"
        try:
            # on the CPU with real (zero) inputs: the encoder's dilated segments need values
            from eagleflow.models.gigapath_slide import build as build_gigapath_slide

            slide_model, slide_source = (
                build_gigapath_slide(device="cpu"),
                "eagleflow.models.gigapath_slide",
            )
            feats = torch.zeros(m, 1536)
            side = int(np.ceil(np.sqrt(m)))
            cells = torch.arange(m)
            coords = torch.stack([cells % side, cells // side], dim=1).float() * 512
            g_slide = count_gflops(slide_model.eval(), feats, coords, 512.0)
            g_total += g_slide
            slide_note = f"slide encoder {g_slide:.1f} GFLOPs on {m} tiles ({slide_source})"
        except Exception as err:  # the slide encoder is not available or not countable
            slide_note = f"slide encoder not counted ({type(err).__name__}: {err})"[:160]
        pipelines.append((f"Prov-GigaPath tile x {m} (0.5 µm/px) + slide encoder", m, g_total))
        notes.append(
            f"Prov-GigaPath tile {g_tile:.1f} GFLOPs per tile ({tile_source}); {slide_note}"
        )
    except Exception as err:
        notes.append(f"Prov-GigaPath not counted ({type(err).__name__}: {err})"[:160])
    for name, tiles, gflops in pipelines:
        ratio = "1" if gflops == eagle else f"EAGLE is {100 * (1 - eagle / gflops):.1f} % less"
        rows.append([name, f"{tiles:,}", f"{gflops:,.0f}", ratio])
    return rows + [[note, "", "", ""] for note in notes]


# --------------------------------------------------------------------------- printing


def print_table(title: str, rows: list[list[str]]) -> None:
    widths = [
        max(len(row[i]) for row in rows if len(row) > i and row[1:] != ["", "", ""])
        for i in range(len(rows[0]))
    ]
    print(f"\n{title}")
    for i, row in enumerate(rows):
        if row[1:] and all(cell == "" for cell in row[1:]):
            print(f"  {row[0]}")
            continue
        print(
            "  "
            + "  ".join(
                cell.ljust(w) if j == 0 else cell.rjust(w)
                for j, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}"


# --------------------------------------------------------------------------- main


def cohort_paths(args: argparse.Namespace, geometry: str) -> list[str]:
    """The cached cohort of one level geometry (made on first use)."""
    width, height = args.size
    if geometry == "rounded":  # odd sizes, levels rounded up: OpenSlide's 3.99997, 15.9999, ...
        paths = make_cohort(Path(args.cache), args.slides, width + 1, height + 3, "ceil")
    else:
        paths = make_cohort(Path(args.cache), args.slides, width, height)
    return [str(p) for p in paths]


def tile_cohort(paths: list[str], tmp: Path, tag: str, threads: int) -> list[TileTable]:
    """The tiling stage as the workflow runs it: one tiles file per slide."""
    return [
        run_tiling(
            path,
            f"S{i}",
            TilingParams().as_dict(),
            None,
            str(tmp / f"{tag}S{i}.tiles.h5"),
            str(tmp / f"{tag}S{i}.png"),
            threads,
        )
        for i, path in enumerate(paths)
    ]


@dataclasses.dataclass
class Reading:
    """One geometry's reading variants: (what, whose) -> a function that runs it once."""

    geometry: str
    tables: list[TileTable]
    geometries: list[TileGeometry]
    candidates: list[np.ndarray]  # every tissue tile of each slide, in tiling's order
    variants: dict[tuple[str, str], Callable[[], Any]]


def reading_variants(
    geometry: str, paths: list[str], tables: list[TileTable], tmp: Path, tag: str, args: Any
) -> Reading:
    threads = args.threads
    geometries = [
        TileGeometry.from_tiles_file(str(tmp / f"{tag}S{i}.tiles.h5"), p)
        for i, p in enumerate(paths)
    ]
    canny = lambda tile: edge_fraction(tile, 40, 100)  # noqa: E731 - the defaults of TilingParams
    candidates = [np.concatenate([t.coords, t.rejected_coords]) for t in tables]
    candidates = [c[np.lexsort((c[:, 0], c[:, 1]))] for c in candidates]  # row-major as tiling

    def ours_edge() -> None:
        for t, coords in zip(tables, candidates, strict=True):
            tiles = iter_tiles(
                t.info.path,
                t.slide_id,
                t.info,
                coords,
                t.read_level,
                t.tile_size_level0,
                TILE_PX,
                threads,
            )
            [canny(tile) for tile in tiles]  # as tile_slide does: in this thread

    def ours_tiling() -> None:  # the whole stage without its files: mask + edge pass
        for i, path in enumerate(paths):
            tile_slide(path, f"S{i}", TilingParams(), threads=threads, progress=False)

    def ours_model() -> None:
        for _ in iter_tile_batches(geometries, args.batch_size, threads):
            pass

    def refs(
        coords_of: Callable[[int], np.ndarray], transform: Any
    ) -> dict[str, Callable[[], Any]]:
        return {
            "floor": lambda: [
                floor_read(g.slide_path, coords_of(i), g.size_level0, g.level, threads, transform)
                for i, g in enumerate(geometries)
            ],
            "naive": lambda: [
                naive_read(g.slide_path, coords_of(i), g.size_level0, g.level, transform)
                for i, g in enumerate(geometries)
            ],
        }

    edge_refs = refs(lambda i: candidates[i], canny)
    variants = {
        ("tiling", "ours"): ours_tiling,
        ("edge", "ours"): ours_edge,
        **{("edge", k): v for k, v in edge_refs.items()},
        ("read", "ours"): ours_model,
        **{("read", k): v for k, v in refs(lambda i: geometries[i].coords, None).items()},
    }
    return Reading(geometry, tables, geometries, candidates, variants)


def distance_to_read_region(reading: Reading) -> tuple[int, float, int]:
    """(max, mean abs difference, tiles) of our kept tiles against read_region's, first slide."""
    g = reading.geometries[0]
    reader = SlideTileReader(g.slide_path, g.slide_id, g.coords, g.size_level0, g.level, 0, TILE_PX)
    ours = [tile for _, _, tile in iter_slide_tiles([reader], 1)]
    naive = naive_read(g.slide_path, g.coords, g.size_level0, g.level)
    diffs = [np.abs(a.astype(np.int16) - b) for a, b in zip(ours, naive, strict=True)]
    return int(max(d.max() for d in diffs)), float(np.mean([d.mean() for d in diffs])), len(diffs)


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=20 if cuda else 2)
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=(120000, 90000),
        metavar=("W", "H"),
        help="level-0 size of the exact cohort (the rounded one is W+1 x H+3)",
    )
    parser.add_argument(
        "--geometry",
        choices=("both", "rounded", "exact"),
        default="both",
        help="level sizes: rounded like a real SVS (ceil(W / 4^k)), exact, or both (rounded first)",
    )
    parser.add_argument("--cache", default=str(REPO / "resources" / "bench"), help="slide cache")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="reader and torch threads"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--model-tiles",
        type=int,
        default=0 if cuda else 8,
        help="kept tiles per slide the model stages run on (0 = all)",
    )
    parser.add_argument("--top-k", type=int, default=EAGLE_TOP_K if cuda else 2)
    parser.add_argument(
        "--forward-tiles",
        type=int,
        default=64 if cuda else 4,
        help="tiles for the forward-only timing",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-flops", action="store_true")
    args = parser.parse_args()
    setup_logging(None, level=30)
    configure_torch(args.threads)
    device = resolve_device(args.device)
    memory = PeakMemory()
    threads = args.threads
    kinds = ["rounded", "exact"] if args.geometry == "both" else [args.geometry]

    start = time.perf_counter()
    cohorts = {kind: cohort_paths(args, kind) for kind in kinds}
    paths = cohorts[kinds[0]]
    sizes = ", ".join(f"{kind} {open_slide(c[0]).dimensions}" for kind, c in cohorts.items())
    print(
        f"cohorts: {args.slides} slides each, {sizes} px (ready in {time.perf_counter() - start:.0f} s, {args.cache})"
    )

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        tables: list[TileTable] = []
        slides: list[dict[str, str]] = []

        def tiling() -> None:
            tables.extend(tile_cohort(paths, tmp, "", threads))

        stages = [run_stage("tiling (mask + edge pass)", 0, device, memory, tiling)]
        candidates = sum(len(t.coords) + len(t.rejected_coords) for t in tables)
        kept = [len(t.coords) for t in tables]
        stages[0].tiles = candidates
        provenance = provenance_attrs("tiling_tile_slide", {})
        for i, table in enumerate(tables):
            m = args.model_tiles or len(table.coords)
            subset = dataclasses.replace(
                table,
                coords=table.coords[:m],
                tissue_fraction=table.tissue_fraction[:m],
                edge_fraction=table.edge_fraction[:m],
            )
            write_tiles(tmp / f"S{i}.model.h5", subset, provenance)
            slides.append(
                {
                    "slide_id": f"S{i}",
                    "slide_path": paths[i],
                    "tiles": str(tmp / f"S{i}.model.h5"),
                    "features": str(tmp / f"S{i}.f.h5"),
                    "attention": str(tmp / f"S{i}.a.h5"),
                    "topk": str(tmp / f"S{i}.t.h5"),
                }
            )
        model_tiles = sum(min(args.model_tiles or k, k) for k in kept)
        demo = {"weights": "demo", "sha256": None, "verify_sha256": True}
        extraction = {"device": str(device), "batch_size": args.batch_size, "num_workers": threads}
        loads = {}
        for name in ("ctranspath", "chief", "virchow2"):
            t0 = time.perf_counter()
            load_model(name, "demo", device=device)
            loads[name] = time.perf_counter() - t0
        stages.append(
            run_stage(
                "CTransPath",
                model_tiles,
                device,
                memory,
                lambda: run_tile_encoder_batch(
                    "ctranspath",
                    [{**s, "output": s["features"]} for s in slides],
                    {"ctranspath": demo},
                    extraction,
                    str(tmp / "f.tsv"),
                    threads,
                ),
            )
        )
        stages.append(
            run_stage(
                "CHIEF",
                model_tiles,
                device,
                memory,
                lambda: run_chief_batch(
                    [{**s, "output": s["attention"]} for s in slides],
                    demo,
                    str(tmp / "a.tsv"),
                    threads,
                ),
            )
        )
        eagle = {**extraction, "top_k": args.top_k, "reference_transpose": False, "batch_size": 25}
        stages.append(
            run_stage(
                f"Virchow2 top-{args.top_k}",
                0,
                device,
                memory,
                lambda: run_topk_batch(
                    "virchow2",
                    [{**s, "output": s["topk"]} for s in slides],
                    {"virchow2": demo},
                    eagle,
                    str(tmp / "t.tsv"),
                    threads,
                ),
            )
        )
        stages[-1].tiles = sum(int(read_h5(s["topk"])[1]["k_used"]) for s in slides)

        # ---- references, interleaved and repeated, for every geometry
        readings = [reading_variants(kinds[0], paths, tables, tmp, "", args)]
        for kind in kinds[1:]:
            other = tile_cohort(cohorts[kind], tmp, kind, threads)
            readings.append(reading_variants(kind, cohorts[kind], other, tmp, kind, args))
        geometries = readings[0].geometries
        variants = {(r.geometry, *key): fn for r in readings for key, fn in r.variants.items()}
        ctp = load_model("ctranspath", "demo", device=device)
        v2 = load_model("virchow2", "demo", device=device)
        chief = load_model("chief", "demo", device=device)
        sample = torch.from_numpy(
            np.stack(
                floor_read(
                    paths[0],
                    geometries[0].coords[: args.forward_tiles],
                    geometries[0].size_level0,
                    geometries[0].level,
                    threads,
                )
            )
        )
        feats = torch.zeros(max(kept), 768, device=device)
        times: dict[Any, list[float]] = {key: [] for key in variants}
        forward: dict[str, list[float]] = {"ctranspath": [], "virchow2": [], "chief": []}
        keys = list(variants)
        load_before = load()
        for r in range(args.repeat):
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:  # rotate the order each round
                t0 = time.perf_counter()
                variants[key]()
                times[key].append(time.perf_counter() - t0)
            forward["ctranspath"].append(
                forward_seconds_per_tile(ctp, "ctranspath", sample, device)
            )
            forward["virchow2"].append(
                forward_seconds_per_tile(v2, "virchow2", sample[: max(1, len(sample) // 4)], device)
            )
            with torch.inference_mode():
                t0 = time.perf_counter()
                chief(feats)
                forward["chief"].append(time.perf_counter() - t0)
        load_after = load()
        del ctp, v2, chief
        med = {key: statistics.median(v) for key, v in times.items()}
        fwd = {key: statistics.median(v) for key, v in forward.items()}
        distances = {r.geometry: distance_to_read_region(r) for r in readings}

    n = args.slides
    total = sum(s.wall_s for s in stages)
    gpu_col = device.type == "cuda"
    rows = [
        ["stage", "tiles", "tiles/s", "wall s", "share", "peak host GB"]
        + (["GPU GB, util"] if gpu_col else [])
    ]
    for s in stages:
        rows.append(
            [
                s.name,
                f"{s.tiles:,}",
                f"{s.tiles / s.wall_s:,.1f}",
                f"{s.wall_s:.1f}",
                f"{100 * s.wall_s / total:.0f} %",
                f"{s.peak_gb:.2f}",
            ]
            + ([s.gpu] if gpu_col else [])
        )
    rows.append(["total", "", "", f"{total:.1f}", "100 %", ""] + ([""] if gpu_col else []))
    subset = (
        f"; model stages on the first {args.model_tiles} kept tiles per slide"
        if args.model_tiles
        else ""
    )
    print(
        f"\nmachine: {machine()}, device {device}, {threads} threads; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(
        f"tiles per slide ({kinds[0]} levels): {candidates / n:.0f} tissue candidates, {statistics.mean(kept):.0f} kept (2 µm/px, 224 px){subset}"
    )
    print_table(
        f"1. Stages on the {kinds[0]}-level cohort (the real stage functions, demo weights; model load included in each stage)",
        rows,
    )
    print(
        f"  model load s: CTransPath {loads['ctranspath']:.2f}, CHIEF {loads['chief']:.2f}, Virchow2 {loads['virchow2']:.2f}"
    )
    print(f"  end-to-end s per slide, as run: {total / n:.1f}")

    rows = [
        [
            "levels  reading path (all slides)",
            "tiles",
            "ours s",
            "floor s",
            "naive s",
            "ours / floor",
            "naive / ours",
            "ours tiles/s",
        ]
    ]
    for r in readings:
        n_candidates = sum(len(c) for c in r.candidates)
        n_kept = sum(len(g.coords) for g in r.geometries)
        for kind, label, count, floor_kind in (
            ("tiling", "tiling stage: mask + edge pass (tile_slide)", n_candidates, "edge"),
            ("edge", "tiling edge pass: read + Canny, all tissue tiles", n_candidates, "edge"),
            ("read", "model-stage reader (iter_tile_batches), kept tiles", n_kept, "read"),
        ):
            o, f = med[(r.geometry, kind, "ours")], med[(r.geometry, floor_kind, "floor")]
            v = med.get((r.geometry, kind, "naive"))
            rows.append(
                [
                    f"{r.geometry:<7} {label}",
                    f"{count:,}",
                    f"{o:.2f}",
                    f"{f:.2f}",
                    "-" if v is None else f"{v:.2f}",
                    f"{o / f:.2f}x",
                    "-" if v is None else f"{v / o:.2f}x",
                    f"{count / o:,.0f}",
                ]
            )
    print_table(
        f"2. Reading vs the floor ({threads} threads) and naive (1 thread), median of {args.repeat}, interleaved ({load_before} before, {load_after} after)",
        rows,
    )
    print("  the tiling stage's floor is the decode floor of the tiles it tests (read + Canny)")
    for geometry, (worst, mean, count) in distances.items():
        ds = readings[[r.geometry for r in readings].index(geometry)].geometries[0].downsample
        print(
            f"  {geometry} levels (OpenSlide downsample {ds:.6g}): our tiles vs read_region's on "
            f"{count:,} kept tiles of S0: max abs diff {worst}, mean abs diff {mean:.3f} (uint8)"
        )

    k_mean = statistics.mean(kept)
    stage = {s.name.split()[0]: s for s in stages}
    topk = min(EAGLE_TOP_K, k_mean)
    g0 = kinds[0]
    read_kept = {w: med[(g0, "read", w)] / n for w in ("ours", "floor", "naive")}
    edge = {w: med[(g0, "edge", w)] / n for w in ("ours", "floor", "naive")}
    mask_s = stage["tiling"].wall_s / n - edge["ours"]  # thumbnail + tissue mask, as run
    # The same forward-only cost for all three (it is 95+ % of a CPU run and the noisiest part,
    # so the rows differ by what they do differently: reading, loads, fp32 vs autocast on GPU).
    forward = k_mean * fwd["ctranspath"] + fwd["chief"] + topk * fwd["virchow2"]
    ours = (
        stage["tiling"].wall_s / n
        + sum(loads.values()) / n
        + read_kept["ours"] * (1 + topk / k_mean)
        + forward
    )
    floor = mask_s + edge["floor"] + read_kept["floor"] * (1 + topk / k_mean) + forward
    naive = (
        mask_s
        + edge["naive"]
        + sum(loads.values())
        + read_kept["naive"] * (1 + topk / k_mean)
        + forward
    )
    rows = [["end-to-end s per slide", "s", "vs ours"]]
    rows += [
        ["ours (tiling + reader measured, loads amortized)", f"{ours:.1f}", "1"],
        ["floor (floor reading + forward passes alone)", f"{floor:.1f}", f"{floor / ours:.2f}x"],
        [
            "naive (read_region per tile, fp32, a model load per slide)",
            f"{naive:.1f}",
            f"{naive / ours:.2f}x",
        ],
    ]
    how = (
        "forward passes extrapolated from measured per-tile costs"
        if args.model_tiles or args.top_k != EAGLE_TOP_K
        else "measured per-tile costs"
    )
    print_table(
        f"3. End to end per slide, all {k_mean:.0f} kept tiles and top-{EAGLE_TOP_K} ({how})", rows
    )
    print(
        f"  forward only, s per tile: CTransPath {fwd['ctranspath']:.3f}, Virchow2 {fwd['virchow2']:.3f}; CHIEF s per slide {fwd['chief']:.4f}"
    )

    if not args.skip_flops:
        size05 = level0_tile_size(tables[0].info.mpp, 256, 0.5)
        giga = []
        for t in tables:
            xs, ys = grid_origins(t.info.width, t.info.height, size05, "drop")
            giga.append(
                int(
                    (
                        _box_fractions(t.mask, xs, ys, size05, t.mask_scale)
                        >= t.params.min_tissue_fraction
                    ).sum()
                )
            )
        print_table(
            f"4. Compute per slide (torch.utils.flop_counter; {k_mean:.0f} kept tiles at 2 µm/px, {statistics.mean(giga):.0f} tissue tiles of 256 px at 0.5 µm/px)",
            compute_table(k_mean, statistics.mean(giga)),
        )


if __name__ == "__main__":
    main()
