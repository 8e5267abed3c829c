"""The cohort plan: which scans exist, which are rejected from headers alone, and their splits.

``plan_cohort`` runs every time Snakemake parses the workflow, so it is built to be cheap on
repeat: the input tree is walked (stat only) and, when nothing relevant changed since the last
call (same files, sizes and mtimes, same label/mask files, same config), the cached plan is
returned without touching any DICOM header. ``Plan.files`` (one row per DICOM file of the
accepted scans) is loaded only when asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hemocam.ingest import index as ix
from hemocam.ingest.series import SCAN_ID_RE, classify_series, is_localizer
from hemocam.io import InputError, atomic_path, read_tsv, write_json

log = logging.getLogger("hemocam")

PLAN_VERSION = 1  # bump when the plan's meaning changes: invalidates cached plans
FORMATS = ("rsna", "physionet", "dicom", "samplesheet")
SPLITS = ("train", "val", "test")
SCAN_COLUMNS = ["scan_id", "status", "reason", "split", "source", "n_files", "patient_group", "format",
                "image", "mask", "notes"]
# per-file columns ingestion needs (a subset of the index)
FILE_COLUMNS = [
    "path", "file_size", "mtime_ns", "sop_uid", "readable", "has_pixels", "truncated", "instance_number",
    "iop_0", "iop_1", "iop_2", "iop_3", "iop_4", "iop_5", "ipp_0", "ipp_1", "ipp_2",
    "pixel_spacing_row", "pixel_spacing_col", "rows", "cols", "bits_stored", "pixel_representation",
    "rescale_intercept", "rescale_slope", "pixel_padding_value", "gantry_tilt",
]
# scan columns carried into batch plans: no split, so a split change does not rerun ingestion
BATCH_SCAN_COLUMNS = ["scan_id", "status", "reason", "format", "source", "image", "mask", "notes"]
BATCH_COLUMNS = BATCH_SCAN_COLUMNS + FILE_COLUMNS
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Plan:
    """``scans``: one row per candidate scan (SCAN_COLUMNS). ``files``: per-file rows of the
    accepted DICOM scans with their ``scan_id`` (empty for NIfTI cohorts), loaded lazily."""

    scans: pd.DataFrame
    signature: str = ""
    _series: dict = field(default_factory=dict, repr=False)  # scan_id -> SeriesInstanceUID
    _index_cache: str | None = field(default=None, repr=False)
    _index: pd.DataFrame | None = field(default=None, repr=False)
    _files: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def files(self) -> pd.DataFrame:
        if self._files is None:
            self._files = self._load_files()
        return self._files

    def _load_files(self) -> pd.DataFrame:
        empty = pd.DataFrame(columns=["scan_id", *FILE_COLUMNS])
        ok = self.scans.loc[self.scans["status"] == "ok", "scan_id"]
        wanted = {self._series[s]: s for s in ok if s in self._series}
        if not wanted:
            return empty
        idx = self._index
        if idx is None:
            idx = ix._load_cache(Path(self._index_cache)) if self._index_cache else None
            if idx is None:
                raise RuntimeError(f"index cache {self._index_cache} is missing: plan the cohort again")
        rows = idx[idx["series_uid"].isin(wanted.keys())]
        rows = rows[~is_localizer(rows["image_type"])]  # dropped from their series (classify_series)
        out = rows[FILE_COLUMNS].copy()
        out.insert(0, "scan_id", rows["series_uid"].map(wanted).to_numpy())
        return out.sort_values(["scan_id", "path"], kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------- helpers


def _cfg(cfg, *keys, default=None):
    cur = cfg
    for k in keys:
        if not isinstance(cur, dict) or k not in cur or cur[k] is None:
            return default
        cur = cur[k]
    return cur


def _stat_sig(path) -> list:
    try:
        st = os.stat(path)
        return [os.path.abspath(path), st.st_size, st.st_mtime_ns]
    except OSError:
        return [os.path.abspath(path), None, None]


def _walk_digest(files: pd.DataFrame) -> str:
    h = pd.util.hash_pandas_object(files[["path", "file_size", "mtime_ns"]], index=False).to_numpy()
    return hashlib.sha256(np.sort(h).tobytes()).hexdigest()


class _Tree:
    """The input tree's state: cheap when the folders recorded last time are unchanged.

    Adding, removing or renaming a file changes its folder's mtime, so comparing folder
    mtimes (one stat per folder) tells whether the per-file walk (one stat per file, ~5 s per
    870k files) is needed. A file rewritten in place is not seen here; ingestion re-checks
    each file's size and mtime and re-reads changed headers.
    """

    def __init__(self, roots, meta, index_cache=None):
        self.roots = sorted(os.path.abspath(os.fspath(r)) for r in roots)
        self.index_cache = index_cache
        self._files = None
        if (meta and meta.get("roots") == self.roots and meta.get("folders")
                and meta.get("index") == self._index_stat() and ix.folders_unchanged(meta["folders"])):
            self.digest, self.folders = meta["walk"], meta["folders"]
        else:
            self._walk()

    def _index_stat(self):
        return _stat_sig(self.index_cache) if self.index_cache else None

    def _walk(self):
        if self.roots:
            self._files, self.folders = ix.walk_tree(self.roots)
        else:
            self._files, self.folders = pd.DataFrame(columns=["path", "file_size", "mtime_ns"]), {}
        self.digest = _walk_digest(self._files) if len(self._files) else ""

    @property
    def files(self) -> pd.DataFrame | None:
        """The per-file walk, or None when the folders are unchanged (the index cache holds it)."""
        return self._files

    def meta(self) -> dict:
        # the index cache's stat too: trusting it as the tree needs the very file planned from
        return {"roots": self.roots, "folders": self.folders, "walk": self.digest, "index": self._index_stat()}


def _listing(folder) -> list:
    """Names, sizes and mtimes of a folder's entries (masks): part of the plan signature."""
    if not folder or not os.path.isdir(folder):
        return []
    out = []
    for e in os.scandir(folder):
        try:
            st = e.stat()
            out.append((e.name, st.st_size, st.st_mtime_ns))
        except OSError:
            continue
    return sorted(out)


