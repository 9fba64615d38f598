"""Hostile inputs and faults: each case asserts the message, the exit and what is left on disk.

Slides go through `run_tiling` (the `tiling_tile_slide` rule's function): a refused slide raises a
SlideError naming the slide id and path and saying what to do, and leaves no tiles file, no QC
picture and no temporary. Sheets: every message names the file, the line and the column (or the
patient) and what to fix. Faults: a full disk or a SIGTERM/SIGKILL mid-write leaves nothing under
a final name that a later run would trust, and the rerun finishes. One workflow test runs Snakemake
with --keep-going on good and bad slides together. Weights are covered in tests/test_models.py.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import tifffile
from conftest import REPO, tissue_image, write_pyramid
from hostile_helpers import (
    BAD_SLIDES,
    GOOD_SLIDES,
    VANISH,
    make_hostile_workdir,
    write_sparse_slide,
)
from workflow_helpers import SNAKEMAKE, job_counts, run

from eagleflow.demo import make_hostile_slides
from eagleflow.errors import EagleflowError
from eagleflow.failures import tiling_status
from eagleflow.h5io import DiskFullError, FormatError, read_tiles, validate_tiles, write_h5
from eagleflow.sheets import (
    SheetError,
    check_sheets_agree,
    read_clinical_table,
    read_slide_sheet,
)
from eagleflow.slides import SlideError
from eagleflow.tiling import TilingParams, run_tiling

PARAMS = TilingParams().as_dict()
SCRIPTS = REPO / "scripts"
RECOPY = "Re-copy the slide from its source"
CONVERT = "Convert it to a tiled pyramidal TIFF/SVS or remove it from the slide sheet"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo's hostile files (empty, truncated, not_tiff, no_mpp, no_tissue, tiny, corrupt)."""
    return make_hostile_slides(tmp_path_factory.mktemp("hostile"), seed=0)


@pytest.fixture(scope="module")
def good_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small valid pyramidal TIFF with tissue in the middle (MPP 0.5, three levels)."""
    path = tmp_path_factory.mktemp("good") / "good.tif"
    return write_pyramid(path, tissue_image(4096, 3072), 0.5)


def refuse(slide: Path, slide_id: str, out: Path, *expected: str) -> str:
    """Tile `slide`, expect a SlideError containing `expected`; check nothing was written."""
    tiles, qc = out / "tiles" / f"{slide_id}.h5", out / "qc" / f"{slide_id}.png"
    with pytest.raises(SlideError) as err:
        run_tiling(str(slide), slide_id, PARAMS, None, str(tiles), str(qc))
    message = str(err.value)
    assert f"slide {slide_id!r} ({slide})" in message  # names the slide and its file
    for fragment in expected:
        assert fragment in message
    assert not tiles.exists() and not qc.exists()
    leftovers = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert leftovers == []  # no temporaries either
    return message


def zero_tiles(data: bytes, page_index: int) -> bytes:
    """Zero every tile of one tiled page: the file opens but that level cannot be decoded."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = [p for p in tif.pages if p.is_tiled][page_index]
        spans = list(zip(page.dataoffsets, page.databytecounts, strict=True))
    out = bytearray(data)
    for offset, count in spans:
        out[offset : offset + count] = bytes(count)
    return bytes(out)


# --------------------------------------------------------------------------- slides


def test_zero_byte_slide(hostile: dict[str, Path], tmp_path: Path) -> None:
    refuse(hostile["empty"], "S-empty", tmp_path, "file is empty (0 bytes)", RECOPY)


def test_demo_truncated_slide_names_the_truncation(
    hostile: dict[str, Path], tmp_path: Path
) -> None:
    size = hostile["truncated"].stat().st_size
    message = refuse(hostile["truncated"], "S-trunc", tmp_path, RECOPY)
    assert f"it is a TIFF truncated at {size} bytes" in message
    assert "Convert it" not in message  # converting a cut-off copy would not help


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.97, 0.995])
def test_truncated_slide_at_any_length(good_slide: Path, tmp_path: Path, fraction: float) -> None:
    """Cut anywhere, a slide is refused before or while opening, always with 'Re-copy'."""
    data = good_slide.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: int(len(data) * fraction)])
    message = refuse(cut, "S-cut", tmp_path / "out", RECOPY)
    assert "truncated" in message


