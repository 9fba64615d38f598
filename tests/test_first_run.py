"""A first run explains itself: missing sheets say what creates them; nested --config values work."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from workflow_helpers import REPO, SNAKEMAKE, run

from eagleflow.config_values import coerce_command_line_strings

SCHEMA = yaml.safe_load((REPO / "config" / "schemas" / "config.schema.yaml").read_text())


def test_a_fresh_clone_without_the_demo_cohort_says_what_creates_it(tmp_path: Path):
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "config.yaml", tmp_path / "config" / "config.yaml")
    result = run([*SNAKEMAKE, "-n", "--directory", str(tmp_path)], cwd=tmp_path, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "resources/demo/slides.csv: file not found" in output
    assert "make demo-data" in output
    assert "--config slide_sheet=PATH" in output


def test_nested_command_line_values_are_typed_by_the_schema():
    given = {
        "eagle": {"top_k": "12", "reference_transpose": "false"},
        "tiling": {"default_mpp": "0.5", "mask_mpp": "8"},
        "tile_encoders": {"gigapath_tile": {"tile_px": "256", "tile_mpp": "0.5"}},
        "heads": {"fewshot": {"shots": ["1", "2", "4"]}},
        "models": {"ctranspath": {"weights": "123", "sha256": "null"}},
    }
    typed, converted = coerce_command_line_strings(given, SCHEMA)
    assert typed["eagle"] == {"top_k": 12, "reference_transpose": False}
    assert typed["tiling"] == {"default_mpp": 0.5, "mask_mpp": 8}
    assert typed["tile_encoders"] == {"gigapath_tile": {"tile_px": 256, "tile_mpp": 0.5}}
    # an integer or a list of integers (oneOf): both read as integers
    listed, _ = coerce_command_line_strings({"eagle": {"top_k": ["25", "5"]}}, SCHEMA)
    assert listed["eagle"]["top_k"] == [25, 5]
    assert typed["heads"]["fewshot"]["shots"] == [1, 2, 4]
    # A string key stays text, even when it looks like a number; "null" becomes null where allowed.
    assert typed["models"]["ctranspath"] == {"weights": "123", "sha256": None}
    assert "eagle.top_k" in converted and "heads.fewshot.shots[2]" in converted
    assert "models.ctranspath.weights" not in converted


@pytest.mark.parametrize("text", ["12.5", "twelve", "1e3", ""])
def test_text_that_is_not_an_integer_is_left_for_the_schema_to_reject(text):
    typed, converted = coerce_command_line_strings({"eagle": {"top_k": text}}, SCHEMA)
    assert typed["eagle"]["top_k"] == text and converted == []


def test_snakemake_accepts_a_nested_override_and_rejects_a_bad_one(demo_dir: Path):
    good = run(
        [*SNAKEMAKE, "-n", "--directory", str(demo_dir), "--config", "eagle={top_k: 3}"],
        cwd=demo_dir,
    )
    assert "eagle.top_k" in good.stderr
    bad = run(
        [*SNAKEMAKE, "-n", "--directory", str(demo_dir), "--config", "eagle={top_k: three}"],
        cwd=demo_dir,
        check=False,
    )
    output = bad.stdout + bad.stderr
    assert bad.returncode != 0 and "'three' is not valid under any of the given schemas" in output
    assert "On instance['eagle']['top_k']" in output
