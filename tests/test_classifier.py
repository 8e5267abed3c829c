"""Classifier: metrics by hand, data/augmentation, end-to-end training and prediction."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from hemocam.cam import ensemble_cams, slice_cams
from hemocam.classifier import (ScanDataset, augment, auc, average_ranks, collate_scans, label_weights,
                                predict_batch, predict_cache, scan_input, slice_metrics, stage_settings, train_classifier,
                                weighted_log_loss)
from hemocam.io import read_tsv
from hemocam.labelset import LABELS
from hemocam.models.resnet_lstm import ResNetLSTM, ResNetLSTMEnsemble, load_bundle
from hemocam.preprocess import cache_paths, load_cache
from hemocam.train import run_key
from hemocam.phantom.cohort import write_nifti_cohort
from hemocam.preprocess import preprocess_batch

WINDOWS = [{"name": "brain", "center": 40, "width": 80}, {"name": "subdural", "center": 80, "width": 200},
           {"name": "soft", "center": 40, "width": 380}]


def test_auc_by_hand():
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)  # ties count half
    assert auc([1, 1, 0], [0.9, 0.8, 0.1]) == 1.0
    assert np.isnan(auc([0, 0], [0.1, 0.2]))
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    # against the pairwise definition on random data with ties
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.integers(0, 10, 200).astype(float)
    pos, neg = s[y == 1], s[y == 0]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auc(y, s) == pytest.approx(pairwise)


def test_weighted_log_loss_by_hand():
    w = label_weights(LABELS)
    assert w[0] == pytest.approx(2 / 7) and w[1:] == pytest.approx([1 / 7] * 5)
    y = np.zeros((2, 6))
    y[0, 0] = 1
    p = np.full((2, 6), 0.5)
    assert weighted_log_loss(y, p, LABELS) == pytest.approx(np.log(2))
    p[0, 0] = 0.9  # only 'any' of slice 0 improves: -log(0.9) instead of log 2 for that entry
    expect = (2 / 7) * (-np.log(0.9) + np.log(2)) / 2 + (5 / 7) * np.log(2)
    assert weighted_log_loss(y, p, LABELS) == pytest.approx(expect)
    t = slice_metrics(y, p, LABELS)
    assert list(t["label"]) == [*LABELS, "weighted"]
    assert t.iloc[-1]["logloss"] == pytest.approx(expect)


def test_augment_shared_across_slices_and_seeded():
    x = torch.zeros(2, 3, 1, 16, 16)
    x[:, :, :, 4:8, 2:6] = 1.0  # same square on every slice
    params = {"flip": 1.0, "rotate_deg": 0.0, "scale": 0.0, "shift": 0.0, "contrast": 0.0, "brightness": 0.0,
              "noise": 0.0}
    out = augment(x, [1, 2], params)
    assert torch.allclose(out.flip(-1), x, atol=1e-6)  # a pure left-right mirror
    params = {"flip": 0.5, "rotate_deg": 20.0, "scale": 0.1, "shift": 0.1, "contrast": 0.1, "brightness": 0.05,
              "noise": 0.02}
    a, b = augment(x, [5, 6], params), augment(x, [5, 6], params)
    assert torch.equal(a, b)  # same seeds, same result
    assert not torch.equal(a, augment(x, [7, 6], params))
    # one geometric draw per scan: without noise the slices of a scan stay identical
    params["noise"] = 0.0
    c = augment(x, [9, 10], params)
    assert torch.allclose(c[:, 0], c[:, 1]) and torch.allclose(c[:, 0], c[:, 2])
    assert c.min() >= 0 and c.max() <= 1


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    r = tmp_path_factory.mktemp("R")
    scans = write_nifti_cohort(r, 6, matrix=48, n_slices=8, seed=3)
    preprocess_batch(list(scans["scan_id"]), r, WINDOWS, 32, r / "pre.tsv")
    return r, scans


def test_dataset_and_collate(cohort):
    r, scans = cohort
    ids = list(scans["scan_id"])[:3]
    ds = ScanDataset(r, ids, LABELS, window=4, train=True)
    assert len(ds) == 3 * 2  # ceil(8 / 4) runs per scan
    s1, s2 = ds[(0, 123)], ds[(0, 123)]
    assert s1["x"].shape == (4, 3, 32, 32) and s1["x"].dtype == torch.uint8 and s1["start"] == s2["start"]
    full = ScanDataset(r, ids, LABELS)
    lab = read_tsv(r / "labels" / f"{ids[0]}.tsv")
    assert np.array_equal(full[0]["y"].numpy(), lab[list(LABELS)].to_numpy())
    b = collate_scans([ds[(0, 1)], full[1]])
    assert b["x"].shape == (2, 8, 3, 32, 32) and b["lengths"].tolist() == [4, 8]
    assert b["x"][0, 4:].sum() == 0


def test_train_and_predict_end_to_end(cohort, tmp_path):
    r, scans = cohort
    cfg = {"seed": 1, "preprocess": {"size": 32, "windows": WINDOWS},
           "classifier": {"arch": "resnet18", "labels": list(LABELS), "lstm_hidden": 8, "lstm_layers": 1,
                          "epochs": 1, "batch_size": 2, "lr": 1e-3, "weight_decay": 1e-4, "patience": 3,
                          "num_workers": 0, "amp": True, "window": 0, "slice_epochs": 1, "freeze_encoder": True,
                          "slice_batch_size": 16}}
    out = {k: tmp_path / f"{k}" for k in ("model.pt", "history.tsv", "metrics.tsv")}
    train_classifier(cfg, r / "scans.tsv", r, out["model.pt"], out["history.tsv"], out["metrics.tsv"])
    hist = read_tsv(out["history.tsv"])
    assert hist["stage"].tolist() == ["slices", "scans"] and hist["epoch"].tolist() == [1, 1]
    assert {"train_loss", "val_score", "val_logloss", "val_auc_any", "seconds"} <= set(hist.columns)
    metrics = read_tsv(out["metrics.tsv"])
    assert list(metrics["label"]) == [*LABELS, "weighted"] and set(metrics["split"]) == {"test"}
    assert metrics["n"].iloc[0] == 8 * (scans["split"] == "test").sum()
    assert (r / "classifier" / "checkpoints" / "scans" / "last.pt").exists()
    model, meta = load_bundle(out["model.pt"])
    # freeze_encoder: the scan stage kept the CNN the slice stage chose, weights and BN statistics
    slice_best = torch.load(r / "classifier" / "checkpoints" / "slices" / "best.pt", weights_only=True)["model"]
    enc = {k: v for k, v in slice_best.items() if k.startswith("encoder.")}
    assert enc and all(torch.equal(v, model.state_dict()[k]) for k, v in enc.items())
    assert not all(torch.equal(v, model.state_dict()[k]) for k, v in slice_best.items() if k.startswith("lstm."))
    assert meta["labels"] == list(LABELS) and meta["size"] == 32 and meta["windows"] == WINDOWS
    assert meta["best_epoch"] == 1 and meta["seed"] == 1 and "torch" in meta["versions"]
    assert model.config["arch"] == "resnet18"

    # a scan-stage setting changed: the finished slice stage is kept, the scan stage trains again
    slices_last = r / "classifier" / "checkpoints" / "slices" / "last.pt"
    scans_last = r / "classifier" / "checkpoints" / "scans" / "last.pt"
    before = (slices_last.stat().st_mtime_ns, scans_last.stat().st_mtime_ns)
    cfg2 = {**cfg, "classifier": {**cfg["classifier"], "freeze_encoder": False}}
    train_classifier(cfg2, r / "scans.tsv", r, out["model.pt"], out["history.tsv"], out["metrics.tsv"])
    assert slices_last.stat().st_mtime_ns == before[0] and scans_last.stat().st_mtime_ns != before[1]

    ids = list(scans["scan_id"]) + ["missing-scan"]
    man = predict_batch(out["model.pt"], ids, r, tmp_path / "classify.tsv", device="cpu")
    assert man.set_index("scan_id").loc["missing-scan", "status"] == "rejected"
    assert (man["status"] == "ok").sum() == len(scans)
    sl = read_tsv(r / "classifier" / "slices" / f"{scans['scan_id'][0]}.tsv")
    assert list(sl.columns) == ["slice", *LABELS] and len(sl) == 8
    assert sl[list(LABELS)].to_numpy().min() >= 0 and sl[list(LABELS)].to_numpy().max() <= 1


def test_stage_settings_keep_the_slice_stage_apart_from_scan_settings():
    c = {"arch": "resnet18", "lr": 1e-3, "window": 0, "batch_size": 2, "epochs": 8, "patience": 8,
         "freeze_encoder": True, "slice_epochs": 9, "slice_batch_size": 32}
    splits = {"train": ["a", "b"], "val": ["c"], "test": []}

    def keys(**change):
        cc = {**c, **change}
        return tuple(run_key(stage_settings(cc, st, 0, splits)) for st in ("slices", "scans"))

    base = keys()
    for scan_only in ({"freeze_encoder": False}, {"batch_size": 4}, {"window": 8}):
        assert keys(**scan_only)[0] == base[0] and keys(**scan_only)[1] != base[1], scan_only
    assert keys(slice_epochs=12) == (base[0], keys(slice_epochs=12)[1]) and keys(slice_epochs=12)[1] != base[1]
    assert all(a != b for a, b in zip(keys(lr=3e-4), base))  # shared settings restart both
    assert all(a != b for a, b in zip(keys(slice_batch_size=16), base))
    # the test-time flip shapes the evaluation, not the weights: a finished training is kept
    assert keys(tta=False) == keys(tta=True) == base
    # the ensemble's size is no member's setting: raising it keeps the members already trained
    assert keys(ensemble=3) == base


def test_an_ensemble_trains_members_like_single_models_and_averages_them(tmp_path):
    r = tmp_path / "R"
    scans = write_nifti_cohort(r, 6, matrix=48, n_slices=8, seed=5)
    preprocess_batch(list(scans["scan_id"]), r, WINDOWS, 32, r / "pre.tsv")
    clf = {"arch": "resnet18", "labels": ["any"], "lstm_hidden": 8, "lstm_layers": 1, "epochs": 1, "batch_size": 2,
           "lr": 1e-3, "weight_decay": 1e-4, "patience": 3, "num_workers": 0, "amp": False, "window": 0,
           "slice_epochs": 1, "freeze_encoder": True, "slice_batch_size": 16}

    def train(seed, ensemble, root):
        cfg = {"seed": seed, "preprocess": {"size": 32, "windows": WINDOWS}, "classifier": {**clf, "ensemble": ensemble}}
        for d in ("cache", "labels", "scans.tsv"):
            if not (root / d).exists():
                (root / d).symlink_to(r / d)
        out = [root / "out" / f for f in ("model.pt", "history.tsv", "metrics.tsv")]
        train_classifier(cfg, root / "scans.tsv", root, *out)
        return out

    single_dir, seed2_dir = tmp_path / "single", tmp_path / "seed2"
    single_dir.mkdir(), seed2_dir.mkdir()
    alone = [load_bundle(train(seed, 1, root)[0])[0] for seed, root in ((1, single_dir), (2, seed2_dir))]
    done = sorted((single_dir / "classifier" / "checkpoints").rglob("*.pt"))
    stamps = [f.stat().st_mtime_ns for f in done]
    # raising ensemble on the same run: member 0 is the finished single model, member 1 trains
    ens = train(1, 2, single_dir)
    assert [f.stat().st_mtime_ns for f in done] == stamps
    assert (single_dir / "classifier" / "checkpoints" / "member1" / "scans" / "last.pt").exists()
    model, meta = load_bundle(ens[0])
    assert isinstance(model, ResNetLSTMEnsemble) and len(model.members) == 2
    assert meta["kind"] == "resnet_lstm_ensemble" and [m["seed"] for m in meta["members"]] == [1, 2]
    # member k is the single model trained with seed + k, weight for weight
    for member, net in zip(model.members, alone):
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in member.state_dict().items())
    hist = read_tsv(ens[1])
    assert hist["stage"].tolist() == ["member 1 slices", "member 1 scans", "member 2 slices", "member 2 scans"]
    # the test metrics are those of the probabilities the classify stage writes
    test_ids = list(scans.loc[scans["split"] == "test", "scan_id"])
    p_test = np.concatenate([predict_cache(model, load_cache(*cache_paths(r, s))[0], meta, "cpu", tta=True)[:, 0]
                             for s in test_ids])
    y_test = np.concatenate([read_tsv(r / "labels" / f"{s}.tsv")["any"].to_numpy() for s in test_ids])
    metrics = read_tsv(ens[2]).set_index("label")
    assert metrics.loc["any", "auc"] == pytest.approx(auc(y_test, p_test), abs=1e-5)

    # predictions and CAMs are the members' means
    sid = scans["scan_id"][0]
    cache, _ = load_cache(*cache_paths(r, sid))
    probs = predict_cache(model, cache, meta, "cpu", tta=True)
    each = [predict_cache(m, cache, meta, "cpu", tta=True) for m in model.members]
    assert np.allclose(probs, np.mean(each, axis=0), atol=1e-6)
    x = scan_input(cache, meta, "cpu")
    torch.manual_seed(0)  # untrained members: one epoch on 4 scans leaves these CAMs at zero
    model = ResNetLSTMEnsemble([ResNetLSTM("resnet18", in_channels=3, n_labels=1, lstm_hidden=8, lstm_layers=1)
                                for _ in range(2)]).eval()
    maps, p = ensemble_cams(model, x, "layer4", [0], "gradcam", out_size=32, grad_mode="auto", chunk=4, amp=False,
                            use="mean")
    each = [slice_cams(m, x, "layer4", [0], "gradcam", out_size=32) for m in model.members]
    mean = np.mean([e[0][0] for e in each], axis=0)
    assert mean.max() > 0 and not np.allclose(each[0][0][0], each[1][0][0])
    assert np.allclose(maps[0], mean / mean.max(), atol=1e-6) and maps[0].max() == pytest.approx(1.0)
    assert np.allclose(p, np.mean([e[1] for e in each], axis=0), atol=1e-6)
    first, p_first = ensemble_cams(model, x, "layer4", [0], "gradcam", out_size=32, grad_mode="auto", chunk=4,
                                   amp=False)  # the default: member 0's map and probabilities
    assert np.array_equal(first[0], each[0][0][0]) and np.array_equal(p_first, each[0][1])
    with pytest.raises(ValueError, match="cam.members"):
        ensemble_cams(model, x, "layer4", [0], "gradcam", out_size=32, grad_mode="auto", chunk=4, use="median")
