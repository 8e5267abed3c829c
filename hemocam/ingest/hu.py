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
PADDING_MIN = -1500  # below this a frequent minimum is out-of-field padding, not tissue


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
    x = values + 1000
    wrapped = x >= WRAP_MODULUS
    n = int(wrapped.sum())
    if n:
        values[wrapped] -= WRAP_MODULUS
    return n


def to_hu_int16(values, name, hu_min=-1100, hu_max=3100, pad_hu=None, wrap=False,
                max_outside=DEFAULT_MAX_OUTSIDE):
    """Checked int16 HU volume and notes from converted (scaled) ``values``.

    ``pad_hu``: PixelPaddingValue in HU when the header gives one. Raises InputError when more
    than ``max_outside`` of the non-padding voxels stay outside [hu_min, hu_max].
    """
    v = np.asarray(values, dtype=np.float32).copy()
    notes = []
    if not np.isfinite(v).all():
        raise InputError(f"{name}: non-finite voxel values")
    if wrap:
        n = repair_wrap(v)
        if n:
            notes.append(f"12-bit wrap repaired ({n} voxels)")
    pads = [float(pad_hu)] if pad_hu is not None and np.isfinite(pad_hu) and pad_hu < AIR else []
    vmin = float(v.min())
    if vmin <= PADDING_MIN and np.count_nonzero(v == vmin) >= 0.005 * v.size:
        pads.append(vmin)
    if pads:
        # padding and its blends with air (resampled volumes) lie in [pad, -1024): air, not outliers
        low = v < min(pads)
    else:
        low = v < hu_min
    high = v > hu_max
    n_out = int(np.count_nonzero(low) + np.count_nonzero(high))
    frac = n_out / v.size
    if frac > max_outside:
        raise InputError(
            f"{name}: {frac:.1%} of voxels outside [{hu_min:g}, {hu_max:g}] HU "
            f"(values {vmin:.0f}..{float(v.max()):.0f}{', after 12-bit wrap repair' if wrap else ''})"
        )
    body = v[v >= AIR] if pads else v
    if body.size and np.count_nonzero(body < -900) == 0:
        notes.append("no air (< -900 HU) in the volume: check rescale/intercept")
    if pads:
        n_pad = int(np.count_nonzero(v < AIR))
        notes.append(f"padding {min(pads):.0f} HU -> {AIR} ({n_pad} voxels)")
    np.clip(v, AIR, np.iinfo(np.int16).max, out=v)
    return np.rint(v).astype(np.int16), notes
