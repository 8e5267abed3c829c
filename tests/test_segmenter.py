import logging
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from hemocam import segmenter as seg
from hemocam.io import load_nifti, read_tsv, save_nifti, write_tsv
from hemocam.phantom import write_nifti_cohort
from hemocam.preprocess import cache_paths, load_cache, preprocess_batch
from hemocam.settings import SEGMENTER_OUTPUT_KEYS, self_training_target

WINDOWS = [{"name": "brain", "center": 40, "width": 80}, {"name": "subdural", "center": 80, "width": 200}]
SEG = {"encoder": "plain", "base_channels": 4, "context_slices": 1, "epochs": 2, "batch_size": 4, "lr": 1e-3,
       "patience": 5, "num_workers": 0, "amp": True, "samples_per_epoch": 8, "min_component_ml": 0}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    R = tmp_path_factory.mktemp("seg") / "R"
    scans = write_nifti_cohort(R, 5, matrix=64, n_slices=16, seed=3)
    preprocess_batch(list(scans["scan_id"]), R, WINDOWS, 32, R / "preprocess.tsv")
    # stand-in pseudo-masks: the test is about the plumbing, not their quality
    for sid in scans["scan_id"]:
        (R / "pseudomask").mkdir(exist_ok=True)
        shutil.copy(R / "masks" / f"{sid}.nii.gz", R / "pseudomask" / f"{sid}.nii.gz")
    return R, scans


def count_training_batches(monkeypatch, real=None) -> dict:
    """Count the training batches ``train_segmenter`` runs from now on (``["n"]``)."""
    real = real or seg._loss_fn
    counted = {"n": 0}

    def counting(dice_weight):
        inner = real(dice_weight)

        def loss_fn(model, batch, device):
            counted["n"] += 1
            return inner(model, batch, device)

        return loss_fn

    monkeypatch.setattr(seg, "_loss_fn", counting)
    return counted


def test_context_stacks():
    cache = np.arange(4 * 2 * 3 * 3, dtype=np.uint8).reshape(4, 2, 3, 3)
    s = seg.context_stack(cache, 0, 1)
    assert s.shape == (6, 3, 3)
    assert (s[0:2] == cache[0]).all() and (s[2:4] == cache[0]).all() and (s[4:6] == cache[1]).all()
    allst = seg.all_stacks(cache, 1)
    assert allst.shape == (4, 6, 3, 3)
    for z in range(4):
        assert (allst[z] == seg.context_stack(cache, z, 1)).all()
    assert (seg.all_stacks(cache, 0)[:, :] == cache).all()


def test_augment_pair_keeps_image_and_target_aligned():
    x = torch.zeros(3, 32, 32)
    y = torch.zeros(1, 32, 32)
    x[:, 8:14, 4:10] = 1.0
    y[:, 8:14, 4:10] = 1.0
    cfg = {"rotate_deg": 10, "scale": 0.1, "shift": 0.06, "intensity": 0.0, "noise": 0.0}
    for s in range(5):
        xa, ya = seg.augment_pair(x, y, np.random.default_rng(s), cfg)
        assert xa.shape == x.shape and ya.shape == y.shape
        assert set(ya.unique().tolist()) <= {0.0, 1.0}
        assert ((xa[0] > 0.5) == (ya[0] > 0.5)).float().mean() > 0.97
    a1 = seg.augment_pair(x, y, np.random.default_rng(7), {**cfg, "noise": 0.02})
    a2 = seg.augment_pair(x, y, np.random.default_rng(7), {**cfg, "noise": 0.02})
    assert torch.equal(a1[0], a2[0])  # the sample seed fixes the augmentation


def test_dice_bce_loss():
    y = torch.zeros(2, 1, 8, 8)
    y[0, 0, 2:5, 2:5] = 1
    good = torch.where(y > 0, 10.0, -10.0)
    assert seg.dice_bce_loss(good, y) < 0.01
    assert seg.dice_bce_loss(-good, y) > 1.5


