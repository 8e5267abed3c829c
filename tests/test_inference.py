"""A new, unlabelled DICOM export segmented with the bundles of an earlier run (README recipe).

The bundles come from the session's tiny demo run; the new cohort is generated fresh with
another seed, and only its DICOM folder is given (no labels, no masks).
"""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from conftest import CPU_SMALL, TINY, dry_run_jobs, run_snakemake
from hemocam.labelset import LABELS
from hemocam.phantom import generate_cohort

pytestmark = pytest.mark.workflow

TRAINING_RULES = ("train_classifier", "train_segmenter", "self_training_batch", "pseudomask_batch", "demo_cohort", "evaluate")


def _overlay(path, export, demo_run, extra=""):
    path.write_text(
        "input:\n  format: dicom\n"
        f"  path: {export}\n"
        '  masks: ""\n'
        "model:\n"
        f"  classifier: {demo_run / 'results/classifier/model.pt'}\n"
        f"  segmenter: {demo_run / 'results/segmenter/model.pt'}\n" + extra
    )
    return path


@pytest.fixture(scope="module")
def new_cohort(demo_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("new_export")
    truth = generate_cohort(root / "gen", n_scans=3, matrix=48, n_slices=16, seed=77, quirks=False)
    export = root / "gen" / "dicom"  # the DICOM tree only: labels.csv and truth stay outside
    overlay = _overlay(root / "new.yaml", export, demo_run)
    return {"root": root, "export": export, "overlay": overlay, "truth": truth, "workdir": root / "run"}


def test_inference_dag_has_no_training(new_cohort):
    out = run_snakemake(new_cohort["workdir"], "-n", configfiles=(CPU_SMALL, TINY, new_cohort["overlay"]))
    jobs = dry_run_jobs(out.stdout + out.stderr)
    assert jobs.get("ingest_batch") and jobs.get("preprocess_batch") and jobs.get("segment_batch"), jobs
    assert not set(TRAINING_RULES) & set(jobs), jobs


def test_new_cohort_is_segmented_with_volumes(new_cohort, demo_run):
    wd = new_cohort["workdir"]
    run_snakemake(wd, configfiles=(CPU_SMALL, TINY, new_cohort["overlay"]))
    scans = pd.read_csv(wd / "results/scans.tsv", sep="\t", dtype=str, keep_default_na=False)
    ok = sorted(scans.loc[scans["status"] == "ok", "scan_id"])
    assert len(ok) == 3
    # nothing is trained: the whole cohort is held out
    assert set(scans.loc[scans["status"] == "ok", "split"]) == {"test"}
    for sid in ok:
        for rel in (f"segmentation/{sid}.nii.gz", f"segmentation/{sid}_prob.nii.gz", f"cam/{sid}.nii.gz",
                    f"classifier/slices/{sid}.tsv"):
            assert (wd / "results" / rel).exists(), rel
    assert not (wd / "results/classifier/model.pt").exists() and not (wd / "results/segmenter/model.pt").exists()
    assert not (wd / "results/labels").exists() or not any((wd / "results/labels").iterdir())
    vol = pd.read_csv(wd / "results/volumes.tsv", sep="\t")
    assert sorted(vol["scan_id"]) == ok
    assert {"volume_ml", "lesions", "largest_ml", "abc2_ml", *(f"p_{lab}" for lab in LABELS)} <= set(vol.columns)
    assert vol["p_any"].between(0, 1).all() and (vol["volume_ml"] >= 0).all()
    # the provenance names the bundles used, whose settings the config does not hold
    prov = json.loads((wd / "results/provenance.json").read_text())
    for role in ("classifier", "segmenter"):
        bundle = demo_run / f"results/{role}/model.pt"
        got = prov["models"][role]
        assert got["path"] == str(bundle) and got["sha256"] == hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert prov["models"]["classifier"]["config"]["classifier"]["arch"] == "resnet18"
    assert prov["models"]["segmenter"]["kind"] == "unet" and "encoder" in prov["models"]["segmenter"]["model"]
    # inputs untouched, and a second run has nothing to do
    again = run_snakemake(wd, "-n", configfiles=(CPU_SMALL, TINY, new_cohort["overlay"]))
    assert "Nothing to be done" in again.stdout + again.stderr


def test_bundle_settings_are_used_when_the_config_leaves_them_default(new_cohort, tmp_path):
    # no preset: the shipped default size (256) would apply; the bundle's 48 is used instead
    out = run_snakemake(tmp_path / "wd", "-n", configfiles=(new_cohort["overlay"],))
    assert "preprocess.size: 256 -> 48 (from model.classifier)" in out.stdout + out.stderr


@pytest.mark.parametrize("setting, needles", [
    ("preprocess:\n  size: 64\n", ("preprocess.size is set to 64", "model.classifier", "48")),
    # the masks are cut at the bundle's threshold: a config that asks for another one is told so
    ("segmenter:\n  threshold: 0.3\n", ("segmenter.threshold is set to 0.3", "model.segmenter", "0.5")),
])
def test_config_that_contradicts_the_bundle_is_refused(new_cohort, demo_run, tmp_path, setting, needles):
    overlay = _overlay(tmp_path / "bad.yaml", new_cohort["export"], demo_run, setting)
    out = run_snakemake(tmp_path / "wd", "-n", configfiles=(CPU_SMALL, TINY, overlay), check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert all(needle in text for needle in needles), text[-3000:]


def test_missing_bundle_is_refused_naming_the_key(new_cohort, tmp_path):
    overlay = tmp_path / "missing.yaml"
    overlay.write_text(f"input:\n  format: dicom\n  path: {new_cohort['export']}\nmodel:\n  classifier: nowhere/model.pt\n"
                       "  segmenter: nowhere/seg.pt\n")
    out = run_snakemake(tmp_path / "wd", "-n", configfiles=(CPU_SMALL, TINY, overlay), check=False)
    assert out.returncode != 0
    assert "model.classifier: no bundle at nowhere/model.pt" in out.stdout + out.stderr


def test_a_grown_export_segments_only_its_new_exam(demo_run, tmp_path):
    # the same bundles, an export that gains an exam: only that exam goes through the stages
    import re
    import shutil
    import time

    from badinput import series_files

    gen = tmp_path / "gen"
    generate_cohort(gen, n_scans=3, matrix=48, n_slices=16, seed=78, quirks=False)
    series = series_files(gen / "dicom")
    new = series[sorted(series)[1]]
    export = tmp_path / "export"
    shutil.copytree(gen / "dicom", export, ignore=shutil.ignore_patterns(*[p.name for p in new]))
    overlay = _overlay(tmp_path / "grow.yaml", export, demo_run)
    wd = tmp_path / "run"
    run_snakemake(wd, configfiles=(CPU_SMALL, TINY, overlay))
    r = wd / "results"
    stages = {"classifier": "classifier/slices", "cam": "cam", "segmentation": "segmentation"}
    before = {p: p.stat().st_mtime_ns for sub in stages.values() for p in (r / sub).glob("ID_*")}
    assert len(before) == 2 + 2 + 4

    for p in new:
        shutil.copy2(p, export / p.name)
    started = time.time_ns()
    run_snakemake(wd, configfiles=(CPU_SMALL, TINY, overlay))
    assert {p: p.stat().st_mtime_ns for p in before} == before, "an earlier exam went through a stage again"
    for stage in stages:
        manifests = [p for p in (r / stage / "batches").glob("*.tsv") if p.stat().st_mtime_ns > started]
        rows = sum(len(pd.read_csv(p, sep="\t")) for p in manifests)
        logs = "".join(p.read_text() for p in (wd / "logs").rglob("*.log") if p.stat().st_mtime_ns > started)
        step = {"classifier": "classify", "cam": "cam", "segmentation": "segment"}[stage]
        kept = sum(int(n) for n in re.findall(rf"\b{step}: (\d+) of \d+ scan\(s\) kept", logs))
        assert manifests and kept == rows - 1, (stage, rows, kept)
    scans = pd.read_csv(r / "scans.tsv", sep="\t", dtype=str)
    assert (scans["status"] == "ok").sum() == 3
    assert len(list((r / "segmentation").glob("ID_*_prob.nii.gz"))) == 3


def test_an_ensemble_classifier_bundle_is_taken(new_cohort, demo_run, tmp_path):
    # the CPU preset trains an ensemble (classifier.ensemble: 3): its bundle must work as model.classifier
    from hemocam.models.resnet_lstm import ResNetLSTMEnsemble, load_bundle, save_bundle

    single, meta = load_bundle(demo_run / "results/classifier/model.pt")
    twin, _ = load_bundle(demo_run / "results/classifier/model.pt")
    bundle = tmp_path / "ensemble.pt"
    save_bundle(bundle, ResNetLSTMEnsemble([single, twin]), {k: v for k, v in meta.items()
                                                             if k not in ("format", "kind", "versions")})
    overlay = tmp_path / "ensemble.yaml"
    overlay.write_text(new_cohort["overlay"].read_text().replace(str(demo_run / "results/classifier/model.pt"),
                                                                  str(bundle)))
    wd = tmp_path / "run"
    run_snakemake(wd, configfiles=(CPU_SMALL, TINY, overlay))
    run_snakemake(new_cohort["workdir"], configfiles=(CPU_SMALL, TINY, new_cohort["overlay"]))
    prov = json.loads((wd / "results/provenance.json").read_text())
    assert prov["models"]["classifier"]["kind"] == "resnet_lstm_ensemble"
    got = sorted((wd / "results/classifier/slices").glob("ID_*.tsv"))
    assert len(got) == 3 and len(list((wd / "results/segmentation").glob("ID_*_prob.nii.gz"))) == 3
    for path in got:
        # two identical members: the ensemble's mean probability is the single model's
        ref = pd.read_csv(new_cohort["workdir"] / "results/classifier/slices" / path.name, sep="\t")
        ens = pd.read_csv(path, sep="\t")
        assert list(ens.columns) == list(ref.columns) == ["slice", *LABELS]
        assert (ens[list(LABELS)] - ref[list(LABELS)]).abs().to_numpy().max() < 1e-5


def test_a_cohort_without_labels_needs_a_classifier_bundle(new_cohort, demo_run, tmp_path):
    # no labels and no model.classifier: refused while planning, not after ingestion and preprocessing
    overlay = tmp_path / "nolabels.yaml"
    overlay.write_text(f"input:\n  format: dicom\n  path: {new_cohort['export']}\n  masks: \"\"\n"
                       f"model:\n  segmenter: {demo_run / 'results/segmenter/model.pt'}\n")
    out = run_snakemake(tmp_path / "wd", "-n", configfiles=(CPU_SMALL, TINY, overlay), check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "input.format dicom gives no slice labels" in text, text[-3000:]
    assert "set model.classifier and model.segmenter" in text
    # ingestion alone needs no labels
    out = run_snakemake(tmp_path / "wd", "-n", "ingest", configfiles=(CPU_SMALL, TINY, overlay))
    assert dry_run_jobs(out.stdout + out.stderr).get("ingest_batch")
