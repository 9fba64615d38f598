"""One file per model: cards read without torch, the catalog's checks, and a toy model dropped
into a copy of the repository running through the DAG."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from workflow_helpers import FAST, REPO, SNAKEMAKE, job_counts, run

from eagleflow.encoders import SLIDE_ENCODERS, TILE_ENCODERS
from eagleflow.h5io import read_h5
from eagleflow.models.card import ModelCard
from eagleflow.models.catalog import CardError, catalog, read_cards
from eagleflow.weights import MODEL_NAMES, REGISTRY

TOY_MODEL = '''
"""A toy tile encoder: per-channel mean and spread of the tile, scaled."""

from pathlib import Path
from typing import Any

import torch
from torch import nn

from eagleflow.models.card import ImagePreprocess, ModelCard, TileEncoderRole, WeightFile

CARD = ModelCard(
    name="toy",
    summary="toy tile encoder (tests)",
    weights=WeightFile(file_name="toy.pth", source="the test suite", container="bare state dict"),
    role=TileEncoderRole(
        encoder="toy",
        dim=6,
        tile_px=224,
        tile_mpp=2.0,
        trained_stains=("HE",),
        reference="the test suite",
        preprocess=ImagePreprocess(resize=224, crop=224, interpolation="bilinear"),
    ),
)
SIGNATURE_KEYS = ("toy_scale",)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.toy_scale = nn.Parameter(torch.ones(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1) * self.toy_scale


def build(device: Any = None) -> Toy:
    with torch.device(device or "cpu"):
        return Toy()


def prepare_state_dict(checkpoint: Any, path: Path | None) -> dict[str, torch.Tensor]:
    return dict(checkpoint)
'''


def test_cards_are_read_without_torch():
    """The Snakefile plans with the catalog: no model file may be imported for it."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        sys.path.insert(0, "scripts")
        from eagleflow.encoders import SLIDE_ENCODERS, TILE_ENCODERS
        from eagleflow.weights import MODEL_NAMES
        print(len(MODEL_NAMES), sorted(TILE_ENCODERS), sorted(SLIDE_ENCODERS))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "ctranspath" in result.stdout and "gigapath_slide" in result.stdout


def test_every_card_is_a_loadable_model_file():
    cat = catalog()
    assert set(MODEL_NAMES) == set(cat.cards) == set(REGISTRY)
    for name, card in cat.cards.items():
        module = importlib.import_module(cat.modules[name])
        assert module.__file__ == str(cat.module_file(name))
        assert callable(module.build) and callable(module.prepare_state_dict), name
        assert module.SIGNATURE_KEYS, name
        assert card.weights.file_name and card.weights.source, name
    for name, encoder in TILE_ENCODERS.items():
        assert encoder.dim > 0 and encoder.tile_px > 0 and encoder.tile_mpp > 0, name
        assert encoder.models, name
    for name, encoder in SLIDE_ENCODERS.items():
        assert cat.card(encoder.model).slide_role is not None, name


def write_model(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(body)
    return path


def test_a_card_is_data_only(tmp_path):
    path = write_model(tmp_path, "toy", TOY_MODEL)
    (card,) = read_cards(path)
    assert isinstance(card, ModelCard) and card.tile_role.dim == 6
    shared = TOY_MODEL.replace("CARD = ModelCard(", 'TOY_SUMMARY = "shared"\nCARD = ModelCard(')
    shared = shared.replace('summary="toy tile encoder (tests)"', "summary=TOY_SUMMARY")
    (card,) = read_cards(write_model(tmp_path, "toy", shared))
    assert card.summary == "shared"  # a module-level name assigned card data before the card
    computed = TOY_MODEL.replace('summary="toy tile encoder (tests)"', "summary=str(1)")
    with pytest.raises(CardError, match=r"toy.py: CARD, line \d+: .*found 'str\(1\)'"):
        read_cards(write_model(tmp_path, "toy", computed))


def test_catalog_refuses_a_name_twice_and_disagreeing_encoder_files(tmp_path):
    write_model(tmp_path, "toy", TOY_MODEL)
    write_model(tmp_path, "toy_again", TOY_MODEL)
    with pytest.raises(CardError, match="'toy' is declared twice"):
        catalog(tmp_path, "somewhere")
    # a second model of tile encoder `toy` at another grid, for the same stain
    write_model(
        tmp_path,
        "toy_again",
        TOY_MODEL.replace('name="toy"', 'name="toy2"').replace("tile_mpp=2.0", "tile_mpp=1.0"),
    )
    with pytest.raises(CardError, match="tile encoder 'toy'"):
        catalog(tmp_path, "somewhere")


@pytest.mark.workflow
def test_a_toy_model_file_is_the_whole_registration(finished_demo, tmp_path):
    """A copy of the repository with one new file: its encoder runs on the existing grid, plans
    only its own feature batches and the tables below (every other stage's code is unchanged),
    and its mean-pooled embedding reaches the patient table."""
    copy = tmp_path / "repo"
    ignore = shutil.ignore_patterns(".venv", ".snakemake", "results", "resources", ".git", "logs")
    shutil.copytree(REPO, copy, ignore=ignore)
    write_model(copy / "scripts" / "eagleflow" / "models", "toy", TOY_MODEL)
    work = tmp_path / "demo"
    shutil.copytree(finished_demo, work)  # copy2 keeps mtimes
    (work / "config" / "toy.yaml").write_text(
        "tile_encoders:\n  toy: {}\nmodels:\n  toy:\n    weights: demo\n"
    )
    args = [*SNAKEMAKE, "--directory", str(work), *FAST, "config/toy.yaml"]
    args[args.index("--snakefile") + 1] = str(copy / "Snakefile")
    counts = job_counts(run([*args, "-n"], cwd=work).stdout)
    assert counts["features_encode_tiles"] == 2  # the toy's two batches, not CTransPath's
    for untouched in ("tiling_tile_slide", "attention_chief", "eagle_embed_topk"):
        assert untouched not in counts
    run([*args, "--cores", "2", "results/embeddings/patients.h5"], cwd=work)
    patients, attrs = read_h5(work / "results" / "embeddings" / "patients.h5")
    assert patients["meanpool_toy"].shape[1] == 6
    assert "meanpool_toy" in json.loads(attrs["embeddings"])
    assert (patients["meanpool_toy"].std(0) > 0).all()  # the tiles' colours, per patient


def test_a_checkpoint_is_named_by_the_architecture_it_fits():
    """Virchow v1's keys are a subset of Virchow2's: the signature alone would name the wrong one."""
    from eagleflow.models.loading import build_model, identify_checkpoint

    for name in ("virchow2", "virchow", "gigapath_tile"):
        meta_file = build_model(name).state_dict()  # meta tensors: shapes without memory
        assert identify_checkpoint(dict(meta_file)) == name
    assert identify_checkpoint({"something": 1}) is None
