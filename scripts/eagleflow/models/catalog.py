"""Every model the workflow knows, read from the cards at the top of the model files.

Pure Python (no torch): the Snakefile plans with it. A model file is any module of this folder
with a module-level `CARD = ModelCard(...)` or `CARDS = (ModelCard(...), ...)`; the card is read
from the file's source with `ast` and built from literals and the classes of
`eagleflow.models.card` only, so nothing in the file runs at planning time. Dropping a new file
here is the whole registration.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eagleflow.errors import EagleflowError
from eagleflow.models.card import (
    CARD_CLASSES,
    CARD_CONSTANTS,
    INTERPOLATIONS,
    ModelCard,
    SlideEncoderRole,
    TileEncoderRole,
)

MODELS_DIR = Path(__file__).resolve().parent
MODELS_PACKAGE = "eagleflow.models"
CARD_NAMES = ("CARD", "CARDS")


class CardError(EagleflowError, ValueError):
    """A model file's card cannot be read, or two cards disagree."""


def _evaluate(node: ast.expr, where: str, names: Mapping[str, Any] | None = None) -> Any:
    """A card expression: literals, tuples/lists/dicts of them, card classes and constants, and
    `names` (the file's earlier module-level assignments of such expressions)."""
    names = names or {}

    def value(child: ast.expr) -> Any:
        return _evaluate(child, where, names)

    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(value(item) for item in node.elts)
    if isinstance(node, ast.Dict):
        return {
            value(key): value(item)
            for key, item in zip(node.keys, node.values, strict=True)
            if key is not None
        }
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -value(node.operand)
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.Name) and node.id in CARD_CONSTANTS:
        return CARD_CONSTANTS[node.id]
    if isinstance(node, ast.Attribute) and node.attr in CARD_CONSTANTS:
        return CARD_CONSTANTS[node.attr]
    if isinstance(node, ast.Call):
        func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        if func in CARD_CLASSES and not any(isinstance(a, ast.Starred) for a in node.args):
            args = [value(arg) for arg in node.args]
            kwargs = {kw.arg: value(kw.value) for kw in node.keywords if kw.arg}
            if len(kwargs) != len(node.keywords):
                raise CardError(f"{where}: `**` is not allowed in a card")
            return CARD_CLASSES[func](*args, **kwargs)
    raise CardError(
        f"{where}, line {node.lineno}: a card holds literals and "
        f"{', '.join(sorted(CARD_CLASSES))} only (so it is read without importing torch); "
        f"found {ast.unparse(node)!r}"
    )


def read_cards(path: Path) -> tuple[ModelCard, ...]:
    """The cards a model file declares (empty for a module without a card).

    A card may use names assigned before it at module level from card expressions (say one
    `ImagePreprocess` shared by a file's two cards); other assignments are skipped.
    """
    tree = ast.parse(path.read_bytes(), filename=str(path))
    names: dict[str, Any] = {}
    for node in tree.body:
        targets = (
            [node.target]
            if isinstance(node, ast.AnnAssign)
            else node.targets
            if isinstance(node, ast.Assign)
            else []
        )
        for target in targets:
            if not isinstance(target, ast.Name) or node.value is None:
                continue
            if target.id not in CARD_NAMES:
                try:  # a shared piece of the cards, or any other module constant (skipped)
                    names[target.id] = _evaluate(node.value, path.name, names)
                except (CardError, TypeError, ValueError):
                    names.pop(target.id, None)
                continue
            if node.value:
                value = _evaluate(node.value, f"{path.name}: {target.id}", names)
                cards = value if isinstance(value, tuple) else (value,)
                for card in cards:
                    if not isinstance(card, ModelCard):
                        raise CardError(f"{path.name}: {target.id} must hold ModelCard(...)")
                    _check_card(card, path.name)
                return cards
    return ()