def test_text_file_renamed_svs(hostile: dict[str, Path], tmp_path: Path) -> None:
    refuse(
        hostile["not_tiff"], "S-text", tmp_path, "not a slide format OpenSlide can read", CONVERT
    )


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("png", "it is a PNG image, not a whole-slide image"),
        ("jpeg", "it is a JPEG image, not a whole-slide image"),
        ("strips", "it is a TIFF stored in strips, and OpenSlide reads tiled TIFFs only"),
    ],
)
def test_format_openslide_cannot_open(tmp_path: Path, kind: str, expected: str) -> None:
    image = tissue_image(1024, 1024)
    path = tmp_path / "scan.svs"
    if kind == "strips":
        tifffile.imwrite(path, image, photometric="rgb")
    else:
        path.write_bytes(cv2.imencode(".png" if kind == "png" else ".jpg", image)[1].tobytes())
    refuse(path, "S-format", tmp_path / "out", f"OpenSlide cannot open it: {expected}", CONVERT)


def test_slide_without_mpp_anywhere(hostile: dict[str, Path], tmp_path: Path) -> None:
    refuse(
        hostile["no_mpp"],
        "S-nompp",
        tmp_path,
        "no MPP (microns per pixel) in the slide's metadata or the sheet",
        "Add an MPP column value for this slide to the slide sheet",
        "tiling.default_mpp",
    )
    # the advice works: an MPP from the sheet tiles it
    tiles = tmp_path / "fixed.h5"
    run_tiling(str(hostile["no_mpp"]), "S-nompp", PARAMS, 0.5, str(tiles), str(tmp_path / "q.png"))
    assert validate_tiles(tiles)["mpp_source"] == "sheet MPP column"


def test_slide_smaller_than_one_tile(hostile: dict[str, Path], tmp_path: Path) -> None:
    refuse(
        hostile["tiny"],
        "S-tiny",
        tmp_path,
        "640x384 px at 0.5 µm/px is smaller than one 448 µm tile",
        "Remove it from the sheet, or use tiling.border: pad",
    )


def test_slide_without_tissue(hostile: dict[str, Path], tmp_path: Path) -> None:
    refuse(
        hostile["no_tissue"],
        "S-blank",
        tmp_path,
        "no tissue found",
        "lower tiling.saturation_min or tiling.min_tissue_fraction",
    )


def test_all_tiles_fail_the_edge_test(make_slide: Callable[..., Path], tmp_path: Path) -> None:
    image = np.full((3072, 4096, 3), 245, dtype=np.uint8)
    image[1000:2500, 1000:3000] = (200, 110, 190)  # saturated (tissue in the mask) but flat
    path = make_slide(name="flat.tif", image=image)
    refuse(
        path,
        "S-flat",
        tmp_path / "out",
        "tissue tiles failed the edge test",
        "lower tiling.min_edge_fraction",
    )


def test_corrupt_tile_data_is_named_not_a_traceback(
    hostile: dict[str, Path], tmp_path: Path
) -> None:
    """The slide opens and has a mask, but tiles at 2 µm/px cannot be decoded."""
    message = refuse(
        hostile["corrupt_tiles"],
        "S-corrupt",
        tmp_path,
        "reading the tile at level-0 (",
        "the slide's image data is corrupt or truncated",
        RECOPY,
    )
    assert "on pyramid level 1" in message


def test_corrupt_mask_level_is_named(good_slide: Path, tmp_path: Path) -> None:
    """Levels at 0.5, 2 and 8 µm/px: the 16 µm/px mask is read from level 2, here undecodable."""
    broken = tmp_path / "broken.tif"
    broken.write_bytes(zero_tiles(good_slide.read_bytes(), page_index=2))
    refuse(broken, "S-mask", tmp_path / "out", "reading pyramid level 2 failed", RECOPY)


