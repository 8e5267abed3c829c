"""The real snakemake on a small generated cohort with quirks, from ingestion to evaluation."""

from __future__ import annotations

import re
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from hemocam.labelset import LABELS
from conftest import CPU_SMALL, TINY, assert_no_markers, dry_run_jobs, run_snakemake

pytestmark = pytest.mark.workflow


def test_every_series_is_accounted_for(demo_run):
    truth = pd.read_csv(demo_run / "resources/demo/truth.tsv", sep="\t", dtype=str, keep_default_na=False)
    scans = pd.read_csv(demo_run / "results/scans.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert sorted(scans["scan_id"]) == sorted(truth["scan_id"])
    merged = truth.merge(scans, on="scan_id")
    assert (merged["expected_status"] == merged["status"]).all(), merged[["scan_id", "kind", "quirk", "status", "reason"]]
    assert (merged.loc[merged["status"] == "rejected", "reason"] != "").all()
    assert set(scans.loc[scans["status"] == "ok", "split"]) == {"train", "val", "test"}


def test_labels_on_the_right_slices_and_geometry(demo_run):
    scans = pd.read_csv(demo_run / "results/scans.tsv", sep="\t", dtype=str, keep_default_na=False)
    for scan_id in scans.loc[scans["status"] == "ok", "scan_id"]:
        ct = nib.load(demo_run / f"results/nifti/{scan_id}.nii.gz")
        mask = nib.load(demo_run / f"results/masks/{scan_id}.nii.gz")
        assert ct.get_data_dtype() == np.int16
        assert ct.shape == mask.shape
        np.testing.assert_allclose(ct.affine, mask.affine, atol=1e-3)
        hu = np.asanyarray(ct.dataobj)
        assert hu.min() >= -1100 and hu.max() <= 3100
        labels = pd.read_csv(demo_run / f"results/labels/{scan_id}.tsv", sep="\t")
        assert list(labels.columns) == ["slice", *LABELS]
        assert list(labels["slice"]) == list(range(ct.shape[2]))
        per_slice = (np.asanyarray(mask.dataobj) > 0).any(axis=(0, 1)).astype(int)
        # the truncated file's slice may be filled from its neighbour: allow one slice off
        assert np.sum(per_slice != labels["any"].to_numpy()) <= 1, scan_id


def test_no_identifying_values_anywhere(demo_run):
    truth = pd.read_csv(demo_run / "resources/demo/truth.tsv", sep="\t", dtype=str, keep_default_na=False)
    markers = sorted({v for values in truth["phi_values"] for v in values.split("|") if len(v) >= 6})
    assert markers, "the demo cohort must carry identifying values to check"
    assert_no_markers([demo_run / "results", demo_run / "logs", demo_run / ".snakemake" / "log"], markers)


def test_every_stage_wrote_every_scan(demo_run):
    scans = pd.read_csv(demo_run / "results/scans.tsv", sep="\t", dtype=str, keep_default_na=False)
    ok = list(scans.loc[scans["status"] == "ok", "scan_id"])
    for scan_id in ok:
        for rel in (
            f"brainmask/{scan_id}.nii.gz", f"cache/{scan_id}.npy", f"classifier/slices/{scan_id}.tsv",
            f"cam/{scan_id}.nii.gz", f"pseudomask/{scan_id}.nii.gz", f"pseudomask_r1/{scan_id}.nii.gz",
            f"segmentation/{scan_id}.nii.gz",
            f"segmentation/{scan_id}_prob.nii.gz",
        ):
            assert (demo_run / "results" / rel).exists(), rel
        cam = np.asanyarray(nib.load(demo_run / f"results/cam/{scan_id}.nii.gz").dataobj)
        assert cam.dtype == np.float32 and cam.min() >= 0 and cam.max() <= 1
    metrics = pd.read_csv(demo_run / "results/classifier/metrics.tsv", sep="\t")
    assert set(LABELS) <= set(metrics["label"])
    assert set(metrics["split"]) >= {"test"}
    seg = pd.read_csv(demo_run / "results/metrics/segmentation.tsv", sep="\t")
    assert {"cam", "pseudomask", "self_training", "segmenter", "hu_threshold", "upper_bound"} <= set(seg["method"])
    # one round of self-training: round 0 learns the pseudo-masks, the final model its masks
    targets = {m: torch.load(demo_run / f"results/{m}/model.pt", weights_only=True)["target"]
               for m in ("segmenter_r0", "segmenter", "segmenter_gt")}
    assert targets == {"segmenter_r0": "pseudomask", "segmenter": "pseudomask_r1", "segmenter_gt": "groundtruth"}


def test_second_run_does_nothing(demo_run):
    out = run_snakemake(demo_run, "-n")
    assert "Nothing to be done" in out.stdout + out.stderr


def test_a_project_moved_whole_reruns_nothing(demo_run, tmp_path):
    # as `cp -a` or `rsync -a` would move it: data (the demo cohort) inside, sizes and mtimes kept
    moved = tmp_path / "moved"
    shutil.copytree(demo_run, moved, symlinks=True)
    out = run_snakemake(moved, "-n")
    assert "Nothing to be done" in out.stdout + out.stderr, out.stdout[-3000:]
    plans = list((moved / "results/ingest/plan").glob("*.tsv"))
    assert plans and not any(str(demo_run) in p.read_text() for p in plans)


def test_cam_parameter_reruns_only_what_follows(demo_run, tmp_path):
    # a config file, not --config: snakemake reads nested --config values as strings
    _, jobs = _dry_run_with(demo_run, tmp_path / "cam.yaml", "cam:\n  method: gradcampp\n")
    assert jobs.get("cam_batch") and jobs.get("pseudomask_batch") and jobs.get("evaluate")
    for untouched in ("demo_cohort", "ingest_batch", "preprocess_batch", "train_classifier", "classify_batch"):
        assert untouched not in jobs, jobs


def test_conversion_settings_rerun_ingestion(demo_run, tmp_path):
    copy = tmp_path / "copy"  # a copy, should a dry run write the plans after all
    shutil.copytree(demo_run, copy, symlinks=True)
    plans = sorted((copy / "results/ingest/plan").glob("*.tsv"))
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in plans]
    _, jobs = _dry_run_with(copy, tmp_path / "ingest.yaml", "ingest:\n  max_outside_fraction: 0.02\n")
    assert jobs.get("ingest_batch") == len(plans) and jobs.get("preprocess_batch"), jobs
    # the dry run lists the rerun but changes no plan: back at the old setting, nothing reruns
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in plans] == before
    out = run_snakemake(copy, "-n")
    assert "Nothing to be done" in out.stdout + out.stderr, out.stdout[-3000:]
    assert not (copy / "results/ingest/plan/dryrun").exists()


