import numpy as np
import pytest

from hemocam.windows import apply_windows

WINDOWS = [{"name": "brain", "center": 40, "width": 80}, {"name": "subdural", "center": 80, "width": 200}]


def test_known_values_uint8():
    hu = np.array([-1024, 0, 40, 80, 100, 3000], dtype=np.int16)
    out = apply_windows(hu, WINDOWS)
    assert out.dtype == np.uint8 and out.shape == (2, 6)
    # brain 0..80 HU -> 0..255; subdural -20..180 HU
    assert out[0].tolist() == [0, 0, 128, 255, 255, 255]
    assert out[1].tolist() == [0, round(20 / 200 * 255), round(60 / 200 * 255), round(100 / 200 * 255),
                               round(120 / 200 * 255), 255]


def test_lut_and_float_paths_agree_and_axis():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1100, 1500, size=(7, 5, 3)).astype(np.int16)
    lut = apply_windows(hu, WINDOWS, axis=-1)
    arith = apply_windows(hu.astype(np.float32), WINDOWS, axis=-1)
    assert lut.shape == (7, 5, 3, 2)
    assert np.abs(lut.astype(int) - arith.astype(int)).max() <= 1
    f = apply_windows(hu, WINDOWS, dtype=np.float32)
    assert f.dtype == np.float32 and f.min() >= 0 and f.max() <= 1
    assert np.allclose(f[0], (np.clip(hu, 0, 80)) / 80.0, atol=1e-6)


def test_bad_window():
    with pytest.raises(ValueError):
        apply_windows(np.zeros(3), [{"name": "x", "center": 0, "width": 0}])
