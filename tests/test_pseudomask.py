from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from hemocam import pseudomask as pm
from hemocam.io import InputError, load_nifti, read_tsv, save_nifti, write_tsv

CFG = {"cam_threshold": 0.3, "hu_min": 45, "hu_max": 95, "refine": "kmeans", "n_clusters": 3, "cam_mode": "region",
       "min_component_ml": 0.005, "prob_threshold": 0.5, "fill_holes": True,
       "bone_margin_mm": 1.0, "bone_regrow_mm": 1.0}  # the phantom's voxels are 1 mm: one voxel each


def phantom(shape=(24, 24, 6)):
    """Brain at 30 HU with CSF, a 70-HU bleed on slices 2-3, bone at 1000 HU around it."""
    hu = np.full(shape, -1000, np.int16)
    brain = np.zeros(shape, np.uint8)
    brain[3:21, 3:21, :] = 1
    hu[2:22, 2:22, :] = 1000  # skull
    hu[3:21, 3:21, :] = 30
    hu[5:8, 12:18, :] = 5  # CSF
    hu[6:12, 6:12, 2:4] = 70  # bleed, 72 voxels
    cam = np.zeros(shape, np.float32)
    cam[4:16, 4:16, :] = 0.9  # where the classifier looked (larger than the bleed)
    return hu, cam, brain


def test_kmeans_keeps_hyperdense_cluster_only():
    hu, cam, brain = phantom()
    m = pm.build_pseudomask(hu, cam, brain, [2, 3], CFG)
    expect = np.zeros(hu.shape, bool)
    expect[6:12, 6:12, 2:4] = True
    assert (m == expect).all()


@pytest.mark.parametrize("refine", ["otsu", "none"])
def test_other_refinements(refine):
    hu, cam, brain = phantom()
    m = pm.build_pseudomask(hu, cam, brain, [2, 3], {**CFG, "refine": refine})
    assert m[6:12, 6:12, 2:4].all() and m.sum() == 72  # the HU window alone isolates the bleed here


def test_label_gating():
    hu, cam, brain = phantom()
    assert pm.build_pseudomask(hu, cam, brain, [3], CFG).sum() == 36
    assert not pm.build_pseudomask(hu, cam, brain, [], CFG).any()
    assert not pm.build_pseudomask(hu, cam, brain, [0, 5], CFG).any()


def test_brain_restriction_and_hu_window():
    hu, cam, brain = phantom()
    cam[:, :, :] = 1.0
    hu[0:2, 0:6, 2:4] = 70  # blood-like HU outside the brain mask (scalp haematoma)
    hu[14:18, 14:18, 2:4] = 150  # calcification inside the brain: above hu_max
    m = pm.build_pseudomask(hu, cam, brain, [2, 3], {**CFG, "refine": "none"})
    assert not m[0:2].any()
    assert not m[14:18, 14:18].any()
    assert m[6:12, 6:12, 2:4].all()


def test_cam_threshold_limits_the_region():
    hu, cam, brain = phantom()
    cam[:, :, :] = 0.0
    cam[6:9, 6:12, :] = 0.8  # the classifier only looked at half of the bleed
    m = pm.build_pseudomask(hu, cam, brain, [2, 3], CFG)
    assert m.sum() == 36 and m[6:9, 6:12, 2:4].all()
    assert not pm.build_pseudomask(hu, cam * 0.3, brain, [2, 3], CFG).any()


def test_small_components_removed_and_holes_filled():
    hu, cam, brain = phantom()
    hu[14, 14, 2] = 70  # isolated single voxel in the CAM region
    hu[8:10, 8:10, 2] = 30  # a hole inside the bleed (heterogeneous clot)
    m = pm.build_pseudomask(hu, cam, brain, [2, 3], CFG)
    assert not m[14, 14, 2]
    assert m[8:10, 8:10, 2].all()
    m2 = pm.build_pseudomask(hu, cam, brain, [2, 3], {**CFG, "fill_holes": False})
    assert not m2[8:10, 8:10, 2].any()
    assert not pm.build_pseudomask(hu, cam, brain, [2, 3], {**CFG, "min_component_ml": 0.1}).any()


