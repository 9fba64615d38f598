"""The tile and slide encoders a config can name, their reference tilings, and the embeddings a
config produces. Pure Python (no torch): the Snakefile imports it at parse time.

A tile encoder runs on every tile of every slide at its own grid (tile px at µm/px); encoders
with the same grid share one tiles file. The embeddings are what the heads compare.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from eagleflow.errors import EagleflowError
from eagleflow.grids import Grid
from eagleflow.models.card import ANY_STAIN
from eagleflow.models.catalog import (
    slide_encoder_models,
    tile_encoder_models,
    tile_encoder_roles,
)

STAINS: tuple[str, ...] = ("HE", "IHC")
DEFAULT_STAIN = "HE"
# EAGLE selects tiles with CHIEF over CTransPath features: that encoder is always configured.
SELECTION_ENCODER = "ctranspath"


class EncoderConfigError(EagleflowError, ValueError):
    """The tile_encoders, eagle or slide_encoders section names something that cannot run."""


@dataclass(frozen=True)
class TileEncoder:
    """One tile encoder: its model per stain, output width and reference tiling."""

    name: str
    models: tuple[tuple[str, str], ...]  # (stain or "*", model name in `models:`)
    dim: int
    tile_px: int
    tile_mpp: float
    trained_stains: tuple[str, ...]  # stains of its training data
    reference: str  # where the default tiling comes from

    @property
    def default_grid(self) -> Grid:
        return Grid(self.tile_px, self.tile_mpp)

    def model_for(self, stain: str) -> str:
        """The model (weights key) that embeds slides of `stain`."""
        by_stain = dict(self.models)
        return by_stain.get(stain, by_stain.get(ANY_STAIN, by_stain.get(DEFAULT_STAIN, "")))

    def models_for(self, stains: Sequence[str]) -> list[str]:
        """The models needed for slides of these stains (each once, in stain order)."""
        return list(dict.fromkeys(self.model_for(stain) for stain in stains))


def _tile_encoders() -> dict[str, TileEncoder]:
    encoders = {}
    for name, role in tile_encoder_roles().items():
        encoders[name] = TileEncoder(
            name,
            tuple(tile_encoder_models(name).items()),
            role.dim,
            role.tile_px,
            role.tile_mpp,
            role.trained_stains,
            role.reference,
        )
    return encoders


# Every tile encoder a model card declares (eagleflow/models/*.py).
TILE_ENCODERS: dict[str, TileEncoder] = _tile_encoders()


@dataclass(frozen=True)
class SlideEncoder:
    """A model over a bag of tile embeddings and their coordinates."""

    name: str
    model: str
    tile_encoders: tuple[str, ...]  # the tile encoders it was trained on; the first by default
    dim: int
    embedding: str
    uses_positions: bool
    order_dependent: bool
    grid_limit: int | None

    @property
    def tile_encoder(self) -> str:
        return self.tile_encoders[0]


# Every slide encoder a model card declares.
SLIDE_ENCODERS: dict[str, SlideEncoder] = {
    name: SlideEncoder(
        name,
        model,
        role.tile_encoders,
        role.dim,
        role.embedding,
        role.uses_positions,
        role.order_dependent,
        role.grid_limit,
    )
    for name, (model, role) in slide_encoder_models().items()
}

# The embeddings of the default config (EAGLE, CHIEF, mean-pooled CTransPath).
DEFAULT_EMBEDDING_NAMES: tuple[str, ...] = ("eagle", "chief", "meanpool_ctranspath")

EmbeddingKind = Literal["eagle", "eagle_all", "chief", "meanpool", "slide_encoder"]


@dataclass(frozen=True)
class EmbeddingSpec:
    """One embedding of the cohort tables: what it is, made by which encoder and k."""

    name: str
    kind: EmbeddingKind
    encoder: str  # tile encoder (eagle: the second stage), or the slide encoder
    top_k: int | None = None
    tile_encoder: str | None = None  # a slide encoder's input
    grid: str = ""  # the grid suffix of its tile encoder's instance ("" for the first grid)

    @property
    def base(self) -> str:
        """The name without the grid suffix."""
        return self.name.removesuffix(self.grid)

    @property
    def features_key(self) -> str:
        """The tile-encoder instance whose features on every tile it reads."""
        if self.kind == "eagle_all":  # the second-stage encoder's instance at CHIEF's grid
            return str(self.tile_encoder)
        return self.input_encoder + self.grid

    @property
    def attention_key(self) -> str:
        """The CHIEF instance EAGLE and CHIEF read (`chief`, or `chief@0.5mpp`)."""
        return "chief" + self.grid

    @property
    def stage_key(self) -> str:
        """Its own stage's instance: EAGLE's second stage, or the slide encoder."""
        return self.encoder + self.grid

    @property
    def input_encoder(self) -> str:
        """The tile encoder whose features on every tile this embedding reads."""
        if self.kind in ("eagle", "chief"):
            return SELECTION_ENCODER
        if self.kind == "eagle_all":
            return self.encoder
        if self.kind == "meanpool":
            return self.encoder
        return self.tile_encoder or SLIDE_ENCODERS[self.encoder].tile_encoder

    @property
    def description(self) -> str:
        if self.kind == "eagle":
            return f"EAGLE: CHIEF top-{self.top_k} tiles embedded by {self.encoder}, mean"
        if self.kind == "eagle_all":
            return f"EAGLE all: CHIEF-softmax-weighted {self.encoder} embeddings of every tile"
        if self.kind == "chief":
            return "CHIEF attention pooling of CTransPath features"
        if self.kind == "meanpool":
            return f"mean of {self.encoder} embeddings of every tile"
        return f"{self.encoder} over the {self.input_encoder} embeddings of every tile"


def as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


# Grid presets. paper: the EAGLE paper's comparison, every encoder on 224 px tiles at 2, 1.14
# and 0.5 µm/px (2 µm/px first: EAGLE's own grid, the unsuffixed names); native: the grid of the
# encoder's card (its authors' setting).
PAPER_GRIDS: tuple[Grid, ...] = (Grid(224, 2.0), Grid(224, 1.14), Grid(224, 0.5))
PRESETS = ("paper", "native")


@dataclass(frozen=True)
class TileInstance:
    """A tile encoder at one grid: `name` is the encoder for its first grid, else the encoder
    and the grid's suffix (`ctranspath@0.5mpp`); every file and embedding made from it carries it."""

    name: str
    encoder: str
    grid: Grid
    suffix: str