def test_train_one_epoch_resume_and_segment(cohort, tmp_path, monkeypatch):
    R, scans = cohort
    cfg = {"seed": 1, "segmenter": SEG}
    bundle, hist = R / "segmenter" / "model.pt", R / "segmenter" / "history.tsv"
    # run 1 is killed at the first training batch of epoch 2, after epoch 1's checkpoint
    real = seg._loss_fn
    calls = {"n": 0}

    def killing(dice_weight):
        inner = real(dice_weight)

        def loss_fn(model, batch, device):
            calls["n"] += 1
            if calls["n"] > 2:  # 8 draws / batch 4 = 2 training batches per epoch
                raise KeyboardInterrupt("simulated kill")
            return inner(model, batch, device)

        return loss_fn

    monkeypatch.setattr(seg, "_loss_fn", killing)
    with pytest.raises(KeyboardInterrupt):
        seg.train_segmenter(cfg, R / "scans.tsv", R, "pseudomask", bundle, hist)
    assert not bundle.exists()
    ck = torch.load(R / "segmenter" / "checkpoints" / "last.pt", weights_only=False)
    assert ck["epoch"] == 1
    monkeypatch.setattr(seg, "_loss_fn", real)
    # run 2 resumes after epoch 1
    res = seg.train_segmenter(cfg, R / "scans.tsv", R, "pseudomask", bundle, hist)
    h = read_tsv(hist)
    assert list(h["epoch"]) == [1, 2]
    assert h["train_loss"].iloc[0] == pytest.approx(ck["history"][0]["train_loss"])
    assert {"val_dice_pos", "val_loss"} <= set(h.columns)
    b = torch.load(bundle, weights_only=True)
    assert b["kind"] == "unet" and b["context"] == 1 and b["size"] == 32 and b["target"] == "pseudomask"
    assert b["model"]["in_channels"] == 2 * 3 and b["windows"] == WINDOWS and b["seed"] == 1
    # output settings are the segment rule's, not the model's: changing them must retrain nothing
    assert not set(SEGMENTER_OUTPUT_KEYS) & (set(b) | set(b["config"]))
    assert res["best_epoch"] in (1, 2)

    out = R / "segmentation"
    df = seg.segment_batch(bundle, list(scans["scan_id"]) + ["missing"], R, out, R / "segmentation" / "batches" / "0.tsv")
    st = df.set_index("scan_id")["status"]
    assert (st[list(scans["scan_id"])] == "ok").all() and st["missing"] == "rejected"
    for sid in scans["scan_id"]:
        prob, aff = load_nifti(out / f"{sid}_prob.nii.gz")
        mask, aff2 = load_nifti(out / f"{sid}.nii.gz")
        brain, aff3 = load_nifti(R / "brainmask" / f"{sid}.nii.gz")
        assert prob.dtype == np.float32 and mask.dtype == np.uint8
        assert prob.shape == mask.shape == brain.shape
        assert np.allclose(aff, aff3) and np.allclose(aff2, aff3)
        assert 0 <= prob.min() and prob.max() <= 1
        assert not (mask.astype(bool) & ~brain.astype(bool)).any()

    # a raised epoch budget continues this training; regenerated inputs start a new one
    counted = count_training_batches(monkeypatch, real)
    cfg3 = {"seed": 1, "segmenter": {**SEG, "epochs": 3, "patience": 10}}
    seg.train_segmenter(cfg3, R / "scans.tsv", R, "pseudomask", bundle, hist)
    assert list(read_tsv(hist)["epoch"]) == [1, 2, 3] and counted["n"] == 2  # epoch 3 only
    # output settings (HU gate, flip, components) train nothing
    out_only = {"hu_min": 30, "hu_max": 100, "tta_flip": False, "min_component_ml": 0.5, "infer_batch": 4}
    counted["n"] = 0
    seg.train_segmenter({**cfg3, "segmenter": {**cfg3["segmenter"], **out_only}}, R / "scans.tsv", R, "pseudomask",
                        bundle, hist)
    assert list(read_tsv(hist)["epoch"]) == [1, 2, 3] and counted["n"] == 0
    train_id = next(s for s, sp in zip(scans["scan_id"], scans["split"]) if sp == "train")
    target = R / "pseudomask" / f"{train_id}.nii.gz"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten alike by a rerun: kept
    counted["n"] = 0
    seg.train_segmenter(cfg3, R / "scans.tsv", R, "pseudomask", bundle, hist)
    assert list(read_tsv(hist)["epoch"]) == [1, 2, 3] and counted["n"] == 0
    m, aff = load_nifti(target)  # a pseudo-mask made anew, with other content: trained anew
    m[m > 0] = 0
    m[2:6, 2:6, len(m[0, 0]) // 2] = 1
    save_nifti(m.astype(np.uint8), aff, target, dtype=np.uint8)
    seg.train_segmenter(cfg3, R / "scans.tsv", R, "pseudomask", bundle, hist)
    assert list(read_tsv(hist)["epoch"]) == [1, 2, 3] and counted["n"] == 6  # all three epochs again


def test_an_ensemble_round_keeps_its_first_member_and_averages_probabilities(cohort, monkeypatch):
    """segmenter.self_training_ensemble: member k trains like one model with seed + k; member 0 is
    the single model itself, so raising the count trains only the new members."""
    R, scans = cohort
    cfg = {"seed": 5, "segmenter": SEG}
    bundle, hist = R / "segmenter_r0" / "model.pt", R / "segmenter_r0" / "history.tsv"
    counted = count_training_batches(monkeypatch)
    seg.train_segmenter(cfg, R / "scans.tsv", R, "pseudomask", bundle, hist)
    single = torch.load(bundle, weights_only=True)
    assert single["kind"] == "unet" and counted["n"] == 4  # 2 epochs x 2 batches
    counted["n"] = 0
    res = seg.train_segmenter(cfg, R / "scans.tsv", R, "pseudomask", bundle, hist, members=2)
    assert counted["n"] == 4  # member 2 only
    b = torch.load(bundle, weights_only=True)
    assert b["kind"] == "unet_ensemble" and "state_dict" not in b and len(b["state_dicts"]) == 2
    assert [m["seed"] for m in b["members"]] == [5, 6] == [m["seed"] for m in res["members"]]
    assert b["seed"] == 5 and b["epoch"] == single["epoch"] and b["target"] == "pseudomask"
    assert all(torch.equal(v, single["state_dict"][k]) for k, v in b["state_dicts"][0].items())
    assert not all(torch.equal(v, b["state_dicts"][0][k]) for k, v in b["state_dicts"][1].items())
    h = read_tsv(hist)
    assert list(h["stage"]) == ["member 1"] * 2 + ["member 2"] * 2 and list(h["epoch"]) == [1, 2, 1, 2]

    model, meta_b, dev = seg.load_segmenter(bundle, "cpu")
    assert isinstance(model, seg.UNetEnsemble) and "state_dicts" not in meta_b
    sid = scans["scan_id"].iloc[0]
    cache, _ = load_cache(*cache_paths(R, sid))
    mean = np.mean([seg.predict_scan_probs(m, meta_b, cache, dev) for m in model.members], axis=0)
    assert np.allclose(seg.predict_scan_probs(model, meta_b, cache, dev), mean, atol=1e-5)
    df = seg.self_training_batch(bundle, list(scans["scan_id"]), R, R / "pseudomask_r1", R / "pseudomask_r1" / "batches"
                                 / "0.tsv", labelled=True, output={"min_component_ml": 0})
    assert (df["status"] == "ok").all()
    for sid in scans["scan_id"]:
        assert load_nifti(R / "pseudomask_r1" / f"{sid}.nii.gz")[0].dtype == np.uint8
    # back to one model: member 0 again, nothing trained
    counted["n"] = 0
    seg.train_segmenter(cfg, R / "scans.tsv", R, "pseudomask", bundle, hist)
    again = torch.load(bundle, weights_only=True)
    assert counted["n"] == 0 and again["kind"] == "unet" and "stage" not in read_tsv(hist)
    assert all(torch.equal(v, single["state_dict"][k]) for k, v in again["state_dict"].items())
    with pytest.raises(ValueError, match="at least 1 member"):
        seg.train_segmenter(cfg, R / "scans.tsv", R, "pseudomask", bundle, hist, members=0)


def test_groundtruth_target_and_missing_targets(cohort, tmp_path, caplog):
    R, scans = cohort
    # no training scan with a target -> a clear error naming the file
    t = read_tsv(R / "scans.tsv", dtype={"scan_id": str})
    t["split"] = "test"
    write_tsv(t, tmp_path / "scans.tsv")
    with pytest.raises(Exception, match="no training scan"):
        seg.train_segmenter({"seed": 0, "segmenter": SEG}, tmp_path / "scans.tsv", R, "groundtruth",
                            tmp_path / "b.pt", tmp_path / "h.tsv")
    with pytest.raises(ValueError, match="target"):
        seg.train_segmenter({"seed": 0, "segmenter": SEG}, R / "scans.tsv", R, "cam", tmp_path / "b.pt", tmp_path / "h.tsv")
    # targets that are all empty (CAMs beside the bleeds): said, not left to a validation score
    # of 1.0 for marking nothing
    empty = tmp_path / "empty"
    (empty / "pseudomask").mkdir(parents=True)
    for d in ("cache", "brainmask", "nifti"):
        os.symlink(R / d, empty / d)
    for sid in scans["scan_id"]:
        m, aff = load_nifti(R / "masks" / f"{sid}.nii.gz")
        save_nifti(np.zeros_like(m, dtype=np.uint8), aff, empty / "pseudomask" / f"{sid}.nii.gz", dtype=np.uint8)
    with caplog.at_level(logging.WARNING, logger="hemocam"):
        seg.train_segmenter({"seed": 0, "segmenter": {**SEG, "epochs": 1}}, R / "scans.tsv", empty, "pseudomask",
                            tmp_path / "b.pt", tmp_path / "h.tsv")
    assert "no training slice has a non-empty pseudomask mask (" in caplog.text
    assert "its validation score says nothing" in caplog.text
    cache, meta = load_cache(*cache_paths(R, scans["scan_id"][0]))
    tgt = seg.load_target(scans["scan_id"][0], R, "groundtruth", meta)
    assert tgt.shape == (cache.shape[0], 32, 32) and tgt.dtype == np.uint8


def test_validation_score_is_mean_dice_over_lesion_scans():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.where(x[:, :1] > 0.5, 10.0, -10.0)  # predicts where channel 0 is bright

    x = torch.zeros(3, 1, 4, 4)
    y = torch.zeros(3, 1, 4, 4)
    x[0, 0, 0, :2] = 1  # scan 0, slice 0: predicts 2 pixels
    y[0, 0, 0, 1:3] = 1  # truth 2 pixels, 1 shared
    x[1, 0, 3, 3] = 1  # scan 0, slice 1: one false positive pixel
    x[2, 0, 0, 0] = 1  # scan 1 (no lesion): a false positive
    batches = [(x, y, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]))]
    score, metrics = seg._evaluate_fn(2, 0.5)(Fixed(), batches, torch.device("cpu"))
    assert score == pytest.approx(2 * 1 / (3 + 2))
    assert metrics["val_dice_pos"] == pytest.approx(0.4)
    assert metrics["val_dice_all"] == pytest.approx(0.2) and metrics["val_fp_neg_scans"] == 1.0


