"""Bad inputs through the real snakemake (mostly the fast `ingest` target).

What a user sees for each fault:
- a scan the workflow cannot use is a row of results/scans.tsv with status ``rejected`` and a
  one-line reason naming the file or the header value at fault; it leaves no output files;
- the other scans go on, and their outputs are byte-identical to a run without the faulty ones;
- a bad sample sheet or config stops snakemake before any job (exit status 1), with a message
  naming the row/key, and writes nothing under results/;
- an empty cohort stops the run (exit 1: nothing to report, most likely a wrong input.path);
  a cohort whose every scan is rejected completes (exit 0) with results/scans.tsv and a warning
  counting the reasons. When every scan passes planning but fails conversion, the `ingest`
  target still exits 0; the full run then stops at train_classifier (exit 1, "no usable
  training scans" in logs/train_classifier.log).
"""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from badinput import (
    all_rejected_cohort, checksums, physionet_bad_cohort, physionet_cohort, physionet_config, read_scans,
    rsna_bad_cohort, rsna_cohort, rsna_config, snakemake,
)
from hemocam.labelset import LABELS


def _row(scans, scan_id):
    hit = scans[scans["scan_id"] == scan_id]
    assert len(hit) == 1, f"{scan_id} not once in scans.tsv:\n{scans}"
    return hit.iloc[0]


def _no_outputs(results, scan_id):
    found = [p for sub in ("nifti", "labels", "masks") for p in (results / sub).glob(f"{scan_id}.*")]
    assert not found, found


def _one_line_rows(results):
    lines = (results / "scans.tsv").read_text().splitlines()
    assert all(line.count("\t") == 9 for line in lines), "a scans.tsv row spans several lines"


# ----------------------------------------------------------------------------- DICOM faults


@pytest.fixture(scope="module")
def rsna(tmp_path_factory):
    """The same cohort ingested twice: clean, and with one broken copy of a series per fault."""
    root = tmp_path_factory.mktemp("rsna")
    rsna_cohort(root / "base")
    made = rsna_bad_cohort(root / "base", root / "bad")
    snakemake(root / "run_base", rsna_config(root / "base"), "ingest")
    proc = snakemake(root / "run_bad", rsna_config(root / "bad"), "ingest")
    return {"root": root, "made": made, "base": root / "run_base" / "results", "bad": root / "run_bad" / "results",
            "scans": read_scans(root / "run_bad" / "results"), "proc": proc}


def test_truncated_last_slice_is_dropped_and_named(rsna):
    made, scans = rsna["made"], rsna["scans"]
    row = _row(scans, made["truncated_top"])
    assert row["status"] == "ok", row["reason"]
    assert f"dropped 1 truncated file(s): {made['truncated_top_file']}" in row["notes"]
    assert row["n_slices"] == "13"  # an integer, also with rejected scans in the batch
    # the same pixels and grid as the intact source series, less its top slice
    src = nib.load(rsna["base"] / "nifti" / f"{made['source']}.nii.gz")
    got = nib.load(rsna["bad"] / "nifti" / f"{made['truncated_top']}.nii.gz")
    assert np.array_equal(np.asanyarray(got.dataobj), np.asanyarray(src.dataobj)[:, :, :13])
    np.testing.assert_allclose(got.affine, src.affine, atol=1e-4)
    lab_src = pd.read_csv(rsna["base"] / "labels" / f"{made['source']}.tsv", sep="\t")
    lab = pd.read_csv(rsna["bad"] / "labels" / f"{made['truncated_top']}.tsv", sep="\t")
    pd.testing.assert_frame_equal(lab, lab_src.iloc[:13])


