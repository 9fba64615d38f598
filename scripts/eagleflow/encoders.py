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

STAINS: tuple[str, ...] = ("HE", "IHC")
DEFAULT_STAIN = "HE"
ANY_STAIN = "*"
# EAGLE selects tiles with CHIEF over CTransPath features: that encoder is always configured.
SELECTION_ENCODER = "ctranspath"


class EncoderConfigError(EagleflowError, ValueError):
    """The tile_encoders, eagle or slide_encoders section names something that cannot run."""


@dataclass(frozen=True, order=True)
class Grid:
    """A tiling: square tiles of `tile_px` pixels at `tile_mpp` µm/px."""

    tile_px: int
    tile_mpp: float

    @property
    def name(self) -> str:
        """The grid's folder name, e.g. 224px_2mpp or 256px_0.5mpp."""
        return f"{self.tile_px}px_{self.tile_mpp:g}mpp"

    @property
    def tile_size_um(self) -> float:
        return self.tile_px * self.tile_mpp


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


TILE_ENCODERS: dict[str, TileEncoder] = {
    "ctranspath": TileEncoder(
        "ctranspath",
        ((ANY_STAIN, "ctranspath"),),
        768,
        224,
        2.0,
        ("HE",),
        "EAGLE and STAMP: 224 px at 2 µm/px (448 µm regions) for CHIEF's selection",
    ),
    "virchow2": TileEncoder(
        "virchow2",
        ((ANY_STAIN, "virchow2"),),
        1280,
        224,
        0.5,
        ("HE", "IHC"),
        "Virchow2 model card: 224 px tiles, trained at several magnifications (0.5 µm/px default)",
    ),
    "gigapath_tile": TileEncoder(
        "gigapath_tile",
        ((ANY_STAIN, "gigapath_tile"),),
        1536,
        256,
        0.5,
        ("HE", "IHC"),
        "Prov-GigaPath demo/1_slide_mpp_check.py: 256 px tiles at 0.5 µm/px",
    ),
    "pathoduet": TileEncoder(
        "pathoduet",
        (("HE", "pathoduet_he"), ("IHC", "pathoduet_ihc")),
        768,
        224,
        0.5,
        ("HE", "IHC"),
        "PathoDuet patch benchmark (NCT-CRC-HE): 224 px at 0.5 µm/px; the H&E or IHC checkpoint",
    ),
}


@dataclass(frozen=True)
class SlideEncoder:
    """A model over a bag of tile embeddings and their coordinates."""

    name: str
    model: str
    tile_encoder: str
    dim: int


SLIDE_ENCODERS: dict[str, SlideEncoder] = {
    "gigapath_slide": SlideEncoder("gigapath_slide", "gigapath_slide", "gigapath_tile", 768),
}

# The embeddings of the default config (EAGLE, CHIEF, mean-pooled CTransPath).
DEFAULT_EMBEDDING_NAMES: tuple[str, ...] = ("eagle", "chief", "meanpool_ctranspath")

EmbeddingKind = Literal["eagle", "chief", "meanpool", "slide_encoder"]


@dataclass(frozen=True)
class EmbeddingSpec:
    """One embedding of the cohort tables: what it is, made by which encoder and k."""

    name: str
    kind: EmbeddingKind
    encoder: str  # tile encoder (eagle: the second stage), or the slide encoder
    top_k: int | None = None

    @property
    def description(self) -> str:
        if self.kind == "eagle":
            return f"EAGLE: CHIEF top-{self.top_k} tiles embedded by {self.encoder}, mean"
        if self.kind == "chief":
            return "CHIEF attention pooling of CTransPath features"
        if self.kind == "meanpool":
            return f"mean of {self.encoder} embeddings of every tile"
        return f"{self.encoder} over the Prov-GigaPath embeddings of every tile"


def as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def tile_encoder_grids(tile_encoders: Mapping[str, Mapping[str, Any] | None]) -> dict[str, Grid]:
    """Encoder -> its grid (the reference tiling unless the config overrides px or µm/px)."""
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
    grids = {}
    for name, settings in tile_encoders.items():
        spec, settings = TILE_ENCODERS[name], settings or {}
        grids[name] = Grid(
            int(settings.get("tile_px", spec.tile_px)),
            float(settings.get("tile_mpp", spec.tile_mpp)),
        )
    return grids


def eagle_embedding_name(encoder: str, k: int, encoders: Sequence[str], ks: Sequence[int]) -> str:
    """`eagle` for the first encoder and first k; variants add `_<encoder>` and/or `_k<k>`."""
    name = "eagle"
    if encoder != encoders[0]:
        name += f"_{encoder}"
    if k != ks[0]:
        name += f"_k{k}"
    return name


def configured_embeddings(
    tile_encoders: Sequence[str],
    eagle_encoders: Sequence[str],
    top_ks: Sequence[int],
    slide_encoders: Sequence[str] = (),
) -> list[EmbeddingSpec]:
    """Every embedding a config produces, in report order (EAGLE first, its reference first)."""
    specs = [
        EmbeddingSpec(eagle_embedding_name(enc, k, eagle_encoders, top_ks), "eagle", enc, k)
        for enc in eagle_encoders
        for k in top_ks
    ]
    specs.append(EmbeddingSpec("chief", "chief", SELECTION_ENCODER))
    specs += [EmbeddingSpec(f"meanpool_{enc}", "meanpool", enc) for enc in tile_encoders]
    specs += [EmbeddingSpec(name, "slide_encoder", name) for name in slide_encoders]
    return specs


def check_encoder_config(config: Mapping[str, Any]) -> None:
    """The eagle and slide_encoders sections name encoders that exist and can run."""
    for encoder in as_list(config["eagle"]["encoder"]):
        if encoder not in TILE_ENCODERS:
            raise EncoderConfigError(
                f"eagle.encoder: unknown tile encoder {encoder!r}; known: "
                f"{', '.join(TILE_ENCODERS)}"
            )
    for name in config.get("slide_encoders") or {}:
        if name not in SLIDE_ENCODERS:
            raise EncoderConfigError(
                f"slide_encoders: unknown slide encoder {name!r}; known: "
                f"{', '.join(SLIDE_ENCODERS)}"
            )
        needs = SLIDE_ENCODERS[name].tile_encoder
        if needs not in config["tile_encoders"]:
            raise EncoderConfigError(
                f"slide_encoders.{name} runs over {needs} tile embeddings: add `{needs}: {{}}` "
                "to tile_encoders"
            )
    top_ks = as_list(config["eagle"]["top_k"])
    if len(set(top_ks)) != len(top_ks):
        raise EncoderConfigError(f"eagle.top_k: {top_ks} lists a k twice")


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
