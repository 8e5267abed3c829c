"""Per-scan training cache: brain mask, windowed channels in a fixed S x S frame, and the exact
inverse mapping back onto the NIfTI grid.

In-plane geometry, from the NIfTI slice (axes 0, 1) to the cache frame (S, S):

1. reorient to radiological display: rows run anterior -> posterior, columns patient right ->
   left (a transpose and/or flips, chosen from the affine), so every scan looks the same way up
   whatever order the converter stored it in (the cache is a CNN input: consistency helps);
2. crop to the brain mask's bounding box (union over slices) plus ``margin_mm``: the brain fills
   the frame, so a given S spends its pixels on the brain rather than air;
3. pad to a square (zeros = air in every window) and resize to S x S (bilinear, antialiased;
   :mod:`hemocam.resize`).

``meta`` records each step, so :func:`to_original_grid` puts a (Z, S, S) array (CAM, mask,
probabilities) back on the original (X, Y, Z) grid and :func:`from_original_grid` does the
opposite; slices are never resampled (axis 2 of the NIfTI = axis 0 of the cache).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from hemocam.brainmask import brain_mask
from hemocam.io import InputError, atomic_path, load_nifti, save_nifti, write_json
from hemocam.resize import resize_last2
from hemocam.windows import apply_windows

# no torch here: a preprocess job is CPU-only and importing torch alone cost ~850 MB of its peak

log = logging.getLogger("hemocam")

META_VERSION = 1
AIR_HU = -1024


# ----------------------------------------------------------------------------- geometry
def _display_orientation(affine) -> dict:
    """transpose / flips that bring the in-plane axes to rows = A->P, columns = R->L."""
    codes = nib.aff2axcodes(np.asarray(affine, float))
    c0, c1 = codes[0], codes[1]
    ap, rl = {"A", "P"}, {"R", "L"}
    if {c0, c1} <= (ap | rl) and ({c0, c1} & ap) and ({c0, c1} & rl):
        transpose = c0 in rl  # axis 0 runs R/L -> it must become the columns
        row_code, col_code = (c1, c0) if transpose else (c0, c1)
        # a code names the direction the index increases towards
        return {"transpose": bool(transpose), "flip_rows": row_code == "A", "flip_cols": col_code == "R"}
    # not an axial R/L x A/P slice plane (e.g. coronal): keep the stored order
    return {"transpose": False, "flip_rows": False, "flip_cols": False}


def _to_display(a_xyz: np.ndarray, meta: dict) -> np.ndarray:
    """(X, Y, Z[, ...]) -> (Z, rows, cols[, ...])."""
    a = np.moveaxis(a_xyz, 2, 0)
    if meta["transpose"]:
        a = np.swapaxes(a, 1, 2)
    if meta["flip_rows"]:
        a = a[:, ::-1]
    if meta["flip_cols"]:
        a = a[:, :, ::-1]
    return a


def _from_display(a_zrc: np.ndarray, meta: dict) -> np.ndarray:
    """(Z, rows, cols) -> (X, Y, Z), the exact inverse of :func:`_to_display`."""
    a = a_zrc
    if meta["flip_cols"]:
        a = a[:, :, ::-1]
    if meta["flip_rows"]:
        a = a[:, ::-1]
    if meta["transpose"]:
        a = np.swapaxes(a, 1, 2)
    return np.ascontiguousarray(np.moveaxis(a, 0, 2))


def compute_geometry(mask_xyz: np.ndarray, affine, spacing, size: int, margin_mm: float = 10.0) -> dict:
    """The in-plane frame for one scan (see module docstring)."""
    meta = _display_orientation(affine)
    m = _to_display(mask_xyz, meta)
    H, W = m.shape[1:]
    row_mm, col_mm = (spacing[1], spacing[0]) if meta["transpose"] else (spacing[0], spacing[1])
    rows = np.flatnonzero(m.any(axis=(0, 2)))
    cols = np.flatnonzero(m.any(axis=(0, 1)))
    if len(rows) == 0:
        r0, r1, c0, c1 = 0, H, 0, W
    else:
        mr, mc = int(np.ceil(margin_mm / row_mm)), int(np.ceil(margin_mm / col_mm))
        r0, r1 = max(0, rows[0] - mr), min(H, rows[-1] + 1 + mr)
        c0, c1 = max(0, cols[0] - mc), min(W, cols[-1] + 1 + mc)
    h, w = r1 - r0, c1 - c0
    side = max(h, w)
    pr, pc = (side - h) // 2, (side - w) // 2
    meta.update(
        shape=[int(s) for s in mask_xyz.shape], display_shape=[int(H), int(W)],
        crop=[int(r0), int(r1), int(c0), int(c1)], pad=[int(pr), int(side - h - pr), int(pc), int(side - w - pc)],
        side=int(side), size=int(size),
    )
    return meta


def from_original_grid(arr_xyz, meta: dict, order: int = 1, channel_axis: int | None = None) -> np.ndarray:
    """(X, Y, Z) array on the NIfTI grid -> (Z, S, S) in the cache frame (or (Z, C, S, S) when
    ``channel_axis`` names a 4th axis of ``arr_xyz``). order 0 = nearest (labels), 1 = linear."""
    a = np.asarray(arr_xyz)
    if channel_axis is not None:
        a = np.moveaxis(a, channel_axis, -1)
    if tuple(a.shape[:3]) != tuple(meta["shape"]):
        raise ValueError(f"array shape {a.shape[:3]} does not match the scan grid {tuple(meta['shape'])}")
    d = _to_display(a, meta)  # (Z, H, W[, C])
    r0, r1, c0, c1 = meta["crop"]
    d = d[:, r0:r1, c0:c1]
    if d.ndim == 4:
        d = np.moveaxis(d, -1, 1)  # still a view: the pad below makes the one (Z, C, side, side) copy
    pr0, pr1, pc0, pc1 = meta["pad"]
    d = np.pad(d, [(0, 0)] * (d.ndim - 2) + [(pr0, pr1), (pc0, pc1)])
    if d.dtype == bool:
        d = d.astype(np.uint8)
    out = resize_last2(d, meta["size"], order)
    if order == 0:
        out = out.astype(a.dtype if a.dtype != bool else np.uint8)
    return out


def to_original_grid(arr_zss, meta: dict, order: int = 1, fill=0) -> np.ndarray:
    """(Z, S, S) array in the cache frame -> (X, Y, Z) on the NIfTI grid of the scan.

    order 0 (nearest) keeps the dtype (labels, masks); order 1 returns float32 (CAMs,
    probabilities). Voxels outside the crop get ``fill``. Save with ``meta["affine"]``.
    """
    a = np.asarray(arr_zss)
    Z, S = meta["shape"][2], meta["size"]
    if a.shape != (Z, S, S):
        raise ValueError(f"expected shape {(Z, S, S)}, got {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8)
    big = resize_last2(a, meta["side"], order)
    if order == 0:
        big = big.astype(a.dtype)
    pr0, pr1, pc0, pc1 = meta["pad"]
    side = meta["side"]
    big = big[:, pr0 : side - pr1, pc0 : side - pc1]
    H, W = meta["display_shape"]
    full = np.full((Z, H, W), fill, dtype=big.dtype)
    r0, r1, c0, c1 = meta["crop"]
    full[:, r0:r1, c0:c1] = big
    return _from_display(full, meta)


# ----------------------------------------------------------------------------- the stage
def _read_hu(nifti_path) -> tuple[np.ndarray, np.ndarray, tuple]:
    hu, affine = load_nifti(nifti_path)
    if hu.ndim == 4 and hu.shape[3] == 1:
        hu = hu[..., 0]
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise InputError(f"{nifti_path}: expected a 3-D CT volume, got shape {hu.shape}")
    if hu.dtype.kind == "f":
        if not np.isfinite(hu).all():
            raise InputError(f"{nifti_path}: non-finite HU values")
        hu = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    spacing = tuple(float(s) for s in nib.load(nifti_path).header.get_zooms()[:3])
    return hu, affine, spacing


def preprocess_scan(nifti_path, brainmask_out, cache_out, meta_out, windows, size: int,
                    skull_strip: bool = True, margin_mm: float = 10.0, strip_hu_max: float | None = 130.0) -> dict:
    """Brain mask (NIfTI grid), cache (Z, C, S, S) uint8 .npy and its meta JSON for one scan.

    ``skull_strip``: HU outside the brain mask are set to air before windowing, so scalp and skull
    never reach the classifier (see benchmarks/README.md for why this is the default).
    Returns manifest columns.
    """
    windows = [dict(w) for w in windows]
    hu, affine, spacing = _read_hu(nifti_path)
    mask = brain_mask(hu, spacing)
    if not mask.any():
        raise InputError(f"{nifti_path}: no intracranial region found (not a head CT, or HU not calibrated?)")
    meta = compute_geometry(mask, affine, spacing, size, margin_mm)
    if skull_strip:
        keep = mask > 0
        if strip_hu_max is not None:
            # the mask keeps the inner table's partial-volume rim (for the bleeds' sake); in the
            # image it would draw a bright outline on every slice, hiding the thin bright
            # crescent a subdural adds there. Above blood density -> air: bleeds stand out.
            keep &= hu <= strip_hu_max
        src = np.where(keep, hu, np.int16(AIR_HU))
    else:
        src = hu
    chans = apply_windows(src, windows, axis=-1)  # (X, Y, Z, C) uint8
    cache = from_original_grid(chans, meta, order=1, channel_axis=3)  # (Z, C, S, S) float
    cache = np.clip(np.rint(cache), 0, 255).astype(np.uint8)
    meta.update(
        version=META_VERSION, affine=np.asarray(affine, float).tolist(), spacing=list(spacing),
        windows=windows, channels=[w.get("name", f"w{i}") for i, w in enumerate(windows)],
        skull_strip=bool(skull_strip), strip_hu_max=strip_hu_max, margin_mm=float(margin_mm), n_slices=int(hu.shape[2]),
        source=Path(nifti_path).name,
    )
    save_nifti(mask, affine, brainmask_out, dtype=np.uint8)
    with atomic_path(cache_out) as tmp, open(tmp, "wb") as fh:
        np.save(fh, cache)
    write_json(meta, meta_out)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {"n_slices": int(hu.shape[2]), "brain_ml": round(float(mask.sum()) * voxel_ml, 1), "size": int(size)}


def cache_paths(results_dir, scan_id) -> tuple[Path, Path]:
    r = Path(results_dir)
    return r / "cache" / f"{scan_id}.npy", r / "cache" / f"{scan_id}.json"


def preprocess_one(scan_id, results_dir, windows, size, skull_strip=True) -> dict:
    r = Path(results_dir)
    cache, meta = cache_paths(r, scan_id)
    return preprocess_scan(r / "nifti" / f"{scan_id}.nii.gz", r / "brainmask" / f"{scan_id}.nii.gz",
                           cache, meta, windows, size, skull_strip=skull_strip)


def preprocess_batch(scan_ids, results_dir, windows, size, manifest_out, upstream=(), processes=1,
                     skull_strip=True):
    """Preprocess a batch of scans (run_batch manifest; upstream = ingest manifests)."""
    import functools

    from hemocam.batch import run_batch

    from hemocam.stamps import file_stamps, stamps_folder

    windows, r = [dict(w) for w in windows], Path(results_dir)
    fn = functools.partial(preprocess_one, results_dir=str(r), windows=windows, size=int(size),
                           skull_strip=bool(skull_strip))
    stamps = file_stamps(stamps_folder(manifest_out), lambda sid: [r / "nifti" / f"{sid}.nii.gz"],
                         lambda sid: [r / "brainmask" / f"{sid}.nii.gz", *cache_paths(r, sid)],
                         {"windows": windows, "size": int(size), "skull_strip": bool(skull_strip)},
                         ("hemocam.preprocess", "hemocam.brainmask", "hemocam.windows", "hemocam.resize", "hemocam.io"),
                         ("nibabel", "numpy", "scikit-image", "scipy"))
    return run_batch("preprocess", list(scan_ids), fn, manifest_out, upstream=upstream, processes=processes,
                     stamps=stamps)


def load_cache(cache_path, meta_path=None, mmap: bool = True) -> tuple[np.ndarray, dict]:
    """(cache (Z, C, S, S) uint8 [memory-mapped], meta); missing/broken files raise InputError."""
    cache_path = Path(cache_path)
    meta_path = Path(meta_path) if meta_path is not None else cache_path.with_suffix(".json")
    try:
        arr = np.load(cache_path, mmap_mode="r" if mmap else None)
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{cache_path}: missing or unreadable cache ({type(exc).__name__}: {exc})") from exc
    if arr.ndim != 4 or arr.dtype != np.uint8 or arr.shape[0] != meta["shape"][2] or arr.shape[2:] != (meta["size"],) * 2:
        raise InputError(f"{cache_path}: cache shape {arr.shape} {arr.dtype} does not match its meta")
    return arr, meta
