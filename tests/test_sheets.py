"""Slide sheet and clinical table validation: each mistake names file, line and column."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from eagleflow.sheets import (
    SheetError,
    check_sheets_agree,
    read_clinical_table,
    read_slide_sheet,
)


@pytest.fixture
def slide_files(tmp_path: Path) -> Path:
    for name in ("a.svs", "b.svs", "c.svs"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_sheet_resolves_paths_relative_to_the_sheet(slide_files):
    sheet = write(
        slide_files / "slides.csv",
        "PATIENT,SLIDE,PATH,MPP,COHORT\nP1,S1,a.svs,0.25,TCGA\nP1,S2,b.svs,,\nP2,S3,"
        f"{slide_files / 'c.svs'},,TCGA\n",
    )
    table = read_slide_sheet(sheet)
    assert list(table.index) == ["S1", "S2", "S3"]
    assert table.at["S1", "PATH"] == str((slide_files / "a.svs").resolve())
    assert table.at["S1", "MPP"] == 0.25 and math.isnan(table.at["S2", "MPP"])
    assert table.at["S2", "COHORT"] == "default"


def test_tsv_is_read_by_extension(slide_files):
    sheet = write(slide_files / "slides.tsv", "PATIENT\tSLIDE\tPATH\nP1\tS1\ta.svs\n")
    assert read_slide_sheet(sheet).at["S1", "PATIENT"] == "P1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("PATIENT,SLIDE,PATH\nP1,S1,a.svs\nP2,S1,b.svs\n", r"SLIDE 'S1' appears on lines 2, 3"),
        ("PATIENT,SLIDE,PATH\nP1,my slide,a.svs\n", r"line 2, column SLIDE: 'my slide'"),
        ("PATIENT,SLIDE,PATH\nP1,S1;rm -rf,a.svs\n", r"line 2, column SLIDE: 'S1;rm -rf'"),
        ('PATIENT,SLIDE,PATH\nP1,"S\'1",a.svs\n', r"line 2, column SLIDE"),
        ("PATIENT,SLIDE,PATH\nP1,S1,missing.svs\n", r"line 2, column PATH: 'missing.svs' does not"),
        ("PATIENT,SLIDE,PATH,LABEL\nP1,S1,a.svs,x\n", r"unknown column\(s\) \['LABEL'\]"),
        ("PATIENT,PATH\nP1,a.svs\n", r"missing column\(s\) \['SLIDE'\]"),
        ("PATIENT,SLIDE,PATH,MPP\nP1,S1,a.svs,fast\n", r"line 2, column MPP: 'fast'"),
        (
            "PATIENT,SLIDE,PATH,MPP\nP1,S1,a.svs,50\n",
            r"line 2, column MPP: 50 µm/px is outside the plausible range 0\.05-10 µm/px",
        ),
        ("PATIENT,SLIDE,PATH,MPP\nP1,S1,a.svs,0.01\n", r"line 2, column MPP: 0\.01 µm/px is out"),
        ("PATIENT,SLIDE,PATH\n,S1,a.svs\n", r"line 2, column PATIENT: empty"),
        ("PATIENT,SLIDE,PATH\n", r"no slides"),
        ("", r"empty"),
    ],
)
def test_sheet_mistakes_are_named(slide_files, text, message):
    sheet = write(slide_files / "slides.csv", text)
    with pytest.raises(SheetError, match=message):
        read_slide_sheet(sheet)


def test_unicode_ids_are_rejected_and_non_utf8_is_explained(slide_files):
    sheet = write(slide_files / "slides.csv", "PATIENT,SLIDE,PATH\nP1,Schnitt-ä,a.svs\n")
    with pytest.raises(SheetError, match="line 2, column SLIDE"):
        read_slide_sheet(sheet)
    latin1 = slide_files / "latin1.csv"
    latin1.write_bytes("PATIENT,SLIDE,PATH\nP1,S1,a.svs\nPä,S2,b.svs\n".encode("latin-1"))
    with pytest.raises(SheetError, match="line 3 is not valid UTF-8"):
        read_slide_sheet(latin1)


def test_all_problems_are_reported_at_once(slide_files):
    sheet = write(slide_files / "slides.csv", "PATIENT,SLIDE,PATH\nP1,S 1,a.svs\nP2,S2,nope.svs\n")
    with pytest.raises(SheetError, match="2 problem") as error:
        read_slide_sheet(sheet)
    assert "line 2" in str(error.value) and "line 3" in str(error.value)


def test_clinical_table_and_agreement(slide_files):
    sheet = write(slide_files / "slides.csv", "PATIENT,SLIDE,PATH\nP1,S1,a.svs\nP2,S2,b.svs\n")
    clinical = write(slide_files / "clinical.csv", "PATIENT,SUBTYPE\nP1,A\nP3,B\n")
    slides, table = read_slide_sheet(sheet), read_clinical_table(clinical)
    assert table.at["P1", "SUBTYPE"] == "A"
    with pytest.raises(SheetError, match=r"without a row in the clinical table.*\['P2'\]"):
        check_sheets_agree(slides, table, sheet, clinical)
    both = write(slide_files / "c2.csv", "PATIENT,SUBTYPE\nP1,A\nP2,B\nP3,B\n")
    with pytest.raises(SheetError, match=r"without slides.*\['P3'\].*allow_patients_without"):
        check_sheets_agree(slides, read_clinical_table(both), sheet, both)
    check_sheets_agree(slides, read_clinical_table(both), sheet, both, True)  # allowed: no error


def test_duplicate_patients_in_clinical_table(slide_files):
    clinical = write(slide_files / "clinical.csv", "PATIENT,SUBTYPE\nP1,A\nP1,B\n")
    with pytest.raises(SheetError, match="PATIENT 'P1' appears on lines 2, 3"):
        read_clinical_table(clinical)


def test_linked_slide_keeps_its_name_and_dotdot_follows_linked_folders(tmp_path):
    real = tmp_path / "gpfs" / "project"
    (real / "slides").mkdir(parents=True)
    (real / "sheets").mkdir()
    (real / "slides" / "x.svs").write_bytes(b"x")
    (real / "slides" / "alias.svs").symlink_to("x.svs")
    # The user reaches the sheet folder through a link, as home-directory links to GPFS do;
    # '..' from there means the linked folder's parent, as the OS resolves it when opening.
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "sheets").symlink_to(real / "sheets")
    (tmp_path / "home" / "slides").mkdir()  # a decoy that text-only '..' handling would pick
    sheet = write(
        tmp_path / "home" / "sheets" / "slides.csv",
        "PATIENT,SLIDE,PATH\nP1,S1,../slides/x.svs\nP1,S2,../slides/alias.svs\n",
    )
    table = read_slide_sheet(sheet)
    assert table.at["S1", "PATH"] == str(real / "slides" / "x.svs")
    assert table.at["S2", "PATH"] == str(real / "slides" / "alias.svs")  # link not followed


def test_sheet_mpp_bounds_follow_the_configured_range(slide_files):
    sheet = write(slide_files / "slides.csv", "PATIENT,SLIDE,PATH,MPP\nP1,S1,a.svs,50\n")
    assert read_slide_sheet(sheet, mpp_range=(0.05, 100.0)).at["S1", "MPP"] == 50.0
    with pytest.raises(SheetError, match=r"MPP: 50 µm/px is outside the plausible range 1-20"):
        read_slide_sheet(sheet, mpp_range=(1.0, 20.0)).at["S1", "MPP"]


def test_paths_inside_the_working_directory_stay_relative_to_it(tmp_path):
    """What the workflow passes on: a project moved as a whole keeps the same slide paths."""
    work, elsewhere = tmp_path / "work", tmp_path / "archive"
    for folder in (work / "resources" / "slides", elsewhere):
        folder.mkdir(parents=True)
        (folder / "a.svs").write_bytes(b"x")
    sheet = write(
        work / "resources" / "slides.csv",
        f"PATIENT,SLIDE,PATH\nP1,S1,slides/a.svs\nP2,S2,{elsewhere / 'a.svs'}\n"
        "P3,S3,../resources/slides/a.svs\n",
    )
    table = read_slide_sheet(sheet, relative_to=work)
    assert table.at["S1", "PATH"] == "resources/slides/a.svs"
    assert table.at["S2", "PATH"] == str((elsewhere / "a.svs").resolve())
    assert table.at["S3", "PATH"] == "resources/slides/a.svs"
    assert read_slide_sheet(sheet).at["S1", "PATH"] == str(sheet.parent.resolve() / "slides/a.svs")
