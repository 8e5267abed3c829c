"""Which DICOM series become scans: header-level classification of the index.

Every series with image files gets a row with ``status`` ok or rejected and a reason:
localizers, secondary captures, non-CT modalities, non-axial reconstructions, series with too
few slices or without one readable, complete file are rejected here, before any pixels are read.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re

import numpy as np
import pandas as pd

from hemocam.ingest.phi import shown

log = logging.getLogger("hemocam")

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame variants .7.1-.7.4
MAX_TILT_DEG = 30.0  # gantry tilt allowance: axial series are at most this far from z
_BAD_CHARS = re.compile(r"[^A-Za-z0-9._-]")
SCAN_ID_RE = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9._-]+$")

SERIES_COLUMNS = [
    "series_uid", "scan_id", "status", "reason", "notes", "n_files", "n_usable", "n_slices",
    "patient_group", "source", "tilt_deg",
]


def scan_id_for(series_uid: str, mode: str = "uid", key: str = "") -> str:
    """Scan id of a series: sanitised SeriesInstanceUID (``uid``) or keyed hash (``hash``)."""
    if mode == "uid":
        sid = _BAD_CHARS.sub("_", series_uid)
        return sid if SCAN_ID_RE.match(sid) else "s_" + sid
    if mode == "hash":
        if not key:
            raise ValueError("input.scan_id is 'hash' but input.scan_id_key is empty")
        return "s" + hmac.new(key.encode(), series_uid.encode(), hashlib.sha256).hexdigest()[:16]
    raise ValueError(f"input.scan_id must be 'uid' or 'hash', not {mode!r}")


def slice_normals(df: pd.DataFrame) -> np.ndarray:
    """Unit slice normal (row x column direction cosines) per file, in DICOM LPS."""
    r = df[["iop_0", "iop_1", "iop_2"]].to_numpy(float)
    c = df[["iop_3", "iop_4", "iop_5"]].to_numpy(float)
    n = np.cross(r, c)
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return n / norm


def _relative_dirs(dirs: pd.Series, roots) -> pd.Series:
    """Folders relative to the input root they lie in ('.' for the root itself)."""
    if not roots:
        return dirs
    roots = [os.path.abspath(os.fspath(r)).rstrip("/") for r in roots]
    out = dirs.copy()
    for root in sorted(roots, key=len, reverse=True):
        inside = (dirs == root) | dirs.str.startswith(root + "/")
        rel = dirs[inside].str.slice(len(root) + 1)
        out[inside] = rel.where(rel != "", ".")
    return out


def _per_value(values, test) -> np.ndarray:
    """``test`` of each value, computed once per distinct value (870k files hold few)."""
    codes, uniq = pd.factorize(np.asarray(values, dtype=object))
    return np.array([test(str(u)) for u in uniq], dtype=bool)[codes] if len(uniq) else np.zeros(len(codes), bool)


def is_localizer(image_types) -> np.ndarray:
    """Per file: its ImageType says LOCALIZER."""
    return _per_value(image_types, lambda v: "LOCALIZER" in v.upper())


def _place_orphans(orphans: pd.DataFrame, img: pd.DataFrame, s: pd.DataFrame, roots) -> None:
    """Name image files without a SeriesInstanceUID beside the series that shares their folder.

    Sets ``s["n_orphan"]`` and ``s["orphan_file"]`` (file name, identifying values removed) on
    that series; orphans in a folder holding no series, or several (a flat RSNA folder), go to
    a warning. Folders are computed only here: the common case (no orphan) costs nothing.
    """
    folder = orphans["path"].str.rsplit("/", n=1).str[0]
    img_folder = img["path"].str.rsplit("/", n=1).str[0]
    near = img_folder.isin(set(folder))
    series_in = pd.Series(img.loc[near, "series_uid"].to_numpy(), index=img_folder[near].to_numpy())
    owners = series_in.groupby(level=0).unique()
    spans = orphans["phi_spans"] if "phi_spans" in orphans else pd.Series("", index=orphans.index)
    unplaced = []
    for f, rows in orphans.groupby(folder.to_numpy()).groups.items():
        uids = owners.get(f, ())
        first = rows[0]
        name = shown(orphans.at[first, "path"], spans.at[first]).rsplit("/", 1)[-1]
        if len(uids) == 1:
            s.loc[uids[0], "n_orphan"] += len(rows)
            s.loc[uids[0], "orphan_file"] = name
        else:
            unplaced.extend(shown(p, sp) for p, sp in zip(
                _relative_dirs(orphans.loc[rows, "path"], roots), spans.loc[rows]))
    if unplaced:
        log.warning("series: %d image file(s) without SeriesInstanceUID belong to no series and are not used, "
                    "e.g. %s", len(unplaced), ", ".join(unplaced[:3]))


def classify_series(index: pd.DataFrame, min_slices: int = 1, scan_id: str = "uid", key: str = "",
                    roots=None, max_tilt: float = MAX_TILT_DEG) -> pd.DataFrame:
    """One row per series of ``index`` (see ``SERIES_COLUMNS``), rejected ones with a reason.

    Files without a SeriesInstanceUID belong to no series. Non-image ones (not DICOM, DICOMDIR,
    ...) are counted in the log; an image among them (a header that lost the UID) is named in
    the notes of the one series sharing its folder, or else in a warning: it is never used.
    ``roots``: input folders, to report ``source`` relative to them.
    """
    in_series = (index["series_uid"] != "").to_numpy() & index["readable"].to_numpy()
    img = index[in_series]
    orphan = ~in_series & index["readable"].to_numpy() & index["has_pixels"].to_numpy()
    n_other = len(index) - len(img) - int(orphan.sum())
    if n_other:
        log.info("series: %d files are not part of any image series (not DICOM, DICOMDIR, ...)", n_other)
    if img.empty:
        if orphan.any():
            _place_orphans(index[orphan], img, pd.DataFrame(columns=["n_orphan", "orphan_file"]), roots)
        return pd.DataFrame(columns=SERIES_COLUMNS)
    # string columns become integer codes once; every aggregate below is numeric (870k rows)
    sid, uids = pd.factorize(img["series_uid"].to_numpy(), sort=True)

    usable = (img["has_pixels"].to_numpy() & ~img["truncated"].to_numpy())
    normals = slice_normals(img)
    # the same SOP instance twice (copied file): converted once, from an intact copy; a file
    # without a SOPInstanceUID is its own instance
    has_sop = (img["sop_uid"] != "").to_numpy()
    copies = np.zeros(len(img), bool)
    copies[has_sop] = img[has_sop].duplicated(["series_uid", "sop_uid"]).to_numpy()
    dup = np.zeros(len(img), bool)
    dup[usable & has_sop] = img[usable & has_sop].duplicated(["series_uid", "sop_uid"]).to_numpy()
    mod_codes, mod_uniq = pd.factorize(img["modality"].to_numpy())
    f = pd.DataFrame({
        "sid": sid, "one": 1, "usable": usable, "dup": dup, "copies": copies,
        "loc": is_localizer(img["image_type"]),
        "sc": _per_value(img["sop_class_uid"], lambda v: v.startswith(SECONDARY_CAPTURE)),
        "non_ct": mod_uniq[mod_codes] != "CT" if len(mod_uniq) else np.zeros(len(img), bool),
        "mod": mod_codes, "truncated": img["truncated"].to_numpy(),
        "patient_group": img["patient_group"].to_numpy(), "row": np.arange(len(img)),
        "frames": img["number_of_frames"].fillna(1).astype(np.int64).clip(lower=1).to_numpy(),
        "n_z": normals[:, 2], "pos": np.round((img[["ipp_0", "ipp_1", "ipp_2"]].to_numpy(float) * normals).sum(axis=1), 2),
        "rows": img["rows"].fillna(-1).astype(np.int64).to_numpy(), "cols": img["cols"].fillna(-1).astype(np.int64).to_numpy(),
        "geom_missing": img[["iop_0", "iop_1", "iop_2", "iop_3", "iop_4", "iop_5", "ipp_0", "ipp_1", "ipp_2"]].isna().any(axis=1).to_numpy(),
        # without PixelSpacing dcm2niix assumes 1 mm: volumes in mL would be silently wrong
        "spacing_missing": ~(img[["pixel_spacing_row", "pixel_spacing_col"]].to_numpy(float) > 0).all(axis=1),
    })
    iop_cols = ["iop_0", "iop_1", "iop_2", "iop_3", "iop_4", "iop_5"]
    for c in iop_cols:
        f[c] = img[c].to_numpy(float)
    g = f.groupby("sid", sort=True)
    # a LOCALIZER image inside an axial series (some exports put the scout in it) is dropped;
    # a series of nothing but LOCALIZER images is a localizer
    u = f[f["usable"] & ~f["dup"] & ~f["loc"]]
    gu = u.groupby("sid", sort=True)
    idx_all = np.arange(len(uids))
    s = pd.DataFrame({
        "n_files": g["one"].sum(),
        "any_non_ct": g["non_ct"].any(),
        "sc": g["sc"].any(),
        "localizer": g["loc"].all(),
        "n_loc": g["loc"].sum(),
        "patient_group": g["patient_group"].min(),
        "first_row": g["row"].min(),
        "n_dup": g["copies"].sum(),
        "n_truncated": g["truncated"].sum(),
    }).reindex(idx_all)
    nonct = f[f["non_ct"]].groupby("sid")["mod"].first().reindex(idx_all)
    mod_names = np.append(np.asarray(mod_uniq, dtype=object), "")
    s["other_modality"] = mod_names[nonct.fillna(len(mod_uniq)).astype(int).to_numpy()]
    bad_rows = f.loc[~f["usable"]].groupby("sid")["row"].min().reindex(idx_all)
    paths = img["path"].to_numpy()
    spans = img["phi_spans"].to_numpy() if "phi_spans" in img else np.full(len(img), "", dtype=object)
    bad_paths = pd.Series([paths[int(r)] if r == r else "" for r in bad_rows.to_numpy()], dtype=str)
    bad_spans = [spans[int(r)] if r == r else "" for r in bad_rows.to_numpy()]
    # a file as reasons name it: relative to the input root, identifying values removed
    # one string dtype for every text column: pandas 3.0 with numpy 2.5 refuses to add an object
    # column to a str one (TypeError 'radd'), which the concatenations below would do
    s["first_bad"] = pd.Series([shown(p, sp) if p else np.nan
                                for p, sp in zip(_relative_dirs(bad_paths, roots).tolist(), bad_spans)],
                               index=s.index, dtype="str")
    s["n_usable"] = gu["one"].sum().reindex(idx_all).fillna(0).astype(np.int64)
    s["n_loc"] = s["n_loc"].where(~s["localizer"], 0)  # noted only where dropped from a series
    s["n_frames"] = gu["frames"].sum().reindex(idx_all).fillna(0).astype(np.int64)
    s["multiframe"] = gu["frames"].max().reindex(idx_all).fillna(1) > 1
    s["geom_missing"] = gu["geom_missing"].any().reindex(idx_all).fillna(True).astype(bool)
    s["spacing_missing"] = gu["spacing_missing"].any().reindex(idx_all).fillna(True).astype(bool)
    iop_spread = gu[iop_cols].max() - gu[iop_cols].min()
    s["iop_mixed"] = (iop_spread.max(axis=1) > 1e-3).reindex(idx_all).fillna(False).astype(bool)
    nz = gu["n_z"].median().reindex(idx_all)
    s["tilt_deg"] = np.degrees(np.arccos(np.clip(nz.abs().to_numpy(float), 0, 1)))
    s["sizes"] = (gu["rows"].nunique() + gu["cols"].nunique()).reindex(idx_all).fillna(0)
    # distinct slice positions (0.01 mm) along the normal; fewer than files: repeated positions
    s["n_pos"] = u.drop_duplicates(["sid", "pos"]).groupby("sid").size().reindex(idx_all).fillna(0).astype(np.int64)
    # source: the folder of the series' first file, relative to the input root, identifying
    # values (a folder named after the patient) removed
    first = s["first_row"].to_numpy()
    first_paths = _relative_dirs(pd.Series([paths[r] for r in first], dtype=str), roots).tolist()
    s["source"] = [os.path.dirname(shown(p, spans[r])) or "." for p, r in zip(first_paths, first)]
    s.index = pd.Index(np.asarray(uids, dtype=object), name="series_uid")

    s["n_slices"] = np.where(s["multiframe"], s["n_frames"], s["n_pos"]).astype(np.int64)
    reasons = pd.Series("", index=s.index, dtype="str")

    def reject(mask, text):
        mask = mask & (reasons == "")
        if mask.any():
            reasons[mask] = text(s[mask]) if callable(text) else text

    other = s["other_modality"].replace("", "missing")
    reject(s["any_non_ct"], lambda d: "not CT (modality " + other[d.index] + ")")
    reject(s["sc"], "secondary capture")
    reject(s["localizer"], "localizer (ImageType LOCALIZER)")
    reject(s["n_usable"] == 0, lambda d: d["first_bad"] + ": no usable file in the series (" + d["n_files"].astype(str)
           + " file(s) truncated or without pixel data)")
    reject(s["multiframe"], "multi-frame (enhanced) CT is not supported")
    reject(s["geom_missing"], "no image geometry (ImageOrientationPatient/ImagePositionPatient missing)")
    reject(s["spacing_missing"], "no pixel size (PixelSpacing missing, malformed or not positive)")
    reject((s["n_usable"] == 1) & (s["tilt_deg"] > max_tilt), "localizer (single non-axial image)")
    reject(s["iop_mixed"], "mixed slice orientations in one series")
    reject(s["tilt_deg"] > max_tilt,
           lambda d: "non-axial reconstruction (slice normal " + d["tilt_deg"].round(1).astype(str)
           + f" deg from z, allowance {max_tilt:g})")
    reject(s["sizes"] > 2, "mixed image sizes in one series")
    few = s["n_slices"] < int(min_slices)
    reject(few & s["first_bad"].notna(),
           lambda d: d["first_bad"] + ": truncated or without pixel data; " + d["n_slices"].astype(str)
           + f" usable slice(s) < ingest.min_slices {int(min_slices)}")
    reject(few, lambda d: d["n_slices"].astype(str) + f" slice(s) < ingest.min_slices {int(min_slices)}")
    reject(s["n_pos"] < s["n_usable"],
           lambda d: (d["n_usable"] - d["n_pos"]).astype(str) + " slice(s) repeat a position (several acquisitions in one series)")

    s["n_orphan"], s["orphan_file"] = 0, ""
    if orphan.any():
        _place_orphans(index[orphan], img, s, roots)
    notes = pd.Series("", index=s.index, dtype="str")
    # truncated files are noted by the conversion, which drops them
    for col, text in (("n_dup", "duplicate SOP instance file(s) ignored"), ("n_loc", "LOCALIZER image(s) dropped"),
                      ("n_orphan", "image file(s) in its folder without SeriesInstanceUID not used, e.g. ")):
        m = s[col] > 0
        notes[m] = notes[m] + np.where(notes[m] == "", "", "; ") + s.loc[m, col].astype(str) + " " + text
    m = s["n_orphan"] > 0
    notes[m] = notes[m] + s.loc[m, "orphan_file"]

    out = s.reset_index()
    out["status"] = np.where(reasons.to_numpy() == "", "ok", "rejected")
    out["reason"] = reasons.to_numpy()
    out["notes"] = notes.to_numpy()
    ids = {uid: scan_id_for(uid, scan_id, key) for uid in out["series_uid"]}
    out["scan_id"] = out["series_uid"].map(ids)
    dup = out["scan_id"].duplicated(keep=False)
    if dup.any():  # only possible when two UIDs differ in characters outside [A-Za-z0-9._-]
        raise ValueError(f"scan ids collide after sanitising series UIDs: {sorted(out.loc[dup, 'scan_id'].unique())[:5]}")
    out["tilt_deg"] = out["tilt_deg"].round(2)
    return out[SERIES_COLUMNS].sort_values("scan_id", kind="stable").reset_index(drop=True)
