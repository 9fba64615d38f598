"""Bad inputs for the robustness tests: truncated, corrupt, scale-less and tissue-less slides."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import tifffile

from eagleflow.demo.render import render_slide
from eagleflow.demo.specs import SlideSpec
from eagleflow.demo.tiff import write_if_changed, write_pyramid_tiff

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
        write_if_changed(root / filename, data)
        out[name] = root / filename
    write_if_changed(
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