def test_helpers():
    assert pm.kmeans_1d([0, 0, 1, 10, 11, 10], 2) == pytest.approx([1 / 3, 31 / 3])
    t = pm.otsu_threshold(np.r_[np.full(100, 30.0), np.full(50, 70.0)])
    assert 30 <= t < 70
    with pytest.raises(ValueError):
        pm.build_pseudomask(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), np.zeros((2, 2, 2)), [])
    with pytest.raises(ValueError, match="refine"):
        pm.build_pseudomask(*phantom(), [2], {"refine": "watershed"})


def write_results(R: Path, sid="s1", labelled=True):
    hu, cam, brain = phantom()
    aff = np.diag([0.5, 0.5, 5.0, 1.0])
    save_nifti(hu, aff, R / "nifti" / f"{sid}.nii.gz", dtype=np.int16)
    save_nifti(cam, aff, R / "cam" / f"{sid}.nii.gz", dtype=np.float32)
    save_nifti(brain, aff, R / "brainmask" / f"{sid}.nii.gz", dtype=np.uint8)
    gt = np.ones(hu.shape, np.uint8)  # a ground truth that would change the answer if read
    save_nifti(gt, aff, R / "masks" / f"{sid}.nii.gz", dtype=np.uint8)
    slices = np.arange(hu.shape[2])
    if labelled:
        lab = pd.DataFrame({"slice": slices, "any": [0, 0, 1, 1, 0, 0]})
        for c in ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"):
            lab[c] = 0
        write_tsv(lab, R / "labels" / f"{sid}.tsv")
    probs = pd.DataFrame({"slice": slices, "any": [0.1, 0.2, 0.4, 0.9, 0.1, 0.0]})
    write_tsv(probs, R / "classifier" / "slices" / f"{sid}.tsv")
    return aff


def test_pseudomask_scan_files_and_never_reads_ground_truth(tmp_path, monkeypatch):
    aff = write_results(tmp_path)
    opened = []
    real_load = nib.load
    monkeypatch.setattr(nib, "load", lambda p, *a, **k: (opened.append(str(p)), real_load(p, *a, **k))[1])
    real_read = pd.read_csv
    monkeypatch.setattr(pd, "read_csv", lambda p, *a, **k: (opened.append(str(p)), real_read(p, *a, **k))[1])
    info = pm.pseudomask_scan("s1", tmp_path, CFG, labelled=True)
    assert not [p for p in opened if "masks" in Path(p).parts], opened
    assert any("labels" in p for p in opened) and not any("classifier" in p for p in opened)
    arr, a2 = load_nifti(tmp_path / "pseudomask" / "s1.nii.gz")
    assert arr.dtype == np.uint8 and np.allclose(a2, aff)
    assert arr.sum() == 72 and info == {"positive_slices": 2, "pseudomask_voxels": 72}


def test_pseudomask_unlabelled_uses_probabilities(tmp_path):
    write_results(tmp_path, labelled=False)
    pm.pseudomask_scan("s1", tmp_path, CFG, labelled=False)
    arr, _ = load_nifti(tmp_path / "pseudomask" / "s1.nii.gz")
    assert arr[:, :, 3].sum() == 36 and arr[:, :, 2].sum() == 0  # prob 0.4 < 0.5 on slice 2


def test_pseudomask_batch_rejects_a_scan_without_labels(tmp_path):
    write_results(tmp_path, "good")
    write_results(tmp_path, "nolab", labelled=False)
    df = pm.pseudomask_batch(["good", "nolab"], tmp_path, CFG, True, tmp_path / "manifest.tsv")
    assert df.set_index("scan_id").loc["good", "status"] == "ok"
    row = df.set_index("scan_id").loc["nolab"]
    assert row["status"] == "rejected" and "labels" in row["reason"] and "missing" in row["reason"]
    assert read_tsv(tmp_path / "manifest.tsv").shape[0] == 2
    with pytest.raises(InputError, match="missing"):
        pm.pseudomask_scan("nolab", tmp_path, CFG, labelled=True)


