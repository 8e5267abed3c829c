"""Hounsfield-unit sanity shared by the DICOM and NIfTI paths.

Order matters: the RSNA 12-bit wrap is undone first (its wrapped air, ~3096, sits inside any
plausible range), then out-of-field padding is recognised, then the value range is checked,
and only then is everything below air clipped to -1024.
"""

from __future__ import annotations

import numpy as np

from hemocam.io import InputError

AIR = -1024
WRAP_MODULUS = 4096
DEFAULT_MAX_OUTSIDE = 0.01  # fraction of voxels outside [hu_min, hu_max] that rejects a scan
# the plausibility check of every converted scan: config keys ``ingest.*`` and their defaults
CONVERSION_DEFAULTS = {"hu_min": -1100.0, "hu_max": 3100.0, "max_outside_fraction": DEFAULT_MAX_OUTSIDE}
# input formats whose scans may be NIfTI files (a sample sheet may also name DICOM folders)
NIFTI_FORMATS = ("physionet", "samplesheet")
DEFAULT_MIN_SLICES = 10  # config ingest.min_slices as shipped
PADDING_MIN = -1500  # below this a frequent minimum is out-of-field padding, not tissue


def conversion_settings(cfg: dict | None) -> dict:
    """``CONVERSION_DEFAULTS`` with the config's ``ingest`` values."""
    ing = (cfg or {}).get("ingest") or {}
    return {k: float(ing[k]) if ing.get(k) is not None else d for k, d in CONVERSION_DEFAULTS.items()}


def changed_conversion_settings(cfg: dict | None) -> dict:
    """The conversion settings that differ from the defaults (what the batch plans record).

    A NIfTI scan's slice count is first read when it is converted (a DICOM series' count is
    known when the cohort is planned), so for NIfTI cohorts ``ingest.min_slices`` is one of them.
    """
    changed = {k: v for k, v in conversion_settings(cfg).items() if v != CONVERSION_DEFAULTS[k]}
    fmt = ((cfg or {}).get("input") or {}).get("format")
    min_slices = ((cfg or {}).get("ingest") or {}).get("min_slices")
    if fmt in NIFTI_FORMATS and min_slices is not None and int(min_slices) != DEFAULT_MIN_SLICES:
        changed["min_slices"] = int(min_slices)
    return changed


def wrap_fault(bits_stored, pixel_representation, rescale_intercept) -> bool:
    """Header signature of the RSNA 12-bit wrap: unsigned 12-bit pixels with a ~0 intercept."""
    try:
        return int(bits_stored) == 12 and int(pixel_representation) == 0 and float(rescale_intercept) > -100
    except (TypeError, ValueError):
        return False


def repair_wrap(values: np.ndarray) -> int:
    """Undo the 12-bit wrap in place on converted values; returns how many voxels changed.

    Negative HU stored as 12-bit unsigned wrap to v + 4096 (air -1000 -> 3096); shifting by
    1000 brings every true value in [-1000, 3096) to [0, 4096), so x >= 4096 marks the wrapped.
    """
    wrapped = values >= WRAP_MODULUS - 1000
    n = int(np.count_nonzero(wrapped))
    if n:
        np.subtract(values, WRAP_MODULUS, out=values, where=wrapped)
    return n


def scaled(raw, slope=None, inter=None) -> np.ndarray:
    """Stored values -> HU, integer when the scaling is (slope 1 or unset, integral intercept).

    Integer HU keep the checks below on small integer arrays: applying a NIfTI's scl_inter
    through nibabel gives float32/64 copies of the whole volume for nothing.
    """
    raw = np.asarray(raw)
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    if raw.dtype.kind in "iub" and slope == 1.0 and inter == int(inter):
        k = int(inter)
        if k == 0 or raw.size == 0:
            return raw
        fits = -32768 <= int(raw.min()) + k and int(raw.max()) + k <= 32767
        return np.add(raw, k, dtype=np.int16 if fits else np.int32)
    return raw.astype(np.float32) * np.float32(slope) + np.float32(inter)


def to_hu_int16(values, name, hu_min=CONVERSION_DEFAULTS["hu_min"], hu_max=CONVERSION_DEFAULTS["hu_max"], pad_hu=None,
                wrap=False, max_outside=DEFAULT_MAX_OUTSIDE, overwrite=False):
    """Checked int16 HU volume and notes from converted (scaled) ``values``.

    ``pad_hu``: PixelPaddingValue in HU when the header gives one. Raises InputError when more
    than ``max_outside`` of the non-padding voxels stay outside [hu_min, hu_max].
    ``overwrite``: ``values`` may be modified in place (saves a copy of the volume).

    The checks run on integer HU (float input is rounded first, as it is written), one min/max
    pass and a count only where the range says some voxels may lie past a threshold: no float
    copy of the volume, and a clean scan costs two reductions and the clip.
    """
    v = np.asarray(values)
    if v.dtype.kind == "f":
        if not np.isfinite(v).all():
            raise InputError(f"{name}: non-finite voxel values")
        v = np.clip(np.rint(v), -(2.0**31), 2.0**31 - 1).astype(np.int32)
        overwrite = True
    elif v.dtype.kind not in "iub":
        raise InputError(f"{name}: voxel type {v.dtype} is not numeric")
    lo, hi = int(v.min()), int(v.max())
    work = np.int16 if -32768 <= lo and hi <= 32767 else np.int32
    if v.dtype != work or not overwrite or not v.flags.writeable:
        v = v.astype(work)
    notes = []
    if wrap and hi >= WRAP_MODULUS - 1000:
        n = repair_wrap(v)
        if n:
            notes.append(f"12-bit wrap repaired ({n} voxels)")
            lo, hi = int(v.min()), int(v.max())

    def below(t):  # voxels < t, counted only when the range does not decide it
        return 0 if t <= lo else v.size if t > hi else int(np.count_nonzero(v < int(np.ceil(t))))

    def above(t):
        return 0 if t >= hi else v.size if t < lo else int(np.count_nonzero(v > int(np.floor(t))))

    pads = [float(pad_hu)] if pad_hu is not None and np.isfinite(pad_hu) and pad_hu < AIR else []
    if lo <= PADDING_MIN and np.count_nonzero(v == lo) >= 0.005 * v.size:
        pads.append(lo)
    # padding and its blends with air (resampled volumes) lie in [pad, -1024): air, not outliers
    n_out = below(min(pads) if pads else hu_min) + above(hu_max)
    frac = n_out / v.size
    if frac > max_outside:
        raise InputError(
            f"{name}: {frac:.1%} of voxels outside [{hu_min:g}, {hu_max:g}] HU "
            f"(values {lo}..{hi}{', after 12-bit wrap repair' if wrap else ''})"
        )
    n_pad = below(AIR) if pads else 0
    if v.size - n_pad and below(-900) - n_pad == 0:
        notes.append("no air (< -900 HU) in the volume: check rescale/intercept")
    if pads:
        notes.append(f"padding {min(pads):.0f} HU -> {AIR} ({n_pad} voxels)")
    if lo < AIR:
        np.maximum(v, AIR, out=v)
    if hi > 32767:
        np.minimum(v, 32767, out=v)
    return v.astype(np.int16, copy=False), notes