def _mask_for(folder, scan_id) -> str:
    if not folder:
        return ""
    for suffix in (".nii.gz", ".nii"):
        p = Path(folder) / f"{scan_id}{suffix}"
        if p.is_file():
            return str(p)
    return ""


def _group_order(keys, seed) -> list:
    return sorted(keys, key=lambda k: (hashlib.sha256(f"hemocam-split:{seed}:{k}".encode()).hexdigest(), k))


def assign_splits(group_keys: pd.Series, fractions: dict, seed: int, fixed: pd.Series | None = None,
                  kept: pd.Series | None = None) -> pd.Series:
    """Deterministic patient-grouped split of scans (``group_keys`` aligned with the scans).

    Groups are ordered by a seeded hash of their key and cut by the fractions (counted in
    groups); with >= 3 groups every split with a non-zero fraction gets at least one group.
    ``fixed``: splits given by the user (kept; their groups are taken out of the draw).
    ``kept``: splits recorded for scans of an earlier, smaller cohort (a grown cohort): their
    groups keep them, and the new groups fill each split up to its count for the whole cohort.
    """
    out = pd.Series("", index=group_keys.index, dtype=object)
    if fixed is not None:
        given = fixed.fillna("").astype(str)
        out[given != ""] = given[given != ""]
    fixed_groups = set(group_keys[out != ""])
    # a group partly fixed by the user follows the user's split for the rest of its scans
    for k in set(pd.unique(group_keys[out == ""])) & fixed_groups:
        out[(group_keys == k) & (out == "")] = out[(group_keys == k) & (out != "")].iloc[0]
    held = {}  # group -> its recorded split
    if kept is not None:
        rec = kept.fillna("").astype(str)
        for k, split in zip(group_keys[(out == "") & (rec != "")], rec[(out == "") & (rec != "")]):
            held.setdefault(k, split)
    keys = [k for k in pd.unique(group_keys[out == ""]) if k not in held]
    f = np.array([max(0.0, float(fractions.get(s, 0) or 0)) for s in SPLITS])
    if f.sum() <= 0:
        f = np.array([1.0, 0.0, 0.0])
    f = f / f.sum()
    n = len(keys) + len(held)
    n_val, n_test = int(round(f[1] * n)), int(round(f[2] * n))
    if n >= 3:
        n_val = max(n_val, 1) if f[1] > 0 else 0
        n_test = max(n_test, 1) if f[2] > 0 else 0
    while n_val + n_test > n - (1 if f[0] > 0 and n >= 1 else 0) and (n_val or n_test):
        if n_val >= n_test and n_val:
            n_val -= 1
        else:
            n_test -= 1
    held_n = pd.Series(list(held.values()), dtype=object).value_counts()
    n_test = max(0, n_test - int(held_n.get("test", 0)))
    n_val = max(0, n_val - int(held_n.get("val", 0)))
    order = _group_order(keys, seed)
    which = dict(held)
    which.update({k: "test" for k in order[:n_test]})
    which.update({k: "val" for k in order[n_test:n_test + n_val]})
    which.update({k: "train" for k in order[n_test + n_val:]})
    todo = out == ""
    out[todo] = group_keys[todo].map(which)
    return out


