"""Smooth random textures for the phantom: periodic band-pass noise sampled at arbitrary points.

A small periodic 3-D field (FFT-filtered white noise) is built once per subject and sampled by
trilinear interpolation, so any grid (any matrix, tilted or not) sees the same anatomy.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def band_noise(rng: np.random.Generator, n: int, wavelength_cells: float, rel_bandwidth: float = 0.35) -> np.ndarray:
    """Periodic (n, n, n) float32 noise, unit standard deviation, energy around one wavelength.

    A narrow band gives labyrinth-like zero sets (used for gyri/sulci); a wide band gives
    blotchy textures (bone marrow, clot heterogeneity).
    """
    white = rng.standard_normal((n, n, n))
    freqs = np.fft.fftfreq(n)
    kx, ky, kz = np.meshgrid(freqs, freqs, freqs, indexing="ij")
    k = np.sqrt(kx**2 + ky**2 + kz**2)
    k0 = 1.0 / wavelength_cells
    gain = np.exp(-0.5 * ((k - k0) / (rel_bandwidth * k0)) ** 2)
    gain[0, 0, 0] = 0.0
    field = np.real(np.fft.ifftn(np.fft.fftn(white) * gain))
    field /= field.std() + 1e-12
    return field.astype(np.float32)


class Texture:
    """A periodic noise field tiled over space with a physical period in mm."""

    def __init__(self, rng, n=32, period_mm=96.0, wavelength_mm=20.0, rel_bandwidth=0.35):
        self.n = n
        self.period = float(period_mm)
        self.field = band_noise(rng, n, wavelength_mm / period_mm * n, rel_bandwidth)
        self.offset = rng.uniform(0, n, size=3).astype(np.float32)
        # mean gradient magnitude per mm: converts |field| near a zero crossing into a distance
        g = np.gradient(self.field.astype(np.float64))
        self.grad_per_mm = float(np.mean(np.sqrt(sum(gi**2 for gi in g)))) * n / self.period

    def __call__(self, q: np.ndarray) -> np.ndarray:
        """Sample at points ``q`` (N, 3) in mm; returns float32 (N,)."""
        if len(q) == 0:
            return np.zeros(0, np.float32)
        coords = (q.T * np.float32(self.n / self.period)) + self.offset[:, None]
        return ndimage.map_coordinates(self.field, coords, order=1, mode="grid-wrap", prefilter=False)