def test_refinement_ignores_bone_inside_the_region():
    hu, cam, brain = phantom()
    hu[3, 3:21, :] = 600  # partial-volume rim of the inner table, inside the brain mask
    cam[:, :, :] = 0.9
    m = pm.build_pseudomask(hu, cam, brain, [2, 3], {**CFG, "hu_max": 95})
    assert m[6:12, 6:12, 2:4].all() and m.sum() == 72  # bone would have been the "hyperdense" cluster


def test_component_mode_keeps_whole_bleeds_the_cam_touches():
    hu, cam, brain = phantom()
    hu[14:18, 14:18, 2:4] = 75  # a second bleed the classifier did not look at
    cam[:, :, :] = 0.0
    cam[6:8, 6:8, 2] = 0.8  # the CAM only touches a corner of the first bleed
    region = pm.build_pseudomask(hu, cam, brain, [2, 3], CFG)
    comp = pm.build_pseudomask(hu, cam, brain, [2, 3], {**CFG, "cam_mode": "component"})
    assert region.sum() == 0  # 4 voxels (mL) inside the region: below min_component_ml
    assert comp[6:12, 6:12, 2:4].all() and comp.sum() == 72  # the whole bleed, not the other one
    with pytest.raises(ValueError, match="cam_mode"):
        pm.build_pseudomask(hu, cam, brain, [2], {**CFG, "cam_mode": "blob"})


def test_the_rim_along_the_skull_is_dropped():
    """The blurred inner table reads blood-like HU in the voxel next to the bone on every slice;
    a collection against the skull keeps the voxels that are not next to the bone."""
    hu, cam, brain = phantom()
    cam[:, :, :] = 0.9
    hu[3, 3:21, :] = 80  # partial-volume rim along the skull (row 2 is bone), all slices
    hu[3:7, 14:20, 2:4] = 70  # a collection against the skull, 4 voxels thick
    hu[6:12, 6:12, 2:4] = 30  # no other bleed
    m = pm.build_pseudomask(hu, cam, brain, [2, 3], {**CFG, "bone_regrow_mm": 0})
    # rows 4-6 (not next to bone) of columns 14-19; the rim voxels of the collection's slices
    # (row 3) go with the rest of the rim (without the regrowth of the next test)
    assert m[4:7, 14:20, 2:4].all() and m.sum() == 3 * 6 * 2
    kept = pm.build_pseudomask(hu, cam, brain, [2, 3], {**CFG, "bone_margin_mm": 0})
    assert kept[3, 3:21, 2:4].all() and kept.sum() > m.sum()
    # bone is what the margin is measured from: below bone_hu nothing is dropped
    assert pm.build_pseudomask(hu, cam, brain, [2, 3], {**CFG, "bone_hu": 1500}).sum() == kept.sum()


def test_a_collection_against_the_skull_takes_its_rim_back():
    """bone_regrow_mm: the margin voxels a surviving component touches come back (its outer layer),
    the rest of the rim along the skull stays out."""
    hu, cam, brain = phantom()
    cam[:, :, :] = 0.9
    hu[3, 3:21, :] = 80  # partial-volume rim along the skull, all slices
    hu[3:7, 14:20, 2:4] = 70  # a collection against the skull
    hu[6:12, 6:12, 2:4] = 30
    m = pm.build_pseudomask(hu, cam, brain, [2, 3], CFG)
    # the collection with its outer row; one in-plane step (4-connected) reaches no further rim voxel
    assert m[3:7, 14:20, 2:4].all() and m.sum() == 4 * 6 * 2
    two = pm.build_pseudomask(hu, cam, brain, [2, 3], {**CFG, "bone_regrow_mm": 2.0})
    assert two[3, [13, 20], 2:4].all() and two.sum() == 4 * 6 * 2 + 2 * 2
    assert not m[:, :, [0, 1, 4, 5]].any()  # unlabelled slices: never
    # a rim with nothing behind it stays out
    hu[3:7, 14:20, 2:4] = 30
    hu[3, 14:20, 2:4] = 80
    assert pm.build_pseudomask(hu, cam, brain, [2, 3], CFG).sum() == 0


