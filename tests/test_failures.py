"""scripts/tools/failed_slides.py: tiling outcomes read from a run's files, and a sheet without failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from eagleflow.failures import tiling_status, write_sheet_without
from eagleflow.sheets import read_slide_sheet

REPO = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, str(REPO / "scripts" / "tools" / "failed_slides.py")]


def log_line(level: str, message: str) -> str:
    """A line as eagleflow.logutil.setup_logging formats it (the hostile workflow test reads
    real ones)."""
    return f"2026-11-23 09:19:58 {level} eagleflow: {message}\n"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """S1 tiled; S2 failed (its job logged why); S3 started and was killed (no reason logged);
    S4 cancelled by SIGTERM; S5 never ran."""
    slides = tmp_path / "data" / "slides"
    slides.mkdir(parents=True)
    rows = ["PATIENT,SLIDE,PATH,MPP"]
    for i, patient in enumerate(["P1", "P2", "P2", "P3", "P3"], start=1):
        (slides / f"s{i}.tif").write_bytes(b"x")
        rows.append(f"{patient},S{i},slides/s{i}.tif,{'0.5' if i == 1 else ''}")
    (tmp_path / "data" / "slides.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "config.yaml").write_text("slide_sheet: data/slides.csv\n", encoding="utf-8")
    for grid in ("224px_2mpp", "256px_0.5mpp"):  # S1 on every grid, S3 on one only
        (tmp_path / "results" / "tiles" / grid).mkdir(parents=True)
        (tmp_path / "results" / "tiles" / grid / "S1.h5").write_bytes(b"complete")
    (tmp_path / "results" / "tiles" / "224px_2mpp" / "S3.h5").write_bytes(b"complete")
    logs = tmp_path / "logs" / "tiling"
    logs.mkdir(parents=True)
    (logs / "S1.log").write_text(log_line("INFO", "done"), encoding="utf-8")
    (logs / "S2.log").write_text(
        log_line("INFO", "reading the slide")
        + log_line("ERROR", "slide 'S2' (s2.tif): no MPP; add one to the sheet"),
        encoding="utf-8",
    )
    (logs / "S3.log").write_text(log_line("INFO", "reading the slide"), encoding="utf-8")
    (logs / "S4.log").write_text(
        log_line("ERROR", "stopped by SIGTERM; outputs not finished were removed."),
        encoding="utf-8",
    )
    return tmp_path


def test_status_of_each_slide_comes_from_its_output_and_log(run_dir: Path) -> None:
    statuses = {s.slide_id: s for s in tiling_status(run_dir / "data" / "slides.csv", run_dir)}
    assert {k: s.status for k, s in statuses.items()} == {
        "S1": "tiled",
        "S2": "failed",
        "S3": "unfinished",
        "S4": "unfinished",
        "S5": "not run",
    }
    assert statuses["S2"].message == "slide 'S2' (s2.tif): no MPP; add one to the sheet"
    assert statuses["S3"].message.startswith("no reason logged")
    assert statuses["S4"].message.startswith("stopped by SIGTERM")


def test_sheet_without_failures_keeps_columns_and_resolves_paths(run_dir: Path) -> None:
    sheet = run_dir / "data" / "slides.csv"
    for out in (run_dir / "elsewhere" / "clean.csv", run_dir / "data" / "clean.csv"):
        assert write_sheet_without(sheet, {"S2"}, out) == 4
        assert out.read_text(encoding="utf-8").splitlines()[0] == "PATIENT,SLIDE,PATH,MPP"
        clean = read_slide_sheet(out)  # paths checked: they resolve from the new folder
        assert list(clean.index) == ["S1", "S3", "S4", "S5"]
        assert clean.at["S1", "PATH"] == str(run_dir / "data" / "slides" / "s1.tif")
        assert clean.at["S1", "MPP"] == 0.5
    assert "slides/s1.tif" in (run_dir / "data" / "clean.csv").read_text(encoding="utf-8")


def failed_slides(run_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, "--configfile", "config.yaml", "--write-sheet", "clean.csv"],
        cwd=run_dir,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "scripts")},
    )


def test_command_lists_failures_and_exits_nonzero(run_dir: Path) -> None:
    result = failed_slides(run_dir)
    lines = result.stdout.splitlines()
    assert result.returncode == 1 and lines, result.stderr
    assert lines[0].endswith("5 slides; 1 tiled, 1 failed, 2 unfinished, 1 not run"), lines[0]
    assert "failed\tS2\tslide 'S2' (s2.tif): no MPP; add one to the sheet" in lines
    assert any(line.startswith("unfinished\tS3\tno reason logged") for line in lines)
    assert any(line.startswith("unfinished\tS4\tstopped by SIGTERM") for line in lines)
    assert "wrote clean.csv: 4 slides (the 1 failed ones removed)" in lines
    # P2 keeps S3, so no patient is left without slides
    assert not any("no slide left" in line for line in lines)
    kept = (run_dir / "clean.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert [row.split(",")[1] for row in kept] == ["S1", "S3", "S4", "S5"]


def test_command_names_patients_left_without_slides(run_dir: Path) -> None:
    (run_dir / "logs" / "tiling" / "S3.log").write_text(
        log_line("ERROR", "slide 'S3' (s3.tif): no tissue found"), encoding="utf-8"
    )
    result = failed_slides(run_dir)
    assert "1 patient(s) have no slide left (P2)" in result.stdout, result.stdout + result.stderr
