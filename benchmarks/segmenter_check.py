"""Train one U-Net in-process on a finished run's targets, with overrides, and print its mean 3D
Dice on the positive validation and training scans: a check of a segmenter setting, outside the
workflow. The test split is not scored: settings are chosen on validation and training.

    python benchmarks/segmenter_check.py RUN OUT SEED '{"segmenter.context_slices": 2}' [TARGET]

RUN is a workflow's working directory after a run with ground-truth masks (the demo's, e.g.):
its `config/config.yaml` and `config/presets/cpu-small.yaml` are merged, then the overrides
(`section.key`: value) and `seed`. TARGET (default `pseudomask_r1`, the final U-Net's targets
with `segmenter.self_training: 1`) is any target `train_segmenter` takes. The bundle and its
checkpoints go to OUT. Each scan is scored with the segmenter's output rule (`predict_mask`).
"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, ".")
import numpy as np
from benchlib import shipped_config  # the script's folder is on sys.path
from hemocam.io import load_nifti, read_tsv
from hemocam.metrics import dice3d
from hemocam.segmenter import load_segmenter, predict_mask, train_segmenter
from hemocam.settings import SEGMENTER_OUTPUT_KEYS


run, out, seed, over = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
target = sys.argv[5] if len(sys.argv) > 5 else "pseudomask_r1"
cfg = shipped_config("config/presets/cpu-small.yaml", root=run)
for k, v in over.items():
    sec, key = k.split(".")
    cfg[sec][key] = v
cfg["seed"] = seed
R = run / "results"
t = time.time()
res = train_segmenter(cfg, R / "scans.tsv", R, target, out / "model.pt", out / "history.tsv")
print(f"trained {time.time() - t:.0f} s, kept epoch {res['best_epoch']}", flush=True)
model, meta_b, dev = load_segmenter(out / "model.pt")
output = {k: cfg["segmenter"][k] for k in SEGMENTER_OUTPUT_KEYS if k in cfg["segmenter"]}
scans = read_tsv(R / "scans.tsv", dtype={"scan_id": str})
figures = {}
for sid, split in scans.loc[(scans.status == "ok") & scans.split.isin(["val", "train"]), ["scan_id", "split"]].values:
    truth = load_nifti(R / "masks" / f"{sid}.nii.gz")[0] > 0
    mask = predict_mask(sid, R, model, meta_b, dev, output)[1]
    figures.setdefault(split, []).append((truth.any(), dice3d(mask, truth), mask.any()))
for split in ("val", "train"):
    pos = [d for p, d, _ in figures.get(split, []) if p]
    marked = [m for p, _, m in figures.get(split, []) if not p]
    print(f"{split}: dice_pos {np.mean(pos):.3f} (per scan {' '.join(f'{d:.2f}' for d in pos)}), "
          f"negatives marked {sum(marked)} of {len(marked)}")
print("overrides", over, "seed", seed)
