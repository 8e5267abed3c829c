"""numpy resize (hemocam.resize) = the torch interpolation the cache was defined with; no torch in
a preprocess job."""

import subprocess
import sys

import numpy as np
import pytest

from hemocam.resize import resize_last2


@pytest.mark.parametrize("n,size", [(64, 48), (37, 48), (48, 48), (123, 17), (7, 3), (3, 7)])
def test_matches_torch_interpolate(n, size):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    a = np.random.default_rng(n).integers(0, 256, (4, 3, n, n)).astype(np.uint8)
    t = torch.from_numpy(a).float()
    lin = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=size < n).numpy()
    near = F.interpolate(t, size=(size, size), mode="nearest-exact").numpy()
    out = resize_last2(a, size, 1)
    assert out.dtype == np.float32 and out.shape == (4, 3, size, size)
    assert np.abs(out - lin).max() < 1e-2
    out0 = resize_last2(a, size, 0)
    assert out0.dtype == np.uint8 and np.array_equal(out0, near.astype(np.uint8))
    # (Z, n, n) without a channel axis, and chunking across the leading axis
    z = a[:, 0]
    assert np.allclose(resize_last2(z, size, 1), lin[:, 0], atol=1e-2)


def test_constant_stays_constant_and_bad_order():
    a = np.full((2, 50, 50), 7, np.uint8)
    assert np.allclose(resize_last2(a, 20, 1), 7.0, atol=1e-4)
    assert np.allclose(resize_last2(a, 80, 1), 7.0, atol=1e-4)
    with pytest.raises(ValueError):
        resize_last2(a, 20, 2)


def test_preprocess_job_does_not_import_torch():
    # what workflow/scripts/preprocess.py imports; torch alone was ~850 MB of the job's peak memory
    code = ("import sys; import hemocam.runlog, hemocam.preprocess, hemocam.batch; "
            "bad = sorted(m for m in ('torch', 'torchvision') if m in sys.modules); print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
