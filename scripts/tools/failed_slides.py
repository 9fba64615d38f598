"""List the slides whose tiling failed (with the reason from their log) and write a sheet without them.

    .venv/bin/python scripts/tools/failed_slides.py [--configfile config/config.yaml] [--write-sheet OUT]

Prints a count per status, then one line per failed slide (its job logged why: the slide itself
is unusable) and per unfinished one (a log but no reason: killed, cancelled or still running;
rerun those). --write-sheet drops only the failed ones. Exit status 0 when every slide is tiled.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import yaml

# Run as a file (python scripts/tools/failed_slides.py): the package lives in scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eagleflow.failures import tiling_status, write_sheet_without


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configfile",
        type=Path,
        default=Path("config/config.yaml"),
        help="the run's config (names the slide sheet, relative to --directory)",
    )
    parser.add_argument("--directory", type=Path, default=Path("."), help="the run's directory")
    parser.add_argument(
        "--write-sheet", type=Path, help="write the slide sheet without the failed slides here"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.configfile.is_file():
        sys.exit(f"config file {args.configfile} not found; pass the run's --configfile")
    config = yaml.safe_load(args.configfile.read_text(encoding="utf-8"))
    sheet = args.directory / config["slide_sheet"]
    statuses = tiling_status(sheet, args.directory)
    counts = Counter(s.status for s in statuses)
    print(f"{sheet}: {len(statuses)} slides; " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    failed = [s for s in statuses if s.status == "failed"]
    for status in statuses:
        if status.status in ("failed", "unfinished"):
            print(f"{status.status}\t{status.slide_id}\t{status.message}")
    if args.write_sheet:
        kept = write_sheet_without(sheet, {s.slide_id for s in failed}, args.write_sheet)
        print(f"wrote {args.write_sheet}: {kept} slides (the {len(failed)} failed ones removed)")
        still = {s.patient for s in statuses if s.status != "failed"}
        orphans = sorted({s.patient for s in failed} - still)
        if orphans:
            print(
                f"{len(orphans)} patient(s) have no slide left ({', '.join(orphans[:10])}"
                f"{' ...' if len(orphans) > 10 else ''}): remove them from the clinical table or "
                "set sheets.allow_patients_without_slides: true"
            )
    return 0 if counts["tiled"] == len(statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
