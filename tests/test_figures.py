"""Figures render from a tiny synthetic results folder into real, non-blank PNGs."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from hemocam.figures import (
    choose_slices,
    cohort_figure,
    display_plan,
    evaluation_figures,
    figures_batch,
    gallery,
    provenance_html,
    reason_group,
    epoch_axis,
    kept_epochs,
    training_figure,
)
from hemocam.io import load_nifti, read_tsv, save_nifti, write_tsv
from hemocam.phantom import write_nifti_cohort


def check_png(path, min_w=300, min_h=150):
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        w, h = im.size
        assert w >= min_w and h >= min_h, (path, im.size)
        arr = np.asarray(im.convert("RGB"), float)
    assert arr.std() > 5, f"{path} looks blank"
    return w, h


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    R = tmp_path_factory.mktemp("figures") / "results"
    scans = write_nifti_cohort(R, n_scans=3, matrix=48, n_slices=16)
    ids = list(scans["scan_id"])
    for sid in ids:
        gt, affine = load_nifti(R / "masks" / f"{sid}.nii.gz")
        cam = ndimage.gaussian_filter(gt.astype(np.float32), 3)
        cam = cam / cam.max() if cam.max() > 0 else cam
        save_nifti(cam, affine, R / "cam" / f"{sid}.nii.gz", dtype=np.float32)
        save_nifti(ndimage.binary_dilation(gt > 0), affine, R / "pseudomask" / f"{sid}.nii.gz", dtype=np.uint8)
        save_nifti(np.roll(gt, 2, axis=0), affine, R / "segmentation" / f"{sid}.nii.gz", dtype=np.uint8)
    # training histories as the shared training loop writes them (epoch, losses, bool 'best', ...)
    for model, extra in (("classifier", {"val_auc_any": [0.6, 0.7, 0.8]}), ("segmenter", {"val_dice": [0.1, 0.3, 0.4]})):
        hist = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [0.9, 0.5, 0.4], "val_score": [0.2, 0.5, 0.45],
                             **extra, "lr": [1e-3, 1e-3, 1e-5], "seconds": [2.0, 2.1, 2.0], "best": [True, True, False]})
        write_tsv(hist, R / model / "history.tsv")
    rows = []
    for i, sid in enumerate(ids):
        for m in ("cam", "pseudomask", "segmenter", "hu_threshold"):
            pos = i != 0
            rows.append({"scan_id": sid, "split": "test", "method": m, "positive": pos, "dice": 0.2 + 0.2 * i if pos else 1.0,
                         "hd95_mm": 3.0, "vol_pred_ml": 1.0 + i, "vol_true_ml": 1.5 * i, "rvd": 0.1, "dice2d": 0.5})
    write_tsv(pd.DataFrame(rows), R / "metrics" / "segmentation.tsv")
    return R, ids


def test_scan_figures_batch_and_gallery(results, tmp_path):
    R, ids = results
    manifest = tmp_path / "figures" / "batches" / "g0000.tsv"
    out_dir = tmp_path / "figures" / "scans" / "g0000"
    upstream = tmp_path / "seg_manifest.tsv"
    write_tsv(pd.DataFrame({"scan_id": ids + ["gone"], "status": ["ok"] * len(ids) + ["rejected"],
                            "reason": [""] * len(ids) + ["segment: broken"]}), upstream)
    df = figures_batch(ids + ["gone"], R, out_dir, manifest, upstream=[upstream], n_slices=4)
    assert list(df["status"]) == ["ok"] * len(ids) + ["rejected"]
    for sid in ids:
        w, h = check_png(out_dir / f"{sid}.png", min_w=400)
    assert not (out_dir / "gone.png").exists()
    table = read_tsv(manifest, dtype={"scan_id": str})
    ok = table[table["status"] == "ok"]
    # positives are drawn where the prediction is largest; 4 slices each
    pos = ok[ok["gt_ml"] > 0]
    assert len(pos) and set(pos["basis"]) == {"prediction"}
    assert all(len(str(s).split(",")) == 4 for s in pos["slices"])

    chosen = gallery([manifest], tmp_path / "gallery", max_scans=2)
    assert len(chosen) == 2 and sorted(p.name for p in (tmp_path / "gallery").iterdir()) == sorted(f"{s}.png" for s in chosen["scan_id"])
    # the largest bleed comes first
    assert chosen.iloc[0]["scan_id"] == ok.sort_values("gt_ml").iloc[-1]["scan_id"]


def test_choose_slices_preference():
    pred = np.zeros((8, 8, 10), bool)
    truth = np.zeros_like(pred)
    truth[2:4, 2:4, [1, 2]] = True
    cam = np.zeros((8, 8, 10), np.float32)
    cam[:, :, 7] = 1.0
    assert choose_slices(pred, truth, cam, n=3) == ([1, 2], "ground truth")
    pred[1:6, 1:6, 5] = True
    pred[1:3, 1:3, [3, 8]] = True
    pred[1:2, 1:2, 9] = True
    assert choose_slices(pred, truth, cam, n=3) == ([3, 5, 8], "prediction")
    assert choose_slices(None, None, cam, n=3) == ([7], "CAM")
    ks, basis = choose_slices(None, np.zeros_like(truth), None, n=3)
    assert basis.startswith("none") and len(ks) == 3 and all(0 <= k < 10 for k in ks)


def test_display_plan_radiological():
    # LAS-like grid (dcm2niix): index 0 grows to the left, index 1 anteriorly
    las = np.diag([-0.5, 0.5, 2.0, 1.0])
    transpose, flip_rows, flip_cols, aspect = display_plan(las)
    assert transpose and flip_rows and not flip_cols and aspect == 1.0
    # swapped in-plane axes: array axis 0 runs along y
    swapped = np.array([[0, 0.7, 0, 0], [0.5, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1.0]])
    transpose, flip_rows, flip_cols, aspect = display_plan(swapped)
    assert not transpose and flip_rows and flip_cols and aspect == pytest.approx(0.5 / 0.7)


def test_epoch_axis_lays_stages_one_after_the_other():
    two = pd.DataFrame({"stage": ["slices"] * 3 + ["scans"] * 2, "epoch": [1, 2, 3, 1, 2]})
    x, starts = epoch_axis(two)
    assert x.tolist() == [1, 2, 3, 4, 5] and starts == [(0.5, "slices"), (3.5, "scans")]
    x, starts = epoch_axis(pd.DataFrame({"stage": ["scans"] * 2, "epoch": [1, 2]}))
    assert x.tolist() == [1, 2] and starts == []


def test_kept_epochs_are_the_last_best_of_the_run_or_of_each_member():
    def kept(stages, best, epochs=(1, 2, 3, 1, 2)):
        hist = pd.DataFrame({"stage": stages, "epoch": list(epochs)[: len(stages)], "best": best})
        return kept_epochs(hist, epoch_axis(hist)[0])

    # the classifier's slice stage hands on its last epoch: its own best is not kept
    assert kept(["slices"] * 3 + ["scans"] * 2, [True, True, False, True, False]) == [(4.0, 1)]
    # an ensemble keeps one epoch per member, its stages named "member k ..."
    assert kept(["member 1"] * 3 + ["member 2"] * 2, [True, False, True, True, True]) == [(3.0, 3), (5.0, 2)]
    assert kept(["member 1 slices", "member 1 scans", "member 1 scans", "member 2 slices", "member 2 scans"],
                [True, True, False, True, False], epochs=(1, 1, 2, 1, 1)) == [(2.0, 1), (4.0, 1)]
    assert kept(["scans"] * 2, [False, False]) == []
    one = pd.DataFrame({"epoch": [1, 2, 3], "best": [True, True, False]})
    assert kept_epochs(one, epoch_axis(one)[0]) == [(2.0, 2)]


def test_training_evaluation_cohort_figures(results, tmp_path):
    R, ids = results
    for model in ("classifier", "segmenter"):
        out = tmp_path / f"training_{model}.png"
        training_figure(R / model / "history.tsv", out, title=model)
        w, h = check_png(out)
        assert w >= 800  # val_score, train_loss, metric, lr, seconds: several panels
    evaluation_figures(R / "metrics" / "segmentation.tsv", tmp_path / "dice.png", tmp_path / "volume.png")
    check_png(tmp_path / "dice.png")
    check_png(tmp_path / "volume.png", min_w=300, min_h=300)
    # an empty table still draws a message, never a broken file
    write_tsv(pd.DataFrame(columns=["scan_id", "method", "dice"]), tmp_path / "empty.tsv")
    evaluation_figures(tmp_path / "empty.tsv", tmp_path / "d0.png", tmp_path / "v0.png")
    check_png(tmp_path / "d0.png", min_h=100)

    scans = read_tsv(R / "scans.tsv", dtype={"scan_id": str})
    extra = pd.DataFrame({"scan_id": ["x1", "x2", "x3"], "status": "rejected",
                          "reason": ["ingest: localizer", "ingest: /data/SMITH^JOHN/1.dcm: truncated file",
                                     "ingest: /data/DOE^JANE/7.dcm: truncated file"]})
    write_tsv(pd.concat([scans, extra]), tmp_path / "scans.tsv")
    cohort_figure(tmp_path / "scans.tsv", tmp_path / "cohort.png")
    check_png(tmp_path / "cohort.png", min_h=150)


def test_reason_group_drops_paths():
    assert reason_group("ingest: /data/SMITH^JOHN/1.dcm: truncated file") == "ingest: truncated file"
    assert reason_group("ingest: series has 3 slices (min 10)") == "ingest: series has 3 slices"
    assert reason_group("ingest: UID 1.2.840.113619 bad").count("#") >= 1


def test_provenance_html(tmp_path):
    prov = {"seed": 7, "versions": {"torch": "2.14.1", "cuda": None},
            "config": {"input": {"format": "rsna", "path": "<x>&y"}, "preprocess": {"windows": [{"name": "brain"}]}}}
    (tmp_path / "p.json").write_text(json.dumps(prov))
    provenance_html(tmp_path / "p.json", tmp_path / "p.html")
    page = (tmp_path / "p.html").read_text()
    assert "input.format" in page and "2.14.1" in page and "&lt;x&gt;&amp;y" in page and "<x>" not in page
    assert "preprocess.windows" in page and "brain" in page
