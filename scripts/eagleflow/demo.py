"""Synthetic demo cohort: small pyramidal H&E-like slides, sheets, ground-truth masks and a manifest.

Layout written under ``out_dir``::

    slides/<SLIDE>.svs|.tif   pyramidal tiled JPEG TIFFs that OpenSlide opens, with MPP
    masks/<SLIDE>.png         ground-truth label map at MASK_MPP µm/px (see MASK_LABELS)
    slides.csv                PATIENT, SLIDE, PATH, COHORT (PATH relative to this file's directory)
    clinical.csv              PATIENT, SUBTYPE (A/B), GRADE (1/2/3)
    manifest.json             seed, code version and, per slide, sha256, mpp, sizes, labels
    hostile/                  bad inputs for robustness tests (see make_hostile_slides)

Internal slides ("DEMO-INT") are Aperio-style SVS files (OpenSlide's aperio driver reads MPP from
``MPP = ...`` in the ImageDescription); external slides ("DEMO-EXT") are generic tiled TIFFs with
the MPP in the resolution tags (OpenSlide 4's generic-tiff driver reads it from there), so both
common ways of storing the scale are exercised. Same seed and size_scale -> byte-identical files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import tifffile

from eagleflow.h5io import atomic_write_bytes
from eagleflow.provenance import code_version
from eagleflow.weights import sha256_file

# Bump whenever the bytes of any generated file change for the same seed.
GENERATOR_VERSION = 1

TILE = 256
JPEG_QUALITY = 80
DOWNSAMPLES = (1, 4, 16, 64)
MIN_LEVEL_SIDE = 32  # smallest side a pyramid level may have (levels 0-2 are always written)
MASK_MPP = 8.0
MASK_LABELS = {"background": 0, "tissue": 1, "pen": 2, "blank": 3, "blur": 4}
INT_COHORT = "DEMO-INT"
EXT_COHORT = "DEMO-EXT"
_APERIO_HEADER = "Aperio Image Library v12.0.15 \r\n"

SlideFormat = Literal["aperio", "generic-tiff"]


@dataclass(frozen=True)
class SlideSpec:
    """What one demo slide should look like; the seed adds the random detail."""

    slide: str
    patient: str
    cohort: str
    subtype: str
    grade: int
    mpp: float
    width_um: float
    height_um: float
    fmt: SlideFormat
    artefacts: tuple[str, ...] = ()  # "pen", "blank", "blur"; "no-tissue" for hostile inputs

    @property
    def suffix(self) -> str:
        return ".svs" if self.fmt == "aperio" else ".tif"


@dataclass
class DemoSlide:
    """One written slide, as recorded in the manifest."""

    slide: str
    patient: str
    cohort: str
    subtype: str
    grade: int
    path: str  # relative to the cohort directory
    mask_path: str
    fmt: str
    mpp: float
    width: int
    height: int
    level_count: int
    level_dimensions: list[list[int]]
    downsamples: list[int]
    artefacts: list[str]
    tissue_fraction: float
    sha256: str
    spec_key: str


@dataclass
class DemoCohort:
    """Paths of everything make_demo_cohort wrote, plus the per-slide records."""

    out_dir: Path
    slides_csv: Path
    clinical_csv: Path
    manifest: Path
    slides: list[DemoSlide]
    hostile: dict[str, Path] = field(default_factory=dict)
    regenerated: list[str] = field(default_factory=list)

    def slide_path(self, slide: str) -> Path:
        """Absolute path of a slide by its SLIDE id."""
        record = next(s for s in self.slides if s.slide == slide)
        return self.out_dir / record.path


# --------------------------------------------------------------------------- cohort definition

# (patient, subtype, grade, slides); two internal patients have two slides each.
_INT_PATIENTS = [
    ("001", "A", 1, 1),
    ("002", "B", 2, 1),
    ("003", "A", 2, 2),
    ("004", "B", 3, 1),
    ("005", "A", 1, 1),
    ("006", "B", 1, 1),
    ("007", "A", 3, 1),
    ("008", "B", 2, 2),
    ("009", "A", 2, 1),
    ("010", "B", 3, 1),
]
_EXT_PATIENTS = [("001", "A", 1, 1), ("002", "B", 3, 1), ("003", "A", 2, 1), ("004", "B", 2, 1)]
# Artefacts are spread over both classes so that they carry no label signal.
_ARTEFACTS = {
    "DEMO-INT-001-S1": ("pen",),
    "DEMO-INT-002-S1": ("pen", "blank"),
    "DEMO-INT-003-S2": ("blank",),
    "DEMO-INT-007-S1": ("blur",),
    "DEMO-INT-008-S1": ("pen",),
    "DEMO-INT-009-S1": ("pen",),
    "DEMO-INT-010-S1": ("blur",),
    "DEMO-EXT-002-S1": ("pen",),
    "DEMO-EXT-003-S1": ("blank",),
}
_MPP40 = {"DEMO-INT-004-S1", "DEMO-EXT-003-S1"}


def cohort_specs(size_scale: float = 1.0) -> list[SlideSpec]:
    """The fixed list of demo slides; size_scale shrinks the physical area (for fast tests)."""
    specs = []
    for cohort, patients, fmt in (
        (INT_COHORT, _INT_PATIENTS, "aperio"),
        (EXT_COHORT, _EXT_PATIENTS, "generic-tiff"),
    ):
        for number, subtype, grade, n_slides in patients:
            patient = f"{cohort}-{number}"
            for k in range(1, n_slides + 1):
                slide = f"{patient}-S{k}"
                crc = zlib.crc32(slide.encode())
                if slide in _MPP40:
                    mpp, width_um, height_um = 0.25, 2560.0, 1920.0
                else:
                    mpp = 0.5
                    width_um = (3840.0, 3968.0, 4096.0)[crc % 3]
                    height_um = (2816.0, 2944.0, 3072.0)[(crc // 3) % 3]
                specs.append(
                    SlideSpec(
                        slide=slide,
                        patient=patient,
                        cohort=cohort,
                        subtype=subtype,
                        grade=grade,
                        mpp=mpp,
                        width_um=width_um * size_scale,
                        height_um=height_um * size_scale,
                        fmt=fmt,  # type: ignore[arg-type]
                        artefacts=_ARTEFACTS.get(slide, ()),
                    )
                )
    return specs


def level0_size(spec: SlideSpec) -> tuple[int, int]:
    """Level-0 (width, height) in pixels: a multiple of 64 so that every downsample is exact."""
    step = DOWNSAMPLES[-1]

    def px(um: float) -> int:
        return max(step, round(um / spec.mpp / step) * step)

    return px(spec.width_um), px(spec.height_um)


def pyramid_downsamples(width: int, height: int) -> list[int]:
    """Downsamples written for a level-0 size: at least three, more while levels stay useful."""
    out = [d for d in DOWNSAMPLES if min(width, height) // d >= MIN_LEVEL_SIDE]
    return list(DOWNSAMPLES[: max(3, len(out))])


# --------------------------------------------------------------------------- image synthesis


@dataclass(frozen=True)
class _Style:
    """Per-patient stain and morphology; slides of one patient share it."""

    nuclei_per_mm2: float
    radius_um: float
    radius_sd: float
    elongation: float
    clustered: float  # fraction of nuclei placed in clusters
    nucleus_density: tuple[float, float]  # hematoxylin density range of nuclei, 0-255
    eosin: float  # stroma eosin density scale
    h_tint: float  # hematoxylin counterstain in stroma
    h_vec: tuple[float, float, float]  # RGB drop at full hematoxylin density
    e_vec: tuple[float, float, float]  # RGB drop at full eosin density
    background: tuple[int, int, int]


def _rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator that depends only on the seed and the given names (not on call order)."""
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in keys)])


