"""Code version, parameters and weight hashes stamped into every output."""

from __future__ import annotations

import ast
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


def code_version(stage: str | None = None, model_files: tuple[str, ...] = ()) -> str:
    """A string that changes whenever the code that produced an output changes.

    With a stage (a rule name), the digest covers the modules that stage runs; without one, the
    whole package.
    """
    commit = git_commit()
    suffix = f"+git.{commit}" if commit else ""
    if stage is None:
        return f"eagleflow {__version__} src.{package_digest()}{suffix}"
    return f"eagleflow {__version__} {stage}.{stage_code_digest(stage, model_files)}{suffix}"


def provenance_attrs(
    stage: str, params: dict[str, Any] | None = None, model_files: tuple[str, ...] = ()
) -> dict[str, str]:
    """Attributes every output carries: stage, code version (with the `model_files` it ran),
    creation time and parameters (JSON)."""
    return {
        "eagleflow_stage": stage,
        "code_version": code_version(stage, model_files),
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "params_json": json.dumps(params or {}, sort_keys=True, default=str),
    }


# Each stage is a rule; its entry point is the rule's script, scripts/<rule>.py. What the stage runs
# is what that script imports inside the package, followed transitively (function-level imports too,
# since they run when the function does). Deriving it keeps it from drifting from the code.
SCRIPTS_DIR = PACKAGE_DIR.parent
PACKAGE = PACKAGE_DIR.name


def _module_file(dotted: str) -> Path | None:
    """The source file of a package module (`eagleflow.x.y`), or None outside the package."""
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return None
    base = SCRIPTS_DIR.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _package_parts(path: Path) -> list[str]:
    """The dotted package (as parts) that a module file belongs to, for relative imports."""
    parts = list(path.relative_to(SCRIPTS_DIR).with_suffix("").parts)
    return parts[:-1]  # eagleflow/models/chief -> eagleflow.models; .../__init__ -> its folder


@functools.cache
def _imports_of(path: Path) -> frozenset[str]:
    """Dotted names a file may import: modules, and `module.name` for every `from module import name`."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_parts(path)
                anchor = ".".join(package[: len(package) - node.level + 1])
                module = f"{anchor}.{node.module}" if node.module else anchor
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
    parents = {
        ".".join(name.split(".")[:i]) for name in names for i in range(1, name.count(".") + 1)
    }
    return frozenset(names | parents)


def _static_closure(entries: list[Path]) -> set[Path]:
    """Package modules that these files import, followed transitively."""
    found: set[Path] = set()
    todo = list(entries)
    while todo:
        for name in _imports_of(todo.pop()):
            module = _module_file(name)
            if module is not None and module not in found:
                found.add(module)
                todo.append(module)
    return found


@functools.cache
def stage_modules(stage: str, model_files: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Package modules (paths relative to the package) that the rule `stage` runs, sorted.

    A model stage loads its models by name (`eagleflow.models.loading` imports the model's file at
    run time, which no import statement shows): `model_files` are the files of the models a job
    of it runs (`eagleflow.models.catalog.model_files`), and they count with what they import.
    So adding or editing one model's file replans only the stages that run that model.
    """
    entry = SCRIPTS_DIR / f"{stage}.py"
    if not entry.is_file():
        raise KeyError(f"no rule script {entry} for stage {stage!r}")
    models = [PACKAGE_DIR / path for path in model_files]
    found = _static_closure([entry]) | _static_closure(models) | set(models)
    return tuple(sorted(m.relative_to(PACKAGE_DIR).as_posix() for m in found))


def _digest_files(paths: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.cache
def stage_code_digest(stage: str, model_files: tuple[str, ...] = ()) -> str:
    """SHA-256 (16 hex digits) of the rule script of `stage`, the package modules it runs and
    the `model_files` its job runs.

    A rule passes it through `params:`, so editing a module a stage runs plans that stage and its
    downstream, and nothing else; batch stages also fold it into the digest that decides whether a
    finished slide can be kept.
    """
    modules = stage_modules(stage, tuple(model_files))
    files = [SCRIPTS_DIR / f"{stage}.py"] + [PACKAGE_DIR / m for m in modules]
    return _digest_files(files, SCRIPTS_DIR)[:16]


@functools.cache
def package_digest() -> str:
    """SHA-256 (12 hex digits) over all of the package's Python sources, in path order."""
    return _digest_files(sorted(PACKAGE_DIR.rglob("*.py")), PACKAGE_DIR)[:12]