def test_crop_pair_centres_on_lesions():
    x = torch.arange(2 * 32 * 32, dtype=torch.float32).reshape(2, 32, 32)
    y = torch.zeros(1, 32, 32)
    y[0, 28, 3] = 1
    for s in range(10):
        xc, yc = seg.crop_pair(x, y, 16, np.random.default_rng(s), p_lesion=1.0)
        assert xc.shape == (2, 16, 16) and yc.shape == (1, 16, 16)
        assert yc.sum() == 1  # the lesion pixel is inside every lesion-centred window
        r, c = torch.nonzero(yc[0])[0].tolist()
        assert xc[0, r, c] == x[0, 28, 3]  # image and target cropped alike


def test_segment_output_keeps_hyperdense_voxels_only(cohort, tmp_path):
    """segmenter.hu_min/hu_max gate the output on the scan's HU (-1024..3071: no gate)."""
    R, scans = cohort
    sid = scans["scan_id"].iloc[0]

    class AllLesion(torch.nn.Module):  # every pixel a lesion: the output is what the gates leave
        def forward(self, x):
            return torch.full((x.shape[0], 1, *x.shape[-2:]), 20.0)

    meta_b = {"context": 1, "size": 32, "windows": WINDOWS, "model": {"in_channels": 6}, "threshold": 0.5,
              "config": {"amp": False}}
    cpu = torch.device("cpu")
    out = {"min_component_ml": 0, "tta_flip": False}
    seg.segment_scan(sid, R, tmp_path / "old", AllLesion(), meta_b, cpu, {**out, "hu_min": -1024, "hu_max": 3071})
    seg.segment_scan(sid, R, tmp_path / "gated", AllLesion(), meta_b, cpu, {**out, "hu_min": 40, "hu_max": 120})
    brain = load_nifti(R / "brainmask" / f"{sid}.nii.gz")[0] > 0
    hu = load_nifti(R / "nifti" / f"{sid}.nii.gz")[0]
    expected = brain & (hu >= 40) & (hu <= 120)
    assert expected.any() and (brain & ~expected).any()
    assert np.array_equal(load_nifti(tmp_path / "old" / f"{sid}.nii.gz")[0] > 0, brain)
    assert np.array_equal(load_nifti(tmp_path / "gated" / f"{sid}.nii.gz")[0] > 0, expected)