# ----------------------------------------------------------------------------- formats


def _dicom_plan(cfg, fmt, roots, files_walk, cache):
    """Index + classification of DICOM roots; returns (series table, index)."""
    threads = int(_cfg(cfg, "ingest", "index_threads", default=8))
    # files_walk None: folders unchanged since the last plan, so the cached index is the tree
    idx = ix.index_dicom(roots, threads=threads, cache=cache, files=files_walk,
                         assume_unchanged=files_walk is None)
    ser = classify_series(
        idx, min_slices=int(_cfg(cfg, "ingest", "min_slices", default=1)),
        scan_id=_cfg(cfg, "input", "scan_id", default="uid") or "uid",
        key=_cfg(cfg, "input", "scan_id_key", default="") or "", roots=roots,
    )
    # stable patient key for the split: the patient's first series UID (not the rank integer)
    first = idx[idx["series_uid"] != ""].groupby("patient_group")["series_uid"].min()
    ser["group_key"] = ser["patient_group"].map(first).fillna(ser["series_uid"])
    return ser, idx


def _rsna_or_dicom(cfg, fmt, cache_dir, meta):
    root = _cfg(cfg, "input", "path")
    if not root or not os.path.isdir(root):
        raise FileNotFoundError(f"input.path {root!r} is not a folder (format {fmt})")
    labels = _cfg(cfg, "input", "labels", default="") or ""
    if fmt == "rsna" and not labels:
        raise ValueError("input.labels (the RSNA label CSV) is required for format rsna")
    if labels and fmt == "rsna" and not os.path.isfile(labels):
        raise FileNotFoundError(f"input.labels {labels!r} does not exist")
    masks = _cfg(cfg, "input", "masks", default="") or ""
    tree = _Tree([root], meta, Path(cache_dir) / "index.tsv")
    sig_parts = {"walk": tree.digest, "labels": _stat_sig(labels) if fmt == "rsna" else None,
                 "masks": _listing(masks)}

    def build():
        ser, idx = _dicom_plan(cfg, fmt, [root], tree.files, Path(cache_dir) / "index.tsv")
        if fmt == "rsna":
            _reject_unlabelled(ser, idx, labels)
        scans = _series_to_scans(ser, fmt, masks)
        return scans, dict(zip(scans["scan_id"], ser["series_uid"])), idx

    return sig_parts, build, str(Path(cache_dir) / "index.tsv"), tree


def _reject_unlabelled(ser, idx, labels):
    """RSNA scans need labels: a series none of whose SOPs has an ``any`` row is rejected."""
    from hemocam.ingest.labels import labeled_sop_keys

    keys = set(labeled_sop_keys(labels))
    img = idx[idx["series_uid"] != ""]
    # plain set lookups: pandas string ops on 870k values cost seconds without pyarrow
    has = np.fromiter(((u[3:] if u.startswith("ID_") else u) in keys for u in img["sop_uid"].tolist()),
                      dtype=bool, count=len(img))
    codes, uids = pd.factorize(img["series_uid"].to_numpy())
    n_lab = pd.Series(np.bincount(codes, weights=has, minlength=len(uids)), index=uids)
    unknown = len(keys) - int(has.sum())
    if unknown > 0:
        log.info("labels: %d labelled SOPs of %s are not in the input tree (ignored)", unknown, labels)
    none = (ser["status"] == "ok") & (ser["series_uid"].map(n_lab).fillna(0) == 0)
    ser.loc[none, "status"] = "rejected"
    ser.loc[none, "reason"] = f"no label rows in {labels}"


def _series_to_scans(ser, fmt, masks) -> pd.DataFrame:
    scans = pd.DataFrame({
        "scan_id": ser["scan_id"], "status": ser["status"], "reason": ser["reason"], "split": "",
        "source": ser["source"], "n_files": ser["n_files"].astype(int), "patient_group": ser["patient_group"],
        "format": fmt, "image": "", "mask": [(_mask_for(masks, s) if st == "ok" else "")
                                             for s, st in zip(ser["scan_id"], ser["status"])],
        "notes": ser["notes"], "group_key": ser["group_key"],
    })
    return scans


