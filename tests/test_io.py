"""hemocam.io: the direct .nii.gz writer writes what nib.save writes."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from hemocam.io import load_nifti, save_nifti


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
@pytest.mark.parametrize("order", ["C", "F"])
def test_nii_gz_same_bytes_as_nibabel(tmp_path, dtype, order):
    a = np.asarray(np.random.default_rng(1).integers(-1024, 2000, (7, 5, 4)).astype(dtype), order=order)
    aff = np.array([[0, -0.5, 0, 10], [0.6, 0, 0, -3], [0, 0, 5, 2], [0, 0, 0, 1.0]])
    save_nifti(a, aff, tmp_path / "fast.nii.gz", dtype=dtype)
    save_nifti(a, aff, tmp_path / "ref.nii", dtype=dtype)  # uncompressed: nib.save
    assert gzip.open(tmp_path / "fast.nii.gz").read() == (tmp_path / "ref.nii").read_bytes()
    back, back_aff = load_nifti(tmp_path / "fast.nii.gz")
    assert back.dtype == dtype and np.array_equal(back, a) and np.allclose(back_aff, aff)
    img = nib.load(tmp_path / "fast.nii.gz")
    assert img.header["qform_code"] == 1 and img.header["sform_code"] == 1
    assert img.dataobj.slope == 1.0 and img.dataobj.inter == 0.0
