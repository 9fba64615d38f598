"""scripts/failed_slides.py: tiling outcomes read from a run's files, and a sheet without failures."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from eagleflow.failures import tiling_status, write_sheet_without
from eagleflow.logutil import setup_logging
from eagleflow.sheets import read_slide_sheet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run in which S1 was tiled, S2 failed (logged like a rule script), S3 never ran."""
    slides = tmp_path / "data" / "slides"
    slides.mkdir(parents=True)
    for name in ("s1.tif", "s2.tif", "s3.tif"):
        (slides / name).write_bytes(b"x")
    (tmp_path / "data" / "slides.csv").write_text(
        "PATIENT,SLIDE,PATH,MPP\nP1,S1,slides/s1.tif,0.5\nP2,S2,slides/s2.tif,\n"
        "P2,S3,slides/s3.tif,\n",
        encoding="utf-8",
    )
    (tmp_path / "config.yaml").write_text("slide_sheet: data/slides.csv\n", encoding="utf-8")
    (tmp_path / "results" / "tiles").mkdir(parents=True)
    (tmp_path / "results" / "tiles" / "S1.h5").write_bytes(b"complete")
    logs = tmp_path / "logs" / "tiling"
    logs.mkdir(parents=True)
    setup_logging(str(logs / "S2.log"))
    logging.getLogger("eagleflow.tiling").info("reading the slide")
    logging.getLogger("eagleflow").error("slide 'S2' (s2.tif): no MPP; add one to the sheet")
    logging.shutdown()
    logging.getLogger().handlers.clear()
    (logs / "S3.log").write_text("", encoding="utf-8")  # started, never finished
    return tmp_path


def test_status_of_each_slide_comes_from_its_output_and_log(run_dir: Path) -> None:
    statuses = {s.slide_id: s for s in tiling_status(run_dir / "data" / "slides.csv", run_dir)}
    assert statuses["S1"].status == "tiled"
    assert statuses["S2"].status == "failed"
    assert statuses["S2"].message == "slide 'S2' (s2.tif): no MPP; add one to the sheet"
    assert statuses["S3"].status == "not run" and statuses["S3"].message == ""


def test_sheet_without_failures_keeps_columns_and_resolves_paths(run_dir: Path) -> None:
    out = run_dir / "elsewhere" / "clean.csv"
    kept = write_sheet_without(run_dir / "data" / "slides.csv", {"S2"}, out)
    assert kept == 2
    assert out.read_text(encoding="utf-8").splitlines()[0] == "PATIENT,SLIDE,PATH,MPP"
    clean = read_slide_sheet(out)  # paths checked: they resolve from the new folder
    assert list(clean.index) == ["S1", "S3"]
    assert clean.at["S1", "PATH"] == str(run_dir / "data" / "slides" / "s1.tif")
    assert clean.at["S1", "MPP"] == 0.5


def test_command_lists_failures_and_exits_nonzero(run_dir: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "failed_slides.py"),
            "--configfile",
            "config.yaml",
            "--write-sheet",
            "clean.csv",
        ],
        cwd=run_dir,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "scripts")},
    )
    lines = result.stdout.splitlines()
    assert result.returncode == 1 and lines, result.stderr
    assert lines[0].endswith("3 slides; 1 tiled, 1 failed, 1 not run")
    assert "failed\tS2\tslide 'S2' (s2.tif): no MPP; add one to the sheet" in lines
    assert "wrote clean.csv: 2 slides (the 1 failed ones removed)" in lines
    # P2 keeps S3, so no patient is left without slides
    assert not any("no slide left" in line for line in lines)
    assert [row.split(",")[1] for row in (run_dir / "clean.csv").read_text().splitlines()[1:]] == [
        "S1",
        "S3",
    ]
