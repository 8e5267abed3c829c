"""In-plane resize of slice stacks with numpy only (no torch in CPU-only jobs).

The weights reproduce ``torch.nn.functional.interpolate`` as the cache was first built with it
(align_corners=False): ``nearest-exact`` for order 0; ``bilinear`` for order 1, antialiased
(a triangle filter widened by the scale, as PIL) when shrinking. Each axis is one (out, in)
weight matrix, so a resize is two matrix products per slice; importing torch only for this
cost a preprocess job ~850 MB before it read a voxel.
"""

from __future__ import annotations

import numpy as np

CHUNK_BYTES = 16 << 20  # float32 working set per chunk of slices


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel (torch ``nearest-exact``)."""
    scale = n_in / n_out
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * scale).astype(np.int64), n_in - 1)


def linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights of bilinear resampling along one axis (antialiased when shrinking)."""
    scale = n_in / n_out
    w = np.zeros((n_out, n_in), np.float64)
    centre = scale * (np.arange(n_out) + 0.5)
    if scale > 1.0:  # shrinking: triangle of half-width `scale` input pixels, renormalised at the edges
        lo = np.maximum((centre - scale + 0.5).astype(np.int64), 0)
        hi = np.minimum((centre + scale + 0.5).astype(np.int64), n_in)
        for i in range(n_out):
            j = np.arange(lo[i], hi[i])
            t = np.clip(1.0 - np.abs((j - centre[i] + 0.5) / scale), 0.0, None)
            w[i, j] = t / t.sum()
    else:  # enlarging (or same size): plain two-tap linear interpolation, edges clamped
        src = np.maximum(centre - 0.5, 0.0)
        i0 = np.minimum(src.astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        frac = src - i0
        rows = np.arange(n_out)
        np.add.at(w, (rows, i0), 1.0 - frac)
        np.add.at(w, (rows, i1), frac)
    return w.astype(np.float32)


def resize_last2(a, size: int, order: int) -> np.ndarray:
    """Resize the last two axes of ``a`` (..., h, w) to (size, size).

    order 0 (nearest) keeps the dtype; order 1 (linear) returns float32, computed in chunks of
    leading slices so only one chunk is ever held as float32 besides the output.
    """
    a = np.asarray(a)
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    h, w = a.shape[-2:]
    if order == 0:
        if (h, w) == (size, size):
            return a
        return np.take(np.take(a, nearest_index(h, size), axis=-2), nearest_index(w, size), axis=-1)
    lead = a.shape[:-2]
    src = a.reshape(-1, h, w)
    out = np.empty((src.shape[0], size, size), np.float32)
    if (h, w) == (size, size):
        out[:] = src
        return out.reshape(*lead, size, size)
    wr, wc_t = linear_weights(h, size), np.ascontiguousarray(linear_weights(w, size).T)
    step = max(1, CHUNK_BYTES // (4 * h * w))
    for s in range(0, src.shape[0], step):
        x = src[s : s + step].astype(np.float32)
        cols = (x.reshape(-1, w) @ wc_t).reshape(len(x), h, size)  # one GEMM for the whole chunk
        np.matmul(wr, cols, out=out[s : s + step])
    return out.reshape(*lead, size, size)
