"""Header index of a DICOM tree: one row per file, read without decoding pixels.

Every file under the root gets a row, DICOM or not: a non-DICOM file is recorded with
``readable=False`` and the error, never raised. Truncated pixel data is detected from the
header and the file size alone (no decoding). Patient identifiers never leave this module:
files are grouped by an HMAC of the PatientID under a per-cache random secret, and the
returned frame carries only ``patient_group``, an opaque integer (rank of the patient's first
series UID in the cohort).

The optional cache (TSV, gzip when the name ends in .gz) is keyed by (path, size, mtime_ns),
so re-indexing a large archive only reads new or changed files.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import struct
from stat import S_ISREG
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pydicom.config
from pydicom.errors import InvalidDicomError

from hemocam.ingest.phi import PHI_KEYWORDS, identifying_values, path_spans
from hemocam.io import atomic_path

log = logging.getLogger("hemocam")

STR_COLS = [
    "path", "sop_uid", "series_uid", "study_uid", "modality", "sop_class_uid", "image_type",
    "transfer_syntax", "error",
    "phi_spans",  # where the path spells an identifying header value (phi.path_spans)
]
FLOAT_COLS = [
    "iop_0", "iop_1", "iop_2", "iop_3", "iop_4", "iop_5", "ipp_0", "ipp_1", "ipp_2",
    "pixel_spacing_row", "pixel_spacing_col", "slice_thickness", "rescale_intercept",
    "rescale_slope", "gantry_tilt", "pixel_padding_value",
]
# optional header integers (pandas nullable)
INT_COLS = [
    "rows", "cols", "bits_allocated", "bits_stored", "pixel_representation", "instance_number",
    "number_of_frames", "samples_per_pixel", "series_number",
]
# always known
SIZE_COLS = ["file_size", "mtime_ns", "pixel_offset", "pixel_length", "expected_pixel_bytes"]
BOOL_COLS = ["readable", "has_pixels", "truncated"]
# cache-only: pseudonym of the PatientID (HMAC under the cache's secret)
CACHE_ONLY = ["patient_key"]

COLUMNS = STR_COLS + FLOAT_COLS + INT_COLS + SIZE_COLS + BOOL_COLS
CACHE_COLUMNS = COLUMNS + CACHE_ONLY
INDEX_COLUMNS = COLUMNS + ["patient_group"]

_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR"}
_IMPLICIT = "1.2.840.10008.1.2"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
# the attributes read_header uses: pydicom then skips every other element's value (about 40 %
# of a CT header read), still walking the file up to the pixel data
_INDEX_TAGS = (
    "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality", "SOPClassUID", "ImageType",
    "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "SliceThickness", "RescaleIntercept",
    "RescaleSlope", "GantryDetectorTilt", "PixelPaddingValue", "Rows", "Columns", "BitsAllocated", "BitsStored",
    "PixelRepresentation", "InstanceNumber", "NumberOfFrames", "SamplesPerPixel", "SeriesNumber",
    *PHI_KEYWORDS,  # read only to find them in the path (phi_spans); never stored
)


# ----------------------------------------------------------------------------- walking


def walk_tree(roots) -> tuple[pd.DataFrame, dict]:
    """Every regular file under ``roots`` (a path or a list) and every folder's mtime.

    Returns (files: path, file_size, mtime_ns; folders: {folder: mtime_ns}). Folder mtimes let
    a caller tell cheaply that no file was added, removed or renamed. Directory symlinks are
    followed once (a visited set stops loops); paths are absolute but not resolved.
    """
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    paths, sizes, mtimes = [], [], []
    folders = {}
    seen_dirs = set()
    stack = []
    for root in roots:
        root = os.path.abspath(os.fspath(root))
        if os.path.isfile(root):
            st = os.stat(root)
            paths.append(root), sizes.append(st.st_size), mtimes.append(st.st_mtime_ns)
        elif os.path.isdir(root):
            stack.append(root)
        else:
            raise FileNotFoundError(f"{root}: no such file or folder")
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        folders[folder] = st.st_mtime_ns
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            log.warning("index: cannot list %s (%s)", folder, exc)
            continue
        for entry in entries:
            try:
                if entry.is_dir():
                    if _unwritable_name(entry.path):
                        log.warning("index: skipping folder %r and everything in it: its name has a tab or "
                                    "newline or is not valid UTF-8 (rename it to include it)", os.fsencode(entry.path))
                    else:
                        stack.append(entry.path)
                    continue
                st = entry.stat()
            except OSError:  # dangling symlink, permission: not a file we can read
                continue
            if S_ISREG(st.st_mode):
                paths.append(entry.path)
                sizes.append(st.st_size)
                mtimes.append(st.st_mtime_ns)
    bad = [p for p in paths if _unwritable_name(p)] if paths else []
    if bad:  # such names would break the TSV cache and batch plans (and crash planning)
        log.warning("index: skipping %d file(s) whose path has a tab or newline or is not valid UTF-8 "
                    "(rename them to include them), e.g. %r", len(bad), os.fsencode(bad[0]))
        skip = set(bad)
        keep = [i for i, p in enumerate(paths) if p not in skip]
        paths, sizes, mtimes = [paths[i] for i in keep], [sizes[i] for i in keep], [mtimes[i] for i in keep]
    files = pd.DataFrame({"path": pd.array(paths, dtype=str), "file_size": np.array(sizes, dtype=np.int64),
                          "mtime_ns": np.array(mtimes, dtype=np.int64)})
    return files, folders


def _unwritable_name(path: str) -> bool:
    """A tab or newline, or bytes that are not UTF-8 (a Latin-1 folder name from a Windows or
    USB export, which Python keeps as surrogates): cannot go into a UTF-8 TSV."""
    if "\t" in path or "\n" in path or "\r" in path:
        return True
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def walk_files(roots) -> pd.DataFrame:
    """Every regular file under ``roots``: path, file_size, mtime_ns (see ``walk_tree``)."""
    return walk_tree(roots)[0]


def folders_unchanged(folders: dict) -> bool:
    """True when every folder still exists with the recorded mtime (no entry added/removed)."""
    for folder, mtime in folders.items():
        try:
            if os.stat(folder).st_mtime_ns != mtime:
                return False
        except OSError:
            return False
    return True


# ----------------------------------------------------------------------------- one header


def _num(value, cast=float):
    try:
        if value is None or value == "":
            return None
        return cast(value)
    except (TypeError, ValueError):
        return None


def _multi(value, n):
    """A multi-valued numeric attribute as ``n`` floats (None where missing or malformed)."""
    try:
        vals = [float(v) for v in (value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value])]
    except (TypeError, ValueError):
        return [None] * n
    return vals if len(vals) == n else [None] * n


def _pixel_element(fp, pos, transfer_syntax):
    """Offset, declared length and header size of the pixel data element at ``pos``."""
    fp.seek(pos)
    head = fp.read(12)
    if len(head) < 8:
        return None
    big = transfer_syntax == _BIG_ENDIAN
    group, elem = struct.unpack(">HH" if big else "<HH", head[:4])
    if (group, elem) not in _PIXEL_TAGS:
        return None
    if transfer_syntax == _IMPLICIT:
        (length,) = struct.unpack("<I", head[4:8])
        return pos, length, 8
    vr = head[4:6]
    if vr in _LONG_VRS:
        if len(head) < 12:
            return None
        (length,) = struct.unpack(">I" if big else "<I", head[8:12])
        return pos, length, 12
    (length,) = struct.unpack(">H" if big else "<H", head[6:8])
    return pos, length, 8


def _fragments_complete(fp, start: int, file_size: int) -> bool:
    """Whether the encapsulated pixel data from ``start`` (its first item) runs through whole
    items to the sequence delimiter inside the file; elements may follow the delimiter."""
    pos = start
    while pos + 8 <= file_size:
        fp.seek(pos)
        group, elem, length = struct.unpack("<HHI", fp.read(8))
        if (group, elem) == (0xFFFE, 0xE0DD):
            return True
        if (group, elem) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            return False
        pos += 8 + length
    return False


def _encoding(ds) -> str:
    """The transfer syntax the dataset was read with: its file meta's, or for a file without
    one (no group 0002) the encoding pydicom detected."""
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if ts:
        return ts
    implicit, little = getattr(ds, "original_encoding", (None, None))
    return _IMPLICIT if implicit else ("1.2.840.10008.1.2.1" if little or little is None else _BIG_ENDIAN)


def _looks_like_raw_dataset(fp) -> bool:
    """A DICOM dataset stored without preamble or 'DICM' (old archives): it starts with a
    group 0008 element, as dcm2niix also accepts."""
    fp.seek(0)
    head = fp.read(4)
    fp.seek(0)
    return head[:2] == b"\x08\x00"


def read_header(path: str, file_size: int) -> dict:
    """One index row for ``path``; never raises for a bad file."""
    row = {"path": path, "file_size": int(file_size), "readable": False, "has_pixels": False,
           "truncated": False, "pixel_offset": -1, "pixel_length": -1, "expected_pixel_bytes": 0}
    try:
        with open(path, "rb") as fp:
            try:
                ds = pydicom.dcmread(fp, stop_before_pixels=True, force=False, specific_tags=list(_INDEX_TAGS))
            except InvalidDicomError:
                if not _looks_like_raw_dataset(fp):
                    raise
                ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True, specific_tags=list(_INDEX_TAGS))
                if not ds.get("SOPClassUID") and not ds.get("Modality"):
                    raise
            pos = fp.tell()
            meta = getattr(ds, "file_meta", None)
            ts = _encoding(ds)
            pixel = _pixel_element(fp, pos, ts)
            complete = True
            if pixel is not None and pixel[1] == 0xFFFFFFFF:
                complete = _fragments_complete(fp, pixel[0] + pixel[2], file_size)
    except InvalidDicomError:
        row["error"] = "not DICOM (no 'DICM' prefix / file meta)"
        return row
    except Exception as exc:  # pydicom raises many types on broken headers
        row["error"] = f"{type(exc).__name__}: {exc}"
        return row
    row["error"] = ""
    row["readable"] = True
    row["phi_spans"] = path_spans(path, identifying_values(ds))
    g = ds.get
    row["sop_uid"] = str(g("SOPInstanceUID", "") or (meta.get("MediaStorageSOPInstanceUID", "") if meta is not None else "") or "")
    row["series_uid"] = str(g("SeriesInstanceUID", "") or "")
    row["study_uid"] = str(g("StudyInstanceUID", "") or "")
    row["modality"] = str(g("Modality", "") or "")
    sop_class = g("SOPClassUID", None) or (meta.get("MediaStorageSOPClassUID", "") if meta is not None else "")
    row["sop_class_uid"] = str(sop_class or "")
    image_type = g("ImageType", None)
    if image_type is None:
        row["image_type"] = ""
    elif isinstance(image_type, str):
        row["image_type"] = image_type
    else:
        row["image_type"] = "\\".join(str(v) for v in image_type)
    row["transfer_syntax"] = ts
    for i, v in enumerate(_multi(g("ImageOrientationPatient", None), 6)):
        row[f"iop_{i}"] = v
    for i, v in enumerate(_multi(g("ImagePositionPatient", None), 3)):
        row[f"ipp_{i}"] = v
    row["pixel_spacing_row"], row["pixel_spacing_col"] = _multi(g("PixelSpacing", None), 2)
    row["slice_thickness"] = _num(g("SliceThickness", None))
    row["rescale_intercept"] = _num(g("RescaleIntercept", None))
    row["rescale_slope"] = _num(g("RescaleSlope", None))
    row["gantry_tilt"] = _num(g("GantryDetectorTilt", None))
    row["pixel_padding_value"] = _num(g("PixelPaddingValue", None))
    for col, kw in (("rows", "Rows"), ("cols", "Columns"), ("bits_allocated", "BitsAllocated"),
                    ("bits_stored", "BitsStored"), ("pixel_representation", "PixelRepresentation"),
                    ("instance_number", "InstanceNumber"), ("number_of_frames", "NumberOfFrames"),
                    ("samples_per_pixel", "SamplesPerPixel"), ("series_number", "SeriesNumber")):
        row[col] = _num(g(kw, None), lambda v: int(float(v)))
    pid = str(g("PatientID", "") or "").strip()
    # no PatientID: each study stands for its own patient (grouping cannot be better than that)
    row["patient_key"] = "pid:" + pid if pid else "study:" + row["study_uid"]

    rows, cols = row["rows"] or 0, row["cols"] or 0
    frames = row["number_of_frames"] or 1
    spp = row["samples_per_pixel"] or 1
    bits = row["bits_allocated"] or 0
    expected = (rows * cols * frames * spp * bits + 7) // 8
    row["expected_pixel_bytes"] = int(expected)
    if pixel is None:
        row["truncated"] = expected > 0  # an image header whose pixel data never comes
        return row
    offset, length, head = pixel
    row["has_pixels"] = True
    row["pixel_offset"] = int(offset)
    row["pixel_length"] = int(length)
    available = file_size - offset - head
    if length == 0xFFFFFFFF:
        # encapsulated (compressed): the fragment sequence must be closed by its delimiter
        row["truncated"] = not complete
    else:
        row["truncated"] = available < min(length, expected) if expected else available < length
        if expected and length < expected:
            row["truncated"] = True
    return row


@contextlib.contextmanager
def quiet_pydicom():
    """No per-file validation warnings (RSNA's ``ID_...`` UIDs are invalid UI values: a
    warning per file would flood the log of an 870k-file archive)."""
    settings = pydicom.config.settings
    old = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode = old


def _read_many(items):
    with quiet_pydicom():
        return [read_header(p, s) for p, s in items]


# ----------------------------------------------------------------------------- frames


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=CACHE_COLUMNS)
    return _coerce(df)


def _coerce(df: pd.DataFrame) -> pd.DataFrame:
    for c in STR_COLS + CACHE_ONLY:
        if c in df:
            df[c] = df[c].fillna("").astype(str)
    for c in FLOAT_COLS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in INT_COLS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    for c in SIZE_COLS:
        df[c] = pd.to_numeric(df[c], errors="coerce").fillna(-1).astype(np.int64)
    for c in BOOL_COLS:
        col = df[c]
        if col.dtype != bool:
            col = col.astype(str).str.lower().isin(["true", "1"])
        df[c] = col.astype(bool)
    # tabs/newlines in error texts would break the TSV cache
    df["error"] = df["error"].str.replace(r"[\t\r\n]+", " ", regex=True)
    return df


def _secret(cache) -> bytes:
    """Per-cache random key for patient pseudonyms (kept beside the cache, owner-only)."""
    if cache is None:
        return secrets.token_bytes(32)
    key_path = Path(str(cache) + ".key")
    if key_path.exists():
        return bytes.fromhex(key_path.read_text().strip())
    key = secrets.token_bytes(32)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(key_path, suffix="") as tmp:
        tmp.write_text(key.hex() + "\n")
        os.chmod(tmp, 0o600)
    return key


def _pseudonymise(keys: pd.Series, secret: bytes) -> pd.Series:
    out = {}
    for k in keys.unique():
        if k.startswith(("pid:", "study:")):
            out[k] = "p" + hmac.new(secret, k.encode(), hashlib.sha256).hexdigest()[:20]
        else:
            out[k] = k  # already a pseudonym (read from the cache)
    return keys.map(out)


def _cache_dtypes() -> dict:
    return {**{c: str for c in STR_COLS + CACHE_ONLY}, **{c: "float64" for c in FLOAT_COLS},
            **{c: "Int64" for c in INT_COLS}, **{c: "int64" for c in SIZE_COLS},
            **{c: "bool" for c in BOOL_COLS}}


def relative_paths(paths: pd.Series, workdir=None) -> pd.Series:
    """Absolute paths under ``workdir`` (default: the current directory, Snakemake's workdir)
    made relative to it; others unchanged. What hemocam writes to its own tables, so that a
    project folder moved whole (data inside) still matches them."""
    root = os.path.abspath(workdir or os.getcwd()).rstrip(os.sep) + os.sep
    under = paths.astype(str).str.startswith(root).to_numpy(bool)
    if not under.any():
        return paths
    out = paths.astype(object)  # a copy
    out[under] = out[under].str.slice(len(root))
    return out


def absolute_paths(paths: pd.Series, workdir=None) -> pd.Series:
    """The inverse of :func:`relative_paths`: relative paths joined to ``workdir``."""
    root = os.path.abspath(workdir or os.getcwd())
    rel = ~paths.str.startswith(os.sep)
    if not rel.any():
        return paths
    out = paths.copy()
    out[rel] = root + os.sep + paths[rel]
    return out


def _load_cache(cache: Path) -> pd.DataFrame | None:
    """The cached index, or None when absent, unreadable or of another layout."""
    if not cache.exists() or not Path(str(cache) + ".key").exists():
        return None
    try:
        header = pd.read_csv(cache, sep="\t", nrows=0, quoting=3).columns.tolist()
        if header != CACHE_COLUMNS:
            log.info("index: cache %s has another layout; rebuilding", cache)
            return None
        # typed read (no per-column coercion afterwards): ~2 s for 870k rows uncompressed
        df = pd.read_csv(cache, sep="\t", dtype=_cache_dtypes(), keep_default_na=False,
                         na_values={c: [""] for c in FLOAT_COLS + INT_COLS},
                         quoting=3)  # csv.QUOTE_NONE: values never hold tabs or newlines
        df["path"] = absolute_paths(df["path"])
        return df
    except Exception as exc:
        log.warning("index: ignoring unreadable cache %s (%s)", cache, exc)
        return None


def _write_cache(df: pd.DataFrame, cache: Path):
    compression = {"method": "gzip", "compresslevel": 1, "mtime": 0} if str(cache).endswith(".gz") else None
    out = df[CACHE_COLUMNS].assign(path=relative_paths(df["path"]))  # a moved project keeps its index
    with atomic_path(cache) as tmp:
        out.to_csv(tmp, sep="\t", index=False, quoting=3, compression=compression)


def _patient_groups(df: pd.DataFrame) -> pd.Series:
    """Opaque integer per patient: rank of the patient's smallest series UID (stable order)."""
    has = ((df["series_uid"] != "") & (df["patient_key"] != "")).to_numpy()
    out = np.full(len(df), -1, dtype=np.int64)
    if not has.any():
        return pd.Series(out, index=df.index)
    # integer codes (factorize hashes once) instead of string group-bys: fast on 870k rows
    pcode, _ = pd.factorize(df["patient_key"].to_numpy()[has])
    scode, _ = pd.factorize(df["series_uid"].to_numpy()[has], sort=True)  # code order = UID order
    first = np.full(pcode.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(first, pcode, scode)
    rank = np.empty_like(first)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    out[has] = rank[pcode]
    return pd.Series(out, index=df.index)


def index_dicom(root, threads: int = 8, cache=None, executor: str = "auto", files=None,
                assume_unchanged: bool = False) -> pd.DataFrame:
    """Index every file under ``root`` (a folder, a file, or a list of them).

    Returns one row per file with the columns of ``INDEX_COLUMNS`` (patient identifiers are
    replaced by the integer ``patient_group``). ``cache``: optional TSV(.gz) path reused for
    files whose (path, size, mtime_ns) did not change; rewritten atomically only on change.
    ``executor``: "process", "thread", "serial" or "auto" (processes once there is enough to
    read: pydicom parsing is pure Python, so threads only help while waiting for the disk).
    ``files``: a ``walk_files`` result already made; ``assume_unchanged``: take the cache's
    file list as the tree (the caller checked folder mtimes).
    """
    t0 = time.perf_counter()
    cache = Path(cache) if cache else None
    secret = _secret(cache)
    old = _load_cache(cache) if cache else None
    if assume_unchanged and old is not None:
        # the caller knows no file was added or removed (folder mtimes): the cache is the tree
        files = old[["path", "file_size", "mtime_ns"]]
    elif files is None:
        files = walk_files(root)  # ``files``: a walk_files result the caller already made
    keep = None
    todo = files
    if assume_unchanged and old is not None:
        keep, todo = old, files.iloc[:0]
    elif old is not None:
        # position of each walked file in the cache (hash lookup, no merge of wide frames)
        pos = pd.Index(old["path"]).get_indexer(files["path"])
        found = pos >= 0
        safe = np.where(found, pos, 0)
        hit = found & (old["file_size"].to_numpy()[safe] == files["file_size"].to_numpy()) \
            & (old["mtime_ns"].to_numpy()[safe] == files["mtime_ns"].to_numpy())
        if hit.all() and len(old) == len(files):
            keep = old  # nothing changed: the cache as it is, in its order
        else:
            keep = old.take(pos[hit])
        todo = files.loc[~hit]
    items = list(zip(todo["path"].tolist(), todo["file_size"].tolist()))
    mtimes = dict(zip(todo["path"].tolist(), todo["mtime_ns"].tolist()))
    rows = _read_parallel(items, threads, executor)
    for r in rows:
        r["mtime_ns"] = mtimes[r["path"]]
    fresh = _frame(rows)
    if len(fresh):
        fresh["patient_key"] = _pseudonymise(fresh["patient_key"], secret)
    changed = old is None or len(fresh) > 0 or len(keep) != len(old)
    if changed:
        parts = [p for p in (keep, fresh) if p is not None and len(p)]
        df = pd.concat(parts, ignore_index=True) if parts else _frame([])
        df = df[CACHE_COLUMNS].sort_values("path", kind="stable").reset_index(drop=True)
        if cache is not None:
            _write_cache(df, cache)
    else:
        df = keep.reset_index(drop=True)
    n_read = len(items)
    dt = time.perf_counter() - t0
    log.info("index: %d files (%d read, %d from cache) in %.1f s%s", len(df), n_read, len(df) - n_read, dt,
             f" ({n_read / dt:.0f} files/s)" if n_read else "")
    bad = int((~df["readable"]).sum())
    if bad:
        log.info("index: %d files are not DICOM or unreadable (kept with their error)", bad)
    df["patient_group"] = _patient_groups(df)
    return df.drop(columns=CACHE_ONLY)


def _read_parallel(items, threads, executor):
    workers = max(1, int(threads or 1))
    if executor == "auto":
        # measured on 2 cores (warm page cache): serial ~1600 files/s, threads ~1000 (GIL),
        # processes ~2100-2800; below a few hundred files the pool start-up is not worth it
        executor = "process" if workers > 1 and len(items) >= 500 else "serial"
    if executor == "serial" or workers == 1 or len(items) < 2:
        return _read_many(items)
    if executor == "thread":
        with quiet_pydicom(), ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda it: read_header(*it), items))
    # processes: chunks amortise pickling; enough chunks to keep workers busy till the end
    workers = min(workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    chunk = max(16, min(512, len(items) // (workers * 8) or 1))
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    out = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for part in pool.map(_read_many, chunks):
            out.extend(part)
    return out