def test_slide_path_vanishes_after_validation(good_slide: Path, tmp_path: Path) -> None:
    slide = tmp_path / "slides" / "s.tif"
    slide.parent.mkdir()
    slide.write_bytes(good_slide.read_bytes())
    sheet = tmp_path / "slides.csv"
    sheet.write_text("PATIENT,SLIDE,PATH\nP1,S1,slides/s.tif\n")
    resolved = Path(read_slide_sheet(sheet).at["S1", "PATH"])  # validated: the file exists
    slide.unlink()
    refuse(
        resolved,
        "S1",
        tmp_path / "out",
        "file not found",
        "Fix PATH in the slide sheet or restore the file",
    )


# VmHWM is this process image's own peak; ru_maxrss would also count the forking parent's peak,
# which Linux carries across exec (a pytest that loaded Virchow2 already holds gigabytes).
_RSS_CHILD = """
import re, sys
from eagleflow.tiling import run_tiling, TilingParams
table = run_tiling(sys.argv[1], "HUGE", TilingParams().as_dict(), None, sys.argv[2], sys.argv[3],
                   threads=2)
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(len(table.coords), table.read_level, peak_kb)
"""


def test_huge_sparse_slide_keeps_memory_bounded(tmp_path: Path) -> None:
    """200,000 x 150,000 px at 0.25 µm/px, empty but for a 1 mm patch of tissue.

    Level 2 (4 µm/px, 12,500 x 9,375 px) feeds the 16 µm/px mask: read whole as RGBA it alone
    would take 470 MB and well over 1.5 GB once converted, so the bound catches an unchunked
    read; level 0 as RGBA would be 120 GB. Generating it takes about a second.
    """
    start = time.monotonic()
    slide = write_sparse_slide(tmp_path / "huge.tif", 200_000, 150_000, 0.25, (1, 4, 16))
    assert time.monotonic() - start < 60 and slide.stat().st_size < 50e6  # sparse on disk too
    tiles, qc = tmp_path / "huge.h5", tmp_path / "huge.png"
    result = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(slide), str(tiles), str(qc)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SCRIPTS)},
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    n_tiles, read_level, maxrss_kb = map(int, result.stdout.split())
    assert n_tiles > 0 and read_level == 1
    assert maxrss_kb * 1024 < 1.2e9, f"peak RSS {maxrss_kb / 1024:.0f} MB"
    coords, _ = read_tiles(tiles)
    patch = (100_000, 75_000, 100_000 + 4096, 75_000 + 4096)  # the tissue patch, level-0 px
    size = 1792  # 448 µm at 0.25 µm/px
    assert (coords[:, 0] + size > patch[0]).all() and (coords[:, 0] < patch[2]).all()
    assert (coords[:, 1] + size > patch[1]).all() and (coords[:, 1] < patch[3]).all()


# --------------------------------------------------------------------------- sheets


