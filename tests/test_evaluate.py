import math

import numpy as np
import pandas as pd
import pytest

from hemocam.evaluate import COLUMNS, evaluate
from hemocam.io import read_tsv, save_nifti, write_tsv

AFF = np.diag([1.0, 1.0, 2.0, 1.0])
SHAPE = (10, 10, 4)
CFG = {"evaluate": {"cam_threshold": 0.5, "hu_baseline_min": 50, "hu_baseline_max": 90, "min_component_ml": 0.004}}


def put(R, folder, sid, arr, dtype):
    save_nifti(arr, AFF, R / folder / f"{sid}.nii.gz", dtype=dtype)


@pytest.fixture
def results(tmp_path):
    R = tmp_path
    brain = np.zeros(SHAPE, np.uint8)
    brain[1:9, 1:9, :] = 1
    # s1: positive, a 9-voxel bleed on slice 1
    gt = np.zeros(SHAPE, np.uint8)
    gt[2:5, 2:5, 1] = 1
    hu = np.where(brain > 0, 20, -1000).astype(np.int16)
    hu[gt > 0] = 70
    hu[7, 7, 2] = 70  # a lone hyperdense voxel (0.002 mL): removed by min_component_ml
    hu[0, 0, 0] = 70  # outside the brain
    cam = np.where(gt > 0, 0.6, 0.4).astype(np.float32)
    cam[0, :, :] = 0.9  # outside the brain
    seg = np.zeros(SHAPE, np.uint8)
    seg[2:5, 2:4, 1] = 1  # 6 of the 9 voxels
    ub = gt.copy()
    for folder, arr, dt in (("nifti", hu, np.int16), ("brainmask", brain, np.uint8), ("masks", gt, np.uint8),
                            ("cam", cam, np.float32), ("pseudomask", np.zeros(SHAPE), np.uint8),
                            ("segmentation", seg, np.uint8), ("segmentation_gt", ub, np.uint8),
                            ("pseudomask_r2", seg, np.uint8), ("pseudomask_r1", gt, np.uint8)):
        put(R, folder, "s1", arr, dt)
    # s2: negative; everything empty except a CAM below threshold
    hu2 = np.where(brain > 0, 20, -1000).astype(np.int16)
    for folder, arr, dt in (("nifti", hu2, np.int16), ("brainmask", brain, np.uint8), ("masks", np.zeros(SHAPE), np.uint8),
                            ("cam", np.full(SHAPE, 0.3), np.float32), ("segmentation", np.zeros(SHAPE), np.uint8)):
        put(R, folder, "s2", arr, dt)
    # s3: no ground truth -> not scored; s4: rejected upstream
    put(R, "nifti", "s3", hu2, np.int16)
    scans = pd.DataFrame({"scan_id": ["s1", "s2", "s3", "s4"], "status": ["ok", "ok", "ok", "rejected"],
                          "reason": ["", "", "", "ingest: bad"], "split": ["test", "test", "train", ""]})
    write_tsv(scans, R / "scans.tsv")
    return R


def test_evaluate_table_and_summary(results):
    R = results
    table = evaluate(R / "scans.tsv", R, CFG, R / "metrics" / "segmentation.tsv", R / "metrics" / "summary.tsv",
                     self_training_target="pseudomask_r2")
    t = read_tsv(R / "metrics" / "segmentation.tsv")
    assert list(t.columns) == COLUMNS
    assert set(t["scan_id"]) == {"s1", "s2"}
    r = t[t["scan_id"] == "s1"].set_index("method")
    assert set(r.index) == {"cam", "pseudomask", "self_training", "segmenter", "hu_threshold", "upper_bound"}
    # the named round's targets (pseudomask_r2), not another round's left in the results
    assert r.loc["self_training", "dice"] == pytest.approx(2 * 6 / 15)
    assert r.loc["hu_threshold", "dice"] == pytest.approx(1.0)
    assert r.loc["cam", "dice"] == pytest.approx(1.0)
    assert r.loc["segmenter", "dice"] == pytest.approx(2 * 6 / 15)
    assert r.loc["pseudomask", "dice"] == 0.0 and math.isnan(r.loc["pseudomask", "hd95_mm"])
    assert r.loc["upper_bound", "dice"] == 1.0
    assert r.loc["segmenter", "vol_true_ml"] == pytest.approx(9 * 2 / 1000)
    assert r.loc["segmenter", "vol_pred_ml"] == pytest.approx(6 * 2 / 1000)
    assert r.loc["segmenter", "rvd"] == pytest.approx(3 / 9)
    assert r.loc["segmenter", "hd95_mm"] == pytest.approx(1.0)
    assert r.loc["segmenter", "dice2d"] == pytest.approx(0.8)
    assert bool(r.loc["segmenter", "positive"]) and (r["split"] == "test").all()
    s2 = t[t["scan_id"] == "s2"].set_index("method")
    assert set(s2.index) == {"cam", "segmenter", "hu_threshold"}  # no pseudo-mask / upper bound files
    assert (s2["dice"] == 1.0).all() and not s2["positive"].any()
    assert len(table) == len(t)

    s = read_tsv(R / "metrics" / "summary.tsv")
    row = s[(s["split"] == "test") & (s["method"] == "segmenter")].iloc[0]
    assert row["n_scans"] == 2 and row["n_positive"] == 1
    assert row["dice_pos"] == pytest.approx(0.8) and row["dice_all"] == pytest.approx(0.9)
    assert row["specificity_scans"] == 1.0
    assert row["vol_abs_err_ml_pos"] == pytest.approx(3 * 2 / 1000)
    assert row["n_hd95_pos"] == 1
    # the pseudo-mask marks nothing on the positive scan: no HD95, and the summary says so
    pm = s[(s["split"] == "test") & (s["method"] == "pseudomask")].iloc[0]
    assert pm["n_positive"] == 1 and pm["n_hd95_pos"] == 0 and math.isnan(pm["hd95_mm_pos"])
    assert set(s["split"]) == {"test", "all"}
    assert list(s[s["split"] == "test"]["method"]) == ["cam", "pseudomask", "self_training", "segmenter", "hu_threshold",
                                                      "upper_bound"]

    # without self-training there is no such method, whatever pseudomask_r{k} folders lie about
    evaluate(R / "scans.tsv", R, CFG, R / "t.tsv", R / "s.tsv")
    assert "self_training" not in set(read_tsv(R / "t.tsv")["method"])


def test_evaluate_without_ground_truth(tmp_path):
    scans = pd.DataFrame({"scan_id": ["a"], "status": ["ok"], "reason": [""], "split": ["test"]})
    write_tsv(scans, tmp_path / "scans.tsv")
    evaluate(tmp_path / "scans.tsv", tmp_path, CFG, tmp_path / "t.tsv", tmp_path / "s.tsv")
    assert read_tsv(tmp_path / "t.tsv").empty
    assert (tmp_path / "s.tsv").exists()


def test_the_old_voxel_count_is_refused_not_skipped_scan_by_scan(results):
    """Per-scan errors are logged and skipped; a renamed key must stop the whole evaluation."""
    R = results
    old = {"evaluate": {**CFG["evaluate"], "min_component_voxels": 2}}
    with pytest.raises(ValueError, match="evaluate.min_component_voxels is now evaluate.min_component_ml"):
        evaluate(R / "scans.tsv", R, old, R / "t.tsv", R / "s.tsv")
    assert not (R / "t.tsv").exists()