def _dry_run_with(workdir, overlay, settings: str) -> tuple[str, dict]:
    """The dry run's printout and planned jobs with ``settings`` (YAML) as the last config file."""
    overlay.write_text(settings)
    out = run_snakemake(workdir, "-n", configfiles=(CPU_SMALL, TINY, overlay))
    text = out.stdout + out.stderr
    return text, dry_run_jobs(text)


def _trained_models(text: str) -> list[str]:
    """The bundles the dry run's train_segmenter jobs would write, sorted."""
    return sorted(re.findall(r"^\s+output: (\S+?),", "".join(_job_blocks(text, "train_segmenter")), re.M))


def _job_blocks(output: str, rule: str) -> list[str]:
    """The dry run's printout of each job of `rule`: the indented lines under its header."""
    return re.findall(rf"^(?:local)?rule {rule}:\n((?:    .*\n?)*)", output, re.M)


def test_batch_time_limits_grow_with_their_scans(demo_run, tmp_path):
    overlay = tmp_path / "slow.yaml"
    overlay.write_text("batching:\n  seconds_per_scan:\n    cam: 600\n")
    out = run_snakemake(demo_run, "-n", "--forcerun", "cam_batch", configfiles=(CPU_SMALL, TINY, overlay))
    text = out.stdout + out.stderr
    scans = pd.read_csv(demo_run / "results/scans.tsv", sep="\t")
    n_ok = int((scans["status"] == "ok").sum())
    sizes = [n_ok // 2 + n_ok % 2, n_ok // 2]  # batching.gpu_jobs: 2 in the tiny overlay
    limits = sorted(int(re.search(r"\bruntime=(\d+)", b).group(1)) for b in _job_blocks(text, "cam_batch"))
    assert limits == sorted(120 + 10 * n for n in sizes), text[-3000:]


def test_segmenter_output_settings_rerun_inference_only(demo_run, tmp_path):
    # the HU gate shapes what is written from the model's probabilities, not the model
    overlay = tmp_path / "gate.yaml"
    text, jobs = _dry_run_with(demo_run, overlay, "segmenter:\n  hu_max: 110\n")
    assert jobs.get("segment_batch") and "evaluate" in jobs, jobs
    # with self-training it also shapes round 1's targets: only the model trained on them retrains
    assert jobs.get("self_training_batch") and jobs.get("train_segmenter") == 1 and "train_classifier" not in jobs, jobs
    assert _trained_models(text) == ["results/segmenter/model.pt"], text[-3000:]
    _, jobs = _dry_run_with(demo_run, overlay, "segmenter:\n  hu_max: 110\n  self_training: 0\n")
    assert jobs.get("segment_batch") and jobs.get("train_segmenter") == 1 and "self_training_batch" not in jobs, jobs
    # dropping the upper bound changes what is evaluated, not the weakly supervised segmenter
    _, jobs = _dry_run_with(demo_run, overlay, "segmenter:\n  upper_bound: false\n")
    assert "train_segmenter" not in jobs and "segment_batch" not in jobs and "train_classifier" not in jobs, jobs


def test_a_larger_first_round_ensemble_retrains_the_rounds_only(demo_run, tmp_path):
    # the tiny overlay's round 0 averages two U-Nets; a third one retrains round 0 (which keeps its
    # members, test_segmenter) and the final model on the new targets, nothing upstream
    text, jobs = _dry_run_with(demo_run, tmp_path / "members.yaml", "segmenter:\n  self_training_ensemble: 3\n")
    assert jobs.get("self_training_batch") and jobs.get("train_segmenter") == 2, jobs
    assert not {"train_classifier", "cam_batch", "pseudomask_batch"} & set(jobs), jobs
    assert _trained_models(text) == ["results/segmenter/model.pt", "results/segmenter_r0/model.pt"], text[-3000:]
    bundle = torch.load(demo_run / "results/segmenter_r0/model.pt", weights_only=True)
    assert bundle["kind"] == "unet_ensemble" and [m["seed"] for m in bundle["members"]] == [42, 43]
    assert torch.load(demo_run / "results/segmenter/model.pt", weights_only=True)["kind"] == "unet"


def test_changed_splits_are_not_kept_silently(demo_run, tmp_path):
    # splits reach scans.tsv through no job's inputs: other split settings must not leave the
    # old splits in place (and train on them) while the provenance records the new ones
    overlay = tmp_path / "split.yaml"
    overlay.write_text("split:\n  train: 0.4\n  val: 0.3\n  test: 0.3\n")
    out = run_snakemake(demo_run, "-n", configfiles=(CPU_SMALL, TINY, overlay), check=False)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "in another split than results/scans.tsv records" in text and "Remove results/scans.tsv" in text, text[-3000:]


def test_execution_settings_rerun_no_science(demo_run, tmp_path):
    # time limits and the segmenter's loader workers say how the workflow runs, not what it
    # computes: only the provenance record (which keeps the whole config) is rewritten
    _, jobs = _dry_run_with(demo_run, tmp_path / "times.yaml",
                            "batching:\n  seconds_per_scan:\n    segment: 60\nsegmenter:\n  num_workers: 3\n")
    assert set(jobs) <= {"provenance", "provenance_page", "all"}, jobs
