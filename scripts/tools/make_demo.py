"""Generate the synthetic demo cohort (slides, sheets, masks, manifest and hostile inputs).

    python scripts/tools/make_demo.py --out resources/demo [--seed 0]

Idempotent: slides whose file still matches the manifest's sha256 for the same seed and
generator version are kept untouched, and files whose bytes would not change are not rewritten,
so a second run does nothing (and Snakemake sees no newer inputs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Run as a file (python scripts/tools/make_demo.py): the package lives in scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eagleflow.demo import make_demo_cohort


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("resources/demo"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--size-scale",
        type=float,
        default=1.0,
        help="shrink every slide's area by this factor per side (tests; default 1)",
    )
    parser.add_argument("--no-hostile", action="store_true", help="skip out/hostile/")
    parser.add_argument(
        "--force", action="store_true", help="re-render every slide (unchanged bytes still kept)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the generator and print one line per slide."""
    args = parse_args(argv)
    if not 0 < args.size_scale <= 4:
        print("--size-scale must be in (0, 4]", file=sys.stderr)
        return 2
    start = time.perf_counter()
    cohort = make_demo_cohort(
        args.out,
        seed=args.seed,
        size_scale=args.size_scale,
        hostile=not args.no_hostile,
        force=args.force,
    )
    for s in cohort.slides:
        state = "written" if s.slide in cohort.regenerated else "up to date"
        print(
            f"{s.slide:18s} {s.cohort:9s} {s.subtype} G{s.grade} {s.mpp:g} µm/px "
            f"{s.width}x{s.height} levels={s.level_count} {state}"
        )
    print(
        f"{len(cohort.slides)} slides ({len(cohort.regenerated)} written) in {cohort.out_dir} "
        f"in {time.perf_counter() - start:.1f} s; sheets: {cohort.slides_csv.name}, "
        f"{cohort.clinical_csv.name}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
