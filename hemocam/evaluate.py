"""Score every method against ground-truth masks: one row per scan and method, plus a summary.

Methods (each skipped for a scan whose output file is absent):

- ``cam``          raw Grad-CAM: ``R/cam`` >= ``evaluate.cam_threshold`` inside the brain mask;
- ``pseudomask``   ``R/pseudomask`` (the first segmenter's training targets);
- ``self_training`` the last self-training round's targets (``R/pseudomask_r{n}``, the final
  segmenter's training targets), when the run trains with ``segmenter.self_training: n``;
- ``segmenter``    ``R/segmentation`` (the weakly supervised U-Net);
- ``hu_threshold`` a no-learning baseline: ``hu_baseline_min <= HU <= hu_baseline_max`` inside the
  brain mask, components of less than ``evaluate.min_component_ml`` removed;
- ``upper_bound``  ``R/segmentation_gt`` (the same U-Net trained on ground truth), when present.

Metrics are those of :mod:`hemocam.metrics` (Dice both-empty = 1, HD95 nan when a mask is empty,
RVD nan on negative scans). The summary has one row per split (and ``all``) and method:
``dice_pos`` (mean Dice on GT-positive scans, the headline number), its standard deviation,
``dice_all`` (all scans), ``specificity_scans`` (share of GT-negative scans predicted empty), and
means over positive scans of HD95, RVD, 2-D Dice and absolute volume error. HD95 is undefined
where a method marks nothing, so its mean covers ``n_hd95_pos`` of the ``n_positive`` scans: a
method that misses most bleeds can show a small HD95.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from hemocam.io import load_nifti, read_tsv, voxel_spacing, write_tsv
from hemocam.metrics import remove_small_components, score_volume
from hemocam.settings import check_renamed

log = logging.getLogger("hemocam")

METHODS = ("cam", "pseudomask", "self_training", "segmenter", "hu_threshold", "upper_bound")
COLUMNS = ["scan_id", "split", "method", "positive", "dice", "hd95_mm", "vol_pred_ml", "vol_true_ml", "rvd", "dice2d"]
DEFAULTS = {"cam_threshold": 0.5, "hu_baseline_min": 50, "hu_baseline_max": 90, "min_component_ml": 0.35}


def _method_masks(scan_id: str, R: Path, cfg: dict, hu, spacing, brain, self_training_target: str = ""):
    """Yield (method, predicted mask) for every method whose output exists for this scan."""
    cam_path = R / "cam" / f"{scan_id}.nii.gz"
    if cam_path.exists():
        cam, _ = load_nifti(cam_path, dtype=np.float32)
        yield "cam", (cam >= float(cfg["cam_threshold"])) & brain
    # the folder comes from the config: a pseudomask_r{k} left by a run with more rounds is not it
    folders = (("pseudomask", "pseudomask"), ("self_training", self_training_target), ("segmenter", "segmentation"))
    for method, folder in folders:
        if not folder:
            continue
        p = R / folder / f"{scan_id}.nii.gz"
        if p.exists():
            yield method, load_nifti(p)[0] > 0
    hu_mask = (hu >= float(cfg["hu_baseline_min"])) & (hu <= float(cfg["hu_baseline_max"])) & brain
    yield "hu_threshold", remove_small_components(hu_mask, float(cfg["min_component_ml"]), spacing)
    p = R / "segmentation_gt" / f"{scan_id}.nii.gz"
    if p.exists():
        yield "upper_bound", load_nifti(p)[0] > 0


def evaluate_scan(scan_id: str, split: str, results_dir, cfg_eval: dict | None = None,
                  self_training_target: str = "") -> list[dict]:
    """Rows for one scan (empty list when it has no ground-truth mask); ``self_training_target``:
    the folder of the last self-training round's targets (``""``: no such method)."""
    R = Path(results_dir)
    cfg = {**DEFAULTS, **{k: v for k, v in (cfg_eval or {}).items() if v is not None}}
    gt_path = R / "masks" / f"{scan_id}.nii.gz"
    if not gt_path.exists():
        return []
    gt = load_nifti(gt_path)[0] > 0
    nifti = R / "nifti" / f"{scan_id}.nii.gz"
    hu, affine = load_nifti(nifti)
    spacing = voxel_spacing(affine)
    brain = load_nifti(R / "brainmask" / f"{scan_id}.nii.gz")[0] > 0
    rows = []
    for method, pred in _method_masks(scan_id, R, cfg, hu, spacing, brain, self_training_target):
        if pred.shape != gt.shape:
            log.warning("evaluate: %s %s has shape %s, ground truth %s: skipped", scan_id, method, pred.shape, gt.shape)
            continue
        rows.append({"scan_id": scan_id, "split": split, "method": method, **score_volume(pred, gt, spacing)})
    return rows


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    out = []
    tables = [(s, g) for s, g in table.groupby("split", sort=True)] + [("all", table)]
    for split, sub in tables:
        for method in [m for m in METHODS if m in set(sub["method"])]:
            g = sub[sub["method"] == method]
            pos, neg = g[g["positive"]], g[~g["positive"]]
            abs_err = (pos["vol_pred_ml"] - pos["vol_true_ml"]).abs()
            out.append({
                "split": split, "method": method, "n_scans": len(g), "n_positive": len(pos),
                "dice_pos": pos["dice"].mean() if len(pos) else np.nan,
                "dice_pos_sd": pos["dice"].std(ddof=0) if len(pos) else np.nan,
                "dice_all": g["dice"].mean(),
                "specificity_scans": (neg["vol_pred_ml"] == 0).mean() if len(neg) else np.nan,
                "hd95_mm_pos": pos["hd95_mm"].mean() if len(pos) else np.nan,
                # HD95 is undefined where a method marks nothing: the mean above is over these
                "n_hd95_pos": int(pos["hd95_mm"].notna().sum()),
                "rvd_pos": pos["rvd"].mean() if len(pos) else np.nan,
                "dice2d_pos": pos["dice2d"].mean() if len(pos) else np.nan,
                "vol_abs_err_ml_pos": abs_err.mean() if len(pos) else np.nan,
            })
    return pd.DataFrame(out)