def write_sheet(path: Path, rows: list[list[str]], header: tuple[str, ...] = ()) -> Path:
    """Write a CSV with proper quoting, so that quotes and commas survive as cell content."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header or ("PATIENT", "SLIDE", "PATH"))
    writer.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


@pytest.fixture
def slide_dir(tmp_path: Path) -> Path:
    for name in ("a.svs", "b.svs", "c.svs"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def sheet_error(reader: Callable[[Path], object], path: Path, *expected: str) -> str:
    with pytest.raises(SheetError) as err:
        reader(path)
    message = str(err.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message
    return message


def test_duplicate_slide_ids(slide_dir: Path) -> None:
    sheet = write_sheet(
        slide_dir / "s.csv", [["P1", "S1", "a.svs"], ["P2", "S2", "b.svs"], ["P3", "S1", "c.svs"]]
    )
    sheet_error(
        read_slide_sheet, sheet, "SLIDE 'S1' appears on lines 2, 4; slide ids must be unique"
    )


def test_slide_ids_differing_only_in_case(slide_dir: Path) -> None:
    """S1.h5 and s1.h5 are one file on macOS and Windows file systems."""
    sheet = write_sheet(slide_dir / "s.csv", [["P1", "S1", "a.svs"], ["P2", "s1", "b.svs"]])
    sheet_error(
        read_slide_sheet,
        sheet,
        "SLIDE ids 'S1' (line 2), 's1' (line 3) differ only in upper/lower case",
        "Rename them apart",
    )


@pytest.mark.parametrize(
    "slide_id",
    [
        "my slide",
        'S"1',
        "S'1",
        "S1,S2",
        "S1;touch pwned",
        "$(touch pwned)",
        "`touch pwned`",
        "S1|touch pwned",
        "S1&&touch pwned",
        "S1>pwned",
        "../pwned",
        "S1/x",
        "-rf",
        ".hidden",
        "S1*",
        "S1\nS2",
        "Schnitt-ä",
    ],
)
def test_slide_id_with_spaces_quotes_or_shell_characters(
    slide_dir: Path, monkeypatch: pytest.MonkeyPatch, slide_id: str
) -> None:
    monkeypatch.chdir(slide_dir)
    sheet = write_sheet(slide_dir / "s.csv", [["P1", slide_id, "a.svs"]])
    sheet_error(read_slide_sheet, sheet, f"line 2, column SLIDE: {slide_id!r}", "rename it")
    assert not list(slide_dir.rglob("pwned"))


@pytest.mark.parametrize(
    ("data", "line"),
    [
        ("PATIENT,SLIDE,PATH\nP1,S1,a.svs\nPä,S2,b.svs\n".encode("latin-1"), 3),
        ("PATIENT,SLIDE,PATH\nP1,S1,a.svs\n".encode("utf-16"), 1),
        (b"PATIENT,SLIDE,PATH\nP1,S\xff1,a.svs\n", 2),
    ],
)
def test_non_utf8_bytes(slide_dir: Path, data: bytes, line: int) -> None:
    sheet = slide_dir / "s.csv"
    sheet.write_bytes(data)
    sheet_error(
        read_slide_sheet,
        sheet,
        f"line {line} is not valid UTF-8",
        "Save the file as UTF-8",
    )


def test_windows_line_endings_and_bom_are_accepted(slide_dir: Path) -> None:
    sheet = slide_dir / "s.csv"
    sheet.write_bytes(b"\xef\xbb\xbfPATIENT,SLIDE,PATH\r\nP1,S1,a.svs\r\nP2,S2,b.svs\r\n")
    assert list(read_slide_sheet(sheet).index) == ["S1", "S2"]


def test_patient_in_clinical_table_without_slides(slide_dir: Path) -> None:
    sheet = write_sheet(slide_dir / "s.csv", [["P1", "S1", "a.svs"]])
    clinical = write_sheet(slide_dir / "c.csv", [["P1", "A"], ["P9", "B"]], ("PATIENT", "SUBTYPE"))
    with pytest.raises(SheetError) as err:
        check_sheets_agree(read_slide_sheet(sheet), read_clinical_table(clinical), sheet, clinical)
    message = str(err.value)
    assert f"patients in the clinical table {clinical} without slides in {sheet}: ['P9']" in message
    assert "sheets.allow_patients_without_slides: true" in message


def test_slide_whose_patient_has_no_clinical_row(slide_dir: Path) -> None:
    sheet = write_sheet(slide_dir / "s.csv", [["P1", "S1", "a.svs"], ["P7", "S2", "b.svs"]])
    clinical = write_sheet(slide_dir / "c.csv", [["P1", "A"]], ("PATIENT", "SUBTYPE"))
    with pytest.raises(SheetError) as err:
        check_sheets_agree(read_slide_sheet(sheet), read_clinical_table(clinical), sheet, clinical)
    message = str(err.value)
    assert f"patients in the slide sheet {sheet} without a row in the clinical table" in message
    assert "['P7']" in message and "Add a row for each" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the file is empty; it needs a header and one row or more"),
        ("\n \n", "the file is empty; it needs a header and one row or more"),
        ("PATIENT,SLIDE,PATH\n", "no slides (only a header). Add one row per slide."),
        ("PATIENT,SLIDE,PATH\n\n\n", "no slides (only a header). Add one row per slide."),
    ],
)
def test_empty_slide_sheet(slide_dir: Path, text: str, expected: str) -> None:
    sheet = slide_dir / "s.csv"
    sheet.write_text(text)
    sheet_error(read_slide_sheet, sheet, expected)


def test_empty_clinical_table(slide_dir: Path) -> None:
    clinical = slide_dir / "c.csv"
    clinical.write_text("PATIENT,SUBTYPE\n")
    sheet_error(read_clinical_table, clinical, "no patients (only a header). Add one row")


# --------------------------------------------------------------------------- faults


def _fail_second_dataset(monkeypatch: pytest.MonkeyPatch) -> str:
    """Raise ENOSPC after the first dataset of a file is written (a disk that fills mid-write)."""
    original = h5py.Group.create_dataset
    calls = {"n": 0}

    def create_dataset(self: h5py.Group, *args: object, **kwargs: object) -> h5py.Dataset:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)
    return "S1.h5"


def _fail_rename_of(name: str) -> Callable[[pytest.MonkeyPatch], str]:
    """ENOSPC when the finished temporary of `name` is renamed into place."""

    def fault(monkeypatch: pytest.MonkeyPatch) -> str:
        original = os.replace

        def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
            if Path(dst).name == name:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            original(src, dst)

        monkeypatch.setattr("eagleflow.h5io.os.replace", replace)
        return name

    fault.__name__ = f"rename_{name}"
    return fault


@pytest.mark.parametrize(
    "fault", [_fail_second_dataset, _fail_rename_of("S1.h5"), _fail_rename_of("S1.png")]
)
def test_disk_full_while_writing_tiles(
    good_slide: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault: Callable[[pytest.MonkeyPatch], str],
) -> None:
    out = tmp_path / "out"
    tiles, qc = out / "S1.h5", out / "S1.png"
    with monkeypatch.context() as patch:
        culprit = out / fault(patch)
        with pytest.raises(DiskFullError) as err:
            run_tiling(str(good_slide), "S1", PARAMS, None, str(tiles), str(qc))
    message = str(err.value)
    assert isinstance(err.value, OSError) and isinstance(err.value, EagleflowError)
    assert err.value.errno == errno.ENOSPC
    assert f"{culprit}: No space left on device while writing it" in message
    assert "Nothing was kept under that name. Free disk space" in message
    assert list(out.iterdir()) == []  # no tiles, no temporary, no orphan QC picture
    run_tiling(str(good_slide), "S1", PARAMS, None, str(tiles), str(qc))  # space is back
    assert validate_tiles(tiles)["n_tiles"] > 0 and qc.exists()


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (needs root and mount rights; skipped where mounting is not allowed)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_real_disk_full_while_writing_h5(tiny_tmpfs: Path) -> None:
    target = tiny_tmpfs / "features.h5"
    big = {"features": np.random.default_rng(0).random((256, 256))}  # 512 KiB > 256 KiB
    with pytest.raises(DiskFullError, match=rf"{target}: No space left on device"):
        write_h5(target, big, {"format": "x"})
    assert list(tiny_tmpfs.iterdir()) == []
    write_h5(target, {"features": big["features"][:16]}, {"format": "x"})  # what fits is written
    assert [p.name for p in tiny_tmpfs.iterdir()] == ["features.h5"]


# A tiling job as the rule script runs it (run_rule), stopped in the middle by a signal: `pause`
# is where it waits (inside the H5 write, or between tiles with two reader threads).
_SIGNAL_CHILD = """
import sys, time, pathlib
import h5py
import eagleflow.tiling as tiling
from eagleflow.logutil import run_rule

