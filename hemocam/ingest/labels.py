"""Slice labels: parsing the cohort label files and placing labels on NIfTI slices.

DICOM labels belong to SOP instances, and reach NIfTI slices only through world positions
(ImagePositionPatient -> slice centre -> RAS -> voxel k), never through file order or
InstanceNumber, so resampled (tilt-corrected, equidistant) volumes get the label of the nearest
DICOM slice along their own slice axis.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from hemocam.io import InputError, read_tsv
from hemocam.labelset import LABELS, SUBTYPES

log = logging.getLogger("hemocam")

PHYSIONET_COLUMNS = {
    "Epidural": "epidural", "Intraparenchymal": "intraparenchymal",
    "Intraventricular": "intraventricular", "Subarachnoid": "subarachnoid", "Subdural": "subdural",
}


def sop_key(sop: pd.Series) -> pd.Series:
    """RSNA names SOPs ``ID_<hex>``; labels say ``ID_<sop>_<subtype>``: compare without one 'ID_'."""
    sop = sop.astype(str)
    return sop.where(~sop.str.startswith("ID_"), sop.str.slice(3))


def _read_label_csv(path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, usecols=[0, 1], dtype={0: str}, engine="c")
    except Exception as exc:
        raise InputError(f"{path}: unreadable label CSV ({type(exc).__name__}: {exc})") from exc
    df.columns = ["ID", "Label"]
    return df


def labeled_sop_keys(path) -> np.ndarray:
    """Unique SOP keys with an ``any`` row in an RSNA label CSV (for planning).

    A scan of the file's bytes for ``_any,`` (~1 s for 4.5 M rows; splitting 4.5 M strings in
    pandas without pyarrow takes ~15 s); falls back to pandas when nothing matches.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: unreadable label CSV ({exc})") from exc
    keys, find, rfind = [], data.find, data.rfind
    pos = find(b"_any,")
    while pos != -1:
        start = rfind(b"\n", 0, pos) + 1
        key = data[start:pos].strip(b'"\r ')
        keys.append(key[3:] if key.startswith(b"ID_") else key)
        pos = find(b"_any,", pos + 5)
    if keys:
        return pd.unique(pd.Series([k.decode("utf-8", "replace") for k in keys], dtype=object))
    ids = _read_label_csv(path)["ID"].astype(str)
    ids = ids[ids.str.endswith("_any")].str.slice(0, -4)
    return sop_key(ids).unique()


def read_rsna_labels(path, sop_uids=None) -> pd.DataFrame:
    """Long RSNA CSV (``ID_<sop>_<subtype>,Label``) -> one row per SOP key, int8 LABELS columns.

    With ``sop_uids`` only those SOPs are parsed (rows are matched by their full ID first, so
    a batch job does not split 4.5 million strings). Missing subtype rows count as 0 and
    ``any`` is raised to cover its subtypes; both are logged.
    """
    df = _read_label_csv(path)
    if sop_uids is not None:
        keys = sop_key(pd.Series(list(sop_uids), dtype=str)).unique()
        wanted = {f"ID_{k}_{lab}" for k in keys for lab in LABELS}
        df = df[df["ID"].isin(wanted)]
    parts = df["ID"].astype(str).str.rpartition("_")
    df = pd.DataFrame({"key": sop_key(parts[0]), "label": parts[2],
                       "value": pd.to_numeric(df["Label"], errors="coerce").to_numpy()})
    unknown = ~df["label"].isin(LABELS)
    if unknown.any():
        log.warning("labels: %d rows of %s have an unknown subtype (ignored)", int(unknown.sum()), path)
    bad = df["value"].isna() | ~df["value"].isin([0, 1])
    if (bad & ~unknown).any():
        log.warning("labels: %d rows of %s have a label that is not 0/1 (ignored)", int((bad & ~unknown).sum()), path)
    df = df[~unknown & ~bad]
    wide = df.groupby(["key", "label"])["value"].max().unstack("label")
    missing = int(wide.reindex(columns=list(LABELS)).isna().sum().sum())
    if missing:
        log.warning("labels: %d subtype values missing in %s (taken as 0)", missing, path)
    wide = wide.reindex(columns=list(LABELS)).fillna(0).astype(np.int8)
    raised = wide["any"] < wide[list(SUBTYPES)].max(axis=1)
    if raised.any():
        log.warning("labels: 'any' raised to match a positive subtype on %d SOPs", int(raised.sum()))
        wide.loc[raised, "any"] = 1
    wide.index.name = "sop_key"
    return wide


def map_dicom_labels(rows: pd.DataFrame, centres_ras: np.ndarray, labels: pd.DataFrame, affine,
                     n_slices: int, name: str) -> tuple[pd.DataFrame, list[str]]:
    """Labels of NIfTI slices 0..n_slices-1 from labelled DICOM slices (nearest along k).

    ``rows`` are the converted files (with ``sop_uid``), ``centres_ras`` their slice centres.
    Raises InputError when no file has a label or the slices fall outside the volume.
    """
    keys = sop_key(rows["sop_uid"]).to_numpy()
    has = np.isin(keys, labels.index.to_numpy())
    if not has.any():
        raise InputError(f"{name}: no label rows for any of its {len(rows)} slices")
    inv = np.linalg.inv(np.asarray(affine, float))
    k = (inv[:3, :3] @ centres_ras.T + inv[:3, 3:4])[2]
    if k.min() < -1.5 or k.max() > n_slices + 0.5:
        raise InputError(f"{name}: DICOM slice positions (k {k.min():.1f}..{k.max():.1f}) do not fall inside "
                         f"the converted volume of {n_slices} slices")
    k_lab, lab = k[has], labels.loc[keys[has], list(LABELS)].to_numpy(np.int8)
    order = np.argsort(k_lab, kind="stable")
    k_lab, lab = k_lab[order], lab[order]
    target = np.arange(n_slices, dtype=float)
    right = np.clip(np.searchsorted(k_lab, target), 0, len(k_lab) - 1)
    left = np.clip(right - 1, 0, len(k_lab) - 1)
    nearest = np.where(np.abs(k_lab[left] - target) <= np.abs(k_lab[right] - target), left, right)
    out = pd.DataFrame(lab[nearest], columns=list(LABELS))
    out.insert(0, "slice", np.arange(n_slices))
    notes = []
    if not has.all():
        notes.append(f"{int((~has).sum())} of {len(has)} DICOM slices have no label row (nearest labelled slice used)")
    return out, notes


