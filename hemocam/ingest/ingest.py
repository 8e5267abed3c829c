"""Ingest one batch: each planned scan -> R/nifti, R/labels, R/masks and a manifest row."""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import shutil
import tempfile
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import pandas as pd

from hemocam.batch import run_batch
from hemocam.ingest.convert import (
    convert_series, find_dcm2niix, phi_values, run_dcm2niix_batch, scratch_dir, slice_centres_ras, usable_rows,
)
from hemocam.ingest.index import quiet_pydicom, read_header
from hemocam.ingest.labels import (
    LABELS_FROM_MASKS, map_dicom_labels, mask_slice_labels, read_physionet_labels, read_rsna_labels,
    read_sheet_labels, slice_table, sop_key,
)
from hemocam.ingest.masks import mask_on_grid
from hemocam.ingest.nifti import convert_nifti
from hemocam.ingest.phi import redact
from hemocam.ingest.plan import read_batch_plan
from hemocam.io import InputError, save_nifti, write_tsv
from hemocam.stamps import Stamps, digest, file_sig, library_versions, source_digest, stamps_folder

log = logging.getLogger("hemocam")

MANIFEST_COLUMNS = ["n_slices", "spacing_x", "spacing_y", "spacing_z", "source", "notes"]
# one dcm2niix call converts at most this much DICOM (its uncompressed volumes wait in the
# scratch folder, in memory on tmpfs, until their scans are written)
CHUNK_BYTES = 256 << 20
CHUNK_SERIES = 1000


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
    elif fmt == "samplesheet" and labels_path and labels_path != LABELS_FROM_MASKS:
        labels = read_sheet_labels(labels_path)
        labels = labels[labels["scan_id"].isin(set(plan["scan_id"]))]
    return plan, labels, labels_path


@lru_cache(maxsize=2)
def _scan_rows(batch_plan_path: str, cfg_json: str) -> dict:
    """Each scan's rows of the batch plan (``plan[plan["scan_id"] == scan_id]``), split once."""
    plan = _context(batch_plan_path, cfg_json)[0]
    return {sid: rows for sid, rows in plan.groupby("scan_id", sort=False)}


class BatchConversion:
    """The DICOM series of a batch converted in few dcm2niix calls (``run_dcm2niix_batch``).

    The batch's series are cut, in plan order, into chunks of at most ``CHUNK_BYTES`` of DICOM.
    A chunk is converted when its first scan is asked for (``prepared``), in one call, and its
    scratch folder removed when the next chunk starts (or at ``close``): the scans are
    ingested in plan order, so each chunk is converted once. Per scan it keeps the files as
    re-checked just before the call (``refresh_changed``) and, when the call gave exactly what
    a call on the series alone gives, its outputs; every other series is converted on its own
    by ``convert_series`` as before. ``frozen`` (after ``convert_all``): nothing more is
    converted, for worker processes that inherit the object.
    """

    def __init__(self, scan_rows: dict, scan_ids: list, cfg: dict):
        self.cfg = cfg
        self.rows = {}  # the DICOM files of each planned scan, as ingest_scan selects them
        for sid, rows in scan_rows.items():
            files = rows[rows["path"] != ""]
            if rows["status"].iloc[0] == "ok" and len(files):
                self.rows[sid] = files
        self.chunks, size, count = [[]], 0, 0
        for sid in scan_ids:
            if sid not in self.rows:
                continue
            nbytes = int(self.rows[sid]["file_size"].sum())
            if self.chunks[-1] and (size + nbytes > CHUNK_BYTES or count >= CHUNK_SERIES):
                self.chunks.append([])
                size, count = 0, 0
            self.chunks[-1].append(sid)
            size, count = size + nbytes, count + 1
        self.chunk_of = {sid: j for j, chunk in enumerate(self.chunks) for sid in chunk}
        self.current, self.scratch, self.ready, self.frozen = None, None, {}, False

    def prepared(self, scan_id: str):
        """(files, changed, usable rows, converted) of a scan, converting its chunk if needed; or None."""
        j = self.chunk_of.get(scan_id)
        if j is None:
            return None
        if j != self.current and not self.frozen:
            self._convert(j)
        return self.ready.get(scan_id)

    def convert_all(self) -> bool:
        """Convert the whole batch now (one chunk only); True when done."""
        if len(self.chunks) != 1 or not self.chunks[0]:
            return False
        self._convert(0)
        self.frozen = True
        return True

    def _convert(self, j: int):
        self.close()
        self.current = j
        todo = []  # (scan_id, paths) dcm2niix gets
        for sid in self.chunks[j]:
            try:
                files, changed = refresh_changed(self.rows[sid])
            except Exception:  # ingest_scan meets it again and rejects the scan with it
                continue
            self.ready[sid] = (files, changed, None, None)
            try:
                usable = usable_rows(files, sid, self.cfg)
            except Exception:  # rejected by convert_series with its reason
                continue
            self.ready[sid] = (files, changed, usable, None)
            todo.append((sid, usable[0]["path"].tolist(), usable[0]["file_size"].sum()))
        if len(todo) < 2:  # one series: its own call, as before
            return
        size = int(sum(t[2] for t in todo))
        try:
            self.scratch = Path(tempfile.mkdtemp(prefix="hemocam-d2n-batch-", dir=scratch_dir(size)))
            phi = sorted({v for _, paths, _ in todo for v in phi_values(paths[0])}, key=len, reverse=True)
            taken, text, why = run_dcm2niix_batch([t[1] for t in todo], self.scratch, phi,
                                                  names=[t[0] for t in todo])
        except Exception as exc:  # each series then gets its own call, and its own reason
            log.warning("dcm2niix on %d series in one call failed (%s: %s); converting them one by one",
                        len(todo), type(exc).__name__, exc)
            return
        if text:
            log.info("dcm2niix, %d series in one call:\n%s", len(todo), text)
        if why:
            log.info("dcm2niix, %d series in one call: %s; those are converted one by one", len(todo), why)
        for k, (sid, paths, _) in enumerate(todo):
            if k in taken:
                files, changed, usable, _ = self.ready[sid]
                self.ready[sid] = (files, changed, usable, (paths, *taken[k]))

    def close(self):
        """Remove the current chunk's scratch folder (its volumes have been read)."""
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        self.current, self.scratch, self.ready = None, None, {}


