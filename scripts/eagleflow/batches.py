"""Slides grouped into batches for the GPU stages: one model load per job, one file per slide.

A slide's batch depends only on its id (a hash), so adding a slide changes one batch and no other.
Within a batch job each slide's output is skipped when it is valid and was made from the same
inputs and parameters, so a rerun after a crash or a new slide recomputes only what is missing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from eagleflow.h5io import FormatError, atomic_write_bytes, validate_h5

log = logging.getLogger(__name__)


def batch_of(slide_id: str, n_batches: int) -> str:
    """The batch name of a slide: stable under adding or removing other slides."""
    index = int(hashlib.sha256(slide_id.encode()).hexdigest()[:8], 16) % n_batches
    return f"b{index:04d}"


def assign_batches(slide_ids: Iterable[str], n_batches: int) -> dict[str, list[str]]:
    """Batch name -> sorted slide ids, for the batches that have slides."""
    batches: dict[str, list[str]] = {}
    for slide_id in sorted(slide_ids):
        batches.setdefault(batch_of(slide_id, n_batches), []).append(slide_id)
    return dict(sorted(batches.items()))


def digest(value: Any) -> str:
    """SHA-256 of a JSON-serialisable value (keys sorted), e.g. a stage's parameters."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def is_up_to_date(
    path: str | os.PathLike[str],
    fmt: str,
    shapes: Mapping[str, tuple[int | str | None, ...]],
    params_sha256: str,
    input_sha256: str,
) -> bool:
    """True if `path` is a valid output made from these inputs with these parameters."""
    if not Path(path).exists():
        return False
    try:
        attrs = validate_h5(path, fmt, shapes)
    except FormatError as err:
        log.warning("recomputing %s: %s", path, err)
        return False
    if attrs.get("params_sha256") != params_sha256:
        log.info("recomputing %s: parameters or weights changed", path)
        return False
    if attrs.get("input_sha256") != input_sha256:
        log.info("recomputing %s: its input changed", path)
        return False
    return True


def stage_params_sha256(
    stage: str, weights_sha256: str, model_files: tuple[str, ...] = (), **settings: Any
) -> str:
    """What a stage's per-slide outputs are made with: its code (with the `model_files` it
    runs), its weights, its settings."""
    from eagleflow.provenance import stage_code_digest

    code = stage_code_digest(stage, tuple(model_files))
    return digest({"code": code, "weights_sha256": weights_sha256, **settings})


def slides_to_compute(
    slides: Sequence[dict[str, str]],
    input_key: str,
    input_attrs: Callable[[str], Mapping[str, Any]],
    output_format: str,
    output_shapes: Mapping[str, tuple[int | str | None, ...]],
    params_sha256: str,
    what: str,
) -> list[tuple[dict[str, str], Mapping[str, Any]]]:
    """The slides of a batch whose output is missing, invalid or stale, with their input's attrs.

    `input_attrs` reads (and may validate) the attributes of `slide[input_key]`; its
    `content_sha256` is what the output must have been made from.
    """
    todo = []
    for slide in slides:
        attrs = input_attrs(slide[input_key])
        input_sha256 = str(attrs["content_sha256"])
        if is_up_to_date(
            slide["output"], output_format, output_shapes, params_sha256, input_sha256
        ):
            log.info("%s: %s up to date, skipped", slide["slide_id"], what)
        else:
            todo.append((slide, attrs))
    return todo


MANIFEST_COLUMNS = ("slide", "path", "status", "content_sha256")


def write_manifest(
    path: str | os.PathLike[str], slides: Iterable[Mapping[str, str]], demo_weights: bool
) -> None:
    """A TSV listing each slide of a batch, its output file and that file's content digest."""
    from eagleflow.h5io import read_attrs

    rows = [
        {
            "slide": slide["slide_id"],
            "path": slide["output"],
            "status": "demo weights" if demo_weights else "ok",
            "content_sha256": str(read_attrs(slide["output"])["content_sha256"]),
        }
        for slide in slides
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, delimiter="\t")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


def read_manifest(path: str | os.PathLike[str]) -> dict[str, str]:
    """Slide id -> output path of a batch manifest."""
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["slide"]: row["path"] for row in csv.DictReader(handle, delimiter="\t")}
