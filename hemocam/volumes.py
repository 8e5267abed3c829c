"""Hemorrhage volumes per scan: what a clinician reads off a segmentation.

Per scan (``scan_volumes``):

- ``volume_ml``   predicted voxels x voxel volume; the voxel volume is |det| of the NIfTI affine's
  3x3 part, so oblique or sheared grids are measured correctly.
- ``lesions``     connected components in 3-D, 26-connectivity.
- ``largest_ml``  volume of the largest component.
- ``abc2_ml``     the bedside ABC/2 estimate (Kothari et al., Stroke 1996) of the largest component,
  measured on the segmentation the way a radiologist would on the CT:
  A = longest in-plane diameter on the slice where the lesion's area is largest,
  B = longest extent perpendicular to A on that slice, C = slice count x slice thickness, all in
  cm; ABC/2 in mL. Diameters are taken over pixel corners (the pixel extent, not pixel centres),
  in mm through the in-plane voxel spacing.
  ``c_method="count"`` (default, the column): C counts every slice showing the lesion; on an
  ellipsoid ABC/2 is then within a few percent of the true volume (pi/6 ~ 1/2).
  ``c_method="kothari"``: Kothari's weighting for irregular bleeds: a slice counts 1 when its
  lesion area is >= 75 % of the largest slice's, 0.5 for 25-75 %, 0 below 25 %. It under-reads
  smooth ellipsoids (~0.68x) by design, so it is not the default.
- ``p_any``, ``p_<subtype>``: the classifier's scan-level probability, the maximum over slices of
  ``R/classifier/slices/{scan_id}.tsv``; NaN for a label the classifier does not predict.

``volumes_table`` writes ``R/volumes.tsv`` for every scan segmented without error.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from hemocam.batch import read_manifests
from hemocam.io import InputError, load_nifti, read_tsv, write_tsv
from hemocam.labelset import LABELS

log = logging.getLogger("hemocam")

STRUCTURE_26 = np.ones((3, 3, 3), bool)
C_METHODS = ("count", "kothari")


def columns(labels=LABELS) -> list[str]:
    return ["scan_id", "volume_ml", "lesions", "largest_ml", "abc2_ml"] + [f"p_{l}" for l in labels]


def voxel_geometry(affine) -> tuple[float, np.ndarray]:
    """(voxel volume in mm^3, per-axis spacing in mm) from a NIfTI affine."""
    m = np.asarray(affine, float)[:3, :3]
    return float(abs(np.linalg.det(m))), np.linalg.norm(m, axis=0)


def _pixel_corners(mask2d: np.ndarray, spacing_xy) -> np.ndarray:
    """Physical (mm) coordinates of the four corners of every foreground pixel."""
    ij = np.argwhere(mask2d).astype(float)
    offsets = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    corners = (ij[:, None, :] + offsets[None]).reshape(-1, 2)
    corners = np.unique(corners, axis=0)
    return corners * np.asarray(spacing_xy, float)[None, :]


def diameters(mask2d: np.ndarray, spacing_xy) -> tuple[float, float]:
    """(A, B) in mm: the longest diameter and the extent perpendicular to it (0, 0 if empty)."""
    pts = _pixel_corners(mask2d, spacing_xy)
    if len(pts) == 0:
        return 0.0, 0.0
    try:
        pts = pts[ConvexHull(pts).vertices]
    except QhullError:  # collinear corners cannot happen for pixels, but stay safe
        pass
    d = pts[:, None, :] - pts[None, :, :]
    dist = np.hypot(d[..., 0], d[..., 1])
    i, j = np.unravel_index(np.argmax(dist), dist.shape)
    a = float(dist[i, j])
    if a == 0:
        return 0.0, 0.0
    u = (pts[j] - pts[i]) / a
    perp = np.array([-u[1], u[0]])
    proj = pts @ perp
    return a, float(proj.max() - proj.min())


def abc2(mask3d: np.ndarray, spacing, c_method: str = "count") -> float:
    """ABC/2 (mL) of one lesion on a grid with ``spacing`` (mm, slices on axis 2)."""
    if c_method not in C_METHODS:
        raise ValueError(f"c_method must be one of {C_METHODS}, got {c_method!r}")
    m = np.asarray(mask3d) > 0
    areas = m.sum(axis=(0, 1))
    if not areas.any():
        return 0.0
    k = int(np.argmax(areas))
    a_mm, b_mm = diameters(m[:, :, k], spacing[:2])
    if c_method == "count":
        n = float((areas > 0).sum())
    else:
        frac = areas / areas[k]
        n = float((frac >= 0.75).sum() + 0.5 * ((frac >= 0.25) & (frac < 0.75)).sum())
    c_mm = n * float(spacing[2])
    return (a_mm / 10) * (b_mm / 10) * (c_mm / 10) / 2


def lesion_stats(mask: np.ndarray, affine, c_method: str = "count") -> dict:
    """Volume, lesion count, largest lesion and its ABC/2 for one binary mask."""
    voxel_mm3, spacing = voxel_geometry(affine)
    m = np.asarray(mask) > 0
    if m.ndim != 3:
        raise InputError(f"segmentation must be 3-D, got shape {m.shape}")
    labels, n = ndimage.label(m, structure=STRUCTURE_26)
    out = {"volume_ml": float(m.sum()) * voxel_mm3 / 1000, "lesions": int(n), "largest_ml": 0.0, "abc2_ml": 0.0}
    if n:
        sizes = np.bincount(labels.ravel())[1:]
        big = int(np.argmax(sizes)) + 1
        out["largest_ml"] = float(sizes[big - 1]) * voxel_mm3 / 1000
        # ABC/2 only needs the lesion's bounding box: crop so large scans stay cheap
        box = ndimage.find_objects(labels, max_label=big)[big - 1]
        out["abc2_ml"] = abc2(labels[box] == big, spacing, c_method)
    return out


def scan_probabilities(prob_tsv_path, labels=LABELS) -> dict:
    """``p_<label>``: max over slices of the classifier's slice probabilities (NaN if absent)."""
    out = {f"p_{l}": float("nan") for l in labels}
    if prob_tsv_path is None or not Path(prob_tsv_path).exists():
        return out
    df = read_tsv(prob_tsv_path)
    for l in labels:
        if l in df and len(df):
            out[f"p_{l}"] = float(pd.to_numeric(df[l], errors="coerce").max())
    return out


