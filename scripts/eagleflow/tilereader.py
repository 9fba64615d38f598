"""Tile reading at the decode floor: each stored tile decoded once per slide, tiles cut in memory.

`read_tile` asks OpenSlide for one region per tile, so the stored JPEG tiles a 448 px region
touches (2x2 to 3x3 of them) are decoded again for each neighbouring tile. Here a slide's tiles
are served from a grid of *source tiles* that are decoded once, shared by every tile that
overlaps them and dropped when the last of those tiles is cut.

Placement (one rule for tiling's edge pass, the tile encoders and the top-k re-read, which all
read through this class): a tile at level-0 (x, y) is the square of `level_tile_side` pixels of
the read level starting at `level_origins` (x / f, y / f rounded to the nearest whole pixel),
where f = `slides.level_factor`: the level's integer downsample when its size is level 0's
divided by it and rounded (almost every scanner pyramid: OpenSlide's 4.00012 for an Aperio
level 1 is an artefact of the rounded size), else OpenSlide's downsample. We snap each box to
the read level's pixel grid rather than define the grid in read-level pixels because our
level-0 grids must stay multiples of the tile side (the slide encoders bin tiles into cells by
them) and tiling already chooses a side of whole read-level pixels (`slides.grid_tile_size`),
so for every grid tile the snap moves nothing: the recorded level-0 coordinates are exactly the
pixels read (within f / 2 level-0 px for coordinates off the grid; the tiles file says which).
Tiles are never interpolated between pixels; OpenSlide's `read_region`, which places level-0 x
at x / 4.00012 and interpolates, differs from them by a sub-pixel shift on rounded levels and is
byte-identical where its positions are whole (every exact-size pyramid).

Sources of decoded pixels:

- ``jpeg``: a TIFF that OpenSlide maps page-for-level (generic TIFF, Aperio SVS) with JPEG
  tiles: the stored tiles are read with `os.pread` and decoded by imagecodecs (via tifffile),
  which releases the GIL, so threads decode in parallel;
- ``dicom``: a DICOM WSI level (a TILED_FULL instance of JPEG frames): its frames, the same way;
- ``region``: any other format whose OpenSlide downsample is a whole number (Philips, Ventana,
  Zeiss, MIRAX, Sakura: OpenSlide rounds theirs; exact-size pyramids): aligned 1024 px regions;
- ``per-tile``: one `read_region` per tile at the snapped position, only for a format we cannot
  decode whose OpenSlide downsample is fractional (NDPI, SCN and VMS through OpenSlide): the old,
  slow path, interpolated by OpenSlide by less than half a read-level pixel (a warning says so).

Each slide's decoders are checked against OpenSlide on its first tile where OpenSlide places it
on whole pixels, else on the level's top-left block (read at level-0 (0, 0), always whole); on
disagreement the slide is read through OpenSlide. A stored tile that fails to decode is re-read
through OpenSlide, so damaged slides fail with OpenSlide's error as before.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import openslide

from eagleflow.slides import (
    level_factor,
    level_origins,
    level_tile_side,
    open_slide,
    resize_to_tile,
    rgba_to_rgb,
)

log = logging.getLogger(__name__)

# OpenSlide drivers that expose each tiled TIFF page as a pyramid level, pixel for pixel.
PAGE_PER_LEVEL_VENDORS = ("generic-tiff", "aperio")
JPEG_COMPRESSION = 7
REGION_BLOCK_PX = 1024  # side (level px) of the OpenSlide regions of the fallback
CHECK_BLOCK_PX = 512  # side of the level's top-left block that checks decoders on rounded levels
LOOKAHEAD_PER_THREAD = 24  # tiles in flight per reader thread: enough to hide decode latency
DICOM_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

Key = tuple[int, int]  # (column, row) of a source tile
T = TypeVar("T")


class _HandlePool:
    """One OpenSlide handle per thread (the existing code never shares a handle across threads)."""

    def __init__(self, path: str, slide_id: str, first: openslide.OpenSlide | None = None) -> None:
        self._path, self._slide_id = path, slide_id
        self._local = threading.local()
        if first is not None:
            self._local.slide = first

    def get(self) -> openslide.OpenSlide:
        if not hasattr(self._local, "slide"):
            self._local.slide = open_slide(self._path, self._slide_id)
        return self._local.slide


class _Source(Protocol):
    """A level cut into a grid of source tiles, loaded one at a time."""

    tile_w: int
    tile_h: int
    width: int
    height: int
    columns: int
    rows: int

    def load(self, key: Key) -> np.ndarray: ...

    def close(self) -> None: ...


class _StoredTiles:
    """Stored tiles of one level in one file (TIFF tiles, DICOM frames), decoded from raw bytes.

    `decode(bytes, index)` returns the pixels of stored tile `index` (row-major); it must be a
    pure function, as it runs in several threads at once.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        size: tuple[int, int],
        tile: tuple[int, int],
        spans: list[tuple[int, int]],
        decode: Callable[[bytes, int], Any],
    ) -> None:
        self.width, self.height = size
        self.tile_w, self.tile_h = tile
        self.columns = -(-self.width // self.tile_w)
        self.rows = -(-self.height // self.tile_h)
        self._spans, self._decode = spans, decode
        self._fd = os.open(path, os.O_RDONLY)

    def load(self, key: Key) -> np.ndarray:
        column, row = key
        index = row * self.columns + column
        offset, count = self._spans[index]
        data = os.pread(self._fd, count, offset)
        if len(data) != count or count == 0:
            raise OSError(f"short read of stored tile {index}")
        pixels = self._decode(data, index)
        if pixels is None:
            raise OSError(f"stored tile {index} is empty")
        pixels = np.asarray(pixels).reshape(self.tile_h, self.tile_w, -1)[..., :3]
        # the right and bottom tiles are padded in the file; OpenSlide shows only the image
        return pixels[: self.height - row * self.tile_h, : self.width - column * self.tile_w]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _RegionSource:
    """Aligned square regions of one level, read through OpenSlide (whole downsamples only)."""

    def __init__(self, handles: _HandlePool, level: int, size: tuple[int, int], ds: int) -> None:
        self.tile_w = self.tile_h = REGION_BLOCK_PX
        self.width, self.height = size
        self.columns = -(-self.width // REGION_BLOCK_PX)
        self.rows = -(-self.height // REGION_BLOCK_PX)
        self._handles, self._level, self._ds = handles, level, ds

    def load(self, key: Key) -> np.ndarray:
        column, row = key
        left, top = column * REGION_BLOCK_PX, row * REGION_BLOCK_PX
        w = min(REGION_BLOCK_PX, self.width - left)
        h = min(REGION_BLOCK_PX, self.height - top)
        origin = (left * self._ds, top * self._ds)
        region = self._handles.get().read_region(origin, self._level, (w, h))
        return rgba_to_rgb(np.asarray(region))

    def close(self) -> None:
        pass


class _Once:
    """A source tile decoded by the first thread that needs it; the others wait for it."""

    __slots__ = ("lock", "pixels")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pixels: np.ndarray | None = None


def _jpeg_tiff_source(path: str, slide: openslide.OpenSlide, level: int) -> _StoredTiles | None:
    """OpenSlide's `level` as the JPEG tiles of its TIFF page, if it is a plain tiled 8-bit RGB page."""
    if slide.properties.get(openslide.PROPERTY_NAME_VENDOR) not in PAGE_PER_LEVEL_VENDORS:
        return None
    if any(key.startswith("openslide.bounds-") for key in slide.properties):
        return None  # a bounded slide would shift level coordinates
    import tifffile

    width, height = slide.level_dimensions[level]
    try:
        tif = tifffile.TiffFile(path)
    except Exception:  # OpenSlide opened it; let OpenSlide read it
        return None
    try:
        pages = [
            page
            for page in tif.pages
            if getattr(page, "is_tiled", False)
            and (page.imagewidth, page.imagelength) == (width, height)
        ]
        if len(pages) != 1:
            return None
        page = pages[0]
        plain = (
            page.compression == JPEG_COMPRESSION
            and page.samplesperpixel == 3
            and page.bitspersample == 8
            and page.planarconfig == 1
            and page.imagedepth == 1
            and len(page.dataoffsets) == -(-width // page.tilewidth) * -(-height // page.tilelength)
        )
        if not plain:
            return None
        decode, tables = page.decode, page.jpegtables  # built while the file is open
        spans = list(zip(map(int, page.dataoffsets), map(int, page.databytecounts), strict=True))
        tile = (int(page.tilewidth), int(page.tilelength))
    finally:
        tif.close()

    def decode_tile(data: bytes, index: int) -> Any:
        return decode(data, index, jpegtables=tables)[0]

    return _StoredTiles(path, (width, height), tile, spans, decode_tile)


def _dicom_frame_spans(path: Path, frames: int) -> list[tuple[int, int]] | None:
    """(offset, length) in the file of each frame of an encapsulated (one fragment a frame) DICOM."""
    import pydicom

    with open(path, "rb") as fh:
        pydicom.dcmread(fh, stop_before_pixels=True)  # leaves the file at the pixel data tag
        header = fh.read(12)
        # (7FE0,0010) OB, undefined length: the encapsulated form of explicit VR little endian
        if header[:8] != b"\xe0\x7f\x10\x00OB\x00\x00" or header[8:] != b"\xff" * 4:
            return None
        spans, position, first = [], fh.tell(), True
        while True:
            item = fh.read(8)
            if len(item) < 8:
                return None
            group, element, length = struct.unpack("<HHI", item)
            if (group, element) == (0xFFFE, 0xE0DD):  # sequence delimiter
                break
            if (group, element) != (0xFFFE, 0xE000):
                return None
            if not first:  # the first item is the basic offset table
                spans.append((position + 8, length))
            first = False
            position += 8 + length
            fh.seek(position)
    return spans if len(spans) == frames else None


def _dicom_source(path: str, slide: openslide.OpenSlide, level: int) -> _StoredTiles | None:
    """OpenSlide's `level` of a DICOM WSI as the JPEG frames of its TILED_FULL instance."""
    if slide.properties.get(openslide.PROPERTY_NAME_VENDOR) != "dicom":
        return None
    import imagecodecs
    import pydicom

    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    width, height = slide.level_dimensions[level]
    found = []
    for file in sorted(folder.iterdir()):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except Exception:  # not a DICOM file
            continue
        tiles = (-(-width // int(ds.get("Columns", 1)))) * (-(-height // int(ds.get("Rows", 1))))
        plain = (
            (ds.get("TotalPixelMatrixColumns"), ds.get("TotalPixelMatrixRows")) == (width, height)
            and "VOLUME" in list(ds.get("ImageType", []))
            and ds.get("DimensionOrganizationType", "TILED_FULL") == "TILED_FULL"
            and int(ds.get("TotalPixelMatrixFocalPlanes", 1)) == 1
            and int(ds.get("NumberOfOpticalPaths", 1)) == 1
            and ds.get("SamplesPerPixel") == 3
            and ds.get("BitsAllocated") == 8
            and ds.file_meta.get("TransferSyntaxUID") == DICOM_JPEG_BASELINE
            and int(ds.get("NumberOfFrames", 0)) == tiles
        )
        if plain:
            found.append((file, (int(ds.Columns), int(ds.Rows)), tiles))
    if len(found) != 1:
        return None
    file, tile, frames = found[0]
    spans = _dicom_frame_spans(file, frames)
    if spans is None:
        return None

    def decode_frame(data: bytes, index: int) -> np.ndarray:
        return imagecodecs.jpeg8_decode(data)

    return _StoredTiles(file, (width, height), tile, spans, decode_frame)


def _cut_from(
    source: _Source, get: Callable[[Key], np.ndarray], left: int, top: int, w: int, h: int
) -> np.ndarray:
    """The level's pixels [top, top+h) x [left, left+w), white outside the level."""
    region = np.full((h, w, 3), 255, dtype=np.uint8)
    for row in range(
        max(0, top // source.tile_h), min(source.rows, -(-(top + h) // source.tile_h))
    ):
        for column in range(
            max(0, left // source.tile_w), min(source.columns, -(-(left + w) // source.tile_w))
        ):
            pixels = get((column, row))
            x0, y0 = column * source.tile_w, row * source.tile_h
            # overlap of [left, left+w) x [top, top+h) with this source tile, in its coordinates
            sx0, sy0 = max(left, x0) - x0, max(top, y0) - y0
            sx1 = min(left + w, x0 + pixels.shape[1]) - x0
            sy1 = min(top + h, y0 + pixels.shape[0]) - y0
            if sx1 > sx0 and sy1 > sy0:
                dx, dy = x0 + sx0 - left, y0 + sy0 - top
                region[dy : dy + sy1 - sy0, dx : dx + sx1 - sx0] = pixels[sy0:sy1, sx0:sx1]
    return region


def _source_keys(source: _Source, left: int, top: int, side: int) -> list[Key]:
    """The source tiles that the square [left, left+side) x [top, top+side) touches."""
    columns = range(
        max(0, left // source.tile_w), min(source.columns, -(-(left + side) // source.tile_w))
    )
    rows = range(max(0, top // source.tile_h), min(source.rows, -(-(top + side) // source.tile_h)))
    return [(c, r) for r in rows for c in columns]


class LevelPixels:
    """Any rectangle of one level's stored pixels, decoded from its stored tiles (no OpenSlide).

    For whole-level reads (the tissue mask, thumbnails): OpenSlide would interpolate every
    region that does not start at level-0 (0, 0) on a rounded level. Checked against OpenSlide
    on the level's top-left block; `open` gives None where it cannot serve.
    """

    def __init__(self, source: _Source) -> None:
        self._source = source

    @classmethod
    def open(cls, path: str, slide: openslide.OpenSlide, level: int) -> LevelPixels | None:
        source = _jpeg_tiff_source(path, slide, level) or _dicom_source(path, slide, level)
        if source is None:
            return None
        if not _origin_agrees(source, slide, level):
            source.close()
            return None
        return cls(source)

    def region(self, left: int, top: int, w: int, h: int) -> np.ndarray:
        """Pixels [top, top+h) x [left, left+w) of the level, RGB uint8, white outside it."""
        return _cut_from(self._source, self._source.load, left, top, w, h)

    def close(self) -> None:
        self._source.close()


def _origin_agrees(source: _Source, slide: openslide.OpenSlide, level: int) -> bool:
    """Do our decodes equal OpenSlide's on the level's top-left block? OpenSlide reads it at
    level-0 (0, 0), on whole pixels whatever the downsample."""
    w, h = min(CHECK_BLOCK_PX, source.width), min(CHECK_BLOCK_PX, source.height)
    expected = rgba_to_rgb(np.asarray(slide.read_region((0, 0), level, (w, h))))
    try:
        return np.array_equal(_cut_from(source, source.load, 0, 0, w, h), expected)
    except Exception:
        return False


class SlideTileReader:
    """The tiles at `coords` (level-0 x, y) of one slide, placed by the module's rule.

    `tile(i)` may be called from several threads; each index must be asked for once (the
    decoded source tiles are dropped after their last user). `downsample` (the tiles file's
    record of OpenSlide's) is not used: the factor comes from the slide's level sizes.
    """

    def __init__(
        self,
        path: str,
        slide_id: str,
        coords: np.ndarray,
        size_level0: int,
        level: int,
        downsample: float,
        tile_px: int,
    ) -> None:
        self.path, self.slide_id = path, slide_id
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.size_level0, self.level = size_level0, level
        self.tile_px = tile_px
        slide = open_slide(path, slide_id)
        self._handles = _HandlePool(path, slide_id, first=slide)
        self.factor = level_factor(slide.level_dimensions, slide.level_downsamples, level)
        # OpenSlide places a level-0 point at x / downsample on the level (float64 division)
        self.downsample = float(slide.level_downsamples[level])
        self.size_level = level_tile_side(size_level0, self.factor)
        self.positions = level_origins(self.coords, self.factor)  # read-level (x, y) of each tile
        self._lock = threading.Lock()
        self._cache: dict[Key, _Once] = {}
        self._source: _Source | None = None
        self._checked = threading.Event()
        self._check_lock = threading.Lock()
        self._done = 0
        self.mode = "per-tile"
        if len(self.coords) == 0:
            self._checked.set()
            return
        if (source := _jpeg_tiff_source(path, slide, level)) is not None:
            self._source, self.mode = source, "jpeg"
        elif (source := _dicom_source(path, slide, level)) is not None:
            self._source, self.mode = source, "dicom"
        else:
            self._checked.set()  # OpenSlide's own pixels need no check
            self._use_openslide()
            return
        self._plan()

    @property
    def openslide_whole(self) -> bool:
        """Whether OpenSlide places our positions on whole pixels (then read_region agrees)."""
        return self.downsample == self.factor == round(self.factor)

    def _use_openslide(self) -> None:
        """Read through OpenSlide: aligned regions when its downsample is whole, else per tile."""
        if self.downsample == round(self.downsample):
            size = self._handles.get().level_dimensions[self.level]
            self._source = _RegionSource(self._handles, self.level, size, round(self.downsample))
            self.mode = "region"
            self._plan()
        else:
            self._source, self.mode = None, "per-tile"
            log.warning(
                "%s: level %d (downsample %.6g) cannot be decoded here and OpenSlide places its "
                "pixels between whole pixels: tiles are read one by one through OpenSlide "
                "(slow; interpolated by less than half a pixel)",
                self.slide_id,
                self.level,
                self.downsample,
            )

    def _plan(self) -> None:
        """Which source tiles each tile needs, and how many tiles need each source tile."""
        source = self._source
        assert source is not None
        self._keys = [
            _source_keys(source, lx, ly, self.size_level) for lx, ly in self.positions.tolist()
        ]
        self._users = Counter(key for keys in self._keys for key in keys)

    def __len__(self) -> int:
        return len(self.coords)

    def _read_tile(self, index: int) -> np.ndarray:
        """The tile through OpenSlide: read_region at the level-0 point of its snapped position."""
        lx, ly = (int(v) for v in self.positions[index])
        origin = (round(lx * self.downsample), round(ly * self.downsample))
        side = self.size_level
        region = self._handles.get().read_region(origin, self.level, (side, side))
        return resize_to_tile(rgba_to_rgb(np.asarray(region)), self.tile_px)

    def _pixels(self, key: Key) -> np.ndarray:
        with self._lock:
            cell = self._cache.setdefault(key, _Once())
        with cell.lock:
            if cell.pixels is None:
                assert self._source is not None
                cell.pixels = self._source.load(key)
            return cell.pixels

    def _release(self, keys: Iterable[Key]) -> None:
        with self._lock:
            for key in keys:
                self._users[key] -= 1
                if self._users[key] == 0:
                    self._cache.pop(key, None)
                    del self._users[key]

    def _cut(self, index: int) -> np.ndarray:
        assert self._source is not None
        lx, ly = (int(v) for v in self.positions[index])
        side = self.size_level
        region = _cut_from(self._source, self._pixels, lx, ly, side, side)
        return resize_to_tile(region, self.tile_px)

    def _decoders_agree(self, index: int) -> tuple[bool, np.ndarray | None]:
        """(do our decodes equal OpenSlide's?, OpenSlide's tile `index` if it was read).

        Where OpenSlide reads the tile on whole pixels the tile itself is compared (a damaged
        slide fails there as it did before); else the level's top-left block, which OpenSlide
        reads at level-0 (0, 0), on whole pixels whatever the downsample.
        """
        source = self._source
        assert source is not None
        if self.openslide_whole:
            reference = self._read_tile(index)
            try:
                return np.array_equal(self._cut(index), reference), reference
            except Exception:
                return False, reference
        return _origin_agrees(source, self._handles.get(), self.level), None

    def _check(self, index: int) -> np.ndarray | None:
        """Check our decoders on the first tile asked for; OpenSlide's tile if it was read."""
        agree, reference = self._decoders_agree(index)
        if not agree:
            log.warning(
                "%s: tifffile/imagecodecs and OpenSlide decode this slide differently; reading it "
                "through OpenSlide",
                self.slide_id,
            )
            assert self._source is not None
            self._source.close()
            self._cache.clear()
            self._use_openslide()
        return reference

    def _tile(self, index: int) -> np.ndarray:
        if not self._checked.is_set():
            with self._check_lock:  # the other threads wait until the check is done
                if not self._checked.is_set():
                    try:
                        reference = self._check(index)
                    finally:
                        self._checked.set()
                    if reference is not None:  # OpenSlide's tile, equal to ours if we agree
                        if self._source is not None:
                            self._release(self._keys[index])
                        return reference
        if self._source is None:
            return self._read_tile(index)
        try:
            return self._cut(index)
        except Exception:  # a damaged stored tile: OpenSlide reports it (or reads it) as before
            log.debug("%s: tile %d re-read through OpenSlide", self.slide_id, index)
            return self._read_tile(index)
        finally:
            self._release(self._keys[index])

    def tile(self, index: int) -> np.ndarray:
        """The tile at coords[index]: uint8 RGB (tile_px, tile_px, 3)."""
        try:
            return self._tile(index)
        finally:
            with self._lock:
                self._done += 1
                finished = self._done == len(self.coords)
            if finished:
                self.close()

    def close(self) -> None:
        """Release the file and the cache (also done once every tile has been read)."""
        if self._source is not None:
            self._source.close()
        self._cache.clear()


def ordered_map(
    jobs: Iterable[Callable[[], T]], threads: int, lookahead: int | None = None
) -> Iterator[T]:
    """Run `jobs` on `threads` threads (0: in the caller's), yield results in order, `lookahead` in flight.

    One thread already overlaps reading with the consumer's work (the model, the Canny test).
    """
    if threads <= 0:
        for job in jobs:
            yield job()
        return
    window = lookahead or threads * LOOKAHEAD_PER_THREAD
    pending: deque[Future[T]] = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tiles") as executor:
        try:
            for job in jobs:
                pending.append(executor.submit(job))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def iter_slide_tiles(
    readers: Iterable[SlideTileReader], threads: int
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(slide index, tile index, tile) for every tile of every reader, in order.

    One thread pool serves all slides, so the next slide is read while the last tiles of the
    previous one are consumed (no worker start-up per slide).
    """

    def jobs() -> Iterator[Callable[[], tuple[int, int, np.ndarray]]]:
        for slide_index, reader in enumerate(readers):
            for tile_index in range(len(reader)):
                yield partial(_read, reader, slide_index, tile_index)

    yield from ordered_map(jobs(), threads)


def _read(
    reader: SlideTileReader, slide_index: int, tile_index: int
) -> tuple[int, int, np.ndarray]:
    return slide_index, tile_index, reader.tile(tile_index)
