"""Read and validate the slide sheet and the clinical table; every error names file, row and column.

Row numbers in messages are line numbers of the file (the header is line 1).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from pathlib import Path

import pandas as pd

from eagleflow.encoders import DEFAULT_STAIN, STAINS
from eagleflow.errors import EagleflowError
from eagleflow.mpp import DEFAULT_MPP_RANGE, outside_range

log = logging.getLogger(__name__)

# Ids become file names and wildcards: letters, digits, '.', '_' and '-' only, never a leading
# '.' or '-', so no id can reach a shell or a path unquoted.
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_ID_RE = re.compile(ID_PATTERN)

SLIDE_REQUIRED = ("PATIENT", "SLIDE", "PATH")
SLIDE_OPTIONAL = ("MPP", "COHORT", "STAIN")
DEFAULT_COHORT = "default"
# Spellings seen in lab exports ("H&E", "H-E", "he"): case, blanks and these marks are ignored.
_STAIN_MARKS = re.compile(r"[\s&+/_-]")


class SheetError(EagleflowError, ValueError):
    """The slide sheet or the clinical table is wrong; the message lists every problem found."""


def table_separator(path: str | os.PathLike[str]) -> str:
    """Tab for '.tsv'/'.txt' files, comma otherwise."""
    return "\t" if Path(path).suffix.lower() in (".tsv", ".txt") else ","


# The config key that names each table (for the message when the file is not there).
TABLE_CONFIG_KEYS = {"slide sheet": "slide_sheet", "clinical table": "clinical_table"}


def missing_table_message(what: str, path: Path) -> str:
    """What a first run without its sheets is told: what creates the demo's, how to give one's own."""
    key = TABLE_CONFIG_KEYS.get(what, what)
    return (
        f"{what} {path}: file not found. The demo cohort and its sheets are written by "
        f"`make demo-data` (`make demo` also runs the workflow on them). For your own cohort, "
        f"set `{key}` to your file's path in config/config.yaml, or run with "
        f"`--config {key}=PATH` (README, 'Inputs')."
    )


def read_table(path: str | os.PathLike[str], what: str) -> pd.DataFrame:
    """CSV or TSV (by extension; '.tsv'/'.txt' are tab-separated), every cell read as text."""
    path = Path(path)
    if not path.is_file():
        raise SheetError(missing_table_message(what, path))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise SheetError(
            f"{what} {path}: line {line} is not valid UTF-8 (byte offset {err.start}). Save the "
            "file as UTF-8 (e.g. 'Save as CSV UTF-8' in a spreadsheet program)."
        ) from err
    sep = table_separator(path)
    if not text.strip():
        raise SheetError(
            f"{what} {path}: the file is empty; it needs a header and one row or more."
        )
    try:
        table = pd.read_csv(
            io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, quoting=csv.QUOTE_MINIMAL
        )
    except (pd.errors.ParserError, csv.Error) as err:
        kind = "TSV" if sep == "\t" else "CSV"
        raise SheetError(f"{what} {path}: cannot be parsed as {kind} ({err})") from err
    table.columns = [str(c).strip() for c in table.columns]
    return table.apply(lambda column: column.str.strip())


def _line(index: int) -> int:
    return int(index) + 2  # header is line 1


def _check_ids(
    table: pd.DataFrame, column: str, what: str, path: Path, problems: list[str]
) -> None:
    for index, value in table[column].items():
        if value == "":
            problems.append(f"line {_line(index)}, column {column}: empty")
        elif not _ID_RE.fullmatch(value):
            problems.append(
                f"line {_line(index)}, column {column}: {value!r} has characters other than "
                "letters, digits, '.', '_' and '-' (or starts with '.'/'-'); rename it"
            )


def _raise(what: str, path: Path, problems: list[str]) -> None:
    if problems:
        shown = "\n  - ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise SheetError(f"{what} {path} has {len(problems)} problem(s):\n  - {shown}{more}")


def normalise_stain(value: str) -> str | None:
    """The STAINS name a STAIN cell means ('' -> DEFAULT_STAIN), or None if it is none of them."""
    key = _STAIN_MARKS.sub("", value).upper()
    if key == "":
        return DEFAULT_STAIN
    return key if key in STAINS else None


def sheet_stains(slides: pd.DataFrame) -> list[str]:
    """Stains of `read_slide_sheet`'s frame in STAINS order (a frame without STAIN is all HE)."""
    present = set(slides["STAIN"]) if "STAIN" in slides.columns else {DEFAULT_STAIN}
    return [stain for stain in STAINS if stain in present]


