"""Ingest one batch: each planned scan -> R/nifti, R/labels, R/masks and a manifest row."""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import pandas as pd

from hemocam.batch import run_batch
from hemocam.ingest.convert import convert_series, slice_centres_ras
from hemocam.ingest.index import quiet_pydicom, read_header
from hemocam.ingest.labels import (
    map_dicom_labels, read_physionet_labels, read_rsna_labels, read_sheet_labels, slice_table,
)
from hemocam.ingest.masks import mask_on_grid
from hemocam.ingest.nifti import convert_nifti
from hemocam.ingest.plan import read_batch_plan
from hemocam.io import InputError, save_nifti, write_tsv

log = logging.getLogger("hemocam")

MANIFEST_COLUMNS = ["n_slices", "spacing_x", "spacing_y", "spacing_z", "source", "notes"]


def output_paths(results_dir, scan_id) -> dict:
    r = Path(results_dir)
    return {"nifti": r / "nifti" / f"{scan_id}.nii.gz", "labels": r / "labels" / f"{scan_id}.tsv",
            "mask": r / "masks" / f"{scan_id}.nii.gz"}


@lru_cache(maxsize=2)
def _context(batch_plan_path: str, cfg_json: str):
    """Batch plan and the batch's labels, parsed once per process (workers reuse the parent's)."""
    cfg = json.loads(cfg_json)
    plan = read_batch_plan(batch_plan_path)
    fmt = cfg["input"]["format"]
    labels_path = cfg["input"].get("labels") or ""
    labels = None
    if fmt == "rsna":
        # only this batch's SOPs are parsed out of the (possibly 4.5 M row) CSV
        labels = read_rsna_labels(labels_path, plan.loc[plan["sop_uid"] != "", "sop_uid"])
    elif fmt == "physionet":
        if not labels_path:
            labels_path = str(Path(cfg["input"]["path"]) / "hemorrhage_diagnosis_raw_metadata.csv")
        labels = read_physionet_labels(labels_path)
        labels = labels[labels["scan_id"].isin(set(plan["scan_id"]))]
    elif fmt == "samplesheet" and labels_path:
        labels = read_sheet_labels(labels_path)
        labels = labels[labels["scan_id"].isin(set(plan["scan_id"]))]
    return plan, labels, labels_path


def ingest_scan(scan_id: str, batch_plan_path: str, cfg_json: str, results_dir: str) -> dict:
    """Convert one planned scan; returns its manifest columns (raises InputError to reject)."""
    cfg = json.loads(cfg_json)
    plan, labels, labels_path = _context(batch_plan_path, cfg_json)
    rows = plan[plan["scan_id"] == scan_id]
    if rows.empty:
        raise InputError(f"scan {scan_id}: not in batch plan {batch_plan_path}")
    head = rows.iloc[0]
    if head["status"] != "ok":
        raise InputError(head["reason"] or "rejected in the plan")
    out = output_paths(results_dir, scan_id)
    name = f"scan {scan_id}"
    notes = [head["notes"]] if head["notes"] else []
    written = []
    try:
        files = rows[rows["path"] != ""]
        if len(files):  # DICOM series (rsna, dicom, samplesheet folder)
            files, changed = refresh_changed(files)
            if changed:
                notes.append(f"{changed} file(s) changed since planning (headers re-read)")
            info = convert_series(files, scan_id, out["nifti"], cfg)
        elif head["image"]:  # NIfTI (physionet, samplesheet)
            info = convert_nifti(head["image"], out["nifti"], cfg, name)
        else:
            raise InputError(f"{name}: the batch plan lists no file for it")
        written.append(out["nifti"])
        notes += info["notes"]
        shape, affine = info["shape"], info["affine"]
        table = None
        fmt = head["format"]
        if fmt == "rsna":
            table, more = map_dicom_labels(info["rows"], slice_centres_ras(info["rows"]), labels, affine,
                                           shape[2], name)
            notes += more
        elif labels is not None:
            mine = labels[labels["scan_id"] == scan_id]
            if len(mine):
                table = slice_table(mine, shape[2], name, os.path.basename(labels_path))
            elif fmt == "physionet":
                raise InputError(f"{name}: no rows in {labels_path}")
            else:
                notes.append("no label rows")
        if table is not None:
            write_tsv(table, out["labels"])
            written.append(out["labels"])
        else:
            _unlink(out["labels"])  # a stale file from an earlier run would claim labels
        if head["mask"]:
            mask, more = mask_on_grid(head["mask"], shape, affine, name)
            save_nifti(mask, affine, out["mask"], dtype=np.uint8)
            written.append(out["mask"])
            notes += more
        else:
            _unlink(out["mask"])
    except BaseException:
        for p in written:  # a rejected scan leaves no half set of outputs behind
            _unlink(p)
        raise
    zooms = np.asarray(info["zooms"], float)
    return {"n_slices": int(shape[2]), "spacing_x": round(float(zooms[0]), 4),
            "spacing_y": round(float(zooms[1]), 4), "spacing_z": round(float(zooms[2]), 4),
            "source": head["source"], "notes": "; ".join(n for n in notes if n)}