def instance_base(name: str) -> str:
    """`virchow2@0.5mpp` -> `virchow2`: the encoder (or slide encoder) of an instance name."""
    return name.split("@", 1)[0]


def instance_suffix(name: str) -> str:
    """`virchow2@0.5mpp` -> `@0.5mpp`; "" for an encoder's first grid."""
    return name[len(instance_base(name)) :]


def grid_suffix(grid: Grid, grids: Sequence[Grid]) -> str:
    """`@<mpp>mpp`, or `@<px>px_<mpp>mpp` where the encoder has two grids at that µm/px."""
    same_mpp = [g for g in grids if g.tile_mpp == grid.tile_mpp]
    return f"@{grid.tile_mpp:g}mpp" if len(same_mpp) == 1 else f"@{grid.name}"


def encoder_grids(name: str, settings: Mapping[str, Any] | None) -> list[Grid]:
    """The grids of one `tile_encoders:` entry, in the order given (the first is its own)."""
    spec, settings = TILE_ENCODERS[name], dict(settings or {})
    if "grids" not in settings:
        return [
            Grid(
                int(settings.get("tile_px", spec.tile_px)),
                float(settings.get("tile_mpp", spec.tile_mpp)),
            )
        ]
    # With grids, tile_px/tile_mpp (say from the base config under an overlay) only fill in
    # what a {tile_px, tile_mpp} entry leaves out.
    default_px = int(settings.get("tile_px", spec.tile_px))
    default_mpp = float(settings.get("tile_mpp", spec.tile_mpp))
    grids: list[Grid] = []
    for entry in as_list(settings["grids"]):
        if entry == "paper":
            grids += PAPER_GRIDS
        elif entry == "native":
            grids.append(spec.default_grid)
        elif isinstance(entry, Mapping):
            grids.append(
                Grid(
                    int(entry.get("tile_px", default_px)), float(entry.get("tile_mpp", default_mpp))
                )
            )
        else:
            raise EncoderConfigError(
                f"tile_encoders.{name}.grids: {entry!r} is not {' or '.join(PRESETS)} or a "
                "{tile_px, tile_mpp} mapping"
            )
    return list(dict.fromkeys(grids))