def _physionet(cfg, cache_dir, meta):
    root = Path(_cfg(cfg, "input", "path", default=""))
    ct = root / "ct_scans"
    if not ct.is_dir():
        raise FileNotFoundError(f"{ct}: missing (format physionet expects ct_scans/, masks/ and "
                                "hemorrhage_diagnosis_raw_metadata.csv)")
    labels = _cfg(cfg, "input", "labels", default="") or str(root / "hemorrhage_diagnosis_raw_metadata.csv")
    if not os.path.isfile(labels):
        raise FileNotFoundError(f"{labels}: the PhysioNet diagnosis CSV is missing")
    tree = _Tree([root], None)  # a few hundred files: always walked
    sig_parts = {"walk": tree.digest, "labels": _stat_sig(labels)}

    def build():
        from hemocam.ingest.labels import read_physionet_labels

        lab = read_physionet_labels(labels)
        have = set(lab["scan_id"])
        rows = []
        for p in sorted(ct.iterdir()):
            stem = p.name[:-7] if p.name.endswith(".nii.gz") else p.name[:-4] if p.name.endswith(".nii") else None
            if stem is None or not stem.isdigit():
                log.info("physionet: ignoring %s (not NNN.nii)", p)
                continue
            sid = f"{int(stem):03d}"
            mask = next((str(m) for m in (root / "masks" / p.name, root / "masks" / f"{stem}.nii.gz",
                                          root / "masks" / f"{stem}.nii") if m.is_file()), "")
            status, reason = ("ok", "") if sid in have else ("rejected", f"no rows in {labels}")
            rows.append({"scan_id": sid, "status": status, "reason": reason, "split": "",
                         "source": f"ct_scans/{p.name}", "n_files": 1, "format": "physionet",
                         "image": str(p), "mask": mask, "notes": "" if mask else "no mask", "group_key": sid})
        scans = pd.DataFrame(rows, columns=[*SCAN_COLUMNS, "group_key"])
        dup = scans["scan_id"].duplicated(keep="first")
        scans.loc[dup, ["status", "reason"]] = ["rejected", "same patient number as another file"]
        scans["patient_group"] = np.arange(len(scans))  # one patient per PhysioNet scan
        return scans, {}, None

    return sig_parts, build, None, tree


def read_samplesheet(path) -> pd.DataFrame:
    """Validated sample sheet rows; malformed sheets raise InputError naming line and value."""
    path = Path(path)
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception as exc:
        raise InputError(f"{path}: unreadable sample sheet ({type(exc).__name__}: {exc})") from exc
    missing = {"scan_id", "image"} - set(df.columns)
    if missing:
        raise InputError(f"{path}: missing column(s) {sorted(missing)}")
    errors = []
    for i, sid in enumerate(df["scan_id"]):
        if not SCAN_ID_RE.match(sid):
            errors.append(f"line {i + 2}: scan_id {sid!r} must match [A-Za-z0-9._-]+ (not '.' or '..')")
    dup = df["scan_id"][df["scan_id"].duplicated(keep=False)]
    if len(dup):
        lines = ", ".join(f"{s!r} (lines {', '.join(str(j + 2) for j in dup.index[dup == s])})"
                          for s in pd.unique(dup))
        errors.append(f"duplicate scan_id: {lines}")
    for i, img in enumerate(df["image"]):
        if not img.strip():
            errors.append(f"line {i + 2}: empty image")
    if "split" in df:
        bad = ~df["split"].isin(["", *SPLITS])
        for i in np.flatnonzero(bad.to_numpy()):
            errors.append(f"line {i + 2}: split {df['split'].iloc[i]!r} is not train, val, test or empty")
    if errors:
        raise InputError(f"{path}: " + "; ".join(errors))
    for col in ("mask", "split", "group"):
        if col not in df:
            df[col] = ""
    base = path.parent

    def resolve(p):
        p = p.strip()
        return "" if not p else os.path.normpath(p if os.path.isabs(p) else base / p)

    df["image"] = df["image"].map(resolve)
    df["mask"] = df["mask"].map(resolve)
    return df


