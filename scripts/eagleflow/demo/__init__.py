"""Synthetic demo cohort: small pyramidal H&E-like slides, sheets, ground-truth masks and a manifest.

Not part of any workflow stage (no stage imports it, so its code is in no output's code digest).

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

Modules: specs (which slides), render (their pixels), tiff (the files), cohort (the cohort on
disk), hostile (bad inputs).
"""

from eagleflow.demo.cohort import generate_slide, make_demo_cohort
from eagleflow.demo.hostile import HOSTILE_EXPECT, make_hostile_slides
from eagleflow.demo.render import render_slide
from eagleflow.demo.specs import (
    DOWNSAMPLES,
    EXT_COHORT,
    INT_COHORT,
    MASK_LABELS,
    MASK_MPP,
    DemoCohort,
    DemoSlide,
    SlideSpec,
    cohort_specs,
    level0_size,
    pyramid_downsamples,
)
from eagleflow.demo.tiff import write_pyramid_tiff

__all__ = [
    "DOWNSAMPLES",
    "EXT_COHORT",
    "HOSTILE_EXPECT",
    "INT_COHORT",
    "MASK_LABELS",
    "MASK_MPP",
    "DemoCohort",
    "DemoSlide",
    "SlideSpec",
    "cohort_specs",
    "generate_slide",
    "level0_size",
    "make_demo_cohort",
    "make_hostile_slides",
    "pyramid_downsamples",
    "render_slide",
    "write_pyramid_tiff",
]
