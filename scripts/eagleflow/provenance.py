"""Code version, parameters and weight hashes stamped into every output."""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from eagleflow import __version__

PACKAGE_DIR = Path(__file__).resolve().parent


@functools.cache
def source_hash() -> str:
    """SHA-256 (first 12 hex digits) over the package's Python sources, in path order."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@functools.cache
def git_commit() -> str | None:
    """The repository's commit (with '-dirty' for local changes), or None outside git."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=PACKAGE_DIR,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def code_version() -> str:
    """A string that changes whenever the code that produced an output changes."""
    commit = git_commit()
    suffix = f"+git.{commit}" if commit else ""
    return f"eagleflow {__version__} src.{source_hash()}{suffix}"


def provenance_attrs(stage: str, params: dict[str, Any] | None = None) -> dict[str, str]:
    """Attributes every output carries: stage, code version, creation time and parameters (JSON)."""
    return {
        "eagleflow_stage": stage,
        "code_version": code_version(),
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "params_json": json.dumps(params or {}, sort_keys=True, default=str),
    }


# The package modules whose code decides each stage's numbers. A rule passes its stage's digest
# through `params:`, so editing one stage's code reruns that stage and its downstream only; batch
# stages also fold it into the digest that decides whether a finished slide can be kept.
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "tiling": ("slides.py", "tiling.py", "h5io.py"),
    "features": (
        "features.py",
        "slides.py",
        "h5io.py",
        "batches.py",
        "weights.py",
        "models/registry.py",
        "models/preprocess.py",
        "models/ctranspath.py",
    ),
    "attention": (
        "attention.py",
        "h5io.py",
        "batches.py",
        "weights.py",
        "models/registry.py",
        "models/chief.py",
    ),
    "eagle": (
        "eagle.py",
        "features.py",
        "slides.py",
        "h5io.py",
        "batches.py",
        "weights.py",
        "models/registry.py",
        "models/preprocess.py",
        "models/virchow2.py",
    ),
    "thumbnail": ("plots.py", "features.py", "slides.py"),
    "embeddings": ("embeddings.py", "eagle.py", "h5io.py"),
    "heads": ("heads.py", "h5io.py", "sheets.py"),
    "evaluation": ("evaluation.py", "stats.py", "heads.py"),
    "figures": ("figures.py", "evaluation.py", "stats.py", "heads.py"),
}


@functools.cache
def stage_code_digest(stage: str) -> str:
    """SHA-256 (16 hex digits) of the modules listed for `stage` in STAGE_MODULES."""
    digest = hashlib.sha256()
    for name in STAGE_MODULES[stage]:
        digest.update(name.encode())
        digest.update((PACKAGE_DIR / name).read_bytes())
    return digest.hexdigest()[:16]
