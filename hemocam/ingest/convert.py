"""One DICOM series -> HU NIfTI with the real dcm2niix (never hand-stacked pixels).

The series' files are symlinked under neutral names into a private temporary folder, so other
series sharing the input folder are not touched, inputs stay read-only, and no original file
name (which may carry a patient name) reaches dcm2niix's messages. dcm2niix's output is
filtered to warnings and errors and scrubbed of the series' identifying header values before it
is logged. Its sidecar and header texts are discarded: the NIfTI is rewritten from the array and
affine alone.

``run_dcm2niix_batch`` converts many series in one dcm2niix call (one process start instead of
one per series: most of dcm2niix's cost on small series): one subfolder per series, named by
its index, converted folder by folder (``-a y``), symlinks named ``s<series>_<file>.dcm`` and
``-f %b`` so every output name starts with its series' index. A series' outputs are used only
when they are exactly what a call on that series alone gives (one volume from all of its
files); anything else is converted on its own by ``run_dcm2niix`` as before, so notes and
reasons stay per series. Dates dcm2niix prints (it compares studies) are scrubbed as well.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom

from hemocam.ingest.hu import conversion_settings, scaled, to_hu_int16, wrap_fault
from hemocam.ingest.index import quiet_pydicom
from hemocam.ingest.phi import identifying_values, redact
from hemocam.ingest.series import slice_normals
from hemocam.io import InputError, save_nifti

log = logging.getLogger("hemocam")

# variants dcm2niix writes for one series, best first (tilt-corrected, then equidistant)
_VARIANTS = (("tilt_eq", re.compile(r"^_Tilt_Eq_\d+$")), ("tilt", re.compile(r"^_Tilt_\d+$")),
             ("eq", re.compile(r"^_Eq_\d+$")), ("plain", re.compile(r"^$")))
_IGNORED = re.compile(r"^_ROI\d+$")  # overlay planes stored as extra images
_KEEP_LINE = re.compile(r"warning|error|convert |gantry|tilt|interslice|missing|slices", re.I)
SPACING_TOL = 0.10  # relative spread of slice gaps still called regular
# dates and date-times (YYYYMMDD[HHMMSS][.ffffff]) dcm2niix prints when it compares studies
_DATE = re.compile(r"(?<![\d.])(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
                   r"(?:[0-2]\d[0-5]\d[0-5]\d)?(?:\.\d+)?(?!\d)")
_CONVERT = re.compile(r"^Convert (\d+) DICOM as (.+) \(\d+(?:x\d+)*\)\s*$", re.M)
_BATCH_NAME = re.compile(r"s(\d{6})_\d{6}\.dcm")
DCM2NIIX_OPTS = ["-g", "i", "-z", "n", "-b", "y", "-ba", "y"]  # the same for one series or many


@lru_cache(maxsize=1)
def find_dcm2niix() -> str:
    """The dcm2niix executable: beside the interpreter, else on PATH, else the PyPI package's.

    The console script the PyPI package installs beside the interpreter is a Python wrapper of
    the same binary; the binary itself is used then (saves an interpreter start per scan).
    """
    candidates = [Path(sys.executable).with_name("dcm2niix"), shutil.which("dcm2niix")]
    try:
        import dcm2niix as _pkg

        pkg_bin = Path(_pkg.bin)
    except Exception:
        pkg_bin = None
    for cand in candidates:
        if not cand or not Path(cand).is_file() or not os.access(cand, os.X_OK):
            continue
        with open(cand, "rb") as fh:
            head = fh.read(512)
        if head.startswith(b"#!") and b"dcm2niix" in head and pkg_bin is not None and pkg_bin.is_file():
            return str(pkg_bin)
        return str(cand)
    if pkg_bin is not None and pkg_bin.is_file():
        return str(pkg_bin)
    raise FileNotFoundError("dcm2niix not found (install the 'dcm2niix' PyPI package)")


def phi_values(path) -> list[str]:
    """Identifying strings of one file's header (see ``phi.identifying_values``)."""
    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return []
    return identifying_values(ds)