def test_truncated_middle_slice_is_named_and_never_silently_closed(rsna):
    made, scans = rsna["made"], rsna["scans"]
    row = _row(scans, made["truncated_mid"])
    name = made["truncated_mid_file"]
    if row["status"] == "rejected":
        assert name in row["reason"]
        _no_outputs(rsna["bad"], made["truncated_mid"])
        return
    # converted: the gap must be said and filled on an even grid, not closed up
    assert name in row["notes"] and "resampled" in row["notes"], row["notes"]
    got = nib.load(rsna["bad"] / "nifti" / f"{made['truncated_mid']}.nii.gz")
    src_id = sorted(set(read_scans(rsna["base"])["scan_id"]))[1]
    src = nib.load(rsna["base"] / "nifti" / f"{src_id}.nii.gz")
    assert got.shape == src.shape
    np.testing.assert_allclose(got.affine, src.affine, atol=1e-3)
    same = [np.array_equal(np.asanyarray(got.dataobj)[:, :, k], np.asanyarray(src.dataobj)[:, :, k])
            for k in range(got.shape[2])]
    assert sum(same) == got.shape[2] - 1, same  # every slice but the lost one is the original


def test_non_dicom_files_are_recorded_and_the_rest_goes_on(rsna):
    made, bad = rsna["made"], rsna["bad"]
    index = pd.concat([pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False, quoting=3)
                       for p in sorted((bad / "ingest").glob("index.tsv*")) if not p.name.endswith(".key")])
    index["name"] = index["path"].str.rsplit("/", n=1).str[-1]
    for name in made["non_dicom"]:
        hit = index[index["name"] == name]
        assert len(hit) == 1 and hit["readable"].iloc[0].lower() in ("false", "0"), name
        assert "not DICOM" in hit["error"].iloc[0]
    scans = rsna["scans"]
    assert not scans["source"].str.contains("README|junk|empty").any()
    base_ids = set(read_scans(rsna["base"])["scan_id"])
    assert (scans.set_index("scan_id").loc[sorted(base_ids), "status"] == "ok").all()


@pytest.mark.parametrize("fault, reason", [
    ("few_slices", "5 slice(s) < ingest.min_slices 10"),
    ("mr", "not CT (modality MR)"),
    ("coronal", "non-axial reconstruction (slice normal 90.0 deg from z"),
    ("sagittal", "non-axial reconstruction (slice normal 90.0 deg from z"),
    ("slope100", "of voxels outside [-1100, 3100] HU"),
])
def test_unusable_series_rejected_with_reason(rsna, fault, reason):
    row = _row(rsna["scans"], rsna["made"][fault])
    assert row["status"] == "rejected" and reason in row["reason"], dict(row)
    assert row["split"] == ""
    _no_outputs(rsna["bad"], rsna["made"][fault])


def test_accepted_scans_identical_to_a_run_without_the_bad_ones(rsna):
    base = checksums(rsna["base"])
    assert len(base) == 12  # 4 scans x (nifti, labels, mask)
    bad = checksums(rsna["bad"])
    assert {k: bad.get(k) for k in base} == base
    extra = set(bad) - set(base)
    made = rsna["made"]
    assert {k.split("/")[1].split(".")[0] for k in extra} <= {made["truncated_top"], made["truncated_mid"]}
    _one_line_rows(rsna["bad"])
    assert "Traceback" not in rsna["proc"].out


# ----------------------------------------------------------------------------- NIfTI faults


@pytest.fixture(scope="module")
def physionet(tmp_path_factory):
    root = tmp_path_factory.mktemp("physionet")
    physionet_cohort(root / "base")
    made = physionet_bad_cohort(root / "base", root / "bad")
    snakemake(root / "run_base", physionet_config(root / "base"), "ingest")
    proc = snakemake(root / "run_bad", physionet_config(root / "bad"), "ingest")
    return {"root": root, "made": made, "base": root / "run_base" / "results", "bad": root / "run_bad" / "results",
            "scans": read_scans(root / "run_bad" / "results"), "proc": proc}


