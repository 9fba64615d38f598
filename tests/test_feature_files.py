"""Tile-feature files (eagleflow.feature_files): what peers make of them, and their validation.

The peer readers below are re-implemented from their documented or published logic (sources in
each docstring); they are not imported, so the tests need neither STAMP nor EAGLE installed.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from packaging.version import Version

from eagleflow import h5io
from eagleflow.feature_files import (
    FEATURES_FORMAT,
    read_feats_mean,
    read_tile_features,
    validate_tile_features,
    write_tile_features,
)
from eagleflow.h5io import FormatError

MPP = 0.25  # level-0 µm/px of a 40x scan: the old layout is misread by 1/MPP = 4
TILE_PX, TILE_MPP = 224, 2.0  # EAGLE's CTransPath grid: 448 µm regions
TILE_LEVEL0 = round(TILE_PX * TILE_MPP / MPP)  # 1792 level-0 px


def grid_corners(rows: int = 3, cols: int = 4, size: int = TILE_LEVEL0) -> np.ndarray:
    """Top-left level-0 corners (x, y) of a rows x cols block of tiles, sorted by y then x."""
    ys, xs = np.mgrid[0:rows, 0:cols]
    return np.stack([xs.ravel() * size + 5000, ys.ravel() * size + 7000], axis=1).astype(np.int64)


def tile_feats(n: int, dim: int = 768, seed: int = 0) -> np.ndarray:
    """Features whose column 0 is the tile's index, so a reader's row order can be checked."""
    feats = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    feats[:, 0] = np.arange(n)
    return feats


def write(path: Path, feats=None, coords=None, encoder="ctranspath", **overrides) -> str:
    coords = grid_corners() if coords is None else coords
    feats = tile_feats(len(coords)) if feats is None else feats
    kwargs = {
        "mpp": MPP,
        "tile_size_px": TILE_PX,
        "tile_size_um": TILE_PX * TILE_MPP,
        "encoder": encoder,
        "attrs": {"slide_id": path.stem, "tile_size_level0_px": TILE_LEVEL0},
    }
    kwargs.update(overrides)
    return write_tile_features(path, feats, coords, **kwargs)


# --- STAMP v2 --------------------------------------------------------------------------------


@dataclass
class StampCoords:
    coords_um: np.ndarray
    tile_size_um: float
    tile_size_px: int | None

    @property
    def mpp(self) -> float:  # STAMP's CoordsInfo.mpp: the tiles' µm/px, not the slide's
        assert self.tile_size_px
        return self.tile_size_um / self.tile_size_px


def stamp_min_step(coords: np.ndarray) -> float:
    """The smallest gap between distinct x or distinct y values (STAMP's get_stride)."""
    xs, ys = np.unique(coords[:, 0]), np.unique(coords[:, 1])
    return float(min(np.diff(xs).min(), np.diff(ys).min()))


def stamp_v2_get_coords(h5: h5py.File, reader_version: str = "2.5.0") -> StampCoords:
    """What STAMP v2 makes of a tile-feature file's coordinates.

    Re-implements the decision order of `get_coords` in KatherLab/STAMP
    src/stamp/modeling/data.py (read through the code search: commit 0016467 and the other stored
    versions agree), which BagDataset, the slide encoders and the heatmaps call:
    1. attributes `tile_size` (truthy) and `unit == "um"`: `coords` are µm;
    2. otherwise an attribute `tile_size_um` (truthy): `coords` are µm, whatever `unit` says;
    3. otherwise, if `tile_size` or the smallest coordinate step rounds to 224: the historic
       layout, pixels at 256 µm per 224 px (coords * 256 / 224);
    a `stamp_version` newer than the reader raises; `tile_size_px` comes from the attribute;
    nothing recognised raises.
    """
    attrs = h5.attrs  # raw h5py attributes, as STAMP reads them
    coords = h5["coords"][:]
    coords_um, tile_size_um, tile_size_px = None, None, None
    if attrs.get("tile_size") and attrs.get("unit") == "um":
        coords_um, tile_size_um = coords, float(attrs["tile_size"])
    elif attrs.get("tile_size_um"):
        coords_um, tile_size_um = coords, float(attrs["tile_size_um"])
    elif round(attrs.get("tile_size", stamp_min_step(coords.astype(np.float32)))) == 224:
        coords_um, tile_size_um, tile_size_px = coords / 224 * 256, 256.0, 224
    version = attrs.get("stamp_version")
    if version and Version(str(version)) > Version(reader_version):
        raise RuntimeError("features were extracted with a newer version of stamp")
    if not tile_size_px and "tile_size_px" in attrs:
        tile_size_px = int(attrs["tile_size_px"])
    if not tile_size_um or coords_um is None:
        raise RuntimeError("unable to infer coordinates from feature file")
    return StampCoords(coords_um, tile_size_um, tile_size_px)


def test_stamp_v2_reads_our_coordinates_in_micrometres(tmp_path):
    level0 = grid_corners()
    write(tmp_path / "s.h5", coords=level0)
    with h5py.File(tmp_path / "s.h5", "r") as h5:
        got = stamp_v2_get_coords(h5)
        feats = h5["feats"][:]  # BagDataset: h5["feats"], (N, D)
        assert h5.attrs["feat_type"] == "tile"  # detect_feature_type: tile-level bags
    np.testing.assert_allclose(got.coords_um, level0 * MPP, rtol=1e-12)
    assert got.tile_size_um == pytest.approx(448.0)
    assert got.tile_size_px == TILE_PX
    assert got.mpp == pytest.approx(TILE_MPP)  # what STAMP's heatmaps and GigaPath use
    assert feats.shape == (len(level0), 768)
    # STAMP's GigaPath slide encoder: slide extent = furthest corner + one tile, in µm
    extent_um = got.coords_um.max(axis=0) + got.tile_size_um
    np.testing.assert_allclose(extent_um, (level0.max(axis=0) + TILE_LEVEL0) * MPP)


def test_the_old_layout_is_misplaced_by_stamp_v2_by_one_over_mpp(tmp_path):
    """Format 1 (level-0 px under `coords` + `tile_size_um`): STAMP takes the pixels as µm."""
    level0 = grid_corners()
    h5io.write_h5(
        tmp_path / "old.h5",
        {"feats": tile_feats(len(level0)), "coords": level0},
        {"format": "eagleflow.features/1", "tile_size_um": 448.0, "coord_unit": "level-0 pixels"},
    )
    with h5py.File(tmp_path / "old.h5", "r") as h5:
        got = stamp_v2_get_coords(h5)
    true_um = level0 * MPP
    assert not np.allclose(got.coords_um, true_um)
    np.testing.assert_allclose(got.coords_um / true_um, 1 / MPP)  # x4, silently


def test_stamp_slide_encoders_accept_the_extractor_names(tmp_path):
    """STAMP's slide encoders check `extractor` (stamp/encoding/encoder/__init__.py): GigaPath
    needs "gigapath", EAGLE "ctranspath"/"chief-ctranspath" plus "virchow2" (ExtractorName)."""
    required = {"gigapath_tile": {"gigapath"}, "ctranspath": {"ctranspath", "chief-ctranspath"}}
    required["virchow2"] = {"virchow2"}
    for encoder, names in required.items():
        write(tmp_path / f"{encoder}.h5", encoder=encoder)
        with h5py.File(tmp_path / f"{encoder}.h5", "r") as h5:
            assert h5.attrs["extractor"] in names
            assert h5.attrs["encoder"] == encoder
    write(tmp_path / "p.h5", encoder="pathoduet")  # no STAMP twin: keeps its own name
    assert h5io.read_attrs(tmp_path / "p.h5")["extractor"] == "pathoduet"


def test_stamp_eagle_aligns_two_of_our_files_on_one_grid(tmp_path):
    """STAMP's EAGLE encoder needs both files' coords_um allclose (atol 1e-5) row by row."""
    level0 = grid_corners()
    write(tmp_path / "ctp.h5", coords=level0)
    write(
        tmp_path / "v2.h5",
        feats=tile_feats(len(level0), 1280, 1),
        coords=level0,
        encoder="virchow2",
    )
    with h5py.File(tmp_path / "ctp.h5", "r") as a, h5py.File(tmp_path / "v2.h5", "r") as b:
        ca, cb = stamp_v2_get_coords(a).coords_um, stamp_v2_get_coords(b).coords_um
    assert np.allclose(ca, cb, atol=1e-5, rtol=0)


# --- STAMP v1 and EAGLE ----------------------------------------------------------------------


def stamp_v1_bag(paths: list[Path]) -> np.ndarray:
    """STAMP v1's BagDataset (stamp/modeling/marugoto/transformer/data.py): the `feats` of each
    of a patient's files, concatenated, as float. It reads nothing else."""
    parts = []
    for path in paths:
        with h5py.File(path, "r") as h5:
            parts.append(h5["feats"][:])
    return np.concatenate(parts).astype(np.float32)


def eagle_match_coords(feats_w, feats_a, coords_w, coords_a):
    """KatherLab/EAGLE eagle/extract_feats.py `match_coords`: rows of two files whose `coords`
    are byte-identical, paired through np.intersect1d on a void view of each row."""
    row = np.dtype((np.void, coords_w.dtype.itemsize * coords_w.shape[1]))
    key_w = np.ascontiguousarray(coords_w).view(row).ravel()
    key_a = np.ascontiguousarray(coords_a).view(row).ravel()
    _, idx_w, idx_a = np.intersect1d(key_w, key_a, return_indices=True)
    return feats_w[idx_w], feats_a[idx_a]


def test_stamp_v1_reads_feats_as_an_n_by_d_bag(tmp_path):
    a, b = tile_feats(12, seed=1), tile_feats(5, seed=2)
    write(tmp_path / "a.h5", feats=a)
    write(tmp_path / "b.h5", feats=b, coords=grid_corners(1, 5))
    bag = stamp_v1_bag([tmp_path / "a.h5", tmp_path / "b.h5"])
    np.testing.assert_array_equal(bag, np.concatenate([a, b]))


def test_eagle_extract_feats_pairs_the_tiles_of_two_of_our_files(tmp_path):
    level0 = grid_corners()
    order = np.random.default_rng(3).permutation(len(level0))  # the second file in another order
    write(tmp_path / "w.h5", coords=level0)
    write(
        tmp_path / "a.h5",
        feats=tile_feats(len(level0), 1280)[order],
        coords=level0[order],
        encoder="virchow2",
    )
    loaded = []
    for name in ("w.h5", "a.h5"):
        with h5py.File(tmp_path / name, "r") as h5:  # EAGLE's load_patch_feats
            loaded.append((h5["feats"][:], h5["coords"][:]))
    (fw, cw), (fa, ca) = loaded
    matched_w, matched_a = eagle_match_coords(fw, fa, cw, ca)
    assert len(matched_w) == len(level0)
    np.testing.assert_array_equal(matched_w[:, 0], matched_a[:, 0])  # same tile in each pair


def test_eagle_reference_crops_would_miss_our_tiles(tmp_path):
    """EAGLE's main_feature_extraction reads `coords` as (row, col) px of its 2 µm/px cache JPEG
    (eagle_stamp.md 1.5: level-0 x = col * 2 / mpp, y = row * 2 / mpp): not our coords."""
    level0 = grid_corners()
    write(tmp_path / "s.h5", coords=level0)
    with h5py.File(tmp_path / "s.h5", "r") as h5:
        row, col = h5["coords"][:].T
    as_eagle = np.stack([col * 2 / MPP, row * 2 / MPP], axis=1)
    assert not np.allclose(as_eagle, level0)


# --- TRIDENT and CLAM ------------------------------------------------------------------------


def trident_convert(ours: Path, theirs: Path) -> None:
    """The conversion the README gives (our coords_level0_px is their coords)."""
    with h5py.File(ours, "r") as src, h5py.File(theirs, "w") as dst:
        dst["features"] = src["feats"][()]
        dst["coords"] = src["coords_level0_px"][()]
        dst["coords"].attrs["patch_size_level0"] = src.attrs["tile_size_level0_px"]


def test_trident_and_clam_need_the_conversion(tmp_path):
    level0, feats = grid_corners(), tile_feats(12)
    write(tmp_path / "ours.h5", feats=feats, coords=level0)
    with h5py.File(tmp_path / "ours.h5", "r") as h5, pytest.raises(KeyError):
        h5["features"]  # TRIDENT's and CLAM's readers: f["features"], f["coords"] (level-0 px)
    trident_convert(tmp_path / "ours.h5", tmp_path / "theirs.h5")
    with h5py.File(tmp_path / "theirs.h5", "r") as h5:
        np.testing.assert_array_equal(h5["features"][:], feats)
        np.testing.assert_array_equal(h5["coords"][:], level0)
        assert h5["coords"].attrs["patch_size_level0"] == TILE_LEVEL0  # TRIDENT Titan/GigaPath


def test_clam_pt_bag_from_our_file(tmp_path):
    torch = pytest.importorskip("torch")
    feats = tile_feats(12)
    write(tmp_path / "ours.h5", feats=feats)
    with h5py.File(tmp_path / "ours.h5", "r") as h5:  # the README's one-liner for pt_files/
        torch.save(torch.from_numpy(h5["feats"][()]), tmp_path / "s.pt")
    bag = torch.load(tmp_path / "s.pt", weights_only=True)  # CLAM's Generic_MIL_Dataset
    np.testing.assert_array_equal(bag.numpy(), feats)


# --- our own readers, the digest, validation -------------------------------------------------


def test_round_trip(tmp_path):
    level0 = grid_corners()
    feats16 = tile_feats(len(level0)).astype(np.float16)  # as STAMP stores them
    digest = write(tmp_path / "s.h5", feats=feats16, coords=level0)
    feats, coords, attrs = read_tile_features(tmp_path / "s.h5")
    assert feats.dtype == np.float32 and coords.dtype == np.int64
    np.testing.assert_array_equal(feats, feats16.astype(np.float32))
    np.testing.assert_array_equal(coords, level0)
    assert attrs["content_sha256"] == digest and attrs["format"] == FEATURES_FORMAT
    assert attrs["slide_id"] == "s" and attrs["n_tiles"] == len(level0)
    mean, n_tiles, _ = read_feats_mean(tmp_path / "s.h5")
    assert n_tiles == len(level0) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, feats16.astype(np.float64).mean(axis=0), rtol=1e-6, atol=1e-7)
    assert validate_tile_features(tmp_path / "s.h5", dim=768)["feature_dim"] == 768


