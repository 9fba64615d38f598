"""Tile reading near the decode floor: each stored tile decoded once per slide, tiles cut in memory.

`read_tile` asks OpenSlide for one region per tile, so the stored JPEG tiles a 448 px region
touches (2x2 to 3x3 of them) are decoded again for each neighbouring tile. Here a slide's tiles
are served from a grid of *source tiles* that are decoded once, shared by every tile that
overlaps them and dropped when the last of those tiles is cut:

- ``jpeg``: a TIFF that OpenSlide maps page-for-level (generic TIFF, Aperio SVS) with JPEG
  tiles: the stored tiles are read with `os.pread` and decoded by imagecodecs (via tifffile),
  which releases the GIL, so threads decode in parallel;
- ``region``: any other format: aligned 1024 px regions read through OpenSlide;
- ``per-tile``: `read_tile` itself, when a tile's position on the level is not a whole pixel
  (OpenSlide then interpolates sub-pixel offsets, which cutting cannot reproduce).

All three give the same bytes as `read_tile` (tests/test_tilereader.py): the cut region is the
same pixels and the resampling is the same function. The JPEG path checks that on each slide's
first tile and falls back to regions if the decoders disagree; a stored tile that fails to
decode is re-read through `read_tile`, so damaged slides fail with OpenSlide's error as before.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import numpy as np
import openslide

from eagleflow.slides import open_slide, read_tile, resize_to_tile, rgba_to_rgb

log = logging.getLogger(__name__)

# OpenSlide drivers that expose each tiled TIFF page as a pyramid level, pixel for pixel.
PAGE_PER_LEVEL_VENDORS = ("generic-tiff", "aperio")
JPEG_COMPRESSION = 7
REGION_BLOCK_PX = 1024  # side (level px) of the OpenSlide regions of the fallback
LOOKAHEAD_PER_THREAD = 24  # tiles in flight per reader thread: enough to hide decode latency

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


class _JpegTiffSource:
    """The stored JPEG tiles of one TIFF page, decoded from raw bytes."""

    def __init__(self, path: str, page: Any) -> None:
        self.tile_w, self.tile_h = int(page.tilewidth), int(page.tilelength)
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.columns = -(-self.width // self.tile_w)
        self.rows = -(-self.height // self.tile_h)
        self._offsets = [int(v) for v in page.dataoffsets]
        self._counts = [int(v) for v in page.databytecounts]
        self._tables = page.jpegtables
        self._decode = page.decode  # a pure function of (bytes, index): safe across threads
        self._fd = os.open(path, os.O_RDONLY)

    def load(self, key: Key) -> np.ndarray:
        column, row = key
        index = row * self.columns + column
        data = os.pread(self._fd, self._counts[index], self._offsets[index])
        if len(data) != self._counts[index]:
            raise OSError(f"short read of stored tile {index}")
        pixels, _, _ = self._decode(data, index, jpegtables=self._tables)
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
    """Aligned square regions of one level, read through OpenSlide (any format it opens)."""

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


def _find_jpeg_page(path: str, slide: openslide.OpenSlide, level: int) -> Any | None:
    """The tifffile page that is OpenSlide's `level`, if it is a plain tiled 8-bit JPEG RGB page."""
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
        page.decode  # noqa: B018 - build the decoder while the file is open
        page.dataoffsets  # noqa: B018
        return page
    finally:
        tif.close()