@pytest.mark.parametrize("fault, reason", [
    ("truncated_nifti", "ct_scans/{id}.nii: unreadable NIfTI"),
    ("broken_header", "ct_scans/{id}.nii: unreadable NIfTI"),
    ("mask_affine", "masks/{id}.nii: mask does not overlap"),
    ("mask_2d", "masks/{id}.nii: mask has shape (48, 48), not 3D"),
    ("labels_beyond", "hemorrhage_diagnosis_raw_metadata.csv covers 12 of 12 slices; beyond the volume [12, 16]"),
    ("labels_missing", "covers 10 of 12 slices; missing [0, 1]"),
    ("no_labels", "no rows in"),
    ("slope100", "ct_scans/{id}.nii: "),
])
def test_bad_nifti_scans_rejected_with_reason(physionet, fault, reason):
    sid = physionet["made"][fault]
    row = _row(physionet["scans"], sid)
    assert row["status"] == "rejected" and reason.format(id=sid) in row["reason"], dict(row)
    _no_outputs(physionet["bad"], sid)


def test_out_of_range_hu_names_the_range(physionet):
    row = _row(physionet["scans"], physionet["made"]["slope100"])
    assert "of voxels outside [-1100, 3100] HU" in row["reason"]


def test_mask_of_another_shape_is_resampled_onto_the_scan_grid(physionet):
    sid = physionet["made"]["mask_shape"]
    row = _row(physionet["scans"], sid)
    assert row["status"] == "ok" and "mask resampled onto the scan grid" in row["notes"], dict(row)
    assert "mask grid covers 10 of 12 scan slices" in row["notes"]  # the 2 others read as no bleed
    ct = nib.load(physionet["bad"] / "nifti" / f"{sid}.nii.gz")
    mask = nib.load(physionet["bad"] / "masks" / f"{sid}.nii.gz")
    assert mask.shape == ct.shape and np.allclose(mask.affine, ct.affine)
    full = np.asanyarray(nib.load(physionet["base"] / "masks" / "049.nii.gz").dataobj)
    got = np.asanyarray(mask.dataobj)
    assert np.array_equal(got[:, :, :-2], full[:, :, :-2]) and not got[:, :, -2:].any()


def test_nifti_accepted_scans_identical_and_rows_one_line(physionet):
    base = checksums(physionet["base"])
    assert len(base) == 9
    bad = checksums(physionet["bad"])
    assert {k: bad.get(k) for k in base} == base
    assert {k.split("/")[1].split(".")[0] for k in set(bad) - set(base)} == {physionet["made"]["mask_shape"]}
    _one_line_rows(physionet["bad"])
    assert "Traceback" not in physionet["proc"].out


def test_min_slices_reruns_nifti_ingestion(physionet, tmp_path):
    # a NIfTI scan's slice count is first read at conversion: the batch plans must change
    run = tmp_path / "run"
    shutil.copytree(physionet["base"].parent, run, symlinks=True)
    cfg = physionet_config(physionet["root"] / "base")
    proc = snakemake(run, {**cfg, "ingest": {"min_slices": 13}}, "ingest")
    scans = read_scans(run / "results")
    assert len(scans) == 3 and set(scans["status"]) == {"rejected"}, scans
    assert scans["reason"].str.contains(r"\.nii: 12 slices < ingest\.min_slices 13").all(), scans["reason"]
    assert not checksums(run / "results")  # nothing of the earlier ingestion is left as a result
    proc = snakemake(run, cfg, "ingest")
    assert "Nothing to be done" not in proc.out
    assert checksums(run / "results") == checksums(physionet["base"])


