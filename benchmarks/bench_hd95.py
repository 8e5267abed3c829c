"""HD95 on a full-size head CT grid: the masks' bounding box (metrics.hd95) against the whole grid.

``evaluate`` scores every scan and method in one job; HD95's distance transforms dominated it
when they ran over all 512 x 512 x Z voxels. Same masks, same value, both timed in this run:

    python benchmarks/bench_hd95.py --slices 32 128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hemocam import metrics  # noqa: E402


def whole_grid_hd95(p, g, spacing) -> float:
    """HD95 with the distance transforms over the whole grid (what metrics.hd95 did before)."""
    return float(max(np.percentile(metrics.surface_distances(p, g, spacing), 95),
                     np.percentile(metrics.surface_distances(g, p, spacing), 95)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--matrix", type=int, default=512)
    a = ap.parse_args(argv)
    spacing = (0.45, 0.45, 5.0)
    for z in a.slices:
        # a small bleed and a prediction shifted by 2 voxels with one false-positive blob
        gt = np.zeros((a.matrix, a.matrix, z), bool)
        gt[200:230, 200:230, z // 2 : z // 2 + 4] = True
        pred = np.roll(gt, 2, axis=0)
        pred[205:215, 400:420, z // 2 + 1] = True
        t = time.perf_counter()
        whole = whole_grid_hd95(pred, gt, spacing)
        t_whole = time.perf_counter() - t
        t = time.perf_counter()
        boxed = metrics.hd95(pred, gt, spacing)
        t_box = time.perf_counter() - t
        print(f"{a.matrix}x{a.matrix}x{z}: whole grid {whole:.4f} mm in {t_whole:.2f} s, bounding box {boxed:.4f} mm "
              f"in {t_box:.3f} s: {t_box / t_whole:.4f}x the time, same value: {abs(whole - boxed) < 1e-9}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