def scrub(text: str, phi: list[str]) -> str:
    """Only dcm2niix's warning/error/summary lines, with identifying values replaced."""
    lines = [ln for ln in text.splitlines() if _KEEP_LINE.search(ln)]
    return _DATE.sub("[date removed]", redact("\n".join(lines), phi))


def scratch_dir(series_bytes: int, shm="/dev/shm") -> str | None:
    """Where dcm2niix's scratch folder goes: tmpfs when it has ample room, else the temp dir (None).

    The scratch volume is written once and read once, and deleting the series' symlinks on a
    disk file system waits on its journal (~75 ms per 32-slice series measured on ext4 with
    discard); in memory neither costs anything. Containers often have a small /dev/shm: then,
    or without one, the default temp dir is used.
    """
    try:
        st = os.statvfs(shm)
    except OSError:
        return None
    room = st.f_bavail * st.f_frsize
    return shm if os.access(shm, os.W_OK) and room > 2 * series_bytes + (256 << 20) else None


def run_dcm2niix(paths: list[str], workdir: Path, phi: list[str]) -> tuple[list[Path], str]:
    """Convert exactly ``paths`` (one series) in ``workdir``; returns (NIfTI files, scrubbed log)."""
    src, dst = workdir / "in", workdir / "out"
    src.mkdir()
    dst.mkdir()
    for i, p in enumerate(paths):
        os.symlink(os.path.abspath(p), src / f"{i:06d}.dcm")
    cmd = [find_dcm2niix(), *DCM2NIIX_OPTS, "-f", "vol", "-o", str(dst),
           "-d", "0", "-i", "n", "-m", "2", "-l", "o", "-x", "n", "-w", "1", str(src)]
    env = {**os.environ, "HOME": str(workdir)}  # no user defaults file is read or written
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env, timeout=600)
    text = scrub(proc.stdout + "\n" + proc.stderr, phi)
    where = os.path.dirname(os.path.abspath(paths[0])) if paths else "?"
    tail = " | ".join(text[-500:].splitlines())  # reasons stay on one line in TSVs
    if proc.returncode != 0:
        raise InputError(f"{where}: dcm2niix failed (exit {proc.returncode}): {tail}")
    outputs = sorted(dst.glob("*.nii"))
    if not outputs:
        raise InputError(f"{where}: dcm2niix wrote no volume: {tail}")
    return outputs, text


