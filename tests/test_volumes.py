"""Hemorrhage volumes: known-answer tests on an ellipsoid, two lesions, an empty mask."""

import math

import numpy as np
import pandas as pd
import pytest

from hemocam.io import read_tsv, save_nifti, write_tsv
from hemocam.labelset import LABELS
from hemocam.volumes import abc2, diameters, lesion_stats, scan_volumes, volumes_table

SPACING = (0.5, 0.6, 1.5)  # anisotropic on purpose: every axis must use its own spacing


def affine(spacing=SPACING, oblique=False):
    a = np.diag([*spacing, 1.0])
    if oblique:  # rotate in-plane by 30 degrees: voxel volume (|det|) must not change
        c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
        a[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ a[:3, :3]
    a[:3, 3] = (-40, -30, 10)
    return a


def ellipsoid(shape, center_mm, semi_mm, spacing=SPACING):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    r = sum(((g - c) / a) ** 2 for g, c, a in zip(grids, center_mm, semi_mm))
    return (r <= 1).astype(np.uint8)


def test_ellipsoid_volume_exact_and_abc2_close():
    semi = (18.0, 12.0, 15.0)  # mm
    m = ellipsoid((100, 80, 30), (25.0, 24.0, 22.0), semi)
    stats = lesion_stats(m, affine())
    voxel_ml = np.prod(SPACING) / 1000
    assert stats["volume_ml"] == pytest.approx(m.sum() * voxel_ml, rel=1e-12)
    assert stats["lesions"] == 1
    assert stats["largest_ml"] == pytest.approx(stats["volume_ml"])
    true_ml = 4 / 3 * math.pi * np.prod(semi) / 1000
    assert stats["volume_ml"] == pytest.approx(true_ml, rel=0.03)
    # ABC/2 = (pi/6 ~ 0.524) ABC against the exact 4/3 pi abc: a few percent on an ellipsoid
    assert stats["abc2_ml"] == pytest.approx(true_ml, rel=0.08)
    # Kothari's slice weighting reads a smooth ellipsoid low (~0.68x): must be clearly smaller
    kothari = abc2(m, SPACING, c_method="kothari")
    assert 0.55 * true_ml < kothari < 0.8 * true_ml


def test_oblique_affine_same_volume():
    m = ellipsoid((60, 60, 20), (15.0, 18.0, 15.0), (8.0, 8.0, 8.0))
    straight = lesion_stats(m, affine())
    rotated = lesion_stats(m, affine(oblique=True))
    assert rotated["volume_ml"] == pytest.approx(straight["volume_ml"], rel=1e-9)
    assert rotated["abc2_ml"] == pytest.approx(straight["abc2_ml"], rel=1e-9)


def test_diameters_rectangle():
    m = np.zeros((30, 30), bool)
    m[5:25, 10:14] = True  # 20 x 4 pixels at 0.5 x 0.6 mm: 10 mm x 2.4 mm
    a, b = diameters(m, (0.5, 0.6))
    assert a == pytest.approx(math.hypot(10.0, 2.4))  # the longest chord is the diagonal
    # width perpendicular to the diagonal of a 10 x 2.4 rectangle: 2 * area / diagonal
    assert b == pytest.approx(2 * 10.0 * 2.4 / math.hypot(10.0, 2.4))


def test_two_lesions_26_connectivity():
    m = np.zeros((40, 40, 12), np.uint8)
    m[2:12, 2:12, 2:8] = 1  # 600 voxels
    m[20:24, 20:24, 3:5] = 1  # 32 voxels
    m[12, 12, 8] = 1  # touches the first block only at a corner: same lesion with 26-connectivity
    stats = lesion_stats(m, affine())
    voxel_ml = np.prod(SPACING) / 1000
    assert stats["lesions"] == 2
    assert stats["largest_ml"] == pytest.approx(601 * voxel_ml)
    assert stats["volume_ml"] == pytest.approx(633 * voxel_ml)
    # the largest lesion's box: 10 x 10 pixels (5 mm x 6 mm) on 7 slices (incl. the corner voxel)
    a, b = diameters(m[2:12, 2:12, 3] > 0, SPACING[:2])
    assert stats["abc2_ml"] == pytest.approx(a * b * 7 * 1.5 / 2000)


def test_empty_mask():
    stats = lesion_stats(np.zeros((10, 10, 5), np.uint8), affine())
    assert stats == {"volume_ml": 0.0, "lesions": 0, "largest_ml": 0.0, "abc2_ml": 0.0}


def test_scan_volumes_and_table(tmp_path):
    R = tmp_path / "results"
    ids = ["s1", "s2", "s3", "s4"]
    pos = ellipsoid((40, 40, 12), (10.0, 12.0, 9.0), (5.0, 5.0, 4.5))
    for sid, mask in (("s1", pos), ("s2", np.zeros_like(pos))):
        save_nifti(mask, affine(), R / "segmentation" / f"{sid}.nii.gz", dtype=np.uint8)
    probs = pd.DataFrame({"slice": range(3), "any": [0.1, 0.9, 0.3], "epidural": [0.0, 0.2, 0.05]})
    write_tsv(probs, R / "classifier" / "slices" / "s1.tsv")
    scans = pd.DataFrame({"scan_id": ids, "status": ["ok", "ok", "ok", "rejected"], "reason": ["", "", "", "ingest: bad"]})
    write_tsv(scans, R / "scans.tsv")
    manifest = pd.DataFrame({"scan_id": ids, "status": ["ok", "ok", "rejected", "rejected"],
                             "reason": ["", "", "segment: boom", "ingest: bad"]})
    write_tsv(manifest, R / "segmentation" / "batches" / "g0000.tsv")

    row = scan_volumes(R / "segmentation" / "s1.nii.gz", R / "classifier" / "slices" / "s1.tsv")
    assert row["p_any"] == pytest.approx(0.9) and row["p_epidural"] == pytest.approx(0.2)
    assert all(math.isnan(row[f"p_{l}"]) for l in LABELS[2:])  # labels the classifier lacks

    out = tmp_path / "volumes.tsv"
    volumes_table(R / "scans.tsv", R, out, manifests=[R / "segmentation" / "batches" / "g0000.tsv"])
    table = read_tsv(out, dtype={"scan_id": str})
    assert list(table.columns) == ["scan_id", "volume_ml", "lesions", "largest_ml", "abc2_ml"] + [f"p_{l}" for l in LABELS]
    assert list(table["scan_id"]) == ["s1", "s2"]
    assert table.loc[0, "volume_ml"] == pytest.approx(pos.sum() * np.prod(SPACING) / 1000, abs=1e-4)
    assert table.loc[0, "lesions"] == 1 and table.loc[1, "lesions"] == 0
    assert table.loc[1, "volume_ml"] == 0 and np.isnan(table.loc[1, "p_any"])