slide, tiles, qc, log, ready, pause = sys.argv[1:]

def stall():
    pathlib.Path(ready).touch()
    time.sleep(120)

if pause == "h5":
    original = h5py.Group.create_dataset
    def create_dataset(self, *args, **kwargs):
        dataset = original(self, *args, **kwargs)
        stall()
        return dataset
    h5py.Group.create_dataset = create_dataset
else:
    edge = tiling.edge_fraction
    def edge_fraction(*args):
        stall()
        return edge(*args)
    tiling.edge_fraction = edge_fraction

run_rule(log, tiling.run_tiling, slide_path=slide, slide_id="S1", params=tiling.TilingParams().as_dict(),
         sheet_mpp=None, tiles_h5=tiles, qc_png=qc, threads=2)
"""


def _stop_tiling_job(slide: Path, out: Path, pause: str, signum: int) -> tuple[int, float, str]:
    """Start a tiling job, send `signum` once it stalls; return (exit code, seconds to exit, log)."""
    out.mkdir(parents=True, exist_ok=True)
    ready, log = out.parent / "ready", out.parent / "job.log"
    args = [str(slide), str(out / "S1.h5"), str(out / "S1.png"), str(log), str(ready), pause]
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_SIGNAL_CHILD), *args],
        env={**os.environ, "PYTHONPATH": str(SCRIPTS)},
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ready.exists(), "the job never reached the point where it is stopped"
    process.send_signal(signum)
    sent = time.monotonic()
    code = process.wait(timeout=60)
    return code, time.monotonic() - sent, log.read_text()


@pytest.mark.parametrize("pause", ["h5", "tiles"])
def test_sigterm_mid_job_leaves_nothing_that_looks_finished(
    good_slide: Path, tmp_path: Path, pause: str
) -> None:
    out = tmp_path / "out"
    code, seconds, log = _stop_tiling_job(good_slide, out, pause, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and seconds < 10
    assert "stopped by SIGTERM" in log and "Rerun the workflow" in log
    assert list(out.iterdir()) == []  # no tiles, no QC picture, no temporary
    run_tiling(str(good_slide), "S1", PARAMS, None, str(out / "S1.h5"), str(out / "S1.png"))
    assert validate_tiles(out / "S1.h5")["n_tiles"] > 0


def test_sigkill_mid_write_is_not_trusted_and_rerun_cleans_up(
    good_slide: Path, tmp_path: Path
) -> None:
    """SIGKILL cannot be caught: a temporary stays, never under the final name, and is removed."""
    out = tmp_path / "out"
    code, _, _ = _stop_tiling_job(good_slide, out, "h5", signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (out / "S1.h5").exists()
    (temporary,) = out.glob(".S1.h5.tmp.*")
    with pytest.raises(FormatError):
        validate_tiles(temporary)  # incomplete: no later stage would accept it
    run_tiling(str(good_slide), "S1", PARAMS, None, str(out / "S1.h5"), str(out / "S1.png"))
    assert validate_tiles(out / "S1.h5")["n_tiles"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["S1.h5", "S1.png"]  # stale temporary gone


# --------------------------------------------------------------------------- workflow


def planned_slides(output: str) -> set[str]:
    """Slide wildcards of the jobs a dry run plans."""
    return {
        line.split("slide=", 1)[1].split(",")[0].strip()
        for line in output.splitlines()
        if line.strip().startswith("wildcards:") and "slide=" in line
    }


@pytest.mark.workflow
def test_keep_going_finishes_good_slides_and_reruns_only_failures(tmp_path: Path) -> None:
    work = make_hostile_workdir(tmp_path / "work")
    snakemake = [*SNAKEMAKE, "--directory", str(work), "--configfile"]
    snakemake += ["config/config.yaml", "config/fast.yaml", "--until", "tiling_tile_slide"]
    good = [*GOOD_SLIDES, VANISH]
    bad = [slide for slide, _ in BAD_SLIDES.values()]
    # Every other slide first (one 2-thread job at a time on 2 cores), so that the vanishing
    # slide's job comes last: its file is deleted once the first job has started.
    first = [f"results/tiles/224px_2mpp/{s}.h5" for s in [*GOOD_SLIDES, *bad]]
    args = [*snakemake, "--cores", "2", "--keep-going", "--latency-wait", "1", "-P", *first]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    process = subprocess.Popen(
        args, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )
    logs = work / "logs" / "tiling"
    deadline = time.monotonic() + 120
    while not (logs.is_dir() and any(logs.iterdir())) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.02)
    vanish = work / "resources" / "slides" / f"{VANISH}.tif"
    kept = vanish.read_bytes()
    vanish.unlink()
    output, _ = process.communicate(timeout=600)

    assert process.returncode != 0
    for slide in GOOD_SLIDES:  # every unaffected slide finished
        assert (
            validate_tiles(work / "results" / "tiles" / "224px_2mpp" / f"{slide}.h5")["n_tiles"] > 0
        )
        assert (work / "results" / "qc" / "tiles" / f"{slide}.png").exists()
    for slide, expected in BAD_SLIDES.values():
        assert not (work / "results" / "tiles" / "224px_2mpp" / f"{slide}.h5").exists()
        assert not (work / "results" / "qc" / "tiles" / f"{slide}.png").exists()
        log = (logs / f"{slide}.log").read_text()
        assert f"ERROR eagleflow: slide {slide!r} (" in log and expected in log, log
        assert "Traceback" not in log
        assert f"log: logs/tiling/{slide}.log (check log file(s) for error details)" in output
    # scripts/tools/failed_slides.py reads the same outcome back from the run's files
    statuses = {s.slide_id: s for s in tiling_status(work / "resources" / "slides.csv", work)}
    assert {k for k, s in statuses.items() if s.status == "failed"} == {*bad, VANISH}
    for slide, expected in BAD_SLIDES.values():
        assert expected in statuses[slide].message
    # The slide is no Snakemake input (a path alone must not plan a rerun): its job names it
    assert statuses[VANISH].status == "failed"
    vanished = f"slide {VANISH!r} (resources/slides/{VANISH}.tif): file not found. Fix PATH"
    assert statuses[VANISH].message.startswith(vanished)
    results = work / "results"
    assert not [p for p in results.rglob("*") if p.is_file() and ".tmp." in p.name]
    mtimes = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}

    # Until the file is back, the sheet check names it before anything runs
    again = run([*snakemake, "-n"], cwd=work, check=False)
    assert again.returncode != 0
    said = again.stdout + again.stderr
    assert "line 5, column PATH: 'slides/GOOD-vanish.tif' does not exist" in said
    assert "fix the path or restore the file" in said

    # File restored: a rerun without fixes plans exactly the failed jobs
    vanish.write_bytes(kept)
    dry = run([*snakemake, "-n"], cwd=work)
    assert planned_slides(dry.stdout) == {*bad, VANISH}
    assert job_counts(dry.stdout)["tiling_tile_slide"] == len(bad) + 1

    # Fix one slide (its MPP in the sheet) and rerun: it and the vanished one finish, the still
    # broken ones fail again, and no finished output is redone
    sheet = work / "resources" / "slides.csv"
    rows = sheet.read_text().splitlines()
    fixed = BAD_SLIDES["no_mpp"][0]
    rows = [rows[0] + ",MPP"] + [r + (",0.5" if f",{fixed}," in r else ",") for r in rows[1:]]
    sheet.write_text("\n".join(rows) + "\n")
    rerun = run([*snakemake, "--cores", "2", "--keep-going"], cwd=work, check=False)
    assert rerun.returncode != 0
    for slide in (fixed, VANISH):
        assert validate_tiles(results / "tiles" / "224px_2mpp" / f"{slide}.h5")["n_tiles"] > 0
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())
    assert planned_slides(run([*snakemake, "-n"], cwd=work).stdout) == set(bad) - {fixed}
    assert set(good) <= {p.stem for p in (results / "tiles" / "224px_2mpp").glob("*.h5")}

    # A shell-looking slide id never reaches a shell: the sheet check stops the run at parse
    evil_row = ["P0", "$(touch pwned)", "slides/GOOD-1.tif"]
    evil = write_sheet(work / "resources" / "evil.csv", [evil_row])
    bad_sheet = run([*snakemake, "-n", "--config", f"slide_sheet={evil}"], cwd=work, check=False)
    assert bad_sheet.returncode != 0
    assert "line 2, column SLIDE: '$(touch pwned)'" in bad_sheet.stdout + bad_sheet.stderr
    assert not list(work.rglob("pwned"))


_STALL_IN_H5_WRITE = """
import os
if os.environ.get("EAGLEFLOW_TEST_STALL"):  # only the jobs of the crash test
    import pathlib, time
    import h5py
    _create_dataset = h5py.Group.create_dataset
    def create_dataset(self, *args, **kwargs):
        dataset = _create_dataset(self, *args, **kwargs)
        pathlib.Path(os.environ["EAGLEFLOW_TEST_STALL"]).touch()
        time.sleep(120)
        return dataset
    h5py.Group.create_dataset = create_dataset