def _check_stains(table: pd.DataFrame, problems: list[str]) -> None:
    """Replace STAIN cells by their STAINS name; name each cell that is no known stain."""
    if "STAIN" not in table.columns:
        table["STAIN"] = DEFAULT_STAIN
        return
    normalised = []
    for index, value in table["STAIN"].items():
        stain = normalise_stain(value)
        if stain is None:
            slide = table.at[index, "SLIDE"]
            problems.append(
                f"line {_line(index)}, column STAIN: {value!r} (slide {slide!r}) "
                f"is not a known stain; allowed are {list(STAINS)} in any case ('H&E' and 'H-E' "
                f"mean HE), or empty for {DEFAULT_STAIN}. Fix the cell or leave it empty."
            )
        normalised.append(stain or value)
    table["STAIN"] = normalised


def absolute_slide_path(sheet_dir: str, value: str) -> str:
    """`value` made absolute against the sheet's folder; a linked slide keeps its own name.

    '..' is resolved by the file system (through symlinked folders, as opening would), not as
    text; without '..', normalising the text is exact and costs no system call.
    """
    joined = os.path.join(sheet_dir, value)
    if ".." in Path(value).parts:
        return os.path.join(os.path.realpath(os.path.dirname(joined)), os.path.basename(joined))
    return os.path.normpath(joined)


def under_folder(path: str, folder: str | None) -> str:
    """`path` relative to `folder` when it lies inside it, else unchanged (both absolute)."""
    if folder is None or path == folder or not Path(path).is_relative_to(folder):
        return path
    return Path(path).relative_to(folder).as_posix()


def _path_problem(value: str, slide_path: str) -> str:
    """Why PATH cannot be a slide ('' if it may be): missing, unreadable, a folder without DICOM."""
    from eagleflow.slidefiles import dicom_instance  # opens nothing unless PATH is a folder

    if os.path.isdir(slide_path):
        try:
            if dicom_instance(slide_path) is not None:
                return ""
        except OSError as err:
            return (
                f"{value!r} is a folder that cannot be listed ({err.strerror}); fix its permissions"
            )
        return (
            f"{value!r} is a folder without a DICOM whole-slide image instance OpenSlide can read "
            f"({slide_path}); point PATH at a slide file, or at the folder of one DICOM WSI export"
        )
    if not os.path.isfile(slide_path):
        return f"{value!r} does not exist ({slide_path}); fix the path or restore the file"
    if not os.access(slide_path, os.R_OK):
        return f"{value!r} is not readable; fix its permissions"
    return ""