def _check_card(card: ModelCard, where: str) -> None:
    tile = card.tile_role
    if tile is not None and tile.preprocess.interpolation not in INTERPOLATIONS:
        raise CardError(
            f"{where}: {card.name}: interpolation {tile.preprocess.interpolation!r}, "
            f"expected one of {INTERPOLATIONS}"
        )


@dataclass(frozen=True)
class Catalog:
    """Cards by model name, and the module that implements each."""

    cards: Mapping[str, ModelCard]
    modules: Mapping[str, str]  # model name -> dotted module

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.cards)

    def card(self, name: str) -> ModelCard:
        try:
            return self.cards[name]
        except KeyError:
            raise CardError(
                f"unknown model {name!r}; known models: {', '.join(self.cards)}"
            ) from None

    def module_file(self, name: str) -> Path:
        return MODELS_DIR / f"{self.modules[name].rsplit('.', 1)[1]}.py"


@functools.cache
def catalog(models_dir: Path = MODELS_DIR, package: str = MODELS_PACKAGE) -> Catalog:
    """Every model file of `models_dir`, in file order (the built-in models)."""
    cards: dict[str, ModelCard] = {}
    modules: dict[str, str] = {}
    for path in sorted(models_dir.glob("*.py")):
        for card in read_cards(path):
            if card.name in cards:
                raise CardError(
                    f"model {card.name!r} is declared twice: in {modules[card.name]} and "
                    f"{package}.{path.stem}"
                )
            cards[card.name] = card
            modules[card.name] = f"{package}.{path.stem}"
    _check_roles(cards)
    return Catalog(cards, modules)


def _check_roles(cards: Mapping[str, ModelCard]) -> None:
    """Cards that make one tile encoder agree on its grid and dim, each for its own stain."""
    by_encoder: dict[str, list[TileEncoderRole]] = {}
    for card in cards.values():
        if card.tile_role is not None:
            by_encoder.setdefault(card.tile_role.encoder, []).append(card.tile_role)
    for encoder, roles in by_encoder.items():
        facts = {(r.dim, r.tile_px, r.tile_mpp) for r in roles}
        stains = [r.stain for r in roles]
        if len(facts) > 1 or len(set(stains)) != len(stains):
            raise CardError(
                f"tile encoder {encoder!r}: its models must share dim and grid and each take a "
                f"different stain, got {roles}"
            )
    # A slide encoder may list tile encoders without a model file here (COBRA's UNI, say): a
    # config that picks one is refused by encoders.check_encoder_config.
    for card in cards.values():
        if card.slide_role is not None and not card.slide_role.tile_encoders:
            raise CardError(f"slide encoder {card.name!r} names no tile encoder")


def model_names() -> tuple[str, ...]:
    return catalog().names


def model_files(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The files (relative to the package, `models/titan.py`) of these models, for the code
    digest of a stage that runs them (`eagleflow.provenance.stage_code_digest`)."""
    cat = catalog()
    return tuple(f"models/{cat.module_file(name).name}" for name in names)


def model_module(name: str) -> str:
    """The dotted module implementing model `name`."""
    cat = catalog()
    cat.card(name)
    return cat.modules[name]


def tile_encoder_models(encoder: str) -> dict[str, str]:
    """Stain (or ANY_STAIN) -> model name, for the models that make tile encoder `encoder`."""
    return {
        card.tile_role.stain: card.name
        for card in catalog().cards.values()
        if card.tile_role is not None and card.tile_role.encoder == encoder
    }


def tile_encoder_roles() -> dict[str, TileEncoderRole]:
    """Tile encoder name -> its role (the first model's: the models of one encoder agree)."""
    roles: dict[str, TileEncoderRole] = {}
    for card in catalog().cards.values():
        if card.tile_role is not None:
            roles.setdefault(card.tile_role.encoder, card.tile_role)
    return roles


def slide_encoder_models() -> dict[str, tuple[str, SlideEncoderRole]]:
    """Slide encoder name -> (its model name, its role)."""
    return {
        card.slide_role.encoder: (card.name, card.slide_role)
        for card in catalog().cards.values()
        if card.slide_role is not None
    }