def run_dcm2niix_batch(series: list[list[str]], workdir: Path, phi: list[str],
                       names: list[str] | None = None) -> tuple[dict, str, str]:
    """Convert several series (lists of files) in one dcm2niix call in ``workdir``.

    Returns (``{index: (NIfTI files, stem)}`` for the series whose outputs are exactly those of
    a call on that series alone, scrubbed log, why the others are not taken). A series is taken
    when dcm2niix reports one volume for it, made of all of its files, and its files pick one
    volume (``pick_output``). ``names``: what the log calls each series (scan ids).
    """
    src, dst = workdir / "in", workdir / "out"
    src.mkdir()
    dst.mkdir()
    for k, paths in enumerate(series):
        folder = src / f"{k:06d}"  # index names only: nothing from the header or the input path
        folder.mkdir()
        for i, p in enumerate(paths):
            os.symlink(os.path.abspath(p), folder / f"s{k:06d}_{i:06d}.dcm")
    # -a y: "images from same series always in same folder": each subfolder is sorted and
    # converted on its own, as in a call on that folder alone. Without it, '-m 2' (which
    # ignores the Series Instance UID) stacks series of other studies when their dates match
    # or are missing (anonymised archives): they would all fall back to their own calls.
    cmd = [find_dcm2niix(), *DCM2NIIX_OPTS, "-a", "y", "-f", "%b", "-o", str(dst),
           "-d", "1", "-i", "n", "-m", "2", "-l", "o", "-x", "n", "-w", "1", str(src)]
    env = {**os.environ, "HOME": str(workdir)}
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env, timeout=600)
    raw = proc.stdout + "\n" + proc.stderr
    if names is not None:  # "Convert 28 DICOM as scan <id> (...)" instead of the scratch path
        raw = re.sub(r"\S*s(\d{6})_\d{6}\.dcm\b",
                     lambda m: f"scan {names[int(m.group(1))]}" if int(m.group(1)) < len(names) else m.group(0), raw)
    text = scrub(raw, phi)
    if proc.returncode != 0:
        return {}, text, f"the call failed (exit {proc.returncode})"
    volumes: dict[int, list[tuple[int, str]]] = {}
    for m in _CONVERT.finditer(proc.stdout):
        base = os.path.basename(m.group(2))
        key = _BATCH_NAME.fullmatch(base)
        if not key:
            return {}, text, f"unexpected output name {base!r}"
        volumes.setdefault(int(key.group(1)), []).append((int(m.group(1)), base))
    files: dict[int, list[Path]] = {}
    for f in dst.glob("*.nii"):
        key = _BATCH_NAME.match(f.name)
        if not key:
            return {}, text, f"unexpected output name {f.name!r}"
        files.setdefault(int(key.group(1)), []).append(f)
    if any(k >= len(series) for k in (*volumes, *files)):
        return {}, text, "output of an unknown series"
    taken, left = {}, []
    for k, paths in enumerate(series):
        conv = volumes.get(k, [])
        if len(conv) != 1 or conv[0][0] != len(paths):
            left.append(k)
            continue
        stem = conv[0][1]
        mine = sorted(files.get(k, []))
        if not mine or any(not f.name.startswith(stem) for f in mine):
            left.append(k)
            continue
        try:
            pick_output(mine, stem)
        except InputError:  # its reason names the outputs: the call on the series alone gives it
            left.append(k)
            continue
        taken[k] = (mine, stem)
    return taken, text, f"{len(left)} series not converted as on their own" if left else ""


def pick_output(files: list[Path], stem: str = "vol") -> tuple[Path, str]:
    """The one volume of the series, preferring dcm2niix's tilt-corrected/equidistant variant."""
    found, unrelated = {}, []
    for f in files:
        suffix = f.name[len(stem):-len(".nii")] if f.name.startswith(stem) else None
        if suffix is None or _IGNORED.match(suffix):
            continue
        for kind, pattern in _VARIANTS:
            if pattern.match(suffix):
                found.setdefault(kind, []).append(f)
                break
        else:
            unrelated.append(f.name)
    if unrelated or any(len(v) > 1 for v in found.values()):
        names = sorted(unrelated + [f.name for v in found.values() for f in v])
        raise InputError(f"dcm2niix wrote several volumes for one series ({', '.join(names)}): "
                         "mixed acquisitions or echoes")
    for kind, _ in _VARIANTS:
        if kind in found:
            return found[kind][0], kind
    raise InputError("dcm2niix wrote no volume")


def slice_centres_ras(rows: pd.DataFrame) -> np.ndarray:
    """World (RAS) centre of each DICOM slice: IPP is the first pixel's centre, in LPS."""
    ipp = rows[["ipp_0", "ipp_1", "ipp_2"]].to_numpy(float)
    r = rows[["iop_0", "iop_1", "iop_2"]].to_numpy(float)
    c = rows[["iop_3", "iop_4", "iop_5"]].to_numpy(float)
    # PixelSpacing = (row spacing, column spacing); along a row (direction r) steps are columns
    dcol = rows["pixel_spacing_col"].to_numpy(float)[:, None]
    drow = rows["pixel_spacing_row"].to_numpy(float)[:, None]
    ncols = rows["cols"].to_numpy(float)[:, None]
    nrows = rows["rows"].to_numpy(float)[:, None]
    centre = ipp + r * dcol * (ncols - 1) / 2 + c * drow * (nrows - 1) / 2
    return centre * np.array([-1.0, -1.0, 1.0])


