"""Intracranial mask from HU: remove skull, scalp and everything outside the cranial cavity.

Scalp (skin, muscle, a scalp haematoma) has blood-like HU; if left in, CAMs and HU-based
pseudo-mask refinement happily "find" bleeds there. The mask must, however, keep epidural and
subdural collections that lie against the inner table of the skull.

Steps (on the NIfTI grid, slices on axis 2, in-plane sizes in mm from ``spacing``):

1. bone = HU >= ``bone_hu``; keep the big 3-D bone components (the cranium; drops a head rest or
   loose calcifications).
2. per slice, the convex hull of that bone: the skull's outer surface is convex, so the scalp lies
   outside the hull on every slice, including vertex slices (bone cap) and skull-base slices
   (open rings: foramen magnum, orbits), where hole filling of the ring would fail.
3. candidates = soft tissue (``soft_min`` <= HU <= ``soft_max``: CSF, brain, blood) inside the hull.
   At the skull base that still includes orbits, temporal muscles and the neck.
4. erode the candidates in-plane by ``erode_mm``, keep the largest 3-D component (the brain: the
   other candidates only touch it through thin gaps in the bone, which the erosion cuts), then grow
   it back geodesically within the candidates (so a subdural crescent against the inner table,
   being connected to the brain, comes back whole) by as far as the erosion took, a move to the
   next slice costing the slice spacing (capped at ``erode_mm``). Growing one slice per step, as
   this once did, let the frontal lobe reach ten 2.6 mm slices down through a thin orbital roof and
   spread through the orbits; the erosion, being in-plane, takes nothing along z.
5. fill holes per slice (calcifications, dense clot) and add a ``rim_mm`` partial-volume rim
   (at least one pixel, HU < ``rim_hu``) towards the inner table: voxels mixing blood and bone
   read far above ``soft_max`` (up to ~700 HU with 5 mm slices through a curved skull) but
   belong to a subdural/epidural collection.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage
from skimage.morphology import convex_hull_image

# 4-connected within a slice (slices are axis 2)
IN_PLANE = ndimage.generate_binary_structure(2, 1)[:, :, None]

log = logging.getLogger("hemocam")


def _disk(radius_px: tuple[float, float]) -> np.ndarray:
    """In-plane elliptic structuring element (rx, ry in pixels) as a (2rx+1, 2ry+1, 1) array."""
    rx, ry = max(radius_px[0], 0.5), max(radius_px[1], 0.5)
    nx, ny = int(np.floor(rx)), int(np.floor(ry))
    x, y = np.mgrid[-nx : nx + 1, -ny : ny + 1]
    return ((x / rx) ** 2 + (y / ry) ** 2 <= 1.0)[:, :, None]


def _largest_components(mask: np.ndarray, min_fraction: float, structure=None) -> np.ndarray:
    lab, n = ndimage.label(mask, structure=structure)
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(lab.ravel())[1:]
    keep = np.flatnonzero(sizes >= max(1, min_fraction * sizes.max())) + 1
    return np.isin(lab, keep)


def _hulls(bone: np.ndarray, min_pixels: int) -> np.ndarray:
    out = np.zeros_like(bone, dtype=bool)
    for k in range(bone.shape[2]):
        sl = bone[:, :, k]
        if sl.sum() >= min_pixels:
            out[:, :, k] = convex_hull_image(sl)
    return out


def _regrow(core: np.ndarray, cand: np.ndarray, steps: int, z_cost: int) -> np.ndarray:
    """Voxels of ``cand`` within ``steps`` in-plane pixel moves (4-connected) of ``core`` along
    paths inside ``cand``, a move to the next or previous slice costing ``z_cost`` pixel moves."""
    box = ndimage.find_objects(cand.astype(np.uint8))[0]  # the work stays inside cand's box
    out = np.zeros_like(core)
    core, cand = core[box], cand[box]
    reached = [core]  # reached[d]: within distance d; only the last z_cost are needed
    for d in range(1, steps + 1):
        now = ndimage.binary_dilation(reached[-1], structure=IN_PLANE, mask=cand)
        if d >= z_cost:
            src = reached[-z_cost]
            now[:, :, 1:] |= src[:, :, :-1] & cand[:, :, 1:]
            now[:, :, :-1] |= src[:, :, 1:] & cand[:, :, :-1]
        reached = (reached + [now])[-z_cost:]
    out[box] = reached[-1]
    return out


def brain_mask(
    hu,
    spacing,
    bone_hu: float = 200.0,
    soft_min: float = -20.0,
    soft_max: float = 130.0,
    erode_mm: float = 3.5,
    bone_min_fraction: float = 0.05,
    rim_mm: float = 3.0,
    rim_hu: float = 800.0,
) -> np.ndarray:
    """uint8 intracranial mask (1 inside) of the HU volume ``hu`` (X, Y, Z).

    ``spacing`` is the voxel size in mm (x, y[, z]); without z, slices are taken as far apart as pixels.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"brain_mask needs a 3-D volume, got shape {hu.shape}")
    sx, sy = float(spacing[0]), float(spacing[1])
    if not (sx > 0 and sy > 0):
        raise ValueError(f"invalid in-plane spacing {spacing}")

    bone = hu >= bone_hu
    bone = _largest_components(bone, bone_min_fraction, structure=np.ones((3, 3, 3), bool))
    # a hull from a few stray bone pixels would be meaningless: ask for ~1 cm^2 of bone
    hull = _hulls(bone, min_pixels=max(8, int(100.0 / (sx * sy))))
    cand = (hu >= soft_min) & (hu <= soft_max) & hull & ~bone
    if not cand.any():
        return np.zeros(hu.shape, np.uint8)

    core = ndimage.binary_erosion(cand, structure=_disk((erode_mm / sx, erode_mm / sy)))
    # 3-D connectivity across slices only through face neighbours: thick slices link weakly
    conn = ndimage.generate_binary_structure(3, 1)
    core = _largest_components(core, 1.0, structure=conn)
    if not core.any():  # tiny heads / very coarse grids: skip the erosion
        core = _largest_components(cand, 1.0, structure=conn)
    steps = int(np.ceil(erode_mm / min(sx, sy))) + 2
    # a move to the next slice costs the slice spacing, at most erode_mm: one move stays possible
    # (the erosion can take a whole vertex slice's core), but the regrowth cannot travel slices
    # down through a thin orbital roof and then spread through the orbit
    sz = float(spacing[2]) if len(spacing) > 2 and float(spacing[2]) > 0 else min(sx, sy)
    z_cost = max(1, int(np.ceil(min(sz, erode_mm) / min(sx, sy))))
    mask = _regrow(core, cand, steps, z_cost)

    for k in range(mask.shape[2]):
        if mask[:, :, k].any():
            mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    # partial-volume rim: voxels against the inner table mix blood/CSF with bone (thick slices
    # through a curved skull read several hundred HU) yet belong to the bleed; the scalp is
    # always further away than the rim (a whole skull thickness)
    steps = max(1, int(round(rim_mm / min(sx, sy))))
    ok = (hu >= soft_min) & (hu < rim_hu) & hull
    mask = ndimage.binary_dilation(mask, structure=np.ones((3, 3, 1), bool), iterations=steps, mask=ok) | mask
    return mask.astype(np.uint8)