def scan_volumes(seg_path, prob_tsv_path=None, labels=LABELS, c_method: str = "count") -> dict:
    """One row of ``volumes.tsv`` (without ``scan_id``) from a segmentation and slice probabilities."""
    mask, affine = load_nifti(seg_path)
    return {**lesion_stats(mask, affine, c_method), **scan_probabilities(prob_tsv_path, labels)}


def volumes_table(scans_tsv, results_dir, out_tsv, manifests=(), labels=LABELS, c_method: str = "count") -> pd.DataFrame:
    """Write ``out_tsv``: one row per ok scan of ``scans_tsv`` with a segmentation.

    ``manifests``: segmentation batch manifests; a scan rejected there (reason logged) has no
    segmentation and no row. Probabilities come from ``R/classifier/slices/{scan_id}.tsv``.
    """
    R = Path(results_dir)
    scans = read_tsv(scans_tsv, dtype={"scan_id": str})
    ids = list(scans.loc[scans["status"] == "ok", "scan_id"].astype(str))
    if manifests:
        seg = read_manifests(manifests)
        status = dict(zip(seg["scan_id"].astype(str), seg["status"]))
        reasons = dict(zip(seg["scan_id"].astype(str), seg["reason"]))
        for sid in ids:
            if status.get(sid) != "ok":
                log.warning("volumes: %s has no segmentation: %s", sid, reasons.get(sid, "not in any manifest"))
        ids = [sid for sid in ids if status.get(sid) == "ok"]
    rows = []
    for sid in ids:
        seg_path = R / "segmentation" / f"{sid}.nii.gz"
        if not seg_path.exists():
            log.warning("volumes: %s: %s missing, skipped", sid, seg_path)
            continue
        row = scan_volumes(seg_path, R / "classifier" / "slices" / f"{sid}.tsv", labels, c_method)
        rows.append({"scan_id": sid, **row})
    table = pd.DataFrame(rows, columns=columns(labels))
    write_tsv(table, out_tsv, float_format="%.4f")
    log.info("volumes: %d scans, %d with hemorrhage", len(table), int((table["volume_ml"] > 0).sum()))
    return table
