"""Cohort planning (who is positive, which subtypes, splits) and the already-ingested NIfTI cohort."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from ..io import save_nifti, write_tsv
from ..labelset import SUBTYPES
from .scan import P_HEMORRHAGE, choose_subtypes, make_scan

SPLIT_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


def opaque_id(*parts, n_hex=9) -> str:
    """RSNA-style identifier ``ID_<hex>`` derived deterministically from ``parts``."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()
    return "ID_" + digest[:n_hex]


def scan_seed(seed: int, i: int) -> int:
    return int.from_bytes(hashlib.sha256(f"hemocam-phantom:{seed}:{i}".encode()).digest()[:4], "little")


def plan_subtypes(n_scans: int, seed: int) -> list[list[str]]:
    """Subtypes per scan: ~38 % negative, every subtype present once there are enough positives.

    Positives cycle through the subtypes for their first lesion so small test cohorts still see
    all five; extra lesions are drawn like ``make_scan`` does.
    """
    rng = np.random.default_rng([seed, 0xC0])
    n_pos = int(round(P_HEMORRHAGE * n_scans))
    if n_scans >= 2:
        n_pos = min(max(n_pos, 1), n_scans - 1)
    else:
        n_pos = n_scans
    positive = np.zeros(n_scans, bool)
    positive[rng.permutation(n_scans)[:n_pos]] = True
    start = int(rng.integers(len(SUBTYPES)))
    plan, j = [], 0
    for pos in positive:
        if not pos:
            plan.append([])
            continue
        extra = choose_subtypes(rng, hemorrhage=True)
        first = SUBTYPES[(start + j) % len(SUBTYPES)]
        j += 1
        plan.append(sorted({first, *extra[: max(0, len(extra) - 1)]}, key=SUBTYPES.index))
    # small cohorts: add missing subtypes to the positives with the fewest lesions
    missing = [s for s in SUBTYPES if not any(s in p for p in plan)]
    pos_idx = [i for i, p in enumerate(plan) if p]
    for s in missing:
        if not pos_idx:
            break
        i = min(pos_idx, key=lambda k: (len(plan[k]), k))
        plan[i] = sorted({*plan[i], s}, key=SUBTYPES.index)
    return plan


def _spread(counts: dict) -> list:
    """Interleave labels evenly: {'a': 3, 'b': 1} -> ['a', 'a', 'b', 'a'] style order."""
    keyed = [((j + 0.5) / c, k, name) for k, (name, c) in enumerate(counts.items()) for j in range(c)]
    return [name for _, _, name in sorted(keyed)]


def assign_splits(groups, positive, seed: int, fractions=None) -> dict:
    """Deterministic patient-grouped, positivity-stratified train/val/test split.

    ``groups``: a patient key per scan; ``positive``: bool per scan. Returns {group: split};
    with three or more groups every split gets at least one.
    """
    fractions = fractions or SPLIT_FRACTIONS
    frame = pd.DataFrame({"g": list(groups), "p": list(positive)}).groupby("g", sort=True)["p"].any()
    keys = list(frame.index)
    n = len(keys)
    if n == 0:
        return {}
    rng = np.random.default_rng([seed, 0x5B])
    order = rng.permutation(n)
    pos = [keys[i] for i in order if frame.iloc[i]]
    neg = [keys[i] for i in order if not frame.iloc[i]]
    stratified = [(pos if kind == "p" else neg).pop(0) for kind in _spread({"p": len(pos), "n": len(neg)})]
    names = list(fractions)
    counts = {s: int(round(fractions[s] * n)) for s in names}
    if n >= len(names):
        for s in names:
            counts[s] = max(counts[s], 1)
    while sum(counts.values()) > n:  # take back from the largest split
        counts[max(counts, key=counts.get)] -= 1
    while sum(counts.values()) < n:
        counts[names[0]] += 1
    return dict(zip(stratified, _spread({s: c for s, c in counts.items() if c > 0})))


def _truth_row(scan_id, scan, seed_i):
    code = scan["mask"]
    voxel_ml = float(np.prod(scan["spacing"])) / 1000.0
    return {
        "scan_id": scan_id,
        "seed": seed_i,
        "subtypes": ",".join(scan["subtypes"]),
        "hemorrhage_ml": round(float((code > 0).sum()) * voxel_ml, 3),
        "positive_slices": int(scan["slice_labels"]["any"].sum()),
    }


def write_nifti_cohort(out_dir, n_scans, matrix=64, n_slices=24, seed=0) -> pd.DataFrame:
    """Write an already-ingested cohort (the workflow's file contract) without any DICOM.

    out_dir/nifti/{id}.nii.gz (int16 HU), labels/{id}.tsv, masks/{id}.nii.gz (uint8 0/1),
    scans.tsv (status ok, deterministic 60/20/20 split) and truth.tsv (test truth: subtypes,
    volume). Returns the scans.tsv frame.
    """
    out = Path(out_dir)
    plan = plan_subtypes(n_scans, seed)
    rows, truth = [], []
    for i, subtypes in enumerate(plan):
        seed_i = scan_seed(seed, i)
        scan = make_scan(seed_i, matrix=matrix, n_slices=n_slices, subtypes=subtypes, hemorrhage=bool(subtypes), strict=False)
        scan_id = opaque_id("series", seed, i)
        save_nifti(scan["hu"], scan["affine"], out / "nifti" / f"{scan_id}.nii.gz", dtype=np.int16)
        save_nifti((scan["mask"] > 0).astype(np.uint8), scan["affine"], out / "masks" / f"{scan_id}.nii.gz", dtype=np.uint8)
        write_tsv(scan["slice_labels"], out / "labels" / f"{scan_id}.tsv")
        sx, sy, sz = scan["spacing"]
        rows.append({"scan_id": scan_id, "status": "ok", "reason": "", "split": "", "n_slices": n_slices,
                     "spacing_x": round(sx, 6), "spacing_y": round(sy, 6), "spacing_z": round(sz, 6),
                     "source": f"phantom:seed={seed}:scan={i}"})
        truth.append(_truth_row(scan_id, scan, seed_i))
    scans = pd.DataFrame(rows, columns=["scan_id", "status", "reason", "split", "n_slices", "spacing_x", "spacing_y", "spacing_z", "source"])
    split = assign_splits(scans["scan_id"], [bool(p) for p in plan], seed)
    scans["split"] = scans["scan_id"].map(split)
    write_tsv(scans, out / "scans.tsv")
    truth = pd.DataFrame(truth)
    truth["split"] = truth["scan_id"].map(split)
    write_tsv(truth, out / "truth.tsv")
    return scans
