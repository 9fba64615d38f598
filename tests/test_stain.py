"""The slide sheet's STAIN column, and tasks restricted to the patients with slides of one stain."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from eagleflow.encoders import DEFAULT_STAIN, STAINS
from eagleflow.sheets import SheetError, read_slide_sheet, sheet_stains
from eagleflow.tasks import TaskError, TaskSpec, validate_tasks


def write_sheet(tmp_path: Path, rows: list[str], header: str = "PATIENT,SLIDE,PATH,STAIN") -> Path:
    sheet = tmp_path / "slides.csv"
    sheet.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return sheet


def test_absent_column_means_every_slide_is_he(tmp_path):
    sheet = write_sheet(tmp_path, ["P1,S1,a.svs", "P2,S2,b.svs"], header="PATIENT,SLIDE,PATH")
    table = read_slide_sheet(sheet, check_paths=False)
    assert list(table["STAIN"]) == [DEFAULT_STAIN, DEFAULT_STAIN]
    assert sheet_stains(table) == [DEFAULT_STAIN]


@pytest.mark.parametrize(
    ("cell", "stain"),
    [
        ("HE", "HE"),
        ("he", "HE"),
        ("H&E", "HE"),
        ("h&e", "HE"),
        ("H-E", "HE"),
        ('"HE "', "HE"),
        ("", "HE"),
        ("IHC", "IHC"),
        ("ihc", "IHC"),
        ("Ihc", "IHC"),
    ],
)
def test_stain_spellings_are_normalised(tmp_path, cell, stain):
    sheet = write_sheet(tmp_path, [f"P1,S1,a.svs,{cell}"])
    assert read_slide_sheet(sheet, check_paths=False).at["S1", "STAIN"] == stain


def test_sheet_stains_follow_stains_order_not_the_sheet(tmp_path):
    sheet = write_sheet(tmp_path, ["P1,S1,a.svs,ihc", "P1,S2,b.svs,H&E", "P2,S3,c.svs,IHC"])
    table = read_slide_sheet(sheet, check_paths=False)
    assert sheet_stains(table) == [s for s in STAINS if s in {"HE", "IHC"}]
    only_ihc = table[table["STAIN"] == "IHC"]
    assert sheet_stains(only_ihc) == ["IHC"]


def test_unknown_stain_names_line_slide_allowed_values_and_the_fix(tmp_path):
    sheet = write_sheet(tmp_path, ["P1,S1,a.svs,HE", "P1,S2,b.svs,PAS", "P2,S 3,c.svs,Masson"])
    with pytest.raises(SheetError) as info:
        read_slide_sheet(sheet, check_paths=False)
    message = str(info.value)
    assert "3 problem(s)" in message  # both stains and the bad slide id, reported at once
    assert "line 3, column STAIN: 'PAS' (slide 'S2')" in message
    assert "line 4, column STAIN: 'Masson' (slide 'S 3')" in message
    assert str(list(STAINS)) in message and "leave it empty" in message
    assert "line 2, column STAIN" not in message


# A cohort for the task tests: INT (train) and EXT (external), every patient with an HE slide,
# some also with an IHC slide. Labels alternate A/B, so the IHC subset has its own counts.
IHC_PATIENTS = {f"INT-{i:02d}" for i in range(0, 24, 2)} | {f"INT-{i:02d}" for i in (1, 3, 5, 7)}
IHC_PATIENTS |= {f"EXT-{i:02d}" for i in range(4)}


def cohort_frames(ihc: set[str] = IHC_PATIENTS) -> tuple[pd.DataFrame, pd.DataFrame]:
    patients = [f"INT-{i:02d}" for i in range(24)] + [f"EXT-{i:02d}" for i in range(8)]
    rows = []
    for patient in patients:
        cohort = patient.split("-")[0]
        rows.append({"PATIENT": patient, "SLIDE": f"{patient}-HE", "COHORT": cohort, "STAIN": "HE"})
        if patient in ihc:
            rows.append(
                {"PATIENT": patient, "SLIDE": f"{patient}-IHC", "COHORT": cohort, "STAIN": "IHC"}
            )
    slides = pd.DataFrame(rows).set_index("SLIDE", drop=False)
    labels = ["A" if int(p.split("-")[1]) % 2 == 0 else "B" for p in patients]
    clinical = pd.DataFrame({"PATIENT": patients, "Y": labels}).set_index("PATIENT", drop=False)
    return clinical, slides


def task(**overrides) -> dict:
    return {"label": "Y", "train_cohorts": ["INT"], "external_cohorts": ["EXT"]} | overrides


def test_stain_restricts_the_task_to_patients_with_such_slides():
    clinical, slides = cohort_frames()
    specs = validate_tasks({"all": task(), "ihc": task(stain="ihc")}, clinical, slides, folds=3)
    train_ihc = clinical[
        clinical["PATIENT"].isin(IHC_PATIENTS) & clinical["PATIENT"].str.startswith("INT")
    ]
    expected = train_ihc["Y"].value_counts().to_dict()
    assert specs["ihc"].stain == "IHC"
    assert specs["ihc"].class_counts == expected
    train_all = clinical[clinical["PATIENT"].str.startswith("INT")]
    assert specs["all"].stain is None
    assert specs["all"].class_counts == train_all["Y"].value_counts().to_dict()
    assert specs["ihc"].class_counts != specs["all"].class_counts


def test_stain_he_without_a_stain_column_uses_every_patient():
    clinical, slides = cohort_frames(ihc=set())
    slides = slides.drop(columns="STAIN")  # frames built by hand, as older callers do
    specs = validate_tasks({"he": task(stain="HE"), "all": task()}, clinical, slides, folds=3)
    assert specs["he"].class_counts == specs["all"].class_counts
    with pytest.raises(TaskError, match=r"cohort 'INT' has a slide with STAIN IHC .*\['HE'\]"):
        validate_tasks({"ihc": task(stain="IHC")}, clinical, slides, folds=3)


def test_stain_without_slides_in_a_cohort_is_an_error():
    only_train = {p for p in IHC_PATIENTS if p.startswith("INT")}
    clinical, slides = cohort_frames(ihc=only_train)
    with pytest.raises(TaskError) as info:
        validate_tasks({"T": task(stain="IHC")}, clinical, slides, folds=3)
    message = str(info.value)
    assert "no patient of external cohort 'EXT' has a slide with STAIN IHC" in message
    assert "cohort 'INT'" not in message
    assert "tasks.T.external_cohorts" in message and "tasks.T.stain" in message
    clinical, slides = cohort_frames(ihc={p for p in IHC_PATIENTS if p.startswith("EXT")})
    with pytest.raises(TaskError, match=r"no patient of train cohort 'INT' has a slide with STAIN"):
        validate_tasks({"T": task(stain="IHC")}, clinical, slides, folds=3)


def test_restricted_task_with_one_class_or_too_few_patients_is_an_error():
    even = {f"INT-{i:02d}" for i in range(0, 24, 2)} | {"EXT-00"}  # every one of them is 'A'
    clinical, slides = cohort_frames(ihc=even)
    validate_tasks({"T": task()}, clinical, slides, folds=3)  # fine on every slide
    with pytest.raises(TaskError, match=r"single class \('A'\) among the 12 labelled patients "):
        validate_tasks({"T": task(stain="IHC")}, clinical, slides, folds=3)
    few_b = even | {"INT-01", "INT-03"}
    clinical, slides = cohort_frames(ihc=few_b)
    with pytest.raises(TaskError, match=r"class 'B' of column 'Y' has 2 patient\(s\) with IHC"):
        validate_tasks({"T": task(stain="IHC")}, clinical, slides, folds=3)


def test_unknown_task_stain_is_an_error():
    clinical, slides = cohort_frames()
    with pytest.raises(TaskError, match=r"task 'T': stain 'PAS' is not one of \['HE', 'IHC'\]"):
        validate_tasks({"T": task(stain="PAS")}, clinical, slides, folds=3)


def test_params_carry_the_stain_and_name_the_embeddings_table():
    clinical, slides = cohort_frames()
    specs = validate_tasks({"all": task(), "ihc": task(stain="IHC")}, clinical, slides, folds=3)
    ihc, every = specs["ihc"], specs["all"]
    assert ihc.params()["stain"] == "IHC"
    assert TaskSpec.from_params(ihc.params()) == ihc
    assert TaskSpec.from_params(every.params()) == every
    # An unset stain leaves the params as they were before the key existed (no rerun).
    assert "stain" not in every.params()
    relabelled = TaskSpec.from_params(every.params() | {"stain": "IHC"})
    assert relabelled.params() != every.params()
    assert every.embeddings_table == "patients"
    assert ihc.embeddings_table == "patients_IHC"
