"""File I/O shared by every stage: atomic writes, NIfTI and TSV helpers.

Every output is written to a temporary name in the same folder and renamed into place, so a
killed job never leaves a half-written file that looks finished.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd


_UMASK = os.umask(0)
os.umask(_UMASK)


class InputError(Exception):
    """A problem with one input (scan, file, label row) that rejects it with a clear reason."""


@contextlib.contextmanager
def atomic_path(path, suffix=None):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the real suffix (.nii.gz) so libraries that dispatch on it still work
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    # mkstemp makes 0600 files; outputs should be readable like any file the user writes
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_nifti(array, affine, path, dtype=None, header=None):
    """Write ``array`` as NIfTI with ``affine`` atomically; ``dtype`` sets the on-disk type."""
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=float), header=header)
    img.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm", "sec")
    # scl_slope/inter left unset: values on disk are the values meant (HU, probabilities, labels)
    img.header["scl_slope"] = np.nan
    img.header["scl_inter"] = np.nan
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:
        if str(path).endswith(".nii.gz") and array.dtype.isnative:
            _write_nii_gz(img, array, tmp)
        else:
            nib.save(img, tmp)


def _write_nii_gz(img, array, path):
    """What nib.save writes for a .nii.gz, in one zlib level-1 stream straight from the array.

    nibabel's writer scans the data for a scaling it does not need (scl_slope is NaN), then
    compresses it in chunks of copies; here the voxels go to zlib as one view of the array (no
    copy when it is Fortran-ordered, as volumes read from NIfTI are). Level 1: CT volumes are
    mostly air and noise, so higher levels cost 3-5x the time for ~10 % smaller files.
    """
    img.update_header()
    hdr = img.header
    hdr["scl_slope"], hdr["scl_inter"] = 1.0, 0.0  # identity, as nib.save records for unscaled data
    head = io.BytesIO()
    hdr.write_to(head)  # 348-byte header + extension flag; sets vox_offset
    head.write(b"\0" * (int(hdr.get_data_offset()) - head.tell()))
    voxels = np.asfortranarray(array).ravel(order="F")  # NIfTI order: first axis fastest
    gz = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: gzip framing and CRC by zlib itself
    with open(path, "wb") as fh:
        fh.write(gz.compress(head.getvalue()))
        fh.write(gz.compress(voxels))
        fh.write(gz.flush())


def load_nifti(path, dtype=None):
    """Return ``(array, affine)``; a truncated or malformed file raises InputError naming it."""
    path = Path(path)
    try:
        img = nib.load(path)
        array = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for broken files
        raise InputError(f"{path}: unreadable NIfTI ({type(exc).__name__}: {exc})") from exc
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return array, img.affine.copy()


def voxel_spacing(affine) -> tuple[float, float, float]:
    """Voxel size (mm) along the array's three axes: the lengths of the affine's columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0))


def write_tsv(df: pd.DataFrame, path, **kwargs):
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False, **kwargs)


def read_tsv(path, **kwargs) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", keep_default_na=False, na_values=[""], **kwargs)


def write_json(obj, path):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
