"""NIfTI scans (PhysioNet layout, sample sheets): validated and rewritten like DICOM scans."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from hemocam.ingest.convert import check_affine
from hemocam.ingest.hu import conversion_settings, scaled, to_hu_int16
from hemocam.io import InputError, save_nifti

MAX_VOXEL_MM = 20.0


def convert_nifti(image_path, out_path, cfg: dict, name: str) -> dict:
    """Check one NIfTI CT (readable, 3D, sane affine, HU range) and write it as int16 HU.

    Returns dict(affine, shape, zooms, notes). The voxel order and affine are kept as they
    are, so slice labels given on the input's 3rd axis stay valid.
    """
    ing = cfg.get("ingest", {})
    try:
        img = nib.load(str(image_path))
        raw = img.dataobj.get_unscaled()
        owned = not isinstance(raw, np.memmap)  # a gzipped file is decoded into a fresh array
        data = scaled(raw, img.dataobj.slope, img.dataobj.inter)  # integer HU when the scaling allows
    except Exception as exc:
        raise InputError(f"{image_path}: unreadable NIfTI ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{image_path}: shape {data.shape} is not a 3D volume")
    if min(data.shape) < 1:
        raise InputError(f"{image_path}: empty volume {data.shape}")
    affine = img.affine.copy()
    zooms = check_affine(affine, str(image_path))
    if np.any(zooms > MAX_VOXEL_MM) or np.any(zooms < 0.05):
        raise InputError(f"{image_path}: implausible voxel size {np.round(zooms, 3).tolist()} mm")
    notes = []
    hdr = img.header
    if int(hdr.get("sform_code", 0)) == 0 and int(hdr.get("qform_code", 0)) == 0:
        notes.append("no sform/qform: affine from voxel sizes only")
    min_slices = int(ing.get("min_slices", 1))
    if data.shape[2] < min_slices:
        raise InputError(f"{image_path}: {data.shape[2]} slices < ingest.min_slices {min_slices}")
    check = conversion_settings(cfg)
    hu, hu_notes = to_hu_int16(
        data, str(image_path), hu_min=check["hu_min"], hu_max=check["hu_max"],
        max_outside=check["max_outside_fraction"], overwrite=owned or data is not raw,
    )
    save_nifti(hu, affine, out_path, dtype=np.int16)
    return {"affine": affine, "shape": hu.shape, "zooms": zooms, "notes": notes + hu_notes}
