"""Ground-truth masks onto a scan's grid: by nearest neighbour through both affines."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
from scipy import ndimage

from hemocam.io import InputError

AFFINE_ATOL = 1e-3  # mm: same grid when the affines agree this closely


def _world_box(shape, affine):
    corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in shape[:3]])))
    world = corners @ np.asarray(affine, float)[:3, :3].T + np.asarray(affine, float)[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def resample_nearest(mask: np.ndarray, mask_affine, shape, affine) -> np.ndarray:
    """``mask`` (any grid) sampled at the voxel centres of (shape, affine); outside -> 0."""
    m = np.linalg.inv(np.asarray(mask_affine, float)) @ np.asarray(affine, float)
    return ndimage.affine_transform(mask, m[:3, :3], offset=m[:3, 3], output_shape=tuple(shape[:3]),
                                    order=0, mode="constant", cval=0, prefilter=False)


def covered_slices(mask_shape, mask_affine, shape, affine, tol=1e-3) -> int:
    """How many slices of the scan grid lie wholly inside the mask grid (corner voxel centres)."""
    m = np.linalg.inv(np.asarray(mask_affine, float)) @ np.asarray(affine, float)
    nx, ny, nz = shape[:3]
    corners = np.array([(i, j, k, 1.0) for k in range(nz) for i in (0, nx - 1) for j in (0, ny - 1)])
    ijk = (corners @ m.T)[:, :3]
    inside = np.all((ijk >= -0.5 - tol) & (ijk <= np.asarray(mask_shape[:3]) - 0.5 + tol), axis=1)
    return int(inside.reshape(nz, 4).all(axis=1).sum())


def mask_on_grid(path, shape, affine, name: str) -> tuple[np.ndarray, list[str]]:
    """Load ``path`` as a uint8 mask (>0 = hemorrhage) on the scan grid (shape, affine)."""
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InputError(f"{path}: unreadable mask ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: mask has shape {data.shape}, not 3D")
    fg = (np.nan_to_num(data.astype(np.float32)) > 0).astype(np.uint8)
    m_aff = img.affine
    notes = []
    same_shape = tuple(data.shape) == tuple(shape[:3])
    if same_shape and np.allclose(m_aff, affine, atol=AFFINE_ATOL):
        return fg, notes
    hdr = img.header
    if same_shape and int(hdr.get("sform_code", 0)) == 0 and int(hdr.get("qform_code", 0)) == 0:
        # no orientation stored: a same-shape mask can only mean the scan's own grid
        notes.append("mask has no orientation: taken as the scan's grid")
        return fg, notes
    lo_m, hi_m = _world_box(data.shape, m_aff)
    lo_s, hi_s = _world_box(shape, affine)
    if np.any(hi_m < lo_s) or np.any(hi_s < lo_m):
        raise InputError(f"{path}: mask does not overlap {name} in world space")
    out = resample_nearest(fg, m_aff, shape, affine).astype(np.uint8)
    n_in = int(fg.sum())
    if n_in and not out.any():
        raise InputError(f"{path}: mask foreground falls outside {name}")
    notes.append("mask resampled onto the scan grid (nearest neighbour)")
    n_cov = covered_slices(data.shape, m_aff, shape, affine)
    if n_cov < shape[2]:  # beyond the mask's grid, the ground truth reads as "no hemorrhage"
        notes.append(f"mask grid covers {n_cov} of {shape[2]} scan slices")
    if n_in:
        # compare in mm^3 (the grids differ): a large loss means part of it lay outside the scan
        v_in = n_in * abs(np.linalg.det(np.asarray(m_aff, float)[:3, :3]))
        v_out = int(out.sum()) * abs(np.linalg.det(np.asarray(affine, float)[:3, :3]))
        if v_out < 0.9 * v_in:
            notes.append(f"mask keeps {v_out / v_in:.0%} of its volume after resampling")
    return out, notes
