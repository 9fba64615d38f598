"""Which slides failed tiling and why, and a slide sheet without them.

A slide that cannot be tiled fails its own job; with `--keep-going` every other slide is tiled,
but the model stages of that slide's batch wait for it. At scale the way through is to tile
first, then take the failed slides out (or fix them) before the GPU stages run.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from eagleflow.logutil import STOPPED_PREFIX
from eagleflow.sheets import read_slide_sheet, read_table, table_separator

# "2026-11-23 09:19:58 ERROR eagleflow: slide 'X' (...): ..." -> the part after the logger name
_ERROR_LINE = re.compile(r"^\S+ \S+ ERROR [\w.]+: (?P<message>.*)$")


@dataclass(frozen=True)
class SlideStatus:
    slide_id: str
    patient: str
    # "tiled"; "failed" (the job logged why); "unfinished" (a log but no reason: killed, e.g. out
    # of memory, stopped by a time limit, or still running); "not run" (no log yet)
    status: str
    message: str


def tiling_status(
    slide_sheet: str | os.PathLike[str], workdir: str | os.PathLike[str]
) -> list[SlideStatus]:
    """Each sheet slide's tiling outcome, read from results/tiles/ and logs/tiling/ under `workdir`.

    A tiles file under its final name is complete (outputs are renamed into place when done); a
    slide is tiled when every grid folder (results/tiles/<grid>/) holds its file.
    """
    workdir = Path(workdir)
    sheet = read_slide_sheet(slide_sheet, check_paths=False)
    tiles = workdir / "results" / "tiles"
    grids = sorted(p for p in tiles.iterdir() if p.is_dir()) if tiles.is_dir() else []
    statuses = []
    for slide_id, patient in zip(sheet.index, sheet["PATIENT"], strict=True):
        if grids and all((grid / f"{slide_id}.h5").is_file() for grid in grids):
            statuses.append(SlideStatus(slide_id, patient, "tiled", ""))
            continue
        log_path = workdir / "logs" / "tiling" / f"{slide_id}.log"
        if not log_path.is_file():
            statuses.append(SlideStatus(slide_id, patient, "not run", ""))
            continue
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        errors = [m["message"] for line in lines if (m := _ERROR_LINE.match(line))]
        # A job cancelled by SIGTERM logs an error too, but its slide is fine.
        if errors and not errors[-1].startswith(STOPPED_PREFIX):
            statuses.append(SlideStatus(slide_id, patient, "failed", errors[-1]))
        else:
            reason = errors[-1] if errors else "no reason logged (killed, or still running)"
            statuses.append(SlideStatus(slide_id, patient, "unfinished", reason))
    return statuses


def write_sheet_without(
    slide_sheet: str | os.PathLike[str], slide_ids: set[str], out: str | os.PathLike[str]
) -> int:
    """Copy the sheet without the rows of `slide_ids`, keeping its columns and separator.

    Relative slide paths are rewritten against the new sheet's folder so they still resolve.
    Returns the number of rows kept.
    """
    source, out = Path(slide_sheet), Path(out)
    table = read_table(source, "slide sheet")
    kept = table[~table["SLIDE"].isin(slide_ids)].copy()
    if source.resolve().parent != out.resolve().parent:
        kept["PATH"] = [
            value if os.path.isabs(value) else os.path.relpath(source.parent / value, out.parent)
            for value in kept["PATH"]
        ]
    out.parent.mkdir(parents=True, exist_ok=True)
    kept.to_csv(out, sep=table_separator(source), index=False)
    return len(kept)
