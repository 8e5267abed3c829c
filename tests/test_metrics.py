import math

import numpy as np
import pytest

from hemocam import metrics


def vol(shape=(8, 8, 6)):
    return np.zeros(shape, dtype=np.uint8)


def test_dice3d_hand_computed():
    p, g = vol(), vol()
    p[1:3, 1:3, 0] = 1  # 4 voxels
    g[2:4, 1:3, 0] = 1  # 4 voxels, 2 shared
    g[5, 5, 5] = 1
    g[6, 6, 5] = 1  # 6 voxels in all
    assert metrics.dice3d(p, g) == pytest.approx(2 * 2 / 10)


def test_dice3d_empty_cases():
    assert metrics.dice3d(vol(), vol()) == 1.0
    g = vol()
    g[0, 0, 0] = 1
    assert metrics.dice3d(vol(), g) == 0.0
    assert metrics.dice3d(g, vol()) == 0.0
    with pytest.raises(ValueError):
        metrics.dice3d(vol((2, 2, 2)), vol((2, 2, 3)))


def test_hd95_single_voxels_uses_spacing():
    p, g = vol(), vol()
    p[2, 2, 1] = 1
    g[2, 2, 4] = 1
    assert metrics.hd95(p, g, (1.0, 1.0, 2.0)) == pytest.approx(6.0)
    p2 = vol()
    p2[5, 2, 4] = 1  # 3 voxels along x at 0.5 mm
    assert metrics.hd95(p2, g, (0.5, 0.7, 5.0)) == pytest.approx(1.5)


def test_hd95_is_symmetric_max_of_directed_percentiles():
    p, g = vol((16, 4, 4)), vol((16, 4, 4))
    p[1, 1, 1] = 1
    g[1, 1, 1] = 1
    g[11, 1, 1] = 1
    # pred->gt distances [0]; gt->pred distances [0, 10] -> 95th percentile 9.5 (linear)
    assert metrics.hd95(p, g, (1, 1, 1)) == pytest.approx(9.5)
    assert metrics.hd95(g, p, (1, 1, 1)) == pytest.approx(9.5)


def test_hd95_uses_surface_not_interior():
    p = vol((12, 12, 12))
    p[2:9, 2:9, 2:9] = 1
    # identical masks: every surface voxel is at distance 0
    assert metrics.hd95(p, p, (1, 1, 1)) == 0.0
    g = vol((12, 12, 12))
    g[3:8, 3:8, 3:8] = 1  # one voxel thinner on every side
    # GT->pred: every inner surface voxel is 1 from the outer surface. pred->GT: of the 218 outer
    # surface voxels, 150 face voxels are at 1, 60 edge voxels at sqrt(2), 8 corners at sqrt(3);
    # the 95th percentile (rank 206.15 of 0..217) falls among the edges
    assert np.sort(metrics.surface_distances(p, g, (1, 1, 1))).tolist() == pytest.approx([1.0] * 150 + [2**0.5] * 60 + [3**0.5] * 8)
    assert metrics.hd95(p, g, (1, 1, 1)) == pytest.approx(2**0.5)


def test_hd95_on_the_masks_box_equals_the_whole_grid():
    rng = np.random.default_rng(0)
    for shape, sl in (((40, 50, 12), (slice(10, 20), slice(5, 30), slice(3, 8))),
                      ((30, 30, 6), (slice(0, 9), slice(20, 30), slice(0, 6)))):  # touches the grid's edges
        p, g = np.zeros(shape, bool), np.zeros(shape, bool)
        p[sl] = rng.random(p[sl].shape) > 0.4
        g[sl] = rng.random(g[sl].shape) > 0.5
        spacing = (0.5, 0.7, 5.0)
        whole = max(np.percentile(metrics.surface_distances(p, g, spacing), 95),
                    np.percentile(metrics.surface_distances(g, p, spacing), 95))
        assert metrics.hd95(p, g, spacing) == pytest.approx(whole)


def test_hd95_empty_is_nan():
    g = vol()
    g[1, 1, 1] = 1
    assert math.isnan(metrics.hd95(vol(), g, (1, 1, 1)))
    assert math.isnan(metrics.hd95(g, vol(), (1, 1, 1)))
    assert math.isnan(metrics.hd95(vol(), vol(), (1, 1, 1)))


def test_volume_and_rvd():
    p, g = vol(), vol()
    p.reshape(-1)[:10] = 1
    g.reshape(-1)[:8] = 1
    assert metrics.volume_ml(p, (0.5, 0.5, 5.0)) == pytest.approx(10 * 1.25 / 1000)
    assert metrics.rvd(p, g) == pytest.approx(2 / 8)
    assert metrics.rvd(g, p) == pytest.approx(2 / 10)
    assert math.isnan(metrics.rvd(p, vol()))


def test_dice2d_over_positive_slices_only():
    p, g = vol(), vol()
    g[0:2, 0, 0] = 1
    p[1:3, 0, 0] = 1  # slice 0: dice 2*1/4 = 0.5
    p[4, 4, 1] = 1  # slice 1: GT empty -> ignored despite a false positive
    g[3, 3, 2] = 1
    p[3, 3, 2] = 1  # slice 2: dice 1
    assert metrics.dice2d(p, g) == pytest.approx(0.75)
    assert math.isnan(metrics.dice2d(p, vol()))


def test_score_volume_row():
    p, g = vol(), vol()
    row = metrics.score_volume(p, g, (1, 1, 1))
    assert row["positive"] is False and row["dice"] == 1.0
    assert math.isnan(row["hd95_mm"]) and math.isnan(row["rvd"]) and math.isnan(row["dice2d"])
    assert row["vol_pred_ml"] == 0.0


def test_remove_small_components():
    m = vol((10, 10, 10))
    m[0:3, 0:3, 0:3] = 1  # 27 voxels
    m[6, 6, 6] = 1
    m[6, 7, 6] = 1  # 2 voxels
    m[8, 8, 8] = 1
    m[9, 9, 9] = 1  # only diagonal neighbours: two 1-voxel components under face connectivity
    out = metrics.remove_small_components(m, 0.003, (1, 1, 1))  # 3 voxels of 1 mm3
    assert out.sum() == 27 and out[1, 1, 1]
    assert metrics.remove_small_components(m, 0.002, (1, 1, 1)).sum() == 29  # kept at exactly 2 voxels
    assert metrics.remove_small_components(m, 0, (1, 1, 1)).sum() == m.sum()


def test_small_components_are_a_volume_whatever_the_grid():
    """The same 0.1 mL leaves a 27-voxel component of 4 mm3 voxels (0.108 mL) and removes it at 1 mm3."""
    m = vol((10, 10, 10))
    m[0:3, 0:3, 0:3] = 1
    assert metrics.remove_small_components(m, 0.1, (2.0, 2.0, 1.0)).sum() == 27
    assert metrics.remove_small_components(m, 0.1, (1.0, 1.0, 1.0)).sum() == 0
    # 0.35 mL on the demo's largest voxels (1.95 x 1.95 x 5 mm) and a 0.49 x 0.49 x 5 mm head CT
    assert metrics.remove_small_components(m, 0.35, (1.95, 1.95, 5.0)).sum() == 27  # 0.51 mL
    assert metrics.remove_small_components(m, 0.35, (0.49, 0.49, 5.0)).sum() == 0  # 0.03 mL