def _samplesheet(cfg, cache_dir, meta):
    sheet = _cfg(cfg, "input", "path")
    df = read_samplesheet(sheet)
    labels = _cfg(cfg, "input", "labels", default="") or ""
    is_dir = df["image"].map(os.path.isdir)
    dicom_dirs = sorted(set(df.loc[is_dir, "image"]))
    cache = Path(cache_dir) / "index.tsv"
    tree = _Tree(dicom_dirs, meta, cache if dicom_dirs else None)
    others = [p for p in list(df.loc[~is_dir, "image"]) + list(df["mask"]) if p]
    sig_parts = {"sheet": _stat_sig(sheet), "walk": tree.digest,
                 "files": [_stat_sig(p) for p in others], "labels": _stat_sig(labels) if labels else None}

    def build():
        rows, series_of = [], {}
        ser = idx = None
        if dicom_dirs:
            ser, idx = _dicom_plan(cfg, "samplesheet", dicom_dirs, tree.files, cache)
            ser["dir"] = idx.drop_duplicates("series_uid").set_index("series_uid")["path"].reindex(ser["series_uid"]).to_numpy()
        seen_series = {}
        for _, r in df.iterrows():
            base = {"scan_id": r["scan_id"], "given_split": r["split"], "n_files": 1, "format": "samplesheet",
                    "image": r["image"], "mask": r["mask"], "notes": "", "source": r["image"],
                    "patient_group": -1, "group_key": ("g:" + r["group"]) if r["group"] else "s:" + r["scan_id"]}
            status, reason = "ok", ""
            if r["mask"] and not os.path.isfile(r["mask"]):
                status, reason = "rejected", f"mask {r['mask']} not found"
            if os.path.isdir(r["image"]):
                prefix = os.path.abspath(r["image"]).rstrip("/") + "/"
                mine = ser[ser["dir"].str.startswith(prefix)] if ser is not None else pd.DataFrame()
                ok = mine[mine["status"] == "ok"] if len(mine) else mine
                base["n_files"] = int(mine["n_files"].sum()) if len(mine) else 0
                if len(ok) == 1 and status == "ok":
                    uid = ok["series_uid"].iloc[0]
                    if uid in seen_series:
                        status, reason = "rejected", f"same DICOM series as scan {seen_series[uid]}"
                    else:
                        seen_series[uid] = r["scan_id"]
                        series_of[r["scan_id"]] = uid
                        base["n_files"] = int(ok["n_files"].iloc[0])
                        base["notes"] = ok["notes"].iloc[0]
                        if not r["group"]:
                            base["group_key"] = "p:" + ok["group_key"].iloc[0]
                        base["patient_group"] = int(ok["patient_group"].iloc[0])
                elif status == "ok" and len(ok) > 1:
                    status, reason = "rejected", f"{r['image']}: {len(ok)} usable CT series; give one per row"
                elif status == "ok":
                    why = "; ".join(sorted(set(mine["reason"]))) if len(mine) else "no DICOM image files"
                    status, reason = "rejected", f"{r['image']}: no usable CT series ({why})"
            elif os.path.isfile(r["image"]):
                if not r["image"].endswith(NIFTI_SUFFIXES):
                    status, reason = "rejected", f"{r['image']}: neither a DICOM folder nor a .nii/.nii.gz file"
            else:
                status, reason = "rejected", f"image {r['image']} not found"
            rows.append({**base, "status": status, "reason": reason})
        scans = pd.DataFrame(rows, columns=[*SCAN_COLUMNS, "group_key", "given_split"])
        return scans, series_of, idx

    return sig_parts, build, str(cache), tree


# ----------------------------------------------------------------------------- plan