def tile_encoder_instances(
    tile_encoders: Mapping[str, Mapping[str, Any] | None],
) -> dict[str, TileInstance]:
    """Every tile encoder at each of its grids, in config order (each encoder's grids in order)."""
    unknown = sorted(set(tile_encoders) - set(TILE_ENCODERS))
    if unknown:
        raise EncoderConfigError(
            f"tile_encoders: unknown encoder(s) {', '.join(unknown)}; known: "
            f"{', '.join(TILE_ENCODERS)}"
        )
    if SELECTION_ENCODER not in tile_encoders:
        raise EncoderConfigError(
            f"tile_encoders: {SELECTION_ENCODER} must be configured: EAGLE and CHIEF select "
            f"tiles over its features (add `{SELECTION_ENCODER}: {{}}`)"
        )
    instances = {}
    for name, settings in tile_encoders.items():
        grids = encoder_grids(name, settings)
        for i, grid in enumerate(grids):
            suffix = "" if i == 0 else grid_suffix(grid, grids)
            instances[name + suffix] = TileInstance(name + suffix, name, grid, suffix)
    return instances


def eagle_embedding_name(encoder: str, k: int, encoders: Sequence[str], ks: Sequence[int]) -> str:
    """`eagle` for the first encoder and first k; variants add `_<encoder>` and/or `_k<k>`."""
    name = "eagle"
    if encoder != encoders[0]:
        name += f"_{encoder}"
    if k != ks[0]:
        name += f"_k{k}"
    return name


def all_tiles_instance(
    instances: Mapping[str, TileInstance], encoder: str, selection: TileInstance
) -> str:
    """The instance of `encoder` at the selection instance's grid (EAGLE over all tiles reads
    its features of every tile CHIEF scored)."""
    for instance in instances.values():
        if instance.encoder == encoder and instance.grid == selection.grid:
            return instance.name
    grid = selection.grid
    raise EncoderConfigError(
        f"eagle.all_tiles: EAGLE over all tiles weights {encoder}'s embedding of every tile that "
        f"CHIEF scored at {grid.name}: add it to tile_encoders at that grid "
        f"(`{encoder}: {{tile_px: {grid.tile_px}, tile_mpp: {grid.tile_mpp:g}}}`, or a grids list "
        "holding it). It costs the second-stage encoder on every tile, as meanpool does."
    )


def configured_embeddings(
    tile_encoders: Sequence[str] | Mapping[str, TileInstance],
    eagle_encoders: Sequence[str],
    top_ks: Sequence[int],
    slide_encoders: Mapping[str, Mapping[str, Any]] | Sequence[str] = (),
    eagle_all: bool = False,
) -> list[EmbeddingSpec]:
    """Every embedding a config produces, in report order: per grid of the selection encoder
    EAGLE (its reference first), EAGLE over all tiles if asked, and CHIEF; then mean pooling and
    slide encoders per instance.

    `tile_encoders`: the instances (or plain encoder names, one grid each).
    """
    instances = (
        dict(tile_encoders)
        if isinstance(tile_encoders, Mapping)
        else {name: TileInstance(name, name, Grid(0, 0.0), "") for name in tile_encoders}
    )
    inputs = (
        {name: s.get("tile_encoder") for name, s in slide_encoders.items()}
        if isinstance(slide_encoders, Mapping)
        else dict.fromkeys(slide_encoders)
    )
    specs = []
    for selection in instances.values():
        if selection.encoder != SELECTION_ENCODER:
            continue
        grid = selection.suffix
        specs += [
            EmbeddingSpec(
                eagle_embedding_name(enc, k, eagle_encoders, top_ks) + grid,
                "eagle",
                enc,
                k,
                grid=grid,
            )
            for enc in eagle_encoders
            for k in top_ks
        ]
        if eagle_all:
            specs += [
                EmbeddingSpec(
                    eagle_embedding_name(enc, 0, eagle_encoders, [0]).replace(
                        "eagle", "eagle_all", 1
                    )
                    + grid,
                    "eagle_all",
                    enc,
                    tile_encoder=all_tiles_instance(instances, enc, selection),
                    grid=grid,
                )
                for enc in eagle_encoders
            ]
        specs.append(EmbeddingSpec("chief" + grid, "chief", SELECTION_ENCODER, grid=grid))
    specs += [
        EmbeddingSpec(f"meanpool_{inst.name}", "meanpool", inst.encoder, grid=inst.suffix)
        for inst in instances.values()
    ]
    for name, tile_encoder in inputs.items():
        source = tile_encoder or SLIDE_ENCODERS[name].tile_encoder
        specs += [
            EmbeddingSpec(
                name + inst.suffix, "slide_encoder", name, tile_encoder=source, grid=inst.suffix
            )
            for inst in instances.values()
            if inst.encoder == source
        ]
    return specs


