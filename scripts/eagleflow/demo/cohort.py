"""The demo cohort on disk: slides, masks, sheets and a manifest, rewritten only where they change."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from eagleflow.demo.hostile import make_hostile_slides
from eagleflow.demo.render import Workspace, render_slide
from eagleflow.demo.specs import (
    GENERATOR_VERSION,
    JPEG_QUALITY,
    MASK_LABELS,
    MASK_MPP,
    DemoCohort,
    DemoSlide,
    SlideSpec,
    cohort_specs,
    pyramid_downsamples,
)
from eagleflow.demo.tiff import write_if_changed, write_pyramid_tiff
from eagleflow.h5io import atomic_write_bytes
from eagleflow.provenance import code_version
from eagleflow.weights import sha256_file


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
    write_if_changed(out_dir / rel, data)
    write_if_changed(out_dir / mask_rel, _png(labels))
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
    write_if_changed(
        slides_csv,
        _csv(
            ["PATIENT", "SLIDE", "PATH", "COHORT"],
            [[r.patient, r.slide, r.path, r.cohort] for r in records],
        ),
    )
    patients = {r.patient: r for r in records}
    write_if_changed(
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