def test_samplesheet_label_rows_and_unlabelled_scans(physionet, tmp_path):
    base = physionet["root"] / "base"
    sheet = tmp_path / "sheet.tsv"
    sheet.write_text("scan_id\timage\tmask\n"
                     f"a\t{base}/ct_scans/049.nii\t{base}/masks/049.nii\n"
                     f"b\t{base}/ct_scans/050.nii\t\n"
                     f"c\t{base}/ct_scans/051.nii\t\n")
    rows = [{"scan_id": sid, "slice": k, **{lab: 0 for lab in LABELS}} for sid in ("a", "c") for k in range(12)]
    rows.append({"scan_id": "c", "slice": 40, **{lab: 0 for lab in LABELS}})  # no slice 40 in c
    pd.DataFrame(rows).to_csv(tmp_path / "labels.tsv", sep="\t", index=False)
    cfg = {"input": {"format": "samplesheet", "path": str(sheet), "labels": str(tmp_path / "labels.tsv"),
                     "masks": "", "scan_id": "uid", "scan_id_key": ""}}
    snakemake(tmp_path / "run", cfg, "ingest")
    res = tmp_path / "run" / "results"
    scans = read_scans(res)
    a, b, c = (_row(scans, s) for s in "abc")
    assert a["status"] == "ok" and (res / "labels" / "a.tsv").exists() and (res / "masks" / "a.nii.gz").exists()
    # no label rows: segmentable, not trainable: kept without a labels file, and said so
    assert b["status"] == "ok" and "no label rows" in b["notes"] and not (res / "labels" / "b.tsv").exists()
    assert c["status"] == "rejected" and "beyond the volume [40]" in c["reason"], dict(c)
    _no_outputs(res, "c")
    assert (res / "nifti" / "a.nii.gz").read_bytes() == (physionet["base"] / "nifti" / "049.nii.gz").read_bytes()


# ----------------------------------------------------------------------------- refused before any job


