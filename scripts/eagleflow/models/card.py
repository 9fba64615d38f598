"""A model's card: the planning-time facts one model file declares about itself.

Every model lives in one file of `eagleflow/models/` that starts with a module-level
`CARD = ModelCard(...)` (or `CARDS = (ModelCard(...), ...)` when one architecture has several
published files), followed by its architecture and the functions the loader calls:

    build(device) -> nn.Module                          the architecture, weights not loaded
    prepare_state_dict(checkpoint, path) -> dict        published file -> the model's state dict
    SIGNATURE_KEYS: tuple[str, ...]                     keys that identify the file
    demo_state_dict(model, seed) -> dict                optional: seeded demo weights
    published_key(key) -> str                           optional: model key -> its name in the file

A file whose cards differ in architecture (COBRA-II and COBRA-I) gives these functions a `name`
keyword: the loader passes the card's name.

The card is plain data written with literals and the classes below only (and module-level
names assigned such data before it, to share a piece between two cards), so that
`eagleflow.models.catalog` reads it from the file's source without importing the file (the
Snakefile plans without torch). Adding a model is adding its file: nothing else is edited.

Runtime interfaces by role:
- tile encoder: `model(x)` with x the card's preprocessing of uint8 tiles -> [B, role.dim];
- slide encoder: `model.encode_bag(feats, cells, tile_encoder, **options)` with feats [N, D]
  float32, cells [N, 2] int64 (x, y) tile cells on the bag's canvas (no two tiles in one cell),
  tokens in the order given, `tile_encoder` the name of the tile encoder that made feats, and
  the model's own options from `slide_encoders.<name>` (gigapath_slide: layer) -> [role.dim].
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NO_NORMALISATION_MEAN = (0.0, 0.0, 0.0)
NO_NORMALISATION_STD = (1.0, 1.0, 1.0)
ANY_STAIN = "*"
INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class WeightFile:
    """The published checkpoint: file name, where users get it, how it is packed."""

    file_name: str
    source: str  # where a user gets it (repository, gated or not, file)
    container: str  # how the state dict sits in the file, in words
    sha256: str | None = None  # None: no published hash; the hash is recorded, not checked
    state_dict_key: str | None = None  # top-level key holding the state dict, if any


@dataclass(frozen=True)
class ImagePreprocess:
    """uint8 RGB tile -> model input: resize the shorter side, center-crop, normalise."""

    resize: int
    crop: int
    interpolation: str  # one of INTERPOLATIONS
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class TileEncoderRole:
    """The model embeds tiles: the tile encoder it makes, at which reference grid."""

    encoder: str  # the `tile_encoders:` name; several models may make one (one per stain)
    dim: int
    tile_px: int
    tile_mpp: float
    trained_stains: tuple[str, ...]
    reference: str  # where the reference grid comes from
    preprocess: ImagePreprocess
    stain: str = ANY_STAIN  # the slides' stain this model embeds; ANY_STAIN: every stain


@dataclass(frozen=True)
class SlideEncoderRole:
    """The model embeds a bag of tile embeddings (a slide, or a patient's slides)."""

    encoder: str  # the `slide_encoders:` name
    tile_encoders: tuple[str, ...]  # the tile encoders it was trained on; the first is default
    dim: int
    embedding: str  # which output is the embedding, in words
    uses_positions: bool  # whether cells change the output
    order_dependent: bool = False  # whether token order changes the output
    grid_limit: int | None = None  # cells must stay below it on both axes (a position table)


@dataclass(frozen=True)
class ModelCard:
    """One model (one published file): its name in `models:`, what it is, its file and role."""

    name: str
    summary: str
    weights: WeightFile
    role: TileEncoderRole | SlideEncoderRole | None = None  # None: used by a stage directly
    on_meta: bool = True  # False where the constructor must compute non-persistent buffers

    @property
    def tile_role(self) -> TileEncoderRole | None:
        return self.role if isinstance(self.role, TileEncoderRole) else None

    @property
    def slide_role(self) -> SlideEncoderRole | None:
        return self.role if isinstance(self.role, SlideEncoderRole) else None


# What a card may be written with (catalog.read_cards evaluates these names only).
CARD_CLASSES = {
    cls.__name__: cls
    for cls in (ModelCard, WeightFile, ImagePreprocess, TileEncoderRole, SlideEncoderRole)
}
CARD_CONSTANTS = {
    name: value
    for name, value in dict(globals()).items()
    if name.isupper() and isinstance(value, (str, tuple))
}
