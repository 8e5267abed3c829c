"""Pseudo-masks: Grad-CAM regions refined with unsupervised intensity cues (the paper's step 2).

For one scan, on the NIfTI grid (all inputs are already there):

1. **slice gate** — only slices that contain hemorrhage: the slice label ``any`` from
   ``R/labels/{id}.tsv`` when the cohort is labelled (the weak supervision), otherwise the
   classifier's probability ``any`` from ``R/classifier/slices/{id}.tsv`` >= ``prob_threshold``;
2. **CAM region** — ``cam >= cam_threshold`` inside the brain mask (``R/brainmask``): where the
   classifier looked;
3. **intensity refinement** (``refine``), fitted on the soft-tissue HU values
   (``refine_min_hu`` <= HU <= ``hu_max``: bone and the partial-volume rim at the inner table would
   otherwise form the "hyperdense" cluster) of the CAM region of the whole scan (pooled over its
   gated slices, steadier than per slice):
   ``kmeans`` — 1-D k-means with ``n_clusters`` clusters (CSF, parenchyma, blood), keep the
   hyperdense (highest centroid) cluster, i.e. voxels above the midpoint between the top two
   centroids; ``otsu`` — keep voxels above Otsu's threshold; ``none`` — no refinement;
4. **HU window** — only ``hu_min <= HU <= hu_max`` (acute blood is hyperdense, ~50-90 HU; this
   drops brain, CSF and bone/calcification whatever the clustering did, and bounds the
   clustering threshold from below when a CAM region holds no blood);
5. **clean-up** — per-slice hole filling (``fill_holes``: clots are heterogeneous and the HU
   window punches holes into them); voxels within ``bone_margin_mm`` (in-plane, Euclidean) of
   bone (HU > ``bone_hu``) dropped: the scanner blurs the inner table into its neighbours, so on
   every slice a rim along the skull reads blood-like HU; then 3-D connected components of less
   than ``min_component_ml`` millilitres removed; last, the surviving components take back the dropped
   margin voxels within ``bone_regrow_mm`` of them (in-plane 4-connected steps of one voxel): a
   bleed against the skull keeps its outer layer, a rim with no bleed behind it stays out.

Both are in millimetres because the rim is a property of the scanner's blur, not of the grid. The
demo's rim is one voxel (1.7-1.95 mm pixels: median 71 HU at one voxel from bone, 38 HU at
two); on the real GE head CT of ``../shared/data/realct`` (0.49 mm pixels) the median brain voxel
reads 104 / 75 / 60 / 52 / 48 HU at 0.5-1 / 1-1.5 / 1.5-2 / 2-2.5 / 2.5-3 mm from bone and 37-38
HU from 6 mm on. 2 mm (``bone_margin_mm: 2.0``) is exactly one voxel on every demo scan (so the
figures below hold) and four on such a scan, where a one-voxel margin would reach 0.5 mm.

On the 40-scan demo (CPU preset; the run's own CAMs, ground truth read only to score) the
pseudo-masks' mean 3-D Dice on the 19 training and validation bleeds is 0.487 with ``kmeans``
and no bone margin, 0.511 with ``kmeans`` and a one-voxel margin, and 0.548 with ``otsu`` and
a one-voxel margin (test, 6 bleeds: 0.456, 0.476, 0.506); ``bone_hu`` 200 against 400: 0.548
against 0.515. Those are the defaults. A one-voxel regrowth (2026-11-30, the same run's CAMs):
0.569 on the training and validation bleeds against 0.548 without (2 and 3 steps: 0.569, 0.570;
with a two-voxel margin 0.533 and 0.553), test 0.574 against 0.506: the margin had taken the
outer layer of every bleed against the skull, so the targets under-read (-107 voxels a bleed on
training and validation, -61 with the regrowth). The segmenter trained on them (one training
each; docs/quality.md, "The runs before the shipped one"): test / validation 0.578 / 0.513 with the regrowth,
0.494 / 0.518 with the margin alone, 0.543 / 0.450 with ``kmeans`` and no margin.

``cam_mode`` says how the CAM restricts the result: ``region`` (default) keeps voxels inside the
CAM region only; ``component`` keeps whole hyperdense 3-D components (found on the gated slices
inside the brain) that the CAM region touches, i.e. their maximum CAM is >= ``cam_threshold``:
a coarse CAM (layer4 is 1/32 of the input resolution, 1/16 with ``classifier.encoder_stride: 16``)
then selects bleeds without cutting them. On the 40-scan demo with the CPU preset's classifier
(stride 16, two stages), segmenters trained on ``component`` pseudo-masks (threshold 0.3) reach
0.47 / 0.50 mean Dice (val / test) but mark both validation negatives (2.1 and 2.4 mL);
``region`` with ``cam_threshold`` 0.1 (the preset's value) reaches 0.49 / 0.55 and marks no
held-out negative; so ``region`` stays the default.

The result is a uint8 mask ``R/pseudomask/{id}.nii.gz``. Ground-truth masks are never read.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
from scipy import ndimage

from hemocam.batch import run_batch
from hemocam.brainmask import IN_PLANE
from hemocam.io import InputError, load_nifti, read_tsv, save_nifti, voxel_spacing
from hemocam.metrics import remove_small_components
from hemocam.settings import check_renamed
from hemocam.stamps import MODEL_LIBRARIES, file_stamps, stamps_folder

log = logging.getLogger("hemocam")

DEFAULTS = {
    "cam_threshold": 0.3,  # CAM (scan-normalised, [0,1]) above which a voxel is "where the classifier looked"
    "hu_min": 45,  # hemorrhage HU window: acute blood ~50-90 HU, minus a partial-volume margin
    "hu_max": 95,
    "refine": "otsu",  # kmeans | otsu | none
    "n_clusters": 3,  # k-means classes in the CAM region: CSF/oedema, parenchyma, blood
    "refine_min_hu": 0,  # soft-tissue values the refinement is fitted on: refine_min_hu..hu_max
    "cam_mode": "region",  # region | component
    "min_component_ml": 0.35,  # smaller 3-D components are noise (about 20 voxels of the demo's grid)
    "prob_threshold": 0.5,  # slice gate from classifier probabilities on unlabelled cohorts
    "fill_holes": True,
    "bone_hu": 200,  # above: bone (the inner table), whose blurred edge mimics blood
    "bone_margin_mm": 2.0,  # in-plane distance from bone within which voxels are dropped; 0: none
    "bone_regrow_mm": 2.0,  # how far surviving components take back dropped margin voxels; 0: none
}


def _cfg(cfg_pm: dict | None) -> dict:
    check_renamed({"pseudomask": cfg_pm})
    cfg = dict(DEFAULTS)
    cfg.update({k: v for k, v in (cfg_pm or {}).items() if v is not None})
    if cfg["refine"] not in ("kmeans", "otsu", "none"):
        raise ValueError(f"pseudomask.refine {cfg['refine']!r} not in kmeans|otsu|none")
    if cfg["cam_mode"] not in ("region", "component"):
        raise ValueError(f"pseudomask.cam_mode {cfg['cam_mode']!r} not in region|component")
    return cfg


def kmeans_1d(values: np.ndarray, k: int, iters: int = 100) -> np.ndarray:
    """Sorted centroids of a deterministic 1-D k-means (initialised at quantiles)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return np.zeros(0)
    k = max(1, min(int(k), np.unique(v).size))
    c = np.quantile(v, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        assign = np.argmin(np.abs(v[:, None] - c[None, :]), axis=1)
        new = np.array([v[assign == j].mean() if np.any(assign == j) else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return np.sort(c)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0 or v.min() == v.max():
        return float(v.min()) if v.size else 0.0
    hist, edges = np.histogram(v, bins=bins)
    mids = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * mids)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[1:][np.argmax(between)])


def refine_threshold(hu_in_region: np.ndarray, refine: str, n_clusters: int) -> float:
    """HU value above which CAM-region voxels are kept (``-inf`` for ``none``)."""
    if refine == "none" or hu_in_region.size == 0:
        return -np.inf
    if refine == "otsu":
        return otsu_threshold(hu_in_region)
    c = kmeans_1d(hu_in_region, n_clusters)
    if c.size < 2:
        return -np.inf
    return float(0.5 * (c[-1] + c[-2]))


def bone_margin(hu, bone_hu: float, margin_mm: float, spacing, slices=None) -> np.ndarray:
    """Voxels (bool, like ``hu``) within ``margin_mm`` in-plane of bone (HU > ``bone_hu``) on
    their own slice, bone itself excluded; ``spacing``: in-plane voxel size (mm) of axes 0 and 1;
    ``slices``: only these (default: all)."""
    bone = np.asarray(hu) > float(bone_hu)
    out = np.zeros(bone.shape, bool)
    zs = range(bone.shape[2]) if slices is None else slices
    for z in zs:
        if bone[:, :, z].any():
            d = ndimage.distance_transform_edt(~bone[:, :, z], sampling=spacing)
            out[:, :, z] = (d > 0) & (d <= float(margin_mm) * (1 + 1e-6))
    return out


def build_pseudomask(hu, cam, brain, positive_slices, cfg_pm: dict | None = None, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """The pseudo-mask (bool, like ``hu``) from arrays on one grid; slices are axis 2;
    ``spacing``: voxel size (mm) of axes 0, 1 and 2: the bone margin is in-plane (axes 0 and 1),
    the smallest component a volume."""
    cfg = _cfg(cfg_pm)
    hu = np.asarray(hu, dtype=np.float32)
    if not (hu.shape == np.shape(cam) == np.shape(brain)):
        raise ValueError(f"grids differ: hu {hu.shape}, cam {np.shape(cam)}, brain {np.shape(brain)}")
    if len(spacing) != 3:
        raise ValueError(f"spacing: the voxel size along three axes (mm), got {spacing!r}")
    spacing = tuple(float(s) for s in spacing)
    in_plane = spacing[:2]
    gate = np.zeros(hu.shape[2], bool)
    gate[np.asarray(positive_slices, dtype=int)] = True
    cam = np.asarray(cam)
    lo, hi = float(cfg["hu_min"]), float(cfg["hu_max"])
    allowed = (np.asarray(brain) > 0) & gate[None, None, :]
    cam_region = allowed & (cam >= float(cfg["cam_threshold"]))
    if not cam_region.any():
        return np.zeros(hu.shape, bool)
    soft = cam_region & (hu >= float(cfg["refine_min_hu"])) & (hu <= hi)
    thr = refine_threshold(hu[soft], cfg["refine"], int(cfg["n_clusters"]))
    region = cam_region if cfg["cam_mode"] == "region" else allowed
    keep = region & (hu >= max(thr, lo)) & (hu <= hi)
    if cfg["fill_holes"]:
        for z in np.flatnonzero(keep.any(axis=(0, 1))):
            # holes are filled only inside the region: no leaking into the brain
            keep[:, :, z] = ndimage.binary_fill_holes(keep[:, :, z]) & region[:, :, z]
    dropped = None
    if float(cfg["bone_margin_mm"]) > 0 and keep.any():
        margin = bone_margin(hu, cfg["bone_hu"], cfg["bone_margin_mm"], in_plane, np.flatnonzero(keep.any(axis=(0, 1))))
        dropped = keep & margin
        keep &= ~margin
    keep = remove_small_components(keep, float(cfg["min_component_ml"]), spacing)
    steps = int(np.floor(float(cfg["bone_regrow_mm"]) / min(in_plane) + 1e-6))
    if dropped is not None and steps > 0 and keep.any() and dropped.any():
        # a bleed against the skull gets its outer layer back; a rim with no bleed behind it does not
        keep |= ndimage.binary_dilation(keep, IN_PLANE, steps, mask=keep | dropped)
    if cfg["cam_mode"] == "component" and keep.any():
        lab, n = ndimage.label(keep)
        touched = np.zeros(n + 1, bool)
        touched[np.unique(lab[cam_region & keep])] = True
        touched[0] = False
        keep = touched[lab]
    return keep


def slice_gate_path(scan_id: str, results_dir, labelled: bool) -> Path:
    """The slice labels, or without them the classifier's slice probabilities."""
    R = Path(results_dir)
    return R / "labels" / f"{scan_id}.tsv" if labelled else R / "classifier" / "slices" / f"{scan_id}.tsv"


def positive_slices(scan_id: str, results_dir, n_slices: int, labelled: bool, prob_threshold: float) -> np.ndarray:
    """Indices of slices with hemorrhage: from slice labels, or from classifier probabilities."""
    path = slice_gate_path(scan_id, results_dir, labelled)
    col, thr = "any", 0.5 if labelled else float(prob_threshold)
    if not path.exists():
        raise InputError(f"{path}: missing ({'slice labels' if labelled else 'slice probabilities'})")
    df = read_tsv(path)
    if "slice" not in df or col not in df:
        raise InputError(f"{path}: needs columns 'slice' and '{col}'")
    s = df["slice"].to_numpy(dtype=int)
    if len(s) and (s.min() < 0 or s.max() >= n_slices):
        raise InputError(f"{path}: slice index outside 0..{n_slices - 1}")
    return np.unique(s[df[col].to_numpy(dtype=float) >= thr])


def pseudomask_scan(scan_id: str, results_dir, cfg_pm: dict | None, labelled: bool, out_dir=None) -> dict:
    """Write ``R/pseudomask/{scan_id}.nii.gz`` (uint8) from CAM, HU, brain mask and slice gate."""
    R = Path(results_dir)
    cfg = _cfg(cfg_pm)
    hu, affine = load_nifti(R / "nifti" / f"{scan_id}.nii.gz")
    cam, _ = load_nifti(R / "cam" / f"{scan_id}.nii.gz", dtype=np.float32)
    brain, _ = load_nifti(R / "brainmask" / f"{scan_id}.nii.gz")
    if hu.ndim != 3:
        raise InputError(f"{R / 'nifti' / f'{scan_id}.nii.gz'}: expected a 3-D volume, got {hu.shape}")
    for name, arr in (("cam", cam), ("brainmask", brain)):
        if arr.shape != hu.shape:
            raise InputError(f"{R / name / f'{scan_id}.nii.gz'}: shape {arr.shape} differs from the CT {hu.shape}")
    pos = positive_slices(scan_id, R, hu.shape[2], labelled, cfg["prob_threshold"])
    mask = build_pseudomask(hu, cam, brain, pos, cfg, voxel_spacing(affine))
    out = Path(out_dir) if out_dir is not None else R / "pseudomask"
    save_nifti(mask.astype(np.uint8), affine, out / f"{scan_id}.nii.gz", dtype=np.uint8)
    return {"positive_slices": int(len(pos)), "pseudomask_voxels": int(mask.sum())}


def pseudomask_batch(scan_ids, results_dir, cfg_pm: dict | None, labelled: bool, manifest_out, upstream=(), processes: int = 1):
    """Pseudo-masks for a batch of scans; one manifest row per scan."""
    R, cfg = Path(results_dir), _cfg(cfg_pm)
    fn = functools.partial(pseudomask_scan, results_dir=str(R), cfg_pm=dict(cfg_pm or {}), labelled=bool(labelled))
    stamps = file_stamps(
        stamps_folder(manifest_out),
        lambda sid: [R / "nifti" / f"{sid}.nii.gz", R / "cam" / f"{sid}.nii.gz", R / "brainmask" / f"{sid}.nii.gz",
                     slice_gate_path(sid, R, labelled)],
        lambda sid: [R / "pseudomask" / f"{sid}.nii.gz"], {"pseudomask": cfg, "labelled": bool(labelled)},
        libraries=MODEL_LIBRARIES)
    return run_batch("pseudomask", list(scan_ids), fn, manifest_out, upstream=upstream, processes=processes,
                     stamps=stamps)