_CONVERSIONS: dict[str, BatchConversion] = {}  # ingest_batch's conversion, by key, in this process
_KEYS = itertools.count()


def ingest_scan(scan_id: str, batch_plan_path: str, cfg_json: str, results_dir: str,
                conversion: str | None = None) -> dict:
    """Convert one planned scan; returns its manifest columns (raises InputError to reject).

    A rejected scan has no outputs, not even those of an earlier run that accepted it.

    ``conversion``: key of the batch's ``BatchConversion`` in this process, if any. Reasons and
    notes name files: identifying header values of the series are removed from them (a PACS
    export's folders often spell the patient's name or accession number).
    """
    rows = _scan_rows(batch_plan_path, cfg_json).get(scan_id)
    dicom = rows["path"][rows["path"] != ""] if rows is not None else ()
    phi = functools.cache(lambda: phi_values(dicom.iat[0]) if len(dicom) else [])
    try:
        out = _ingest_scan(scan_id, batch_plan_path, cfg_json, results_dir, conversion)
    except InputError as exc:
        for path in output_paths(results_dir, scan_id).values():  # an earlier run's, say
            _unlink(path)
        raise InputError(redact(str(exc), phi())) from None
    if out["notes"]:
        out["notes"] = redact(out["notes"], phi())
    return out


def _ingest_scan(scan_id: str, batch_plan_path: str, cfg_json: str, results_dir: str,
                 conversion: str | None = None) -> dict:
    cfg = json.loads(cfg_json)
    plan, labels, labels_path = _context(batch_plan_path, cfg_json)
    rows = _scan_rows(batch_plan_path, cfg_json).get(scan_id, plan.iloc[:0])
    if rows.empty:
        raise InputError(f"scan {scan_id}: not in batch plan {batch_plan_path}")
    # the scan's columns (its first row; rows.iloc[0] would build a Series of every column)
    head = {c: rows[c].iat[0] for c in ("status", "reason", "notes", "image", "format", "source", "mask")}
    if head["status"] != "ok":
        raise InputError(head["reason"] or "rejected in the plan")
    out = output_paths(results_dir, scan_id)
    name = f"scan {scan_id}"
    notes = [head["notes"]] if head["notes"] else []
    written = []
    try:
        batch = _CONVERSIONS.get(conversion) if conversion is not None else None
        ready = batch.prepared(scan_id) if batch is not None else None  # DICOM series of the batch
        files = ready[0] if ready is not None else rows[rows["path"] != ""]
        if len(files):  # DICOM series (rsna, dicom, samplesheet folder)
            if ready is not None:  # re-checked just before its chunk's dcm2niix call
                files, changed, usable, converted = ready
            else:
                (files, changed), usable, converted = refresh_changed(files), None, None
            if changed:
                notes.append(f"{changed} file(s) changed since planning (headers re-read)")
            info = convert_series(files, scan_id, out["nifti"], cfg, converted=converted, usable=usable)
        elif head["image"]:  # NIfTI (physionet, samplesheet)
            info = convert_nifti(head["image"], out["nifti"], cfg, name)
        else:
            raise InputError(f"{name}: the batch plan lists no file for it")
        written.append(out["nifti"])
        notes += info["notes"]
        shape, affine = info["shape"], info["affine"]
        mask = None
        if head["mask"]:
            mask, more = mask_on_grid(head["mask"], shape, affine, name)
            save_nifti(mask, affine, out["mask"], dtype=np.uint8)
            written.append(out["mask"])
            notes += more
        else:
            _unlink(out["mask"])
        table = None
        fmt = head["format"]
        if fmt == "rsna":
            table, more = map_dicom_labels(info["rows"], slice_centres_ras(info["rows"]), labels, affine,
                                           shape[2], name)
            notes += more
        elif fmt == "samplesheet" and labels_path == LABELS_FROM_MASKS:
            if mask is not None:
                table = mask_slice_labels(mask)
            else:
                notes.append("no mask to derive slice labels from")
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
    except BaseException:
        for p in written:  # a rejected scan leaves no half set of outputs behind
            _unlink(p)
        raise
    zooms = np.asarray(info["zooms"], float)
    return {"n_slices": int(shape[2]), "spacing_x": round(float(zooms[0]), 4),
            "spacing_y": round(float(zooms[1]), 4), "spacing_z": round(float(zooms[2]), 4),
            "source": head["source"], "notes": "; ".join(n for n in notes if n)}