def check_affine(affine, name):
    a = np.asarray(affine, float)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise InputError(f"{name}: affine is not a finite 4x4 matrix")
    cols = a[:3, :3]
    zooms = np.linalg.norm(cols, axis=0)
    if np.any(zooms < 1e-3) or abs(np.linalg.det(cols)) < 1e-9:
        raise InputError(f"{name}: degenerate affine (voxel sizes {np.round(zooms, 4).tolist()})")
    unit = cols / zooms
    off = np.abs(unit.T @ unit - np.eye(3)).max()
    if off > 1e-3:
        raise InputError(f"{name}: sheared (non-orthogonal) affine, off by {off:.3f}")
    return zooms


def _gaps(rows: pd.DataFrame) -> np.ndarray:
    n = slice_normals(rows)[0]
    pos = np.sort(rows[["ipp_0", "ipp_1", "ipp_2"]].to_numpy(float) @ n)
    return np.diff(pos)


def missing_positions(gaps: np.ndarray) -> int:
    """Slice positions absent from a series with these gaps: gaps of about 2, 3, ... times the
    median (the spacing) count 1, 2, ...; uneven acquisitions (spiral helical steps) count none."""
    if gaps.size < 2:
        return 0
    step = float(np.median(gaps))
    if step <= 0:
        return 0
    ratio = gaps / step
    return int(np.sum(np.where(ratio > 1.5, np.round(ratio) - 1, 0)))


