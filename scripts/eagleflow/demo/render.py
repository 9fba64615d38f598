"""H&E-like pixels of one demo slide: tissue field, nuclei, fibres and the artefacts (pen, blank, blur)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import cv2
import numpy as np

from eagleflow.demo.specs import MASK_LABELS, MASK_MPP, SlideSpec, level0_size


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