def _signature(cfg, fmt, parts) -> str:
    relevant = {
        "version": PLAN_VERSION, "format": fmt, "input": _cfg(cfg, "input", default={}),
        "split": _cfg(cfg, "split", default={}), "seed": _cfg(cfg, "seed", default=0),
        "min_slices": _cfg(cfg, "ingest", "min_slices", default=1), "parts": parts,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def plan_cohort(cfg: dict, cache_dir) -> Plan:
    """Plan the cohort of ``cfg['input']``: candidate scans, header-level rejections, splits.

    Cached in ``cache_dir`` (index.tsv.gz, plan.tsv, plan.json); a repeat call with nothing
    changed costs one stat per input folder (per file for NIfTI cohorts and masks).
    """
    fmt = _cfg(cfg, "input", "format", default="")
    if fmt not in FORMATS:
        raise ValueError(f"input.format must be one of {FORMATS}, not {fmt!r}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta_path, scans_path = cache_dir / "plan.json", cache_dir / "plan.tsv"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = {}
    make = {"rsna": _rsna_or_dicom, "dicom": _rsna_or_dicom, "physionet": _physionet, "samplesheet": _samplesheet}[fmt]
    if fmt in ("rsna", "dicom"):
        parts, build, index_cache, tree = make(cfg, fmt, cache_dir, meta)
    else:
        parts, build, index_cache, tree = make(cfg, cache_dir, meta)
    sig = _signature(cfg, fmt, parts)
    cached = _load_plan(meta, scans_path, sig)
    if cached is not None and index_cache and not Path(index_cache).exists() and cached[1]:
        cached = None  # Plan.files needs the index
    if cached is not None:
        scans, series, groups = cached
        scans = keep_recorded_splits(scans, groups, read_split_record(cache_dir), cfg)
        return Plan(scans=scans, signature=sig, _series=series, _index_cache=index_cache)
    scans, series, idx = build()
    st = split_settings(cfg)
    ok = scans["status"] == "ok"
    scans["split"] = ""
    if ok.any():
        fixed = scans.loc[ok, "given_split"] if "given_split" in scans else None
        scans.loc[ok, "split"] = assign_splits(scans.loc[ok, "group_key"], st["split"], st["seed"], fixed=fixed)
    if fmt == "samplesheet":
        keys = scans["group_key"]
        scans["patient_group"] = keys.rank(method="dense").astype(int) - 1 if len(keys) else keys
    scans = scans.sort_values("scan_id", kind="stable").reset_index(drop=True)
    scans["patient_group"] = scans["patient_group"].astype(int)
    for c in ("reason", "notes", "image", "mask", "source", "split"):
        scans[c] = scans[c].fillna("").astype(str)
    out = scans[SCAN_COLUMNS].copy()
    groups = pd.DataFrame({"group_key": scans["group_key"].fillna("").astype(str),
                           "given_split": scans.get("given_split", pd.Series("", index=scans.index)).fillna("").astype(str)})
    _save_plan(meta_path, scans_path, sig, out, series, tree.meta(), groups)
    n_ok = int((out["status"] == "ok").sum())
    log.info("plan: %d candidate scans, %d ok, %d rejected from headers", len(out), n_ok, len(out) - n_ok)
    out = keep_recorded_splits(out, groups, read_split_record(cache_dir), cfg)
    return Plan(scans=out, signature=sig, _series=series, _index_cache=index_cache, _index=idx)


def _load_plan(meta, scans_path, sig):
    if meta.get("signature") != sig:
        return None
    try:
        scans = read_tsv(scans_path, dtype=str)
    except (OSError, ValueError):
        return None
    if not {"group_key", "given_split"} <= set(scans):  # written before splits were kept
        return None
    groups = pd.DataFrame({c: scans.pop(c).fillna("").astype(str) for c in ("group_key", "given_split")})
    series = dict(zip(scans.pop("series_uid").fillna(""), scans["scan_id"])) if "series_uid" in scans else {}
    series = {sid: uid for uid, sid in series.items() if uid}
    scans = scans.reindex(columns=SCAN_COLUMNS)
    for c in SCAN_COLUMNS:
        scans[c] = scans[c].fillna("").astype(str)
    scans["n_files"] = scans["n_files"].astype(int)
    scans["patient_group"] = scans["patient_group"].astype(int)
    return scans, series, groups


def _save_plan(meta_path, scans_path, sig, scans, series, tree_meta, groups):
    table = scans.copy()
    table["series_uid"] = [series.get(sid, "") for sid in table["scan_id"]]
    for c in groups:
        table[c] = groups[c].to_numpy()
    with atomic_path(scans_path) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    # written last: a plan.json naming this signature means plan.tsv is complete
    write_json({"signature": sig, "version": PLAN_VERSION, **tree_meta}, meta_path)


# ----------------------------------------------------------------------------- kept splits
SPLIT_RECORD = "splits.json"  # in the plan cache: the splits results/scans.tsv holds, and their settings


def split_settings(cfg) -> dict:
    """Split fractions and seed; with both model bundles given nothing is trained, so the whole
    cohort is held out as ``test`` (a sample sheet's own ``split`` column still counts)."""
    seed = int(_cfg(cfg, "seed", default=0))
    if _cfg(cfg, "model", "classifier", default="") and _cfg(cfg, "model", "segmenter", default=""):
        return {"split": {"train": 0.0, "val": 0.0, "test": 1.0}, "seed": seed}
    return {"split": {s: float(_cfg(cfg, "split", s, default=0) or 0) for s in SPLITS}, "seed": seed}


def read_split_record(cache_dir) -> dict | None:
    try:
        return json.loads((Path(cache_dir) / SPLIT_RECORD).read_text())
    except (OSError, ValueError):
        return None


def write_split_record(cache_dir, cfg, table: pd.DataFrame):
    """Record the splits of ``results/scans.tsv`` (its ok scans) with the settings that made them."""
    ok = table[table["status"] == "ok"]
    write_json({"settings": split_settings(cfg), "splits": dict(zip(ok["scan_id"], ok["split"]))},
               Path(cache_dir) / SPLIT_RECORD)


def keep_recorded_splits(scans: pd.DataFrame, groups: pd.DataFrame, record: dict | None, cfg) -> pd.DataFrame:
    """A grown cohort keeps the splits its scans had (``record``, when made with these split
    settings): the new scans' patient groups are drawn to fill each split up to its fraction of
    the whole cohort, and a new scan of a known patient joins that patient's split. Without a
    record, or with other settings, the plan's own draw stands (and ``_check_splits`` in the
    workflow stops a run whose recorded splits it would change)."""
    st = split_settings(cfg)
    if not record or record.get("settings") != st:
        return scans
    ok = (scans["status"] == "ok").to_numpy()
    kept = scans["scan_id"].map(record.get("splits") or {}).fillna("").astype(str)
    if (kept[ok] == scans.loc[ok, "split"]).all():
        return scans  # the same cohort, or one whose new scans change no split
    scans = scans.copy()
    scans.loc[ok, "split"] = assign_splits(groups.loc[ok, "group_key"], st["split"], st["seed"],
                                           fixed=groups.loc[ok, "given_split"], kept=kept[ok]).to_numpy()
    return scans


# ----------------------------------------------------------------------------- batches


def _render(df: pd.DataFrame) -> bytes:
    return df.to_csv(sep="\t", index=False, lineterminator="\n").encode()


def batch_table(plan: Plan, scan_ids: list[str], _rows_of: dict | None = None) -> pd.DataFrame:
    """The rows one ingest job needs: its scans, and for DICOM scans one row per file."""
    scans = plan.scans.set_index("scan_id").reindex(list(scan_ids))
    missing = scans.index[scans["status"].isna()].tolist()
    if missing:
        raise KeyError(f"scans not in the plan: {missing[:5]}")
    scans = scans.reset_index()[BATCH_SCAN_COLUMNS]
    files = plan.files
    if len(files):
        rows_of = _rows_of if _rows_of is not None else files.groupby("scan_id").indices
        take = [rows_of[s] for s in scan_ids if s in rows_of]
        files = files.take(np.concatenate(take)) if take else files.iloc[:0]
    out = scans.merge(files, on="scan_id", how="left") if len(files) else scans.reindex(columns=BATCH_COLUMNS)
    out = out.reindex(columns=BATCH_COLUMNS)
    return out.sort_values(["scan_id", "path"], kind="stable", na_position="first").reset_index(drop=True)


PATH_COLUMNS = ("path", "image", "mask")


def relative_to_workdir(table: pd.DataFrame, workdir=None) -> pd.DataFrame:
    """Input paths under the working directory made relative to it (:func:`ix.relative_paths`):
    a project folder moved or copied whole (data inside, e.g. the demo cohort) then renders the
    same batch plans, and reruns nothing."""
    out = table.copy()
    for col in PATH_COLUMNS:
        if col in out:
            out[col] = ix.relative_paths(out[col], workdir)
    return out


PREVIEW_FOLDER = "dryrun"  # under the plans' folder: a dry run's plans


def write_batch_plans(plan: Plan, batches: dict, folder, conversion: dict | None = None,
                      dry_run: bool = False) -> list[str]:
    """Write ``folder/{batch}.tsv`` for every batch; a file is rewritten only if its content
    changed, so Snakemake does not rerun unchanged batches. Returns the batches rewritten.

    ``conversion``: the conversion settings that differ from their defaults
    (:func:`hemocam.ingest.hu.changed_conversion_settings`), recorded in a ``conversion`` column:
    changing them rewrites every plan, so ingestion reruns, while plans at the defaults stay
    byte for byte those of earlier versions, which rerun nothing.

    A digest of (plan signature, batch scan list) per batch file (in ``folder/.digests.json``)
    skips even rendering an unchanged batch, so this stays cheap at every workflow parse.
    Paths under the working directory are written relative to it (:func:`relative_to_workdir`);
    a plan written before that, with the same files under absolute paths, is kept as it is.

    ``dry_run``: the plans that would be written go to ``folder/dryrun`` instead, and the rest
    of ``folder`` is left as it is. A dry run then lists the jobs the change reruns (their plan
    is another, newer file) without touching what the real run compares against: previewing a
    setting and going back to the old one reruns nothing. Returns the batches written there.
    Any call removes the previews of an earlier dry run.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    preview = folder / PREVIEW_FOLDER
    shutil.rmtree(preview, ignore_errors=True)  # an earlier dry run's, stale now
    digest_path = folder / ".digests.json"
    try:
        digests = json.loads(digest_path.read_text())
    except (OSError, ValueError):
        digests = {}
    new_digests, written = {}, []
    rows_of = None
    settings = json.dumps(dict(sorted((conversion or {}).items()))) if conversion else ""
    for name, ids in sorted(batches.items()):
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise ValueError(f"batch name {name!r} is not a safe file name")
        path = folder / f"{name}.tsv"
        digest = hashlib.sha256(json.dumps([PLAN_VERSION, plan.signature, list(ids)] + ([settings] if settings else [])).encode()).hexdigest()
        st = _stat_sig(path)
        if plan.signature and digests.get(name) == [digest, st[1], st[2]]:
            new_digests[name] = digests[name]
            continue
        if rows_of is None:  # positions of each scan's files, computed once for all batches
            rows_of = plan.files.groupby("scan_id").indices if len(plan.files) else {}
        table = batch_table(plan, ids, rows_of)
        if settings:
            table["conversion"] = settings
        content = _render(relative_to_workdir(table))
        try:
            old = path.read_bytes()
            same = old == content or old == _render(table)  # written before paths were relative
        except OSError:
            same = False
        if not same and dry_run:
            preview.mkdir(parents=True, exist_ok=True)
            with atomic_path(preview / path.name) as tmp:
                tmp.write_bytes(content)
            written.append(name)
            if name in digests:
                new_digests[name] = digests[name]
            continue
        if not same:
            with atomic_path(path) as tmp:
                tmp.write_bytes(content)
            written.append(name)
        st = _stat_sig(path)
        new_digests[name] = [digest, st[1], st[2]]
    if new_digests != digests and not dry_run:
        write_json(new_digests, digest_path)
    if written and dry_run:
        log.info("plan: dry run: %d batch plan(s) would change (previewed in %s)", len(written), preview)
    elif written:
        log.info("plan: %d batch plan(s) written (%d unchanged)", len(written), len(batches) - len(written))
    return written


def read_batch_plan(path) -> pd.DataFrame:
    dtypes = {c: str for c in BATCH_SCAN_COLUMNS + ["path", "sop_uid"]}
    df = read_tsv(path, dtype=dtypes)
    for c in BATCH_SCAN_COLUMNS + ["path", "sop_uid"]:
        df[c] = df[c].fillna("").astype(str)
    for c in ("readable", "has_pixels", "truncated"):
        df[c] = df[c].astype(str).str.lower().isin(["true", "1"])
    for c in ("file_size", "mtime_ns"):
        df[c] = pd.to_numeric(df[c], errors="coerce").fillna(-1).astype(np.int64)
    for c in ("rows", "cols", "bits_stored", "pixel_representation", "instance_number"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    return df


# ----------------------------------------------------------------------------- scans.tsv

SCANS_TABLE_COLUMNS = ["scan_id", "status", "reason", "split", "n_slices", "spacing_x", "spacing_y", "spacing_z",
                       "source", "notes"]


def write_scans_table(plan: Plan, manifests, out) -> pd.DataFrame:
    """``results/scans.tsv``: every candidate scan once, with its final status and reason.

    Header-level rejections come from the plan, the rest from the ingest manifests; a planned
    scan missing from every manifest is reported as rejected rather than silently dropped.
    """
    from hemocam.batch import read_manifests
    from hemocam.io import write_tsv

    man = read_manifests(list(manifests) if not isinstance(manifests, (str, os.PathLike)) else [manifests])
    man = man.drop_duplicates("scan_id", keep="last").set_index("scan_id")
    rows = []
    for r in plan.scans.itertuples(index=False):
        row = {"scan_id": r.scan_id, "status": r.status, "reason": r.reason, "split": "", "source": r.source,
               "notes": r.notes, "n_slices": "", "spacing_x": "", "spacing_y": "", "spacing_z": ""}
        if r.status == "ok":
            if r.scan_id in man.index:
                m = man.loc[r.scan_id]
                row["status"], row["reason"] = m["status"], "" if pd.isna(m["reason"]) else m["reason"]
                for c in ("n_slices", "spacing_x", "spacing_y", "spacing_z", "source", "notes"):
                    if c in m and not pd.isna(m[c]):
                        row[c] = m[c]
                if row["n_slices"] != "":  # read back as float when a manifest has a rejected row
                    row["n_slices"] = int(row["n_slices"])
            else:
                row["status"], row["reason"] = "rejected", "ingest: in no ingest manifest"
            if row["status"] == "ok":
                row["split"] = r.split
        rows.append(row)
    stale = sorted(set(man.index) - set(plan.scans["scan_id"]))
    if stale:
        log.warning("scans table: %d manifest rows are not in the plan (ignored), e.g. %s", len(stale), stale[:3])
    table = pd.DataFrame(rows, columns=SCANS_TABLE_COLUMNS)
    write_tsv(table, out)
    n_ok = int((table["status"] == "ok").sum())
    log.info("scans table: %d scans, %d ok, %d rejected", len(table), n_ok, len(table) - n_ok)
    return table