"""


@pytest.mark.workflow
def test_rerun_after_a_crash_mid_write(tmp_path: Path) -> None:
    """Snakemake and its job are SIGKILLed while the tiles file is written (a node crash).

    The QC picture was already under its final name; Snakemake refuses to trust it and names
    the flag to go on; the crash also left its lock, which it names too (--unlock). The rerun
    then finishes and leaves no temporary behind.
    """
    work = make_hostile_workdir(tmp_path / "work")
    (work / "resources" / "one.csv").write_text("PATIENT,SLIDE,PATH\nP0,GOOD-1,slides/GOOD-1.tif\n")
    (work / "resources" / "one_clinical.csv").write_text("PATIENT,SUBTYPE\nP0,A\n")
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_STALL_IN_H5_WRITE)
    snakemake = [*SNAKEMAKE, "--directory", str(work), "--cores", "2", "--configfile"]
    snakemake += ["config/config.yaml", "config/fast.yaml", "--until", "tiling_tile_slide"]
    snakemake += ["--config", "slide_sheet=resources/one.csv"]
    snakemake += ["clinical_table=resources/one_clinical.csv"]
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(inject), "EAGLEFLOW_TEST_STALL": str(ready)}
    process = subprocess.Popen(
        snakemake,
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ready.exists(), "the tiling job never reached its H5 write"
    os.killpg(process.pid, signal.SIGKILL)  # Snakemake and the job together
    process.wait()
    tiles, qc = (
        work / "results" / "tiles" / "224px_2mpp" / "GOOD-1.h5",
        work / "results" / "qc" / "tiles",
    )
    assert not tiles.exists() and (qc / "GOOD-1.png").exists()
    assert list(tiles.parent.glob(".GOOD-1.h5.tmp.*"))

    plain = run(snakemake, cwd=work, check=False)
    said = plain.stdout + plain.stderr
    assert plain.returncode != 0 and "IncompleteFilesException" in said
    assert "results/qc/tiles/GOOD-1.png" in said and "--rerun-incomplete" in said
    assert not tiles.exists()

    locked = run([*snakemake, "--rerun-incomplete"], cwd=work, check=False)
    said = locked.stdout + locked.stderr
    assert locked.returncode != 0 and "LockException" in said and "--unlock" in said
    run([*snakemake, "--unlock"], cwd=work)
    run([*snakemake, "--rerun-incomplete"], cwd=work)
    assert validate_tiles(tiles)["n_tiles"] > 0
    assert sorted(p.name for p in tiles.parent.iterdir()) == ["GOOD-1.h5"]  # temporary removed
    assert job_counts(run([*snakemake, "-n"], cwd=work).stdout) == {"total": 0}
