"""Pseudo-masks remade from a finished run's CAMs with overrides, and their mean 3D Dice on the
positive training and validation scans beside the run's own settings: a check of a pseudo-mask
setting, outside the workflow. The test split is not scored: settings are chosen on training
and validation.

    python benchmarks/pseudomask_check.py RUN '{"pseudomask.bone_regrow_mm": 4}' [extra-axial]

RUN is a workflow's working directory after a run with ground-truth masks (the demo's, e.g.):
its `config/config.yaml` and `config/presets/cpu-small.yaml` are merged, then the overrides
(`pseudomask.key`: value). With `extra-axial`, the overrides apply only on the slices whose
labels say epidural or subdural (a bleed against the skull); the other slices keep the run's
settings. Ground truth is read only to score.
"""
import json, sys
from pathlib import Path
sys.path.insert(0, ".")
import numpy as np
from benchlib import shipped_config  # the script's folder is on sys.path
from hemocam.io import load_nifti, read_tsv, voxel_spacing
from hemocam.metrics import dice3d
from hemocam.pseudomask import build_pseudomask, positive_slices


run, over = Path(sys.argv[1]), json.loads(sys.argv[2])
extra_axial_only = len(sys.argv) > 3 and sys.argv[3] == "extra-axial"
cfg = shipped_config("config/presets/cpu-small.yaml", root=run)
shipped = dict(cfg["pseudomask"])
changed = dict(shipped, **{k.split(".", 1)[1]: v for k, v in over.items()})
R = run / "results"
scans = read_tsv(R / "scans.tsv", dtype={"scan_id": str})
rows = []
for sid, split in scans.loc[(scans.status == "ok") & scans.split.isin(["train", "val"]), ["scan_id", "split"]].values:
    truth = load_nifti(R / "masks" / f"{sid}.nii.gz")[0] > 0
    if not truth.any():
        continue
    hu, affine = load_nifti(R / "nifti" / f"{sid}.nii.gz")
    cam = load_nifti(R / "cam" / f"{sid}.nii.gz", dtype=np.float32)[0]
    brain = load_nifti(R / "brainmask" / f"{sid}.nii.gz")[0]
    pos = positive_slices(sid, R, hu.shape[2], labelled=True, prob_threshold=shipped["prob_threshold"])
    spacing = voxel_spacing(affine)
    base = build_pseudomask(hu, cam, brain, pos, shipped, spacing)
    new = build_pseudomask(hu, cam, brain, pos, changed, spacing)
    if extra_axial_only:
        labels = read_tsv(R / "labels" / f"{sid}.tsv")
        cols = [c for c in ("epidural", "subdural") if c in labels]
        extra_axial = np.zeros(hu.shape[2], bool)
        extra_axial[labels["slice"].to_numpy()[(labels[cols].to_numpy() >= 0.5).any(1)]] = True
        new = np.where(extra_axial[None, None, :], new, base)
    rows.append((sid, split, dice3d(base, truth), dice3d(new, truth), int(new.sum()) - int(base.sum())))
print("scan split run-settings overrides voxels-added")
for sid, split, a, b, dv in rows:
    print(f"{sid} {split} {a:.3f} {b:.3f} {dv:+d}")
for split in ("train", "val"):
    sel = [r for r in rows if r[1] == split]
    print(f"{split} ({len(sel)} bleeds): {np.mean([r[2] for r in sel]):.3f} -> {np.mean([r[3] for r in sel]):.3f}")
print(f"both ({len(rows)}): {np.mean([r[2] for r in rows]):.3f} -> {np.mean([r[3] for r in rows]):.3f}",
      "overrides", over, "on extra-axial slices only" if extra_axial_only else "")