def test_self_training_targets_are_the_masks_on_gated_slices(cohort, tmp_path):
    """Round k + 1's targets: round k's output mask, only on the slices the slice gate opens."""
    R0, scans = cohort
    sid = scans["scan_id"].iloc[0]
    R = tmp_path / "R"  # a copy: this test writes its own slice labels and probabilities
    for sub in ("cache", "brainmask", "nifti"):
        shutil.copytree(R0 / sub, R / sub)

    class AllLesion(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 1, *x.shape[-2:]), 20.0)

    model = AllLesion()
    meta_b = {"context": 1, "size": 32, "windows": WINDOWS, "model": {"in_channels": 6}, "threshold": 0.5,
              "config": {"amp": False}}
    out = {"min_component_ml": 0, "tta_flip": False, "hu_min": 40, "hu_max": 120}
    cpu = torch.device("cpu")
    seg.segment_scan(sid, R, tmp_path / "seg", model, meta_b, cpu, out)
    mask = load_nifti(tmp_path / "seg" / f"{sid}.nii.gz")[0] > 0
    Z = mask.shape[2]
    middle = np.flatnonzero(mask.any((0, 1)))
    assert len(middle) >= 4
    # labelled: the slice labels gate
    pos = np.zeros(Z, bool)
    pos[middle[1:3]] = True
    (R / "labels").mkdir()
    write_tsv(pd.DataFrame({"slice": range(Z), "any": pos.astype(int)}), R / "labels" / f"{sid}.tsv")
    info = seg.self_training_scan(sid, R, tmp_path / "r1", model, meta_b, cpu, out, labelled=True)
    got = load_nifti(tmp_path / "r1" / f"{sid}.nii.gz")[0]
    assert got.dtype == np.uint8
    assert np.array_equal(got > 0, mask & pos[None, None, :])
    assert info["positive_slices"] == pos.sum() and info["pseudomask_voxels"] == int((got > 0).sum())
    # unlabelled: the classifier's slice probabilities gate
    probs = np.zeros(Z)
    probs[middle[[0, 3]]] = [0.9, 0.6]
    (R / "classifier" / "slices").mkdir(parents=True, exist_ok=True)
    write_tsv(pd.DataFrame({"slice": range(Z), "any": probs}), R / "classifier" / "slices" / f"{sid}.tsv")
    seg.self_training_scan(sid, R, tmp_path / "r1u", model, meta_b, cpu, out, labelled=False, prob_threshold=0.7)
    got = load_nifti(tmp_path / "r1u" / f"{sid}.nii.gz")[0] > 0
    z = middle[0]
    assert got[..., z].any() and np.array_equal(got[..., z], mask[..., z])
    assert not got[..., np.arange(Z) != z].any()


def test_training_targets():
    assert [self_training_target(k) for k in (0, 1, 12)] == ["pseudomask", "pseudomask_r1", "pseudomask_r12"]
    assert seg.target_path("a", "R", "pseudomask_r2").as_posix() == "R/pseudomask_r2/a.nii.gz"
    assert seg.target_path("a", "R", "groundtruth").as_posix() == "R/masks/a.nii.gz"
    for bad in ("cam", "pseudomask_r0", "pseudomask_r", "../pseudomask_r1"):
        with pytest.raises(ValueError):
            seg.target_path("a", "R", bad)
