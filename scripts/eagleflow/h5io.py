"""Every on-disk format of the workflow, written atomically and validated on read.

A file that exists under its final name is complete: writers put data under a temporary name in the
same directory and rename it at the end (`os.replace` is atomic on POSIX file systems).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from eagleflow.errors import EagleflowError

if TYPE_CHECKING:  # pandas stays out of the planning-time imports
    import pandas as pd

TILES_FORMAT = "eagleflow.tiles/2"
ATTENTION_FORMAT = "eagleflow.attention/2"
TOPK_FORMAT = "eagleflow.topk/2"
EMBEDDINGS_FORMAT = "eagleflow.embeddings/2"
# results/embeddings/compute.csv: what each embedding cost per slide (written by the cohort
# tables, read by the comparison). `base` is the name before '@' (`eagle@0.5mpp` -> `eagle`);
# tile_px/tile_mpp the grid its tiles were read at (EAGLE and CHIEF: the selection grid), so the
# comparison never parses magnifications from names.
COMPUTE_COLUMNS = (
    "embedding",
    "base",
    "kind",
    "description",
    "tile_px",
    "tile_mpp",
    "tile_forwards_per_slide",
    "slide_forwards_per_slide",
    "seconds_per_slide",
    "demo_weights",
)


class FormatError(EagleflowError, ValueError):
    """A file does not have the layout its stage promises."""


class DiskFullError(EagleflowError, OSError):
    """No space (or quota) left while writing an output; nothing was kept under its final name."""


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def pid_alive(pid: int) -> bool:
    """True if a process with this id exists (possibly owned by another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(final: Path) -> None:
    """Delete temporaries of `final` left by killed writers (their process no longer exists)."""
    for stale in final.parent.glob(f".{final.name}.tmp.*"):
        pid = stale.name.rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it to `path`, on failure delete it."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final)
    tmp = final.with_name(f".{final.name}.tmp.{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as err:
        if err.errno not in _DISK_FULL or isinstance(err, DiskFullError):
            raise
        full = DiskFullError(
            f"{final}: {os.strerror(err.errno)} while writing it ({err}). Nothing was kept under "
            "that name. Free disk space (or quota) on that file system and rerun."
        )
        full.errno = err.errno
        raise full from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _attr_value(value: Any) -> Any:
    """HDF5 attributes hold numbers and strings; everything else is stored as JSON text."""
    if value is None:
        return "null"
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, float, str, np.integer, np.floating)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def content_digest(datasets: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over dataset names, dtypes, shapes and bytes: what a downstream stage depends on."""
    digest = hashlib.sha256()
    for name in sorted(datasets):
        array = np.ascontiguousarray(datasets[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def write_h5(
    path: str | os.PathLike[str],
    datasets: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any],
) -> str:
    """Write datasets and attributes to `path` atomically; return the content digest it records."""
    digest = content_digest(datasets)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        for name, array in datasets.items():
            h5.create_dataset(name, data=array)
        for key, value in attrs.items():
            h5.attrs[key] = _attr_value(value)
        h5.attrs["content_sha256"] = digest
    return digest


def read_h5(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All datasets and attributes of a (small) file."""
    with h5py.File(path, "r") as h5:
        data = {name: h5[name][()] for name in h5}
    return data, read_attrs(path)


def validate_h5(
    path: str | os.PathLike[str], fmt: str, shapes: Mapping[str, tuple[int | str | None, ...]]
) -> dict[str, Any]:
    """Check format and dataset shapes; a shape entry may be an int, a shared name ("N"), or None.

    Returns the attributes. Raises FormatError for anything a later stage should not trust.
    """
    sizes: dict[str, int] = {}
    try:
        with h5py.File(path, "r") as h5:
            if h5.attrs.get("format") != fmt:
                raise FormatError(f"{path}: not a {fmt} file (format {h5.attrs.get('format')!r})")
            if "content_sha256" not in h5.attrs:
                raise FormatError(f"{path}: no content_sha256 attribute (incomplete write?)")
            for name, expected in shapes.items():
                if name not in h5:
                    raise FormatError(f"{path}: dataset {name!r} missing")
                shape = h5[name].shape
                if len(shape) != len(expected):
                    raise FormatError(f"{path}: {name} has shape {shape}, expected {expected}")
                for actual, want in zip(shape, expected, strict=True):
                    if isinstance(want, str):
                        want = sizes.setdefault(want, actual)
                    if want is not None and actual != want:
                        raise FormatError(f"{path}: {name} has shape {shape}, expected {expected}")
                h5[name][()]  # reads every byte: a truncated file fails here
    except (OSError, KeyError) as err:
        raise FormatError(f"{path}: unreadable or incomplete file ({err})") from err
    return read_attrs(path)


def read_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    with h5py.File(path, "r") as h5:
        return {
            key: value.decode() if isinstance(value, bytes) else value
            for key, value in h5.attrs.items()
        }


def write_tiles(path: str | os.PathLike[str], table: Any, provenance: Mapping[str, Any]) -> None:
    """Write a tiling.TileTable: coords (N, 2) int64 level-0 (x, y), plus per-tile scores."""
    from eagleflow.grids import Grid

    info, params = table.info, table.params
    attrs: dict[str, Any] = {
        "format": TILES_FORMAT,
        "slide_id": table.slide_id,
        "slide_path": info.path,
        "slide_width": info.width,
        "slide_height": info.height,
        "slide_vendor": info.vendor,
        "mpp": info.mpp,
        "mpp_source": info.mpp_source,
        "mpp_warning": info.mpp_warning,
        "coord_unit": "level-0 pixels",
        "coord_order": "x,y (top-left corner), rows sorted by y then x",
        "grid": Grid(params.tile_px, params.tile_mpp).name,
        "tile_px": params.tile_px,
        "tile_mpp": params.tile_mpp,
        "tile_size_um": params.tile_px * params.tile_mpp,
        "tile_size_level0_px": table.tile_size_level0,
        "effective_mpp": table.effective_mpp,
        "read_level": table.read_level,
        "read_level_downsample": info.level_downsamples[table.read_level],
        "resample_filter": "cv2.INTER_AREA (INTER_CUBIC if upsampling)",
        "n_grid": table.n_grid,
        "n_tissue": len(table.coords) + len(table.rejected_coords),
        "n_edge_rejected": len(table.rejected_coords),
        "n_tiles": len(table.coords),
        **provenance,
    }
    write_h5(
        path,
        {
            "coords": table.coords.astype(np.int64).reshape(-1, 2),
            "tissue_fraction": table.tissue_fraction.astype(np.float32),
            "edge_fraction": table.edge_fraction.astype(np.float32),
        },
        attrs,
    )


def read_tiles(path: str | os.PathLike[str], grid: Any = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Return (coords, attrs) of a tiles file, checking its format (and grid, if given) first."""
    validate_tiles(path, grid)
    with h5py.File(path, "r") as h5:
        coords = h5["coords"][:]
    return coords, read_attrs(path)


def validate_tiles(path: str | os.PathLike[str], grid: Any = None) -> dict[str, Any]:
    """Check a tiles file; with `grid` (an encoders.Grid), also that its tiles are of that grid."""
    from eagleflow.grids import Grid

    attrs = validate_h5(
        path,
        TILES_FORMAT,
        {"coords": ("N", 2), "tissue_fraction": ("N",), "edge_fraction": ("N",)},
    )
    with h5py.File(path, "r") as h5:
        if h5["coords"].dtype != np.int64 or int(attrs["n_tiles"]) != h5["coords"].shape[0]:
            raise FormatError(f"{path}: coords must be int64 and match n_tiles")
    if "tile_px" not in attrs or "tile_mpp" not in attrs:
        raise FormatError(f"{path}: no tile_px or tile_mpp attribute: its grid is unknown")
    # files written before grids had names carry no `grid`: their tile_px and tile_mpp say it
    actual = Grid(int(attrs["tile_px"]), float(attrs["tile_mpp"]))
    if attrs.get("grid", actual.name) != actual.name:
        raise FormatError(
            f"{path}: attribute grid {attrs['grid']!r} disagrees with its tile_px and tile_mpp "
            f"({actual.name})"
        )
    if grid is not None and actual != grid:
        raise FormatError(
            f"{path}: holds tiles of grid {actual.name}, not {grid.name}: it is another grid's "
            "tiles file"
        )
    return attrs


def write_csv(frame: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_json(data: Any, path: str | Path) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1, default=str) + "\n").encode())