class SlideTileReader:
    """The tiles at `coords` (level-0 x, y) of one slide, as `read_tile` returns them.

    `tile(i)` may be called from several threads; each index must be asked for once (the
    decoded source tiles are dropped after their last user).
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
        self.size_level0, self.level, self.downsample = size_level0, level, downsample
        self.tile_px = tile_px
        self.size_level = max(1, round(size_level0 / downsample))
        slide = open_slide(path, slide_id)
        self._handles = _HandlePool(path, slide_id, first=slide)
        self._lock = threading.Lock()
        self._cache: dict[Key, _Once] = {}
        self._source: _JpegTiffSource | _RegionSource | None = None
        self._checked = threading.Event()
        self._check_lock = threading.Lock()
        self._done = 0
        self.mode = "per-tile"
        # OpenSlide places a level-0 point at x / downsample on the level (float64 division)
        level_ds = float(slide.level_downsamples[level])
        positions = self.coords.astype(np.float64) / level_ds
        if len(self.coords) == 0 or not np.array_equal(positions, np.floor(positions)):
            self._checked.set()
            return
        self._positions = positions.astype(np.int64)
        page = _find_jpeg_page(path, slide, level)
        if page is not None:
            self._source, self.mode = _JpegTiffSource(path, page), "jpeg"
        elif level_ds == round(level_ds):
            size = slide.level_dimensions[level]
            self._source = _RegionSource(self._handles, level, size, round(level_ds))
            self.mode = "region"
            self._checked.set()
        else:
            self._checked.set()
            return
        self._plan()

    def _plan(self) -> None:
        """Which source tiles each tile needs, and how many tiles need each source tile."""
        source = self._source
        assert source is not None
        self._keys: list[list[Key]] = []
        for lx, ly in self._positions.tolist():
            columns = range(
                max(0, lx // source.tile_w),
                min(source.columns, -(-(lx + self.size_level) // source.tile_w)),
            )
            rows = range(
                max(0, ly // source.tile_h),
                min(source.rows, -(-(ly + self.size_level) // source.tile_h)),
            )
            self._keys.append([(c, r) for r in rows for c in columns])
        self._users = Counter(key for keys in self._keys for key in keys)

    def __len__(self) -> int:
        return len(self.coords)

    def _read_tile(self, index: int) -> np.ndarray:
        x, y = (int(v) for v in self.coords[index])
        return read_tile(
            self._handles.get(),
            x,
            y,
            self.size_level0,
            self.level,
            self.downsample,
            self.tile_px,
        )

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
        source = self._source
        assert source is not None
        lx, ly = (int(v) for v in self._positions[index])
        side = self.size_level
        region = np.full((side, side, 3), 255, dtype=np.uint8)  # outside the level: white
        for column, row in self._keys[index]:
            pixels = self._pixels((column, row))
            x0, y0 = column * source.tile_w, row * source.tile_h
            # overlap of the tile [lx, lx+side) with this source tile, in source coordinates
            sx0, sy0 = max(lx, x0) - x0, max(ly, y0) - y0
            sx1 = min(lx + side, x0 + pixels.shape[1]) - x0
            sy1 = min(ly + side, y0 + pixels.shape[0]) - y0
            if sx1 > sx0 and sy1 > sy0:
                dx, dy = x0 + sx0 - lx, y0 + sy0 - ly
                region[dy : dy + sy1 - sy0, dx : dx + sx1 - sx0] = pixels[sy0:sy1, sx0:sx1]
        return resize_to_tile(region, self.tile_px)

    def _switch_to_regions(self) -> None:
        """Our decodes differ from OpenSlide's: read this slide through OpenSlide instead."""
        log.warning(
            "%s: tifffile/imagecodecs and OpenSlide decode this slide differently; reading it "
            "through OpenSlide",
            self.slide_id,
        )
        assert self._source is not None
        self._source.close()
        self._cache.clear()
        slide = self._handles.get()
        level_ds = float(slide.level_downsamples[self.level])
        if level_ds != round(level_ds):
            self._source, self.mode = None, "per-tile"
            return
        size = slide.level_dimensions[self.level]
        self._source = _RegionSource(self._handles, self.level, size, round(level_ds))
        self.mode = "region"
        self._plan()

    def _first_tile(self, index: int) -> np.ndarray:
        """The first tile asked for, cut and also read by OpenSlide: do the decoders agree?"""
        reference = self._read_tile(index)  # a damaged slide fails here as it did before
        try:
            tile = self._cut(index)
        except Exception:
            tile = None
        if tile is None or not np.array_equal(tile, reference):
            self._switch_to_regions()
        if self._source is not None:
            self._release(self._keys[index])
        return reference

    def _tile(self, index: int) -> np.ndarray:
        if not self._checked.is_set():
            with self._check_lock:  # the other threads wait until the check is done
                if not self._checked.is_set():
                    try:
                        return self._first_tile(index)
                    finally:
                        self._checked.set()
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
        """The tile at coords[index]: uint8 RGB (tile_px, tile_px, 3), bytes as read_tile's."""
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