def _refused(proc, workdir, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.out, proc.out[-3000:]
    for needle in needles:
        assert needle in proc.out, f"{needle!r} not in:\n{proc.out[-3000:]}"
    assert not (workdir / "results").exists(), sorted((workdir / "results").rglob("*"))
    assert not (workdir / "logs").exists()


@pytest.mark.parametrize("ids, needle", [
    (["a1", "a1"], "duplicate scan_id values: a1"),
    (["a1", "../x"], "'../x' does not match"),
    (["a1", "/abs/x"], "'/abs/x' does not match"),
    (["a1", "has space"], "'has space' does not match"),
])
def test_bad_sample_sheet_ids_refused_before_any_job(tmp_path, ids, needle):
    img = tmp_path / "x.nii.gz"
    img.write_bytes(b"")  # never opened: the sheet is refused first
    sheet = tmp_path / "sheet.tsv"
    sheet.write_text("scan_id\timage\n" + "".join(f"{i}\t{img}\n" for i in ids))
    cfg = {"input": {"format": "samplesheet", "path": str(sheet), "labels": "", "masks": "", "scan_id": "uid",
                     "scan_id_key": ""}}
    proc = snakemake(tmp_path / "run", cfg, "ingest", check=False)
    _refused(proc, tmp_path / "run", needle, str(sheet) if "duplicate" in needle else "scan_id")


@pytest.mark.parametrize("overlay, needles", [
    ({"classifier": {"epochs": "ten"}}, ["'ten' is not of type 'integer'", "['classifier']['epochs']"]),
    ({"ingest": {"min_slices": 0}}, ["0 is less than the minimum of 1", "['ingest']['min_slices']"]),
    ({"input": {"format": "nrrd"}}, ["'nrrd' is not one of", "['input']['format']"]),
    ({"ingest": {"min_slice": 3}}, ["'min_slice' was unexpected", "['ingest']"]),
    ({"preprocess": {"windows": [{"name": "brain", "center": 40, "width": 0}]}},
     ["0 is less than or equal to the minimum of 0", "['preprocess']['windows'][0]['width']"]),
])
def test_bad_config_refused_naming_the_key(tmp_path, overlay, needles):
    cohort = tmp_path / "cohort"
    (cohort / "dicom").mkdir(parents=True)
    cfg = rsna_config(cohort)
    for key, value in overlay.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    proc = snakemake(tmp_path / "run", cfg, "ingest", check=False)
    _refused(proc, tmp_path / "run", "Error validating config file", *needles)


@pytest.mark.parametrize("section, old, new", [("pseudomask", "bone_margin", "bone_margin_mm (voxels -> millimetres"),
                                              ("segmenter", "min_component_voxels", "min_component_ml (voxels -> millilitres")])
def test_a_renamed_key_is_refused_with_its_new_name(tmp_path, section, old, new):
    cohort = tmp_path / "cohort"
    (cohort / "dicom").mkdir(parents=True)
    cfg = {**rsna_config(cohort), section: {old: 1}}
    proc = snakemake(tmp_path / "run", cfg, "ingest", check=False)
    _refused(proc, tmp_path / "run", f"{section}.{old} is now {section}.{new}")


# ----------------------------------------------------------------------------- nothing usable


def test_empty_cohort_stops_with_a_message(tmp_path):
    cohort = tmp_path / "cohort"
    (cohort / "dicom").mkdir(parents=True)
    (cohort / "dicom" / "notes.txt").write_text("not a scan\n")
    (cohort / "labels.csv").write_text("ID,Label\n")
    proc = snakemake(tmp_path / "run", rsna_config(cohort, masks=""), check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.out
    assert f"hemocam: no candidate scans in input.path {cohort / 'dicom'} (input.format rsna)" in proc.out
    assert not (tmp_path / "run" / "results" / "scans.tsv").exists()
    assert not (tmp_path / "run" / "logs").exists()  # no job ran


def test_a_masks_folder_that_does_not_exist_stops_with_a_message(tmp_path):
    # else the evaluation, its figures and the upper bound would quietly come out empty
    rsna_cohort(tmp_path / "cohort", n_scans=1)
    proc = snakemake(tmp_path / "run", rsna_config(tmp_path / "cohort", masks=str(tmp_path / "nowhere")), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.out
    assert f"hemocam: input.masks {tmp_path / 'nowhere'} is not a folder" in proc.out
    assert not (tmp_path / "run" / "logs").exists()  # no job ran


def test_every_scan_rejected_completes_with_the_reasons(tmp_path):
    rsna_cohort(tmp_path / "base", n_scans=1)
    made = all_rejected_cohort(tmp_path / "base", tmp_path / "cohort")
    cfg = rsna_config(tmp_path / "cohort", masks="")
    proc = snakemake(tmp_path / "run", cfg)  # the default target
    assert "Traceback" not in proc.out
    assert "hemocam: all 3 candidate scans in input.path" in proc.out
    for line in ("1 x not CT (modality MR)", "1 x 4 slice(s) < ingest.min_slices 10", "1 x non-axial reconstruction"):
        assert line in proc.out
    assert "results/scans.tsv gives the reason of each scan" in proc.out
    res = tmp_path / "run" / "results"
    scans = read_scans(res)
    assert sorted(scans["scan_id"]) == sorted(made.values())
    assert (scans["status"] == "rejected").all() and (scans["reason"] != "").all()
    assert not (res / "nifti").exists() and not (res / "classifier").exists()
    again = snakemake(tmp_path / "run", cfg, extra=("-n",))
    assert "Nothing to be done" in again.out


def test_every_scan_rejected_at_conversion(tmp_path):
    """Planning cannot see a wrong rescale: `ingest` completes and says why for each scan."""
    rsna_cohort(tmp_path / "base", n_scans=2)
    from badinput import _slope, derive_series, series_files

    (tmp_path / "cohort" / "dicom").mkdir(parents=True)
    labels = pd.read_csv(tmp_path / "base" / "labels.csv", dtype=str)
    rows = []
    for i, files in enumerate(series_files(tmp_path / "base" / "dicom").values()):
        rows.append(derive_series(files, tmp_path / "cohort" / "dicom", f"s{i}", edit=_slope(100), labels=labels)[2])
    pd.concat(rows).to_csv(tmp_path / "cohort" / "labels.csv", index=False)
    proc = snakemake(tmp_path / "run", rsna_config(tmp_path / "cohort", masks=""), "ingest")
    assert "Traceback" not in proc.out
    scans = read_scans(tmp_path / "run" / "results")
    assert len(scans) == 2 and (scans["status"] == "rejected").all()
    assert scans["reason"].str.contains(r"ingest: scan .*% of voxels outside \[-1100, 3100\] HU", regex=True).all()
    shutil.rmtree(tmp_path / "cohort")
