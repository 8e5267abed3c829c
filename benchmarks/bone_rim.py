"""How far the inner table's blur reaches into the brain: HU of brain voxels by in-plane distance
from bone, and what bone margins of several widths drop. The measurement behind
`pseudomask.bone_margin_mm` (README, "The bone margin on real CT").

    python benchmarks/bone_rim.py RESULTS [train]

RESULTS is a workflow's results folder with `nifti/` and `brainmask/` (run the `preprocess`
target on a cohort, e.g. `../shared/data/realct` with `input.format: dicom`); `train` keeps the
training split of `scans.tsv` only. Where `masks/` holds a scan's mask, its bleeds and two voxels
around them are left out, so what is measured is the rim alone.
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hemocam.io import load_nifti, voxel_spacing  # noqa: E402
from hemocam.pseudomask import DEFAULTS  # noqa: E402

R = Path(sys.argv[1])
scans_tsv = R / "scans.tsv"
if scans_tsv.exists():
    scans = pd.read_csv(scans_tsv, sep="\t")
    scans = scans[scans["status"] == "ok"]
    if sys.argv[2:] == ["train"]:
        scans = scans[scans["split"] == "train"]
    ids = list(scans["scan_id"])
else:
    ids = sorted(p.name[: -len(".nii.gz")] for p in (R / "brainmask").glob("*.nii.gz"))

BONE_HU, LO, HI = float(DEFAULTS["bone_hu"]), 45.0, 95.0  # the pseudo-masks' HU window
EDGES = np.arange(0.0, 8.5, 0.5)
MARGINS = (0.5, 1.0, 2.0, 2.5, 3.0)


def report(name, bins, near, dropped):
    print(name)
    print("  mm from bone   voxels   median HU   share 45-95 HU")
    for (a, b), v in zip(zip(EDGES[:-1], EDGES[1:]), bins):
        v = np.concatenate(v)
        if v.size:
            print(f"  {a:3.1f}-{b:3.1f}     {v.size:9d}   {np.median(v):7.0f}     {np.mean((v >= LO) & (v <= HI)):6.3f}")
    for mm, n in zip(MARGINS, dropped):
        print(f"  margin {mm:3.1f} mm drops {n} of the {near} brain voxels of {LO:.0f}-{HI:.0f} HU within 3 mm "
              f"of bone ({n / max(near, 1):.0%})")


pooled = ([[] for _ in EDGES[:-1]], [0], [0] * len(MARGINS))
for sid in ids:
    hu, affine = load_nifti(R / "nifti" / f"{sid}.nii.gz")
    hu = hu.astype(np.float32)
    spacing = voxel_spacing(affine)[:2]
    brain = load_nifti(R / "brainmask" / f"{sid}.nii.gz")[0] > 0
    gt = R / "masks" / f"{sid}.nii.gz"
    if gt.exists():
        brain &= ~ndimage.binary_dilation(load_nifti(gt)[0] > 0, iterations=2)
    bone = hu > BONE_HU
    dist = np.full(hu.shape, np.inf, np.float32)
    for z in np.flatnonzero(bone.any(axis=(0, 1))):
        dist[:, :, z] = ndimage.distance_transform_edt(~bone[:, :, z], sampling=spacing)
    inside = brain & (dist > 0)
    bins = [[hu[inside & (dist > a) & (dist <= b)]] for a, b in zip(EDGES[:-1], EDGES[1:])]
    near = inside & (hu >= LO) & (hu <= HI) & (dist <= 3.0)
    # what hemocam.pseudomask.bone_margin drops (0 < distance <= mm), from the distances above
    dropped = [int((near & (dist <= mm * (1 + 1e-6))).sum()) for mm in MARGINS]
    report(f"{sid}: {spacing[0]:.3f} x {spacing[1]:.3f} mm pixels, {hu.shape[2]} slices", bins, int(near.sum()), dropped)
    for acc, v in zip(pooled[0], bins):
        acc.extend(v)
    pooled[1][0] += int(near.sum())
    pooled[2][:] = [x + y for x, y in zip(pooled[2], dropped)]
if len(ids) > 1:
    report(f"all {len(ids)} scans", pooled[0], pooled[1][0], pooled[2])