def check_encoder_config(config: Mapping[str, Any]) -> None:
    """The eagle and slide_encoders sections name encoders that exist and can run."""
    for encoder in as_list(config["eagle"]["encoder"]):
        if encoder not in TILE_ENCODERS:
            raise EncoderConfigError(
                f"eagle.encoder: unknown tile encoder {encoder!r}; known: "
                f"{', '.join(TILE_ENCODERS)}"
            )
    for name, settings in (config.get("slide_encoders") or {}).items():
        needs = slide_encoder_input(name, settings)
        if needs not in config["tile_encoders"]:
            raise EncoderConfigError(
                f"slide_encoders.{name} runs over {needs} tile embeddings: add `{needs}: {{}}` "
                "to tile_encoders"
            )
        if "layer" in (settings or {}) and name != "gigapath_slide":
            raise EncoderConfigError(
                f"slide_encoders.{name}.layer: only gigapath_slide has a layer choice"
            )
    top_ks = as_list(config["eagle"]["top_k"])
    if len(set(top_ks)) != len(top_ks):
        raise EncoderConfigError(f"eagle.top_k: {top_ks} lists a k twice")


def slide_encoder_input(name: str, settings: Mapping[str, Any] | None) -> str:
    """The tile encoder slide encoder `name` runs over: `tile_encoder:` or its card's first."""
    if name not in SLIDE_ENCODERS:
        raise EncoderConfigError(
            f"slide_encoders: unknown slide encoder {name!r}; known: {', '.join(SLIDE_ENCODERS)}"
        )
    spec = SLIDE_ENCODERS[name]
    chosen = (settings or {}).get("tile_encoder", spec.tile_encoder)
    if chosen not in spec.tile_encoders:
        raise EncoderConfigError(
            f"slide_encoders.{name}.tile_encoder: {name} was trained on "
            f"{', '.join(spec.tile_encoders)} features only, not {chosen!r}: another encoder's "
            "features (even of the same width) give meaningless embeddings"
        )
    if chosen not in TILE_ENCODERS:
        raise EncoderConfigError(
            f"slide_encoders.{name}.tile_encoder: {chosen!r} has no model file in this workflow "
            f"(available: {', '.join(t for t in spec.tile_encoders if t in TILE_ENCODERS)})"
        )
    return chosen


FUSIONS = ("early", "late")


def slide_encoder_settings(section: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """`slide_encoders:` with defaults: fusion early, the card's first tile encoder."""
    settings = {}
    for name, given in (section or {}).items():
        given = dict(given or {})
        fusion = given.get("fusion", "early")
        if fusion not in FUSIONS:
            raise EncoderConfigError(
                f"slide_encoders.{name}.fusion: one of {', '.join(FUSIONS)}, got {fusion!r}"
            )
        settings[name] = {
            **given,
            "fusion": fusion,
            "tile_encoder": slide_encoder_input(name, given),
        }
    return settings


def required_models(config: Mapping[str, Any], stains: Sequence[str]) -> list[str]:
    """The `models:` entries this config runs, for slides of these stains."""
    models = []
    for name in config["tile_encoders"]:
        models += TILE_ENCODERS[name].models_for(stains)
    models.append("chief")
    for encoder in as_list(config["eagle"]["encoder"]):
        models += TILE_ENCODERS[encoder].models_for(stains)
    for name in config.get("slide_encoders") or {}:
        models.append(SLIDE_ENCODERS[name].model)
    return list(dict.fromkeys(models))


def check_embedding_names(where: str, names: Sequence[str], known: Sequence[str]) -> None:
    """Names a config section compares must be embeddings the config makes."""
    unknown = [name for name in names if name not in known]
    if unknown:
        renamed = " ('meanpool' is now 'meanpool_ctranspath')" if "meanpool" in unknown else ""
        raise EncoderConfigError(
            f"{where}: unknown embedding(s) {unknown}; this config makes {list(known)}{renamed}"
        )