def refresh_changed(files: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Re-read the headers of files whose size or mtime changed since planning.

    Planning trusts folder mtimes, which do not see a file rewritten in place (a truncated
    file replaced by a good copy, say); this per-file check at conversion time does.
    """
    files = files.copy()
    changed = 0
    for i, (path, size, mtime) in enumerate(zip(files["path"], files["file_size"], files["mtime_ns"])):
        try:
            st = os.stat(path)
        except OSError:
            files.iloc[i, files.columns.get_indexer(["readable", "has_pixels"])] = [False, False]
            changed += 1
            continue
        if st.st_size == int(size) and st.st_mtime_ns == int(mtime):
            continue
        changed += 1
        with quiet_pydicom():
            fresh = read_header(path, st.st_size)
        fresh["mtime_ns"] = st.st_mtime_ns
        for col, val in fresh.items():
            if col in files.columns:
                files.iat[i, files.columns.get_loc(col)] = val
    return files, changed


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def ingest_batch(batch_plan_path, cfg: dict, results_dir, manifest_out, threads: int = 1) -> pd.DataFrame:
    """Ingest every scan of a batch plan (``write_batch_plans``) and write its manifest.

    Per scan: results_dir/nifti/{scan_id}.nii.gz (int16 HU), labels/{scan_id}.tsv when the
    cohort has labels for it, masks/{scan_id}.nii.gz when a mask exists. Manifest columns:
    scan_id, status, reason, n_slices, spacing_x, spacing_y, spacing_z, source, notes.
    """
    cfg_json = json.dumps(cfg, sort_keys=True, default=str)
    batch_plan_path = str(batch_plan_path)
    plan, _, _ = _context(batch_plan_path, cfg_json)  # parsed here, inherited by forked workers
    scan_ids = list(dict.fromkeys(plan["scan_id"]))
    fn = partial(ingest_scan, batch_plan_path=batch_plan_path, cfg_json=cfg_json, results_dir=str(results_dir))
    df = run_batch("ingest", scan_ids, fn, manifest_out, processes=max(1, int(threads or 1)))
    missing = [c for c in MANIFEST_COLUMNS if c not in df]
    rejected = bool((df["status"] != "ok").any())
    if missing or rejected:
        for col in missing:  # every scan rejected: keep the manifest's columns the same for readers
            df[col] = ""
        # a rejected row has no n_slices: without this the column turns float ("14.0")
        df["n_slices"] = pd.to_numeric(df["n_slices"], errors="coerce").astype("Int64")
        write_tsv(df[["scan_id", "status", "reason", *MANIFEST_COLUMNS]], manifest_out)
    return df