def evaluate(scans_tsv, results_dir, cfg: dict, out_tsv, summary_tsv, self_training_target: str = "") -> pd.DataFrame:
    """Write ``out_tsv`` (one row per scan with a ground-truth mask and method) and ``summary_tsv``.

    ``cfg`` is the whole config (``evaluate`` section used) or the ``evaluate`` section itself;
    ``self_training_target``: see :func:`evaluate_scan`.
    """
    cfg_eval = cfg.get("evaluate", cfg) if isinstance(cfg, dict) else {}
    check_renamed({"evaluate": cfg_eval})  # before the per-scan loop, which logs and skips errors
    scans = read_tsv(scans_tsv, dtype={"scan_id": str})
    scans = scans[scans["status"] == "ok"]
    rows = []
    for sid, split in zip(scans["scan_id"], scans["split"].fillna("")):
        try:
            rows += evaluate_scan(sid, split or "none", results_dir, cfg_eval, self_training_target)
        except Exception as exc:  # one unreadable output must not hide the other scans' scores
            log.error("evaluate: %s skipped: %s: %s", sid, type(exc).__name__, exc)
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["positive"] = table["positive"].astype(bool)
    for c in ("dice", "hd95_mm", "vol_pred_ml", "vol_true_ml", "rvd", "dice2d"):
        table[c] = table[c].astype(float)
    write_tsv(table, out_tsv, float_format="%.6g")
    summary = summarise(table) if len(table) else pd.DataFrame(columns=["split", "method", "n_scans"])
    write_tsv(summary, summary_tsv, float_format="%.6g")
    if len(summary):
        log.info("segmentation summary:\n%s", summary.to_string(index=False))
    else:
        log.warning("evaluate: no scan has a ground-truth mask in %s/masks", results_dir)
    return table