def read_slide_sheet(
    path: str | os.PathLike[str],
    check_paths: bool = True,
    mpp_range: tuple[float, float] = DEFAULT_MPP_RANGE,
    relative_to: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Validated slide sheet indexed by SLIDE, with PATH resolved and MPP as float (NaN if absent).

    STAIN is always there, one of STAINS (DEFAULT_STAIN where the column or the cell is empty).

    PATH may be absolute or relative to the sheet's own directory, and may name a DICOM WSI
    folder. Resolved paths are absolute, except those inside `relative_to` (the workflow's working
    directory), which stay relative to it: a project moved as a whole keeps the same paths.
    """
    path = Path(path)
    what = "slide sheet"
    table = read_table(path, what)
    problems: list[str] = []
    missing = [c for c in SLIDE_REQUIRED if c not in table.columns]
    unknown = [c for c in table.columns if c not in SLIDE_REQUIRED + SLIDE_OPTIONAL]
    if missing:
        problems.append(f"missing column(s) {missing}; required are {list(SLIDE_REQUIRED)}")
    if unknown:
        problems.append(
            f"unknown column(s) {unknown}; allowed are {list(SLIDE_REQUIRED + SLIDE_OPTIONAL)} "
            "(put labels in the clinical table)"
        )
    _raise(what, path, problems)
    if table.empty:
        raise SheetError(f"{what} {path}: no slides (only a header). Add one row per slide.")
    for column in ("PATIENT", "SLIDE"):
        _check_ids(table, column, what, path, problems)
    duplicated = table["SLIDE"][table["SLIDE"].duplicated(keep=False) & (table["SLIDE"] != "")]
    for slide_id, rows in duplicated.groupby(duplicated).groups.items():
        lines = ", ".join(str(_line(i)) for i in rows)
        problems.append(f"SLIDE {slide_id!r} appears on lines {lines}; slide ids must be unique")
    named = table["SLIDE"][table["SLIDE"] != ""]
    folded = named.str.casefold()
    # Ids become file names: S1.h5 and s1.h5 collide on macOS. Only ids that share a folded
    # spelling are grouped (grouping 10,000 unique ids one by one costs seconds at startup).
    clashing = folded.duplicated(keep=False)
    for rows in named[clashing].groupby(folded[clashing]).groups.values():
        if named[rows].nunique() > 1:
            spelled = ", ".join(f"{named[i]!r} (line {_line(i)})" for i in rows)
            problems.append(
                f"SLIDE ids {spelled} differ only in upper/lower case; their output files would "
                "collide on case-insensitive file systems (macOS, Windows). Rename them apart."
            )
    if "COHORT" not in table.columns:
        table["COHORT"] = DEFAULT_COHORT
    table.loc[table["COHORT"] == "", "COHORT"] = DEFAULT_COHORT
    _check_ids(table, "COHORT", what, path, problems)
    _check_stains(table, problems)
    mpp = [math.nan] * len(table)
    if "MPP" in table.columns:
        for position, (index, value) in enumerate(table["MPP"].items()):
            if value == "":
                continue
            try:
                mpp[position] = float(value)
            except ValueError:
                problems.append(f"line {_line(index)}, column MPP: {value!r} is not a number")
                continue
            if problem := outside_range(mpp[position], mpp_range):
                problems.append(f"line {_line(index)}, column MPP: {value} µm/px is {problem}")
    table["MPP"] = pd.Series(mpp, index=table.index, dtype=float)
    resolved = []
    sheet_dir = os.path.realpath(path.parent)
    workdir = None if relative_to is None else os.path.realpath(relative_to)
    for index, value in table["PATH"].items():
        slide_path = absolute_slide_path(sheet_dir, value) if value else ""
        resolved.append(under_folder(slide_path, workdir))
        if value == "":
            problems.append(f"line {_line(index)}, column PATH: empty")
        elif check_paths and (problem := _path_problem(value, slide_path)):
            problems.append(f"line {_line(index)}, column PATH: {problem}")
    table["PATH"] = resolved
    _raise(what, path, problems)
    return table.set_index("SLIDE", drop=False)


def read_clinical_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Validated clinical table indexed by PATIENT; label cells stay text ('' = missing)."""
    path = Path(path)
    what = "clinical table"
    table = read_table(path, what)
    problems: list[str] = []
    if "PATIENT" not in table.columns:
        _raise(what, path, [f"missing column 'PATIENT' (columns are {list(table.columns)})"])
    if table.empty:
        raise SheetError(f"{what} {path}: no patients (only a header). Add one row per patient.")
    _check_ids(table, "PATIENT", what, path, problems)
    duplicated = table["PATIENT"][table["PATIENT"].duplicated(keep=False)]
    for patient, rows in duplicated.groupby(duplicated).groups.items():
        lines = ", ".join(str(_line(i)) for i in rows)
        problems.append(f"PATIENT {patient!r} appears on lines {lines}; one row per patient")
    _raise(what, path, problems)
    return table.set_index("PATIENT", drop=False)


def check_sheets_agree(
    slides: pd.DataFrame,
    clinical: pd.DataFrame,
    slide_sheet: str | os.PathLike[str],
    clinical_table: str | os.PathLike[str],
    allow_patients_without_slides: bool = False,
) -> None:
    """Every slide's patient has a clinical row; every clinical patient has slides (unless allowed)."""
    problems: list[str] = []
    no_row = sorted(set(slides["PATIENT"]) - set(clinical["PATIENT"]))
    if no_row:
        problems.append(
            f"patients in the slide sheet {slide_sheet} without a row in the clinical table "
            f"{clinical_table}: {no_row[:20]}{' ...' if len(no_row) > 20 else ''}. Add a row for "
            "each (labels may be empty)."
        )
    no_slides = sorted(set(clinical["PATIENT"]) - set(slides["PATIENT"]))
    if no_slides:
        message = (
            f"patients in the clinical table {clinical_table} without slides in {slide_sheet}: "
            f"{no_slides[:20]}{' ...' if len(no_slides) > 20 else ''}"
        )
        if allow_patients_without_slides:
            log.warning("%s (ignored: sheets.allow_patients_without_slides is true)", message)
        else:
            problems.append(
                message + ". Remove their rows, add their slides, or set "
                "sheets.allow_patients_without_slides: true."
            )
    if problems:
        raise SheetError("the sheets disagree:\n  - " + "\n  - ".join(problems))