def usable_rows(files: pd.DataFrame, scan_id: str, cfg: dict) -> tuple[pd.DataFrame, list, list]:
    """(files dcm2niix converts, files dropped, notes) of a series' index rows; InputError if none.

    Duplicate SOP instances are dropped, and truncated or pixel-less files with a note when the
    remaining slices still make a valid volume; otherwise the scan is rejected naming them.
    """
    min_slices = int(cfg.get("ingest", {}).get("min_slices", 1))
    usable = files["readable"] & files["has_pixels"] & ~files["truncated"]
    # a copied slice: keep an intact copy over a truncated one; no SOPInstanceUID: its own instance
    copy = files.assign(_bad=~usable).sort_values("_bad", kind="stable").duplicated("sop_uid")
    copy = copy.reindex(files.index) & (files["sop_uid"] != "")
    if copy.any():
        files, usable = files[~copy], usable[~copy]
    bad = files.loc[~usable, "path"].tolist()
    rows = files[usable].copy()
    notes = []
    if bad:
        shown = ", ".join(os.path.basename(p) for p in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if len(rows) < min_slices:
            raise InputError(f"{bad[0]}: truncated or without pixel data; {len(rows)} usable slices remain "
                             f"(< ingest.min_slices {min_slices})")
        notes.append(f"dropped {len(bad)} truncated file(s): {shown}")
    if rows.empty:
        raise InputError(f"scan {scan_id}: no usable DICOM file")
    return rows, bad, notes


def convert_series(files: pd.DataFrame, scan_id: str, out_path, cfg: dict, converted=None, usable=None) -> dict:
    """Convert the series given by its index rows ``files``; write ``out_path`` (int16 HU).

    Returns dict(affine, shape, zooms, notes, rows) where ``rows`` are the files actually
    converted (for label mapping). Truncated or pixel-less files are dropped with a note when
    the remaining slices still make a valid volume; otherwise the scan is rejected naming them.
    ``converted``: (paths, NIfTI files, stem) of a batched dcm2niix call (``run_dcm2niix_batch``),
    used when its paths are exactly the files converted here; otherwise dcm2niix runs on the
    series alone. ``usable``: ``usable_rows(files, scan_id, cfg)`` when already made.
    """
    ing = cfg.get("ingest", {})
    min_slices = int(ing.get("min_slices", 1))
    name = f"scan {scan_id}"
    rows, bad, notes = usable if usable is not None else usable_rows(files, scan_id, cfg)
    notes = list(notes)
    gaps = _gaps(rows)
    irregular = gaps.size > 1 and (gaps.max() - gaps.min()) > SPACING_TOL * max(np.median(gaps), 1e-6)

    def volume(outputs, stem):
        chosen, kind = pick_output(outputs, stem)
        if irregular and kind == "plain":
            where = ", ".join(os.path.basename(p) for p in bad) if bad else "the series"
            raise InputError(f"{bad[0] if bad else name}: uneven slice spacing ({gaps.min():.2f}-{gaps.max():.2f} mm) "
                             f"after dropping {where}, and dcm2niix did not resample it")
        img = nib.load(str(chosen))
        # stored values + scl_slope/inter ourselves: integer HU, read once into memory we own
        return (scaled(np.array(img.dataobj.get_unscaled()), img.dataobj.slope, img.dataobj.inter),
                img.affine.copy(), kind)

    if converted is not None and list(converted[0]) == rows["path"].tolist():
        data, affine, kind = volume(converted[1], converted[2])
    else:
        phi = phi_values(rows["path"].iat[0])
        size = int(rows["file_size"].sum()) if "file_size" in rows else 0
        tmp_root = Path(tempfile.mkdtemp(prefix="hemocam-d2n-", dir=scratch_dir(size)))
        try:
            outputs, text = run_dcm2niix(rows["path"].tolist(), tmp_root, phi)
            if text:
                log.info("dcm2niix %s:\n%s", scan_id, text)
            data, affine, kind = volume(outputs, "vol")
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{name}: dcm2niix volume has shape {data.shape}, not 3D")
    zooms = check_affine(affine, name)
    if kind != "plain":
        notes.append({"tilt_eq": "gantry tilt corrected and resampled to even spacing by dcm2niix",
                      "tilt": "gantry tilt corrected by dcm2niix",
                      "eq": "uneven slice spacing resampled to even spacing by dcm2niix"}[kind])
    missing = missing_positions(gaps)
    if missing:  # a lost file or an incomplete transfer, not the scanner: the slices are made up
        notes.append(f"{missing} slice position(s) missing (gaps up to {gaps.max():.2f} mm against "
                     f"{np.median(gaps):.2f} mm spacing), filled by dcm2niix's interpolation")
    if data.shape[2] < min_slices:
        raise InputError(f"{name}: {data.shape[2]} slices < ingest.min_slices {min_slices}")
    wrap = np.array([wrap_fault(b, p, i) for b, p, i in zip(rows["bits_stored"].tolist(),
                                                           rows["pixel_representation"].tolist(),
                                                           rows["rescale_intercept"].tolist())], dtype=bool)
    if wrap.any() and not wrap.all():
        notes.append(f"12-bit wrap signature in {int(wrap.sum())} of {len(wrap)} files")
    pad_hu = None
    pad = rows["pixel_padding_value"].dropna()
    if len(pad):
        first = rows.iloc[0]
        slope = float(first["rescale_slope"]) if pd.notna(first["rescale_slope"]) else 1.0
        inter = float(first["rescale_intercept"]) if pd.notna(first["rescale_intercept"]) else 0.0
        pad_hu = float(pad.iloc[0]) * slope + inter
    check = conversion_settings(cfg)
    hu, hu_notes = to_hu_int16(
        data, name, hu_min=check["hu_min"], hu_max=check["hu_max"], pad_hu=pad_hu, wrap=bool(wrap.any()),
        max_outside=check["max_outside_fraction"], overwrite=True,
    )
    notes += hu_notes
    save_nifti(hu, affine, out_path, dtype=np.int16)
    return {"affine": affine, "shape": hu.shape, "zooms": zooms, "notes": notes, "rows": rows, "variant": kind}