def test_feats_mean_is_read_without_touching_feats(tmp_path):
    write(tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5", "r+") as h5:
        del h5["feats"]
    mean, n_tiles, _ = read_feats_mean(tmp_path / "s.h5")
    assert mean.shape == (768,) and n_tiles == 12
    with pytest.raises(FormatError):
        read_tile_features(tmp_path / "s.h5")


def test_digest_covers_the_datasets_and_nothing_else(tmp_path):
    level0, feats = grid_corners(), tile_feats(12)
    first = write(tmp_path / "a.h5", feats=feats, coords=level0)
    again = write(
        tmp_path / "b.h5", feats=feats, coords=level0, attrs={"created_utc": "another time"}
    )
    assert first == again  # attributes (times, provenance) do not enter the digest
    with h5py.File(tmp_path / "a.h5", "r") as h5:
        sha = hashlib.sha256()
        for name in sorted(h5):  # the digest, recomputed from what the file holds
            array = np.ascontiguousarray(h5[name][()])
            sha.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
            sha.update(array.tobytes())
        assert sorted(h5) == ["coords", "coords_level0_px", "feats", "feats_mean"]
    assert sha.hexdigest() == first
    changed = feats.copy()
    changed[3, 7] += 1
    assert write(tmp_path / "c.h5", feats=changed, coords=level0) != first
    assert write(tmp_path / "d.h5", feats=feats, coords=level0, mpp=0.5) != first


def test_validation_rejects_the_wrong_width(tmp_path):
    write(tmp_path / "s.h5")
    with pytest.raises(FormatError, match="768-d, expected 1280-d"):
        validate_tile_features(tmp_path / "s.h5", dim=1280)


def test_validation_rejects_a_truncated_file(tmp_path):
    write(tmp_path / "s.h5", feats=tile_feats(400), coords=grid_corners(20, 20))
    data = (tmp_path / "s.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    for reader in (validate_tile_features, read_tile_features, read_feats_mean):
        with pytest.raises(FormatError):
            reader(tmp_path / "cut.h5")


def tampered(tmp_path: Path, edit) -> Path:
    write(tmp_path / "good.h5")
    path = tmp_path / "bad.h5"
    shutil.copy(tmp_path / "good.h5", path)
    with h5py.File(path, "r+") as h5:
        edit(h5)
    return path


def _replace(h5: h5py.File, name: str, data: np.ndarray) -> None:
    del h5[name]
    h5[name] = data


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h5: h5.attrs.__setitem__("mpp", MPP * 1.01), "coords_level0_px \\* mpp"),
        # the old bug inside the new format: pixels under `coords`
        (lambda h5: _replace(h5, "coords", h5["coords_level0_px"][()] * 1.0), "coords_level0_px"),
        (lambda h5: _replace(h5, "coords_level0_px", h5["coords_level0_px"][()] * 1.0), "int64"),
        (lambda h5: _replace(h5, "feats_mean", h5["feats_mean"][()] + 1), "feats_mean"),
        (lambda h5: h5.attrs.__setitem__("n_tiles", 11), "n_tiles"),
        (lambda h5: h5.attrs.__setitem__("unit", "px"), "unit"),
        (lambda h5: h5.attrs.__setitem__("format", "eagleflow.features/1"), "not a"),
        (lambda h5: h5.__delitem__("coords_level0_px"), "missing"),
    ],
)
def test_validation_rejects_inconsistent_files(tmp_path, edit, message):
    path = tampered(tmp_path, edit)
    validate_tile_features(tmp_path / "good.h5")
    with pytest.raises(FormatError, match=message):
        validate_tile_features(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"feats": tile_feats(0), "coords": np.zeros((0, 2), np.int64)}, "no tiles"),
        ({"feats": tile_feats(12), "coords": grid_corners()[:5]}, "to match feats"),
        ({"coords": grid_corners() * 1.0}, "integer"),
        ({"mpp": 0.0}, "mpp must be"),
        ({"tile_size_um": float("nan")}, "tile_size_um must be"),
        ({"attrs": {"tile_size_um": 256.0}}, "disagrees"),
        ({"attrs": {"mpp": 0.5}}, "disagrees"),
        ({"feats": np.full((12, 768), np.nan, np.float32)}, "NaN"),
    ],
)
def test_writer_refuses_bad_input(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        write(tmp_path / "s.h5", **change)
    assert not (tmp_path / "s.h5").exists()


def test_layout_attributes_replace_those_of_the_tiles_file(tmp_path):
    tiles_attrs = {"coord_unit": "level-0 pixels", "format": "eagleflow.tiles/1", "mpp": MPP}
    write(tmp_path / "s.h5", attrs=tiles_attrs)
    attrs = h5io.read_attrs(tmp_path / "s.h5")
    assert attrs["format"] == FEATURES_FORMAT and attrs["coord_unit"].startswith("um")


def test_attribute_types_survive(tmp_path):
    extra = {
        "count": 3,
        "np_count": np.int64(4),
        "ratio": 0.5,
        "name": "slide ü",
        "flag": True,
        "missing": None,
        "levels": [1, 4, 16],
        "params": {"batch_size": 64},
    }
    write(tmp_path / "s.h5", attrs=extra)
    _, _, attrs = read_tile_features(tmp_path / "s.h5")
    assert isinstance(attrs["count"], np.integer) and attrs["count"] == 3
    assert isinstance(attrs["np_count"], np.integer) and attrs["np_count"] == 4
    assert isinstance(attrs["ratio"], np.floating) and attrs["ratio"] == 0.5
    assert attrs["name"] == "slide ü"
    assert (attrs["flag"], attrs["missing"]) == ("true", "null")  # h5io._attr_value's spellings
    assert attrs["levels"] == "[1, 4, 16]" and attrs["params"] == '{"batch_size": 64}'
    with h5py.File(tmp_path / "s.h5", "r") as h5:  # raw h5py, as STAMP sees them
        assert h5.attrs["unit"] == "um" and h5.attrs["feat_type"] == "tile"
        assert isinstance(h5.attrs["tile_size_px"], np.integer)
        assert isinstance(h5.attrs["tile_size_um"], np.floating)
        assert h5["coords"].dtype == np.float64 and h5["feats"].dtype == np.float32
