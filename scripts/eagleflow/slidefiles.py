"""Where a slide's pixels are on disk: one file, or a DICOM WSI folder (one instance per level).

Light on imports (OpenSlide only when a folder is looked into): the workflow calls these for every
slide of the sheet while it plans.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from stat import S_ISDIR


def dicom_instance(folder: str | os.PathLike[str]) -> Path | None:
    """The first instance of a DICOM WSI folder (in name order) that OpenSlide reads as a slide.

    OpenSlide opens a DICOM slide from any one of its instances and finds the other levels in
    the same folder; a folder with none it recognises gives None.
    """
    import openslide

    with os.scandir(folder) as entries:
        names = sorted(entry.name for entry in entries if entry.is_file())
    for name in names:
        path = Path(folder, name)
        try:
            if openslide.OpenSlide.detect_format(str(path)) == "dicom":
                return path
        except (OSError, openslide.OpenSlideError):
            continue
    return None


def slide_fingerprint(path: str | os.PathLike[str]) -> str:
    """What decides whether a finished slide is redone: its size and whole-second mtime.

    Path-free, so moving or renaming the slide (or its folder) keeps its tiles; a slide replaced
    or rewritten changes it. A DICOM folder counts every file in it. 'missing' when not there
    (the job then fails and names the path).
    """
    try:
        stat = os.stat(path)  # one system call for a slide file, the common case
        if not S_ISDIR(stat.st_mode):
            return f"{stat.st_size}-{int(stat.st_mtime)}"
        digest = hashlib.sha256()
        with os.scandir(path) as entries:
            for entry in sorted((e for e in entries if e.is_file()), key=lambda e: e.name):
                stat = entry.stat()
                digest.update(f"{entry.name}\0{stat.st_size}\0{int(stat.st_mtime)}\n".encode())
        return f"folder-{digest.hexdigest()[:16]}"
    except OSError:
        return "missing"
