"""An INSTANCE 2022-like cohort (NIfTI scans and masks, no slice labels): binary slice labels
derived from the masks (``input.labels: masks``), as the paper's classifier learns them."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import CPU_SMALL, TINY, run_snakemake
from hemocam.ingest.labels import mask_slice_labels, read_sheet_labels, sheet_label_columns
from hemocam.io import InputError
from hemocam.phantom.physionet import generate_physionet_cohort


def test_mask_slice_labels_mark_the_slices_with_a_voxel():
    mask = np.zeros((4, 5, 6), np.uint8)
    mask[1, 2, 1] = 1
    mask[0, 4, 4] = 2  # any label value of a multi-class mask counts
    got = mask_slice_labels(mask)
    assert list(got.columns) == ["slice", "any"]
    assert got["slice"].tolist() == list(range(6)) and got["any"].tolist() == [0, 1, 0, 0, 1, 0]


def test_sheet_labels_may_give_any_alone(tmp_path):
    path = tmp_path / "labels.tsv"
    path.write_text("scan_id\tslice\tany\nA\t0\t0\nA\t1\t1\n")
    got = read_sheet_labels(path)
    assert list(got.columns) == ["scan_id", "slice", "any"] and got["any"].tolist() == [0, 1]
    assert sheet_label_columns(path) == ["any"] and sheet_label_columns("masks") == ["any"]
    path.write_text("scan_id\tslice\tsubdural\nA\t0\t0\n")
    with pytest.raises(InputError, match=r"missing columns \['any'\]"):
        read_sheet_labels(path)
    path.write_text("scan_id\tslice\tany\tsubdural\nA\t0\t1\t2\n")
    with pytest.raises(InputError, match="labels 0 or 1"):
        read_sheet_labels(path)


@pytest.fixture(scope="module")
def instance_like(tmp_path_factory):
    root = tmp_path_factory.mktemp("instance")
    generate_physionet_cohort(root / "src", n_scans=8, matrix=48, n_slices=16, seed=11)
    rows = [f"{p.stem}\t{p}\t{root / 'src/masks' / p.name}\n" for p in sorted((root / "src/ct_scans").glob("*.nii"))]
    rows[-1] = rows[-1].rsplit("\t", 1)[0] + "\t\n"  # one scan without a mask: segmentable, not trainable
    sheet = root / "sheet.tsv"
    sheet.write_text("scan_id\timage\tmask\n" + "".join(rows))
    overlay = root / "instance.yaml"
    overlay.write_text(f"input:\n  format: samplesheet\n  path: {sheet}\n  labels: masks\n  masks: ''\n"
                       "classifier:\n  labels: [any]\n")
    return {"root": root, "sheet": sheet, "overlay": overlay}


@pytest.mark.workflow
def test_a_cohort_of_masks_trains_on_slice_labels_derived_from_them(instance_like):
    wd = instance_like["root"] / "run"
    run_snakemake(wd, configfiles=(CPU_SMALL, TINY, instance_like["overlay"]))
    r = wd / "results"
    scans = pd.read_csv(r / "scans.tsv", sep="\t", dtype=str, keep_default_na=False).set_index("scan_id")
    assert (scans["status"] == "ok").all() and len(scans) == 8
    unmasked = sorted(scans.index)[-1]
    assert "no mask to derive slice labels from" in scans.loc[unmasked, "notes"]
    assert not (r / "labels" / f"{unmasked}.tsv").exists()
    for sid in sorted(scans.index)[:-1]:
        labels = pd.read_csv(r / "labels" / f"{sid}.tsv", sep="\t")
        mask = np.asanyarray(nib.load(r / "masks" / f"{sid}.nii.gz").dataobj)
        assert list(labels.columns) == ["slice", "any"]
        assert labels["any"].tolist() == mask.any(axis=(0, 1)).astype(int).tolist()
    metrics = pd.read_csv(r / "classifier/metrics.tsv", sep="\t")
    assert set(metrics["label"]) - {"weighted"} == {"any"}, metrics  # "weighted": over the labels
    summary = pd.read_csv(r / "metrics/summary.tsv", sep="\t")
    assert {"segmenter", "pseudomask", "upper_bound"} <= set(summary["method"])
    assert len(list((r / "segmentation").glob("*_prob.nii.gz"))) == 8


@pytest.mark.workflow
def test_subtype_labels_that_masks_cannot_give_are_refused(instance_like, tmp_path):
    overlay = tmp_path / "six.yaml"
    overlay.write_text(instance_like["overlay"].read_text().split("classifier:")[0])
    out = run_snakemake(tmp_path / "wd", "-n", configfiles=(CPU_SMALL, TINY, overlay), check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-2000:]
    assert "classifier.labels asks for epidural" in text and "set classifier.labels to [any]" in text, text[-3000:]