def _style(spec: SlideSpec, seed: int) -> _Style:
    rng = _rng(seed, "style", spec.patient)
    is_b = spec.subtype == "B"
    # Class B: denser, larger, darker, more clustered nuclei and a more purple stroma.
    density = (4500.0 if is_b else 2400.0) * float(rng.lognormal(0.0, 0.2))
    radius = (
        (3.9 if is_b else 3.1) * float(rng.lognormal(0.0, 0.06)) * (1 + 0.08 * (spec.grade - 1))
    )
    jitter = rng.lognormal(0.0, 0.07, size=6)
    h_vec = np.array([165.0, 185.0, 95.0] if is_b else [150.0, 175.0, 100.0]) * jitter[:3]
    e_vec = np.array([12.0, 105.0, 55.0]) * jitter[3:]
    dark = (170.0, 250.0) if is_b else (130.0, 215.0)
    bg = 243 + rng.integers(-4, 4, size=3)
    return _Style(
        nuclei_per_mm2=density,
        radius_um=radius,
        radius_sd=0.10 + 0.08 * spec.grade,
        elongation=1.15 + 0.2 * spec.grade,
        clustered=(0.6 if is_b else 0.25) + float(rng.uniform(-0.1, 0.1)),
        nucleus_density=dark,
        eosin=(0.7 if is_b else 0.95) * float(rng.lognormal(0.0, 0.08)),
        h_tint=(0.28 if is_b else 0.1) * float(rng.lognormal(0.0, 0.15)),
        h_vec=tuple(float(v) for v in h_vec),  # type: ignore[arg-type]
        e_vec=tuple(float(v) for v in e_vec),  # type: ignore[arg-type]
        background=tuple(int(v) for v in bg),  # type: ignore[arg-type]
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    noise = rng.standard_normal(shape).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    return noise / max(float(noise.std()), 1e-6)


def _tissue_field(spec: SlideSpec, rng: np.random.Generator, grid_um: float) -> np.ndarray:
    """Soft tissue map (uint8, > 127 is tissue) at grid_um µm/px: irregular blobs with holes.

    Soft rather than binary so that upsampling and thresholding give smooth outlines.
    """
    gw = max(8, round(spec.width_um / grid_um))
    gh = max(8, round(spec.height_um / grid_um))
    coarse_um = 32.0
    cw, ch = max(4, round(spec.width_um / coarse_um)), max(4, round(spec.height_um / coarse_um))
    yy, xx = np.mgrid[0:ch, 0:cw].astype(np.float32)
    field_ = np.zeros((ch, cw), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0.25, 0.75) * cw, rng.uniform(0.25, 0.75) * ch
        sx, sy = rng.uniform(0.15, 0.3) * cw, rng.uniform(0.15, 0.3) * ch
        theta = rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        field_ = np.maximum(field_, np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2)))
    field_ += 0.35 * _smooth_noise(rng, (ch, cw), sigma=max(1.0, min(cw, ch) / 12))
    # Taper so that tissue rarely touches the slide border.
    edge = np.minimum.reduce([xx, cw - 1 - xx, yy, ch - 1 - yy]) / max(2.0, 0.08 * min(cw, ch))
    field_ -= 1.5 * np.clip(1 - edge, 0, 1)
    threshold = float(np.quantile(field_, 1 - rng.uniform(0.3, 0.45)))
    fine = cv2.resize(field_ - threshold, (gw, gh), interpolation=cv2.INTER_CUBIC)
    fine += 0.025 * _smooth_noise(rng, (gh, gw), sigma=3.0)
    soft = np.clip(128 + 2000 * fine, 0, 255).astype(np.uint8)
    # Holes (lumina, fat, tears): tissue is rarely a solid sheet.
    n_holes = int(rng.poisson(1.5 * (spec.width_um * spec.height_um) / 1e6))
    for _ in range(n_holes):
        center = (int(rng.integers(0, gw)), int(rng.integers(0, gh)))
        axes = tuple(max(1, int(rng.uniform(15, 70) / grid_um)) for _ in range(2))
        cv2.ellipse(soft, center, axes, float(rng.uniform(0, 180)), 0, 360, 0, -1)
    return soft