def scan_key(batch_plan_path: str, cfg_json: str, scan_id: str) -> str:
    """What a scan's ingestion depends on (:mod:`hemocam.stamps`): its plan rows, the size and
    mtime of each of its files, its label rows, the input and ingest settings, and the code,
    libraries and dcm2niix binary that convert it."""
    cfg = json.loads(cfg_json)
    plan, labels, _ = _context(batch_plan_path, cfg_json)
    rows = _scan_rows(batch_plan_path, cfg_json).get(scan_id, plan.iloc[:0])
    files = [p for col in ("path", "image", "mask") for p in rows[col].unique() if p]
    if labels is None:
        own = None
    elif cfg["input"]["format"] == "rsna":
        own = labels.reindex(sop_key(rows.loc[rows["sop_uid"] != "", "sop_uid"]).unique()).to_csv()
    else:
        own = labels[labels["scan_id"] == scan_id].to_csv(index=False)
    return digest({
        "rows": rows.to_csv(index=False), "files": [(p, file_sig(p)) for p in files], "labels": own,
        "input": cfg["input"], "ingest": {k: v for k, v in cfg.get("ingest", {}).items() if k != "index_threads"},
        "code": source_digest("hemocam.ingest", "hemocam.io", "hemocam.labelset"),
        "libraries": library_versions("dcm2niix", "nibabel", "numpy", "pandas", "pydicom"),
        "dcm2niix": file_sig(find_dcm2niix()),
    })


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
    processes = max(1, int(threads or 1))
    # DICOM series: one dcm2niix call per chunk of the batch instead of one per series. Worker
    # processes cannot share the chunk order, so with processes the batch is converted up front
    # when it is one chunk, else each series on its own as before.
    stamps = Stamps(stamps_folder(manifest_out), partial(scan_key, batch_plan_path, cfg_json),
                    lambda sid: output_paths(results_dir, sid).values())
    todo = [sid for sid in scan_ids if stamps.kept(sid) is None]
    batch = BatchConversion(_scan_rows(batch_plan_path, cfg_json), todo, cfg)
    key = None
    if processes == 1 or (len(todo) > 1 and batch.convert_all()):
        key = f"{os.getpid()}-{next(_KEYS)}"
        _CONVERSIONS[key] = batch
    fn = partial(ingest_scan, batch_plan_path=batch_plan_path, cfg_json=cfg_json, results_dir=str(results_dir),
                 conversion=key)
    try:
        df = run_batch("ingest", scan_ids, fn, manifest_out, processes=processes, stamps=stamps)
    finally:
        _CONVERSIONS.pop(key, None)
        batch.close()
    missing = [c for c in MANIFEST_COLUMNS if c not in df]
    rejected = bool((df["status"] != "ok").any())
    if missing or rejected:
        for col in missing:  # every scan rejected: keep the manifest's columns the same for readers
            df[col] = ""
        # a rejected row has no n_slices: without this the column turns float ("14.0")
        df["n_slices"] = pd.to_numeric(df["n_slices"], errors="coerce").astype("Int64")
        write_tsv(df[["scan_id", "status", "reason", *MANIFEST_COLUMNS]], manifest_out)
    return df