def _against_the_skull():
    hu, cam, brain = phantom()
    cam[:, :, :] = 0.9
    hu[3, 3:21, :] = 80  # partial-volume rim along the skull, all slices
    hu[3:7, 14:20, 2:4] = 70  # a collection against the skull
    hu[6:12, 6:12, 2:4] = 30
    return hu, cam, brain


def test_the_bone_margin_is_measured_in_millimetres():
    """The rim is the scanner's blur, so the margin is a distance: the same head at half the pixel
    size loses the same millimetres (two voxels, not one), and the regrowth crosses them again."""
    hu, cam, brain = _against_the_skull()
    fine = [np.repeat(np.repeat(a, 2, 0), 2, 1) for a in (hu, cam, brain)]
    up = lambda m: np.repeat(np.repeat(m, 2, 0), 2, 1)  # noqa: E731
    cfg = {**CFG, "bone_regrow_mm": 0}
    coarse = pm.build_pseudomask(hu, cam, brain, [2, 3], cfg, spacing=(1.0, 1.0, 1.0))
    half = pm.build_pseudomask(*fine, [2, 3], cfg, spacing=(0.5, 0.5, 1.0))
    assert coarse.sum() == 3 * 6 * 2 and np.array_equal(half, up(coarse))
    # counted in voxels, one voxel of 0.5 mm would leave half the rim in
    thin = pm.build_pseudomask(*fine, [2, 3], {**cfg, "bone_margin_mm": 0.5}, spacing=(0.5, 0.5, 1.0))
    assert thin[7, 7:41, 2:4].all() and thin.sum() > half.sum()
    # 1 mm of regrowth: one step of 1 mm, two of 0.5 mm (the second also one voxel along the rim)
    coarse = pm.build_pseudomask(hu, cam, brain, [2, 3], CFG, spacing=(1.0, 1.0, 1.0))
    half = pm.build_pseudomask(*fine, [2, 3], CFG, spacing=(0.5, 0.5, 1.0))
    assert coarse[3:7, 14:20, 2:4].all() and coarse.sum() == 4 * 6 * 2
    assert (half >= up(coarse)).all() and half[7, [27, 40], 2:4].all() and half.sum() == up(coarse).sum() + 2 * 2
    # the margin is a Euclidean distance within the slice: diagonal neighbours are further away
    bone = np.zeros((5, 5, 1), np.int16)
    bone[2, 2, 0] = 1000
    ring = pm.bone_margin(bone, 200, 1.0, (1.0, 1.0))[:, :, 0]
    assert ring.sum() == 4 and not ring[2, 2] and ring[1, 2] and not ring[1, 1]
    assert pm.bone_margin(bone, 200, 1.5, (1.0, 1.0)).sum() == 8


def test_the_old_voxel_keys_are_refused_with_their_new_names():
    hu, cam, brain = _against_the_skull()
    with pytest.raises(ValueError, match="bone_margin_mm"):
        pm.build_pseudomask(hu, cam, brain, [2, 3], {**CFG, "bone_margin": 1})
    with pytest.raises(ValueError, match="pseudomask.min_component_ml"):
        pm.build_pseudomask(hu, cam, brain, [2, 3], {**CFG, "min_component_voxels": 20})
    with pytest.raises(ValueError, match="three axes"):
        pm.build_pseudomask(hu, cam, brain, [2, 3], CFG, spacing=(1.0, 1.0))
