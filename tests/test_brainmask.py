"""Brain mask on phantom heads: keeps bleeds against the inner table, drops the scalp."""

import numpy as np
import pytest

from hemocam.brainmask import brain_mask
from hemocam.phantom import make_scan
from hemocam.phantom.anatomy import INTRACRANIAL, T
from hemocam.phantom.scan import apply_scanner, axial_affine, render_grid, sample_phantom

SCALP = [T["skin"], T["fat"], T["muscle"]]


def _check(hu, code, tissue, spacing):
    m = brain_mask(hu, spacing)
    assert m.dtype == np.uint8 and m.shape == hu.shape and set(np.unique(m)) <= {0, 1}
    m = m.astype(bool)
    hem = code > 0
    scalp = np.isin(tissue, SCALP)
    ic = np.isin(tissue, INTRACRANIAL)
    assert hem.sum() > 100 and scalp.sum() > 1000
    assert m[hem].mean() > 0.95, f"bleed coverage {m[hem].mean():.4f}"
    assert 1 - m[scalp].mean() > 0.99, f"scalp exclusion {1 - m[scalp].mean():.5f}"
    assert m[ic].mean() > 0.97
    assert (m & ~ic).sum() / m.sum() < 0.05  # only the partial-volume rim at the inner table


@pytest.mark.parametrize("seed,subtypes", [(3, ["subdural", "epidural"]), (11, ["epidural", "subarachnoid"])])
def test_extra_axial_bleeds_kept_scalp_removed(seed, subtypes):
    s = make_scan(seed, matrix=128, n_slices=28, subtypes=subtypes)
    _check(s["hu"], s["mask"], s["tissue"], s["spacing"])


def test_the_orbits_stay_out():
    # the eroded brain grows back as far as the erosion took; when each step could also move one
    # slice, it went down through the orbital roof and took in 47 % of these globes' voxels
    globe = inside = 0
    for seed in (1, 2, 3, 5, 8):
        s = make_scan(seed, matrix=128, n_slices=28, subtypes=["subdural"])
        g = s["tissue"] == T["globe"]
        m = brain_mask(s["hu"], s["spacing"]).astype(bool)
        globe, inside = globe + g.sum(), inside + (m & g).sum()
    assert globe > 1000 and inside / globe < 0.15, f"{inside} of {globe} globe voxels in the mask"


def test_gantry_tilt_corrected_grid():
    # a tilt-corrected series is a sheared grid: rows shift with the slice index
    ph = sample_phantom(5, 28, 5.0, subtypes=["subdural", "intraparenchymal"])
    aff = axial_affine(ph, 128)
    d = ph.scanner.fov_mm / 128
    shear = np.eye(4)
    shear[1, 2] = np.tan(np.radians(20)) * 5.0 / d
    hu, code, tissue = render_grid(ph, aff @ shear, (128, 128, 28))
    hu = apply_scanner(hu, ph.scanner, np.random.default_rng(0))
    _check(hu, code, tissue, (d, d, 5.0))


def test_no_head_gives_empty_mask():
    air = np.full((32, 32, 4), -1000, np.int16)
    assert brain_mask(air, (1, 1, 5)).sum() == 0
    with pytest.raises(ValueError):
        brain_mask(np.zeros((4, 4)), (1, 1))
