"""Which slides the demo cohort holds: patients, classes, artefacts, formats and pyramid sizes."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