def _check_slices(df: pd.DataFrame, n_slices: int, name: str, what: str) -> pd.DataFrame:
    if df["slice"].duplicated().any():
        raise InputError(f"{name}: {what} lists slice {int(df.loc[df['slice'].duplicated(), 'slice'].iloc[0])} twice")
    want = set(range(n_slices))
    have = set(df["slice"].astype(int))
    if have != want:
        extra, miss = sorted(have - want), sorted(want - have)
        raise InputError(f"{name}: {what} covers {len(have & want)} of {n_slices} slices"
                         + (f"; missing {miss[:5]}" if miss else "") + (f"; beyond the volume {extra[:5]}" if extra else ""))
    out = df.sort_values("slice").reset_index(drop=True)
    return out[["slice", *(lab for lab in LABELS if lab in df.columns)]].astype(np.int64)


def read_physionet_labels(path) -> pd.DataFrame:
    """PhysioNet CT-ICH diagnosis CSV -> scan_id (3 digits), slice (0-based), LABELS."""
    try:
        df = pd.read_csv(path)
    except Exception as exc:
        raise InputError(f"{path}: unreadable diagnosis CSV ({type(exc).__name__}: {exc})") from exc
    need = {"PatientNumber", "SliceNumber", "No_Hemorrhage", *PHYSIONET_COLUMNS}
    if need - set(df.columns):
        raise InputError(f"{path}: missing columns {sorted(need - set(df.columns))}")
    out = pd.DataFrame({"scan_id": df["PatientNumber"].astype(int).map(lambda n: f"{n:03d}"),
                        "slice": df["SliceNumber"].astype(int) - 1})
    for src, dst in PHYSIONET_COLUMNS.items():
        out[dst] = (pd.to_numeric(df[src], errors="coerce").fillna(0) > 0).astype(np.int64)
    sub = out[list(SUBTYPES)].max(axis=1)
    no_h = pd.to_numeric(df["No_Hemorrhage"], errors="coerce").fillna(1) > 0
    odd = int(((sub > 0) == no_h).sum())
    if odd:
        log.warning("labels: %d rows of %s disagree between No_Hemorrhage and the subtypes "
                    "(any = a subtype or No_Hemorrhage == 0)", odd, path)
    out["any"] = ((sub > 0) | ~no_h).astype(np.int64)
    return out[["scan_id", "slice", *LABELS]]


# input.labels of a sample sheet that derives slice labels from the sheet's masks
LABELS_FROM_MASKS = "masks"


def sheet_label_columns(path) -> list[str]:
    """The labels a sample sheet's ``input.labels`` gives: ``any`` and the subtypes it has
    columns for (only ``any`` when derived from masks)."""
    if path == LABELS_FROM_MASKS:
        return ["any"]
    try:
        header = pd.read_csv(path, sep="\t", nrows=0).columns
    except Exception as exc:
        raise InputError(f"{path}: unreadable labels TSV ({type(exc).__name__}: {exc})") from exc
    return [lab for lab in LABELS if lab in header]


def read_sheet_labels(path) -> pd.DataFrame:
    """Samplesheet labels TSV: scan_id, slice (0-based on the NIfTI's 3rd axis), ``any`` and any
    of the subtypes as 0/1 (binary slice labels, as the paper trains on, need ``any`` alone)."""
    try:
        df = read_tsv(path, dtype={"scan_id": str})
    except Exception as exc:
        raise InputError(f"{path}: unreadable labels TSV ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in ("scan_id", "slice", "any") if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing columns {missing}")
    given = [lab for lab in LABELS if lab in df.columns]
    vals = df[["slice", *given]].apply(pd.to_numeric, errors="coerce")
    if vals.isna().any().any() or not vals[given].isin([0, 1]).all().all():
        raise InputError(f"{path}: slice must be an integer and labels 0 or 1")
    out = pd.concat([df[["scan_id"]].astype(str), vals.astype(np.int64)], axis=1)
    return out[["scan_id", "slice", *given]]


def mask_slice_labels(mask: np.ndarray) -> pd.DataFrame:
    """``slice``, ``any`` of a mask on its NIfTI grid: a slice is bleeding where it marks a voxel."""
    bleeding = np.asarray(mask).reshape(-1, mask.shape[2]).any(axis=0)
    return pd.DataFrame({"slice": np.arange(mask.shape[2]), "any": bleeding.astype(np.int64)})


def slice_table(per_scan: pd.DataFrame, n_slices: int, name: str, what: str) -> pd.DataFrame:
    """Validated labels of one NIfTI scan (every slice exactly once)."""
    return _check_slices(per_scan, n_slices, name, what)