def _sample_nuclei(
    spec: SlideSpec, style: _Style, rng: np.random.Generator, mask: np.ndarray, grid_um: float
) -> np.ndarray:
    """Nucleus centres in µm as an (n, 2) array of (x, y), inside the tissue mask."""
    inside = np.flatnonzero(mask.ravel() > 127)
    if inside.size == 0:
        return np.zeros((0, 2))
    area_mm2 = inside.size * (grid_um / 1000) ** 2
    n = int(rng.poisson(style.nuclei_per_mm2 * area_mm2))
    n_cluster = int(n * style.clustered)
    cells = rng.choice(inside, size=n - n_cluster)
    uniform = np.stack([cells % mask.shape[1], cells // mask.shape[1]], axis=1).astype(float)
    uniform = (uniform + rng.uniform(0, 1, uniform.shape)) * grid_um
    n_centres = max(1, n_cluster // 40)
    centres = rng.choice(inside, size=n_centres)
    centres_um = np.stack([centres % mask.shape[1], centres // mask.shape[1]], axis=1) * grid_um
    spread = rng.uniform(15, 45, size=n_centres)
    which = rng.integers(0, n_centres, size=n_cluster)
    clustered = centres_um[which] + rng.standard_normal((n_cluster, 2)) * spread[which, None]
    gx = np.clip((clustered[:, 0] / grid_um).astype(int), 0, mask.shape[1] - 1)
    gy = np.clip((clustered[:, 1] / grid_um).astype(int), 0, mask.shape[0] - 1)
    clustered = clustered[mask[gy, gx] > 127]
    return np.concatenate([uniform, clustered])


class Workspace:
    """Reusable level-0 buffers.

    Fresh 50-250 MB arrays cost more in page faults than the pixel work itself, so the renderer
    draws into buffers kept here; arrays returned by render_slide are overwritten by its next
    call with the same workspace.
    """

    def __init__(self) -> None:
        self._flat: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A C-contiguous uint8 array of this shape (contents undefined)."""
        n = int(np.prod(shape))
        flat = self._flat.get(name)
        if flat is None or flat.size < n:
            flat = np.empty(n, np.uint8)
            self._flat[name] = flat
        return flat[:n].reshape(shape)


def _fill_tiled(dst: np.ndarray, tile: np.ndarray) -> np.ndarray:
    """Cover dst with copies of a small noise tile (drawing full-size noise is much slower)."""
    th, tw = tile.shape
    h, w = dst.shape
    for y in range(0, h, th):
        for x in range(0, w, tw):
            dst[y : y + th, x : x + tw] = tile[: h - y, : w - x]
    return dst


def _draw_fibres(canvas: np.ndarray, spec: SlideSpec, rng: np.random.Generator) -> None:
    h, w = canvas.shape
    n_fibres = int(1500 * spec.width_um * spec.height_um / 1e6)
    start = rng.uniform(0, 1, (n_fibres, 2)) * (w, h)
    angle = rng.uniform(0, np.pi, n_fibres)
    length = rng.uniform(15, 60, n_fibres) / spec.mpp
    end = start + length[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    value = rng.integers(25, 60, n_fibres).tolist()
    thickness = max(1, round(0.8 / spec.mpp))
    for (x0, y0), (x1, y1), v in zip(
        start.astype(int).tolist(), end.astype(int).tolist(), value, strict=True
    ):
        cv2.line(canvas, (x0, y0), (x1, y1), v, thickness)


def _draw_nuclei(
    canvas: np.ndarray,
    spec: SlideSpec,
    style: _Style,
    rng: np.random.Generator,
    centres_um: np.ndarray,
) -> None:
    """Filled ellipses of hematoxylin density; size spread and elongation grow with grade."""
    n = len(centres_um)
    radius = style.radius_um * rng.lognormal(0.0, style.radius_sd, n) / spec.mpp
    ratio = 1 + (style.elongation - 1) * rng.uniform(0, 1, n)
    axes = np.maximum(1, np.stack([radius * np.sqrt(ratio), radius / np.sqrt(ratio)], axis=1))
    angle = rng.uniform(0, 180, n).tolist()
    value = rng.uniform(*style.nucleus_density, n).astype(int).tolist()
    xy = (centres_um / spec.mpp).astype(int).tolist()
    for (x, y), (a, b), ang, v in zip(xy, axes.astype(int).tolist(), angle, value, strict=True):
        cv2.ellipse(canvas, (x, y), (a, b), ang, 0, 360, v, -1, lineType=cv2.LINE_8)


def _bezier(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Points of a random cubic curve across part of the slide (a marker stroke)."""
    ctrl = rng.uniform(0.1, 0.9, (4, 2)) * (w, h)
    t = np.linspace(0, 1, 200)[:, None]
    pts = (
        (1 - t) ** 3 * ctrl[0]
        + 3 * (1 - t) ** 2 * t * ctrl[1]
        + 3 * (1 - t) * t**2 * ctrl[2]
        + t**3 * ctrl[3]
    )
    return pts


def render_slide(
    spec: SlideSpec, seed: int, workspace: Workspace | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 RGB image (uint8) and ground-truth label map at MASK_MPP for one slide.

    The image is composed as background minus eosin and hematoxylin densities times per-patient
    stain vectors (a linearised Beer-Lambert model), plus a little per-channel noise.
    """
    ws = workspace or Workspace()
    w, h = level0_size(spec)
    # Work in the physical size of the pixel grid so that µm and pixel positions agree exactly.
    spec = replace(spec, width_um=w * spec.mpp, height_um=h * spec.mpp)
    style = _style(spec, seed)
    rng = _rng(seed, "slide", spec.slide)
    grid_um = 4.0
    tissue = _tissue_field(spec, rng, grid_um)
    if "no-tissue" in spec.artefacts:
        tissue[:] = 0
    tissue_bin = np.where(tissue > 127, 255, 0).astype(np.uint8)
    centres = _sample_nuclei(spec, style, rng, tissue, grid_um)
    # Distinct tile shapes so that the repeats of different noise layers never line up.
    shapes = ((509, 1021), (1019, 511), (761, 887), (883, 757), (631, 953))
    tiles = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]

    mask0, eosin, nuclei, aux = (ws.get(k, (h, w)) for k in ("mask", "eosin", "nuclei", "aux"))
    cv2.resize(tissue, (w, h), dst=mask0, interpolation=cv2.INTER_LINEAR)
    cv2.threshold(mask0, 127, 255, cv2.THRESH_BINARY, dst=mask0)

    # Stroma: smooth eosin variation, fibres and grain, only inside tissue.
    cw, ch = max(4, round(spec.width_um / 20)), max(4, round(spec.height_um / 20))
    low = 0.72 + 0.18 * _smooth_noise(rng, (ch, cw), sigma=3.0)
    low = np.clip(low * style.eosin * 255, 40, 255).astype(np.uint8)
    cv2.resize(low, (w, h), dst=eosin, interpolation=cv2.INTER_LINEAR)
    aux.fill(0)
    _draw_fibres(aux, spec, rng)
    cv2.add(eosin, aux, dst=eosin)
    cv2.add(eosin, _fill_tiled(aux, tiles[0] >> 3), dst=eosin)
    cv2.bitwise_and(eosin, mask0, dst=eosin)

    # Nuclei with chromatin grain and soft edges, on a faint hematoxylin counterstain.
    nuclei.fill(0)
    _draw_nuclei(nuclei, spec, style, rng, centres)
    cv2.subtract(nuclei, _fill_tiled(aux, tiles[1] // 6), dst=nuclei)
    cv2.bitwise_and(nuclei, mask0, dst=nuclei)
    k = 3 if spec.mpp >= 0.4 else 5
    cv2.GaussianBlur(nuclei, (k, k), 0, dst=aux)
    cv2.addWeighted(aux, 1.0, eosin, style.h_tint, 0, dst=nuclei)

    image = ws.get("image", (h, w, 3))
    for c in range(3):
        cv2.addWeighted(
            eosin,
            -style.e_vec[c] / 255,
            nuclei,
            -style.h_vec[c] / 255,
            style.background[c] - 2,
            dst=aux,
        )
        noise = _fill_tiled(mask0, tiles[2 + c] % 5)  # mask0 is no longer needed
        cv2.add(aux, noise, dst=aux)
        image[..., c] = aux

    mw, mh = max(1, round(spec.width_um / MASK_MPP)), max(1, round(spec.height_um / MASK_MPP))
    labels = cv2.resize(tissue_bin, (mw, mh), interpolation=cv2.INTER_AREA)
    labels = np.where(labels >= 128, MASK_LABELS["tissue"], 0).astype(np.uint8)
    art_rng = _rng(seed, "artefacts", spec.slide)
    for artefact in spec.artefacts:
        if artefact == "pen":
            _draw_pen(image, labels, spec, art_rng)
        elif artefact == "blank":
            _draw_blank(image, labels, art_rng)
        elif artefact == "blur":
            _draw_blur(image, labels, spec, art_rng, tissue_bin)
    return image, labels


def _draw_pen(
    image: np.ndarray, labels: np.ndarray, spec: SlideSpec, rng: np.random.Generator
) -> None:
    """A semi-transparent green or blue marker stroke, 80-160 µm wide."""
    h, w = image.shape[:2]
    pts = _bezier(rng, w, h)
    thickness = max(2, int(rng.uniform(80, 160) / spec.mpp))
    colour = ((35, 150, 80), (40, 70, 175))[int(rng.integers(0, 2))]
    alpha = float(rng.uniform(0.6, 0.8))
    pad = thickness
    x0, y0 = np.maximum(pts.min(axis=0).astype(int) - pad, 0)
    x1, y1 = np.minimum(pts.max(axis=0).astype(int) + pad, (w, h))
    local = np.zeros((y1 - y0, x1 - x0), np.uint8)
    poly = (pts - (x0, y0)).astype(np.int32)
    cv2.polylines(local, [poly], False, 255, thickness, lineType=cv2.LINE_AA)
    region = image[y0:y1, x0:x1]
    ink = np.empty_like(region)
    ink[:] = colour
    blended = cv2.addWeighted(region, 1 - alpha, ink, alpha, 0)
    np.copyto(region, blended, where=(local > 127)[..., None])
    scale = labels.shape[1] / w
    cv2.polylines(
        labels,
        [(pts * scale).astype(np.int32)],
        False,
        MASK_LABELS["pen"],
        max(1, int(thickness * scale)),
    )


def _draw_blank(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> None:
    """An unscanned band (pure white), as scanners leave outside the scan area."""
    w = image.shape[1]
    mw = labels.shape[1]
    band = max(1, int(mw * rng.uniform(0.12, 0.2)))  # in mask pixels, so both agree exactly
    m0, m1 = (0, band) if rng.integers(0, 2) else (mw - band, mw)
    image[:, m0 * w // mw : m1 * w // mw] = 255
    labels[:, m0:m1] = MASK_LABELS["blank"]


def _draw_blur(
    image: np.ndarray,
    labels: np.ndarray,
    spec: SlideSpec,
    rng: np.random.Generator,
    tissue: np.ndarray,
) -> None:
    """An out-of-focus patch centred on tissue."""
    h, w = image.shape[:2]
    ys, xs = np.nonzero(tissue)
    if xs.size == 0:
        return
    i = int(rng.integers(0, xs.size))
    cx, cy = xs[i] * w / tissue.shape[1], ys[i] * h / tissue.shape[0]
    half = int(rng.uniform(300, 500) / spec.mpp)
    x0, x1 = max(0, int(cx) - half), min(w, int(cx) + half)
    y0, y1 = max(0, int(cy) - half), min(h, int(cy) + half)
    sigma = 6.0 / spec.mpp
    image[y0:y1, x0:x1] = cv2.GaussianBlur(image[y0:y1, x0:x1], (0, 0), sigma)
    sx, sy = labels.shape[1] / w, labels.shape[0] / h
    region = labels[int(y0 * sy) : int(y1 * sy), int(x0 * sx) : int(x1 * sx)]
    region[region == MASK_LABELS["tissue"]] = MASK_LABELS["blur"]


# --------------------------------------------------------------------------- TIFF writing


def _aperio_description(spec: SlideSpec, w: int, h: int, level_w: int, level_h: int) -> str:
    base = f"{_APERIO_HEADER}{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE})"
    if (level_w, level_h) != (w, h):
        return f"{base} -> {level_w}x{level_h} JPEG/RGB Q={JPEG_QUALITY}"
    fields = [
        f"{base} JPEG/RGB Q={JPEG_QUALITY}",
        f"AppMag = {round(10 / spec.mpp)}",
        "StripeWidth = 2048",
        "ScanScope ID = EAGLEFLOW-DEMO",
        f"Filename = {spec.slide}",
        "Date = 01/01/25",
        "Time = 00:00:00",
        "User = eagleflow-demo",
        f"MPP = {spec.mpp:g}",
        "Left = 0",
        "Top = 0",
        f"OriginalWidth = {w}",
        f"OriginalHeight = {h}",
    ]
    return "|".join(fields)


def write_pyramid_tiff(
    dest: io.BytesIO | Path,
    image: np.ndarray,
    mpp: float | None,
    fmt: SlideFormat,
    spec: SlideSpec | None = None,
    downsamples: list[int] | None = None,
) -> list[tuple[int, int]]:
    """Write a tiled JPEG pyramid (levels as successive IFDs); return the level sizes (w, h).

    ``fmt="aperio"`` stores MPP in the Aperio ImageDescription and adds a stripped thumbnail as
    the second IFD, as real SVS files have; ``"generic-tiff"`` stores it in the resolution tags.
    ``mpp=None`` with ``"generic-tiff"`` writes no scale at all.
    """
    h, w = image.shape[:2]
    downsamples = downsamples or pyramid_downsamples(w, h)
    levels = [image]
    for prev, d in itertools.pairwise(downsamples):
        size = (max(1, w // d), max(1, h // d))
        source = levels[-1] if d % prev == 0 else image
        levels.append(cv2.resize(source, size, interpolation=cv2.INTER_AREA))
    common: dict[str, Any] = {
        "compression": "jpeg",
        "compressionargs": {"level": JPEG_QUALITY},
        "photometric": "rgb",
        "metadata": None,
        "maxworkers": min(4, os.cpu_count() or 1),
    }
    with tifffile.TiffWriter(dest) as tif:
        for i, (d, level) in enumerate(zip(downsamples, levels, strict=True)):
            extra: dict[str, Any] = {}
            if fmt == "aperio":
                if spec is None or mpp is None:
                    raise ValueError("an Aperio file needs the slide spec and its MPP")
                desc = _aperio_description(spec, w, h, level.shape[1], level.shape[0])
                extra["description"] = desc
            elif mpp is not None:
                extra["resolution"] = (1e4 / (mpp * d), 1e4 / (mpp * d))
                extra["resolutionunit"] = "CENTIMETER"
            # Aperio marks pyramid levels as full images (tifffile's SVS reader relies on it);
            # generic TIFFs mark them as reduced-resolution.
            subfiletype = 0 if i == 0 or fmt == "aperio" else 1
            tif.write(level, tile=(TILE, TILE), subfiletype=subfiletype, **common, **extra)
            if i == 0 and fmt == "aperio":
                scale = 768 / max(w, h)
                size = (max(1, round(w * scale)), max(1, round(h * scale)))
                thumb = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
                thumb_desc = f"{_APERIO_HEADER}{w}x{h} -> {size[0]}x{size[1]} - "
                tif.write(thumb, rowsperstrip=16, description=thumb_desc, **common)
    return [(level.shape[1], level.shape[0]) for level in levels]


# --------------------------------------------------------------------------- file helpers


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Atomically write unless the file already has these bytes (keeps mtimes for Snakemake)."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _csv(header: list[str], rows: list[list[Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


def _spec_key(spec: SlideSpec, seed: int) -> str:
    payload = json.dumps(
        {"v": GENERATOR_VERSION, "seed": seed, "spec": asdict(spec), "q": JPEG_QUALITY},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- public API


def generate_slide(
    spec: SlideSpec, seed: int, out_dir: Path, workspace: Workspace | None = None
) -> DemoSlide:
    """Render one slide and write it (and its mask) atomically under out_dir."""
    image, labels = render_slide(spec, seed, workspace)
    h, w = image.shape[:2]
    rel = Path("slides") / f"{spec.slide}{spec.suffix}"
    mask_rel = Path("masks") / f"{spec.slide}.png"
    buf = io.BytesIO()
    sizes = write_pyramid_tiff(buf, image, spec.mpp, spec.fmt, spec)
    data = buf.getvalue()
    _write_if_changed(out_dir / rel, data)
    _write_if_changed(out_dir / mask_rel, _png(labels))
    tissue = np.isin(labels, (MASK_LABELS["tissue"], MASK_LABELS["blur"]))
    return DemoSlide(
        slide=spec.slide,
        patient=spec.patient,
        cohort=spec.cohort,
        subtype=spec.subtype,
        grade=spec.grade,
        path=rel.as_posix(),
        mask_path=mask_rel.as_posix(),
        fmt=spec.fmt,
        mpp=spec.mpp,
        width=w,
        height=h,
        level_count=len(sizes),
        level_dimensions=[list(s) for s in sizes],
        downsamples=pyramid_downsamples(w, h),
        artefacts=list(spec.artefacts),
        tissue_fraction=round(float(tissue.mean()), 4),
        sha256=hashlib.sha256(data).hexdigest(),
        spec_key=_spec_key(spec, seed),
    )


def _reusable(out_dir: Path, old: dict[str, Any] | None, spec: SlideSpec, seed: int) -> bool:
    if old is None or old.get("spec_key") != _spec_key(spec, seed):
        return False
    paths = [out_dir / old["path"], out_dir / old["mask_path"]]
    return all(p.is_file() for p in paths) and sha256_file(paths[0]) == old["sha256"]


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def make_demo_cohort(
    out_dir: Path,
    seed: int = 0,
    size_scale: float = 1.0,
    hostile: bool = True,
    force: bool = False,
) -> DemoCohort:
    """Write the demo cohort under out_dir; slides already there with matching hashes are kept.

    size_scale < 1 shrinks every slide's physical area (same mpp) for fast tests.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    old_manifest = None if force else _read_manifest(manifest_path)
    old_slides = {s["slide"]: s for s in (old_manifest or {}).get("slides", [])}

    records: list[DemoSlide] = []
    regenerated: list[str] = []
    workspace = Workspace()
    for spec in cohort_specs(size_scale):
        old = old_slides.get(spec.slide)
        if old is not None and _reusable(out_dir, old, spec, seed):
            records.append(DemoSlide(**old))
        else:
            records.append(generate_slide(spec, seed, out_dir, workspace))
            regenerated.append(spec.slide)

    slides_csv, clinical_csv = out_dir / "slides.csv", out_dir / "clinical.csv"
    _write_if_changed(
        slides_csv,
        _csv(
            ["PATIENT", "SLIDE", "PATH", "COHORT"],
            [[r.patient, r.slide, r.path, r.cohort] for r in records],
        ),
    )
    patients = {r.patient: r for r in records}
    _write_if_changed(
        clinical_csv,
        _csv(
            ["PATIENT", "SUBTYPE", "GRADE"], [[p, r.subtype, r.grade] for p, r in patients.items()]
        ),
    )

    hostile_paths: dict[str, Path] = {}
    hostile_info: dict[str, Any] = {}
    if hostile:
        hostile_paths = make_hostile_slides(out_dir, seed)
        hostile_info = {
            name: {"path": p.relative_to(out_dir).as_posix(), "sha256": sha256_file(p)}
            for name, p in hostile_paths.items()
        }

    manifest = {
        "generator": "eagleflow.demo",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "size_scale": size_scale,
        "paths_relative_to": "the directory of this manifest and of slides.csv",
        "mask_mpp": MASK_MPP,
        "mask_labels": MASK_LABELS,
        "slides": [asdict(r) for r in records],
        "hostile": hostile_info,
    }
    unchanged = (
        old_manifest is not None
        and not regenerated
        and {k: v for k, v in old_manifest.items() if k != "code_version"} == manifest
    )
    if not unchanged:
        manifest["code_version"] = code_version()
        atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    return DemoCohort(
        out_dir=out_dir,
        slides_csv=slides_csv,
        clinical_csv=clinical_csv,
        manifest=manifest_path,
        slides=records,
        hostile=hostile_paths,
        regenerated=regenerated,
    )


HOSTILE_EXPECT = {
    "empty": "zero-byte .svs: not a slide",
    "truncated": "first 30% of a valid SVS: OpenSlide cannot open it",
    "corrupt_tiles": "opens; middle third of the level-0 and level-1 tiles zeroed: reads fail",
    "not_tiff": "a text file named .svs: not a slide",
    "no_mpp": "valid pyramidal TIFF with tissue but no MPP anywhere (no openslide.mpp-x)",
    "no_tissue": "valid SVS with MPP 0.5, background only: no tissue tiles",
    "tiny": "valid SVS with MPP 0.5 smaller than one 224 px tile at 2 µm/px (448 µm)",
}


def _zero_middle_tiles(data: bytes) -> bytes:
    """Zero the middle third of the tiles of levels 0 and 1 (those read at 2 µm/px).

    The headers and the coarse levels stay intact, so the file opens and a tissue mask can be
    made, but reading tiles there fails.
    """
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        tiled = [page for page in tif.pages if page.is_tiled][:2]  # type: ignore[union-attr]
        spans = [
            list(zip(page.dataoffsets, page.databytecounts, strict=True))  # type: ignore[union-attr]
            for page in tiled
        ]
    out = bytearray(data)
    for level in spans:
        for offset, count in level[len(level) // 3 : max(len(level) // 3 + 1, 2 * len(level) // 3)]:
            out[offset : offset + count] = bytes(count)
    return bytes(out)


def make_hostile_slides(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write bad inputs under out_dir/hostile/ (see HOSTILE_EXPECT); return name -> path."""
    root = Path(out_dir) / "hostile"

    def spec(name: str, w_um: float, h_um: float, **kw: Any) -> SlideSpec:
        base: dict[str, Any] = {
            "slide": f"HOSTILE-{name}",
            "patient": "HOSTILE",
            "cohort": "HOSTILE",
            "subtype": "A",
            "grade": 1,
            "mpp": 0.5,
            "width_um": w_um,
            "height_um": h_um,
            "fmt": "aperio",
        }
        base.update(kw)
        return SlideSpec(**base)

    def encode(s: SlideSpec, mpp: float | None) -> bytes:
        image, _ = render_slide(s, seed)
        buf = io.BytesIO()
        write_pyramid_tiff(buf, image, mpp, s.fmt, s)
        return buf.getvalue()

    valid = encode(spec("truncated", 1024, 768), 0.5)
    files = {
        "empty": ("empty.svs", b""),
        "truncated": ("truncated.svs", valid[: int(len(valid) * 0.3)]),
        "corrupt_tiles": ("corrupt_tiles.svs", _zero_middle_tiles(valid)),
        "not_tiff": ("not_a_slide.svs", b"This is not a whole-slide image.\n" * 8),
        "no_mpp": ("no_mpp.tif", encode(spec("no_mpp", 1024, 768, fmt="generic-tiff"), None)),
        "no_tissue": (
            "no_tissue.svs",
            encode(spec("no_tissue", 1024, 768, artefacts=("no-tissue",)), 0.5),
        ),
        "tiny": ("tiny.svs", encode(spec("tiny", 320, 192), 0.5)),
    }
    out: dict[str, Path] = {}
    for name, (filename, data) in files.items():
        _write_if_changed(root / filename, data)
        out[name] = root / filename
    _write_if_changed(
        root / "hostile.json",
        (
            json.dumps(
                {n: {"file": f, "expect": HOSTILE_EXPECT[n]} for n, (f, _) in files.items()},
                indent=2,
            )
            + "\n"
        ).encode(),
    )
    return out
