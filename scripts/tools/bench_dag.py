"""Benchmark planning: wall time and peak memory of `snakemake -n` for N-slide cohorts.

Each cohort is one tiny real slide linked N times (N/2 patients, two cohorts), so the sheet
validation, the weight check and the DAG are the real ones; nothing is computed.

    .venv/bin/python scripts/tools/bench_dag.py --sizes 1000 10000 50000 --repeat 3
    .venv/bin/python scripts/tools/bench_dag.py --sizes 10000 --extra-encoders gigapath_tile pathoduet
    .venv/bin/python scripts/tools/bench_dag.py --sizes 10000 --overlay config/paper.yaml
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

# Run as a file (python scripts/tools/bench_dag.py): the package lives in scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
REPO = Path(__file__).resolve().parents[2]


def make_cohort(
    root: Path, n_slides: int, slides_per_batch: int, extra_encoders: list[str]
) -> Path:
    """A working directory with an N-slide sheet, a clinical table and a config."""
    from eagleflow.demo import write_pyramid_tiff

    slides_dir = root / "slides"
    slides_dir.mkdir(parents=True)
    image = np.full((1024, 1024, 3), 230, dtype=np.uint8)
    source = slides_dir / "tiny.tif"
    write_pyramid_tiff(source, image, 0.5, "generic-tiff", downsamples=[1, 4, 16])
    patients = [f"P{i // 2:06d}" for i in range(n_slides)]
    lines = ["PATIENT,SLIDE,PATH,COHORT"]
    for i, patient in enumerate(patients):
        link = slides_dir / f"S{i:06d}.tif"
        os.symlink(source.name, link)
        lines.append(f"{patient},S{i:06d},slides/{link.name},{'DEMO-INT' if i % 5 else 'DEMO-EXT'}")
    (root / "slides.csv").write_text("\n".join(lines) + "\n")
    unique = sorted(set(patients))
    labels = [f"{p},{'AB'[j % 2]},{1 + j % 3}" for j, p in enumerate(unique)]  # the demo's tasks
    (root / "clinical.csv").write_text("PATIENT,SUBTYPE,GRADE\n" + "\n".join(labels) + "\n")
    config = (REPO / "config" / "config.yaml").read_text()
    config = config.replace("resources/demo/slides.csv", str(root / "slides.csv"))
    config = config.replace("resources/demo/clinical.csv", str(root / "clinical.csv"))
    config = config.replace("n_batches: 4", f"n_batches: {max(1, n_slides // slides_per_batch)}")
    if extra_encoders:  # each at its reference grid, with demo weights
        import yaml

        from eagleflow.encoders import TILE_ENCODERS

        data = yaml.safe_load(config)
        for name in extra_encoders:
            data["tile_encoders"][name] = {}
            for model in TILE_ENCODERS[name].models_for(["HE"]):
                data["models"][model] = {"weights": "demo"}
        config = yaml.safe_dump(data)
    (root / "config.yaml").write_text(config)
    return root


def measure(workdir: Path, overlay: Path | None = None) -> tuple[float, float, str]:
    """Wall seconds and peak RSS (GB, whole process tree) of a dry run; the job stats line."""
    command = [
        str(Path(sys.executable).parent / "snakemake"),
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        *([str(overlay.resolve())] if overlay else []),
        "-n",
    ]
    log_path = workdir / "dry-run.log"  # a file, not a pipe: 10,000 job listings fill a pipe
    log = log_path.open("w")
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    peak = 0
    handle = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            tree = [handle, *handle.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - start
    log.close()
    output = log_path.read_text()
    if process.returncode != 0:
        raise SystemExit(f"dry run failed:\n{output[-3000:]}")
    total = next((line for line in output.splitlines() if line.startswith("total")), "total ?")
    return wall, peak / 1e9, total.split()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--slides-per-batch", type=int, default=100)
    parser.add_argument(
        "--repeat", type=int, default=3, help="dry runs per size; the median and range are printed"
    )
    parser.add_argument(
        "--extra-encoders",
        nargs="*",
        default=[],
        help="tile encoders run on every tile besides CTransPath (e.g. gigapath_tile pathoduet)",
    )
    parser.add_argument(
        "--overlay", type=Path, help="a config read on top (e.g. config/paper.yaml, the paper grid)"
    )
    args = parser.parse_args()
    extra = f", extra tile encoders: {' '.join(args.extra_encoders)}" if args.extra_encoders else ""
    extra += f", overlay {args.overlay}" if args.overlay else ""
    print(f"snakemake -n, {args.repeat} run(s) per size, {os.cpu_count()} CPU(s){extra}")
    print(f"{'slides':>8} {'jobs':>8} {'median s':>9} {'min-max s':>11} {'peak GB':>8}")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = make_cohort(Path(tmp), size, args.slides_per_batch, args.extra_encoders)
            runs = [measure(workdir, args.overlay) for _ in range(args.repeat)]
        walls = [wall for wall, _, _ in runs]
        spread = f"{min(walls):.1f}-{max(walls):.1f}"
        peak = max(peak for _, peak, _ in runs)
        print(
            f"{size:>8} {runs[0][2]:>8} {statistics.median(walls):>9.1f} {spread:>11} {peak:>8.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
