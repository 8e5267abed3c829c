"""Preprocess cache and its mapping back onto the NIfTI grid."""

import json

import nibabel as nib
import numpy as np
import pytest

from hemocam.io import InputError, save_nifti
from hemocam.phantom import make_scan
from hemocam.preprocess import from_original_grid, load_cache, preprocess_scan, to_original_grid

WINDOWS = [{"name": "brain", "center": 40, "width": 80}, {"name": "subdural", "center": 80, "width": 200},
           {"name": "soft", "center": 40, "width": 380}]


@pytest.fixture(scope="module")
def scan():
    return make_scan(7, matrix=64, n_slices=12, subtypes=["intraparenchymal"])


def _run(tmp_path, hu, affine, name="a", size=48, **kw):
    nii = tmp_path / f"{name}.nii.gz"
    save_nifti(np.rint(hu).astype(np.int16), affine, nii)
    out = [tmp_path / f"{name}_bm.nii.gz", tmp_path / f"{name}.npy", tmp_path / f"{name}.json"]
    extra = preprocess_scan(nii, *out, WINDOWS, size, **kw)
    return out, extra


def test_outputs_and_shapes(tmp_path, scan):
    (bm, cache, meta_path), extra = _run(tmp_path, scan["hu"], scan["affine"])
    img = nib.load(bm)
    assert img.shape == scan["hu"].shape and np.allclose(img.affine, scan["affine"])
    assert np.asanyarray(img.dataobj).dtype == np.uint8
    arr = np.load(cache, mmap_mode="r")
    assert isinstance(arr, np.memmap) and arr.shape == (12, 3, 48, 48) and arr.dtype == np.uint8
    meta = json.loads(meta_path.read_text())
    assert meta["shape"] == [64, 64, 12] and meta["size"] == 48 and meta["windows"] == WINDOWS
    assert np.allclose(meta["affine"], scan["affine"])
    arr2, meta2 = load_cache(cache, meta_path)
    assert arr2.shape == arr.shape and meta2 == meta
    assert extra["n_slices"] == 12 and extra["brain_ml"] > 100
    # skull stripping: nothing outside the brain mask reaches the cache
    outside = from_original_grid(1 - np.asanyarray(img.dataobj), meta, order=0)
    inside_any = from_original_grid(np.asanyarray(img.dataobj), meta, order=1) > 0
    assert arr[:, 0][(outside > 0) & ~inside_any].max() == 0
    assert arr[:, 0][inside_any].mean() > 50
    # and inside it, nothing denser than blood (the inner-table rim would outline every slice)
    (_, c2, _), _ = _run(tmp_path, scan["hu"], scan["affine"], "nostrip", skull_strip=False)
    (_, c3, _), _ = _run(tmp_path, scan["hu"], scan["affine"], "rim", strip_hu_max=None)
    full, rim = np.load(c2), np.load(c3)
    assert (full[:, 2] == 255).sum() > (rim[:, 2] == 255).sum() > (arr[:, 2] == 255).sum()


def test_round_trip_on_original_grid(tmp_path, scan):
    (_, cache, meta_path), _ = _run(tmp_path, scan["hu"], scan["affine"])
    _, meta = load_cache(cache, meta_path)
    lab = (scan["mask"] > 0).astype(np.uint8) * 3  # integer labels keep their values
    z = from_original_grid(lab, meta, order=0)
    assert z.shape == (12, 48, 48) and z.dtype == np.uint8 and set(np.unique(z)) <= {0, 3}
    back = to_original_grid(z, meta, order=0)
    assert back.shape == lab.shape and back.dtype == np.uint8
    # a blob mask there and back
    brain = np.asanyarray(nib.load(tmp_path / "a_bm.nii.gz").dataobj)
    for order in (0, 1):
        b = to_original_grid(from_original_grid(brain, meta, order=order), meta, order=order) > 0.5
        dice = 2 * (b & (brain > 0)).sum() / (b.sum() + brain.sum())
        assert dice > 0.95, (order, dice)
    # with no resizing (size = padded side) the mapping is exact
    exact = dict(meta, size=meta["side"])
    assert np.array_equal(to_original_grid(from_original_grid(lab, exact, order=0), exact, order=0), lab)
    f = to_original_grid(np.ones((12, 48, 48), np.float32), meta, order=1)
    assert f.dtype == np.float32 and f.shape == lab.shape
    with pytest.raises(ValueError):
        to_original_grid(np.zeros((11, 48, 48)), meta)


def test_storage_order_does_not_change_the_cache(tmp_path, scan):
    hu, aff = scan["hu"], scan["affine"]
    (_, c0, _), _ = _run(tmp_path, hu, aff, "base")
    # the same head stored with a flipped first axis, and transposed in-plane
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = hu.shape[0] - 1
    (_, c1, m1), _ = _run(tmp_path, hu[::-1], aff @ flip, "flipped")
    perm = np.eye(4)[[1, 0, 2, 3]]
    (_, c2, m2), _ = _run(tmp_path, hu.transpose(1, 0, 2), aff @ perm, "transposed")
    a0, a1, a2 = (np.load(p) for p in (c0, c1, c2))
    assert np.array_equal(a0, a1) and np.array_equal(a0, a2)
    # and maps back onto each one's own grid
    meta2 = json.loads(m2.read_text())
    lab = (scan["mask"] > 0).astype(np.uint8)
    back = to_original_grid(from_original_grid(lab.transpose(1, 0, 2), meta2, order=1), meta2, order=1) > 0.5
    assert back.shape == (64, 64, 12)
    assert 2 * (back & (lab.transpose(1, 0, 2) > 0)).sum() / (back.sum() + lab.sum()) > 0.8


def test_bad_inputs(tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    with pytest.raises(InputError, match="broken.nii.gz"):
        preprocess_scan(broken, tmp_path / "bm.nii.gz", tmp_path / "c.npy", tmp_path / "c.json", WINDOWS, 32)
    air = tmp_path / "air.nii.gz"
    save_nifti(np.full((32, 32, 6), -1000, np.int16), np.eye(4), air)
    with pytest.raises(InputError, match="no intracranial"):
        preprocess_scan(air, tmp_path / "bm.nii.gz", tmp_path / "c.npy", tmp_path / "c.json", WINDOWS, 32)
    assert not (tmp_path / "c.npy").exists()
    with pytest.raises(InputError):
        load_cache(tmp_path / "missing.npy", tmp_path / "missing.json")
