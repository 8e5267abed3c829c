"""Ingestion on small DICOM/NIfTI series built here with pydicom/nibabel (known answers)."""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from conftest import REPO, assert_no_markers
from hemocam.ingest import ingest_batch, plan_cohort, write_batch_plans, write_scans_table
from hemocam.ingest import hu as hu_mod
from hemocam.ingest import index as ix
from hemocam.ingest.convert import pick_output, scrub
from hemocam.ingest.plan import assign_splits, read_samplesheet
from hemocam.ingest.series import classify_series, scan_id_for
from hemocam.io import InputError, read_tsv, save_nifti
from hemocam.labelset import LABELS

MARKERS = ["PHIMARKERNAME", "PHIMARKERID", "PHIMARKERHOSP", "PHIMARKERACC"]
SIZE = 32


def brain_value(s):
    """HU of the central 'brain' of slice s: identifies the DICOM slice after conversion."""
    return 20 + 3 * s


def slice_hu(s, size=SIZE):
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    r = np.hypot(yy, xx)
    img = np.full((size, size), -1000, np.int16)
    img[r < size * 0.42] = 900  # skull
    img[r < size * 0.36] = brain_value(s)
    return img


def write_series(*args, **kwargs):
    with warnings.catch_warnings():  # RSNA-style "ID_..." SOP UIDs are not valid UI values
        warnings.simplefilter("ignore")
        return _write_series(*args, **kwargs)


def _write_series(folder, n=12, dz=2.5, z0=10.0, iop=(1, 0, 0, 0, 1, 0), patient="PHIMARKERID", study=None,
                 series=None, wrap=False, modality="CT", image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                 sop_class=CTImageStorage, rng=None, positions=None, padding=None, instance_order=None):
    """One CT series as flat ID_<sop>.dcm files (RSNA style); returns rows (path, sop, z, s)."""
    rng = rng or np.random.default_rng(0)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series = series or generate_uid()
    study = study or generate_uid()
    positions = positions if positions is not None else [z0 + dz * s for s in range(n)]
    inst = instance_order if instance_order is not None else rng.permutation(len(positions)) + 1
    r, c = np.array(iop[:3], float), np.array(iop[3:], float)
    out = []
    for s, z in enumerate(positions):
        sop = "ID_" + generate_uid()[-12:].replace(".", "")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{sop}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality = modality
        ds.PatientName, ds.PatientID = "Doe^PHIMARKERNAME", patient
        ds.InstitutionName, ds.AccessionNumber = "PHIMARKERHOSP", "PHIMARKERACC"
        ds.PatientBirthDate, ds.PatientPosition = "19700101", "HFS"
        ds.ImageType = list(image_type)
        ds.SeriesNumber, ds.InstanceNumber = 2, int(inst[s])
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        origin = np.array([-12.4, -12.4, 0.0]) + z * np.cross(r, c)
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin]
        ds.PixelSpacing, ds.SliceThickness = ["0.8", "0.8"], f"{dz:.2f}"
        ds.Rows = ds.Columns = SIZE
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = 16
        hu = slice_hu(s)
        if padding is not None:
            hu = hu.copy()
            hu[:3, :] = padding
            ds.PixelPaddingValue = padding
        if wrap:  # RSNA fault: negative HU stored as unsigned 12 bit with intercept 0
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
            ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
            ds.PixelData = (hu.astype(np.int32) % 4096).astype(np.uint16).tobytes()
        else:
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
            ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
            ds.PixelData = hu.astype(np.int16).tobytes()
        ds.save_as(path, enforce_file_format=True)
        out.append({"path": str(path), "sop": sop, "z": z, "s": s})
    return pd.DataFrame(out)


def cfg_for(path, fmt="rsna", labels="", masks="", **ingest):
    return {
        "seed": 7,
        "input": {"format": fmt, "path": str(path), "labels": str(labels), "masks": str(masks),
                  "scan_id": "uid", "scan_id_key": ""},
        "split": {"train": 0.6, "val": 0.2, "test": 0.2},
        "ingest": {"min_slices": 5, "hu_min": -1100, "hu_max": 3100, "index_threads": 1, **ingest},
    }


def write_rsna_labels(path, rows: pd.DataFrame, positive):
    lines = []
    for sop, s in zip(rows["sop"], rows["s"]):
        for lab in LABELS:
            pos = s in positive and lab in ("any", "subdural")
            lines.append((f"{sop}_{lab}", int(pos)))
    pd.DataFrame(lines, columns=["ID", "Label"]).sample(frac=1, random_state=3).to_csv(path, index=False)


def run_all(cfg, results, batches=1, threads=1):
    plan = plan_cohort(cfg, results / "ingest")
    ok = sorted(plan.scans.loc[plan.scans["status"] == "ok", "scan_id"])
    groups = {f"c{i:04d}": ok[i::batches] for i in range(batches) if ok[i::batches]}
    write_batch_plans(plan, groups, results / "ingest" / "plan")
    manifests = []
    for b in groups:
        m = results / "ingest" / "batches" / f"{b}.tsv"
        ingest_batch(results / "ingest" / "plan" / f"{b}.tsv", cfg, results, m, threads=threads)
        manifests.append(m)
    table = write_scans_table(plan, manifests, results / "scans.tsv")
    return plan, table


def decode_slices(nifti):
    """For each NIfTI slice, the DICOM slice s whose brain value it holds."""
    a = np.asanyarray(nib.load(str(nifti)).dataobj)
    c = a[SIZE // 2 - 2:SIZE // 2 + 2, SIZE // 2 - 2:SIZE // 2 + 2, :].reshape(-1, a.shape[2])
    return (np.median(c, axis=0) - 20) / 3


# ----------------------------------------------------------------------------- index


def test_index_records_non_dicom_truncated_and_reuses_cache(tmp_path, monkeypatch):
    rows = write_series(tmp_path / "in" / "a", n=6)
    (tmp_path / "in" / "README.txt").write_text("not a dicom file\n")
    (tmp_path / "in" / "a" / "empty.dcm").write_bytes(b"")
    victim = rows["path"][2]
    data = Path(victim).read_bytes()
    Path(victim).write_bytes(data[:-700])  # pixel data cut short
    cache = tmp_path / "cache" / "index.tsv.gz"
    df = ix.index_dicom(tmp_path / "in", threads=1, cache=cache)
    assert len(df) == 8
    by = df.set_index(df["path"].map(lambda p: Path(p).name))
    assert not by.loc["README.txt", "readable"] and "not DICOM" in by.loc["README.txt", "error"]
    assert not by.loc["empty.dcm", "readable"]
    assert by.loc[Path(victim).name, "truncated"] and by.loc[Path(victim).name, "readable"]
    assert by["truncated"].sum() == 1
    assert (by.loc[by["readable"], "expected_pixel_bytes"] == SIZE * SIZE * 2).all()
    assert "patient_key" not in df and "PHIMARKERID" not in df.to_csv()
    assert set(df.loc[df["readable"], "patient_group"]) == {0}

    calls = []
    real = ix.read_header
    monkeypatch.setattr(ix, "read_header", lambda p, s: calls.append(p) or real(p, s))
    before = cache.stat().st_mtime_ns
    again = ix.index_dicom(tmp_path / "in", threads=1, cache=cache)
    assert calls == [] and cache.stat().st_mtime_ns == before  # nothing read, cache untouched
    pd.testing.assert_frame_equal(again, df)
    os.utime(rows["path"][0], ns=(1, 1))
    write_series(tmp_path / "in" / "b", n=1)
    third = ix.index_dicom(tmp_path / "in", threads=1, cache=cache)
    assert len(calls) == 2 and len(third) == 9
    assert cache.stat().st_mtime_ns != before
    assert b"PHIMARKER" not in __import__("gzip").decompress(cache.read_bytes())


def test_index_of_a_moved_project_is_reused(tmp_path, monkeypatch):
    import shutil

    write_series(tmp_path / "proj" / "in" / "a", n=4)
    monkeypatch.chdir(tmp_path / "proj")  # the workdir, data and results inside it
    df = ix.index_dicom("in", threads=1, cache=Path("results/index.tsv"))
    assert str(tmp_path) not in Path("results/index.tsv").read_text()  # paths stored relative
    shutil.copytree(tmp_path / "proj", tmp_path / "moved", symlinks=True)  # like cp -a: mtimes kept
    monkeypatch.chdir(tmp_path / "moved")
    monkeypatch.setattr(ix, "read_header", lambda *a: pytest.fail("header re-read after the move"))
    again = ix.index_dicom("in", threads=1, cache=Path("results/index.tsv"))
    assert again["path"].tolist() == [p.replace(str(tmp_path / "proj"), str(tmp_path / "moved")) for p in df["path"]]
    assert all(os.path.isfile(p) for p in again["path"])


def test_index_processes_match_serial(tmp_path):
    write_series(tmp_path / "a", n=8)
    write_series(tmp_path / "b", n=8, patient="OTHER")
    serial = ix.index_dicom(tmp_path, threads=1)
    procs = ix.index_dicom(tmp_path, threads=2, executor="process")
    cols = [c for c in serial.columns if c != "patient_group"]
    pd.testing.assert_frame_equal(serial[cols], procs[cols])
    assert serial["patient_group"].nunique() == 2


# ----------------------------------------------------------------------------- series


def test_classification_reasons(tmp_path):
    write_series(tmp_path / "ok", n=8)
    write_series(tmp_path / "loc", n=1, iop=(0, 1, 0, 0, 0, -1), image_type=("ORIGINAL", "PRIMARY", "OTHER"))
    write_series(tmp_path / "sag", n=8, iop=(0, 1, 0, 0, 0, -1))
    write_series(tmp_path / "few", n=3)
    write_series(tmp_path / "mr", n=8, modality="MR")
    write_series(tmp_path / "sc", n=8, sop_class=SecondaryCaptureImageStorage)
    write_series(tmp_path / "tilt", n=8, iop=(1, 0, 0, 0, np.cos(0.35), -np.sin(0.35)))
    idx = ix.index_dicom(tmp_path, threads=1)
    ser = classify_series(idx, min_slices=5, roots=[tmp_path]).set_index("source")
    assert ser.loc["ok", "status"] == "ok" and ser.loc["tilt", "status"] == "ok"
    assert ser.loc["tilt", "tilt_deg"] == pytest.approx(np.degrees(0.35), abs=0.01)
    assert ser.loc["loc", "reason"].startswith("localizer (single non-axial")
    assert ser.loc["sag", "reason"].startswith("non-axial reconstruction")
    assert ser.loc["few", "reason"] == "3 slice(s) < ingest.min_slices 5"
    assert ser.loc["mr", "reason"] == "not CT (modality MR)"
    assert ser.loc["sc", "reason"] == "secondary capture"


def test_scan_ids_uid_and_hash():
    assert scan_id_for("1.2.3") == "1.2.3"
    assert scan_id_for("1.2 3/4") == "1.2_3_4"
    h = scan_id_for("1.2.3", "hash", "key")
    assert h.startswith("s") and len(h) == 17 and h == scan_id_for("1.2.3", "hash", "key")
    assert h != scan_id_for("1.2.3", "hash", "other")
    with pytest.raises(ValueError, match="scan_id_key"):
        scan_id_for("1.2.3", "hash", "")


# ----------------------------------------------------------------------------- conversion + labels


def test_rsna_labels_follow_world_position_not_instance_number(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hemocam")
    rng = np.random.default_rng(5)
    rows = write_series(tmp_path / "dicom", n=10, rng=rng, patient="PHIMARKERID")
    # a second series in the same flat folder must not leak into the first
    other = write_series(tmp_path / "dicom", n=7, rng=rng, patient="PHIMARKERID", z0=100)
    labels = tmp_path / "labels.csv"
    positive = {3, 4, 5}
    write_rsna_labels(labels, pd.concat([rows, other]), positive)
    with open(labels, "a") as fh:
        fh.write("ID_unknown_any,1\nID_unknown_subdural,1\n")
    res = tmp_path / "results"
    plan, table = run_all(cfg_for(tmp_path / "dicom", labels=labels), res)
    assert (table["status"] == "ok").all() and len(table) == 2
    for sid, n in zip(table["scan_id"], table["n_slices"]):
        s_of_k = decode_slices(res / "nifti" / f"{sid}.nii.gz")
        assert np.allclose(s_of_k, np.round(s_of_k))  # every NIfTI slice is one DICOM slice
        lab = read_tsv(res / "labels" / f"{sid}.tsv")
        assert list(lab.columns) == ["slice", *LABELS] and list(lab["slice"]) == list(range(int(n)))
        expect = np.isin(np.round(s_of_k), list(positive)).astype(int)
        assert (lab["subdural"].to_numpy() == expect).all() and (lab["any"].to_numpy() == expect).all()
        assert lab[["epidural", "intraparenchymal"]].to_numpy().sum() == 0
    img = nib.load(str(res / "nifti" / f"{table['scan_id'][0]}.nii.gz"))
    assert img.get_data_dtype() == np.int16
    assert np.allclose(img.header.get_zooms(), (0.8, 0.8, 2.5), atol=1e-3)
    assert_no_markers([res], MARKERS)
    assert not any(m in caplog.text for m in MARKERS)
    assert "1 labelled SOPs of" in caplog.text  # the unknown SOP's rows, counted and ignored


def test_hash_scan_ids(tmp_path):
    rows = write_series(tmp_path / "dicom", n=6)
    cfg = cfg_for(tmp_path / "dicom", fmt="dicom")
    cfg["input"].update(scan_id="hash", scan_id_key="secret")
    res = tmp_path / "res"
    plan, table = run_all(cfg, res)
    sid = table["scan_id"].iloc[0]
    assert table["status"].iloc[0] == "ok" and len(sid) == 17 and sid.startswith("s")
    assert (res / "nifti" / f"{sid}.nii.gz").exists()
    uid = __import__("pydicom").dcmread(rows["path"][0], stop_before_pixels=True).SeriesInstanceUID
    assert uid not in (res / "scans.tsv").read_text()
    cfg["input"]["scan_id_key"] = ""
    with pytest.raises(ValueError, match="scan_id_key"):
        plan_cohort(cfg, tmp_path / "other")


def test_unlabelled_series_rejected_for_rsna(tmp_path):
    a = write_series(tmp_path / "dicom", n=6)
    write_series(tmp_path / "dicom", n=6, z0=200)
    labels = tmp_path / "labels.csv"
    write_rsna_labels(labels, a, set())
    plan = plan_cohort(cfg_for(tmp_path / "dicom", labels=labels), tmp_path / "r" / "ingest")
    st = plan.scans.set_index("status")
    assert list(plan.scans["status"]).count("ok") == 1
    assert st.loc["rejected", "reason"].startswith("no label rows")


def test_resampled_gap_labels_nearest_slice(tmp_path):
    # uneven positions: dcm2niix resamples (_Eq); labels go to the nearest DICOM slice in z
    z = [0, 2, 4, 6, 8, 14, 16, 18, 20, 22]
    rows = write_series(tmp_path / "dicom", positions=z)
    labels = tmp_path / "labels.csv"
    write_rsna_labels(labels, rows, {5})  # the slice at z = 14
    res = tmp_path / "res"
    plan, table = run_all(cfg_for(tmp_path / "dicom", labels=labels), res)
    row = table.iloc[0]
    assert row["status"] == "ok" and "resampled" in row["notes"]
    img = nib.load(str(res / "nifti" / f"{row['scan_id']}.nii.gz"))
    kz = img.affine[2, 2] * np.arange(img.shape[2]) + img.affine[2, 3]  # world z of each slice
    lab = read_tsv(res / "labels" / f"{row['scan_id']}.tsv")
    want = [int(np.argmin(np.abs(np.array(z) - zz)) == 5) for zz in kz]
    assert lab["subdural"].tolist() == want and sum(want) >= 1


def test_truncated_file_dropped_with_note(tmp_path):
    rows = write_series(tmp_path / "dicom", n=9)
    mid = rows.sort_values("z")["path"].iloc[4]
    Path(mid).write_bytes(Path(mid).read_bytes()[:-100])
    res = tmp_path / "res"
    plan, table = run_all(cfg_for(tmp_path / "dicom", fmt="dicom"), res)
    row = table.iloc[0]
    assert row["status"] == "ok"
    assert "dropped 1 truncated file(s): " + Path(mid).name in row["notes"]
    assert int(row["n_slices"]) == 9  # the gap resampled by dcm2niix
    assert not (res / "labels").exists()


def test_truncated_below_min_slices_rejected_naming_file(tmp_path):
    rows = write_series(tmp_path / "dicom", n=5)
    Path(rows["path"][1]).write_bytes(Path(rows["path"][1]).read_bytes()[:-10])
    res = tmp_path / "res"
    plan, table = run_all(cfg_for(tmp_path / "dicom", fmt="dicom"), res)
    assert table["status"].iloc[0] == "rejected"
    # named relative to the input root (absolute paths may spell identifying folder names)
    assert table["reason"].iloc[0].startswith(Path(rows["path"][1]).name + ": truncated")
    assert not any((res / "nifti").glob("*")) if (res / "nifti").exists() else True


def test_12bit_wrap_repaired(tmp_path):
    write_series(tmp_path / "dicom", n=6, wrap=True)
    res = tmp_path / "res"
    plan, table = run_all(cfg_for(tmp_path / "dicom", fmt="dicom"), res)
    row = table.iloc[0]
    assert row["status"] == "ok" and "12-bit wrap repaired" in row["notes"]
    a = np.asanyarray(nib.load(str(res / "nifti" / f"{row['scan_id']}.nii.gz")).dataobj)
    assert a.min() == -1000 and a.max() == 900  # air and skull back where they belong
    assert sorted(np.round(decode_slices(res / "nifti" / f"{row['scan_id']}.nii.gz"))) == list(range(6))


def test_wrap_left_unrepaired_is_out_of_range():
    wrapped = (slice_hu(0).astype(np.int32) % 4096).astype(float)[..., None].repeat(3, axis=2)
    wrapped[:3] += 100  # wrapped air with noise reaches past 3100
    with pytest.raises(InputError, match="outside"):
        hu_mod.to_hu_int16(wrapped, "x", wrap=False)
    fixed, notes = hu_mod.to_hu_int16(wrapped - np.where(wrapped > 3000, 100, 0), "x", wrap=True)
    assert fixed.min() == -1000 and "12-bit wrap repaired" in notes[0]


def test_padding_clipped_to_air(tmp_path):
    write_series(tmp_path / "dicom", n=6, padding=-2000)
    res = tmp_path / "res"
    plan, table = run_all(cfg_for(tmp_path / "dicom", fmt="dicom"), res)
    row = table.iloc[0]
    a = np.asanyarray(nib.load(str(res / "nifti" / f"{row['scan_id']}.nii.gz")).dataobj)
    assert row["status"] == "ok" and a.min() == -1024 and "padding -2000" in row["notes"]


def test_pick_output_prefers_tilt_corrected_and_refuses_several():
    p = [Path(x) for x in ("vol.nii", "vol_Tilt_Eq_1.nii", "vol_ROI1.nii")]
    assert pick_output(p) == (Path("vol_Tilt_Eq_1.nii"), "tilt_eq")
    assert pick_output([Path("vol.nii"), Path("vol_Eq_1.nii")])[1] == "eq"
    with pytest.raises(InputError, match="several volumes"):
        pick_output([Path("vol.nii"), Path("vola.nii")])


def test_dcm2niix_messages_are_scrubbed():
    text = "Chris Rorden's dcm2niiX\nWarning: name Doe^Jane in 12345\nsome path /x/Jane\nConvert 3 DICOM"
    out = scrub(text, ["Doe^Jane", "Jane", "12345"])
    assert "Jane" not in out and "12345" not in out and "Rorden" not in out and "Convert 3 DICOM" in out


# ----------------------------------------------------------------------------- batched dcm2niix


def spy_dcm2niix(monkeypatch, batched=True):
    """Count dcm2niix calls: ``series`` (one per series), ``batch`` (series per batched call).

    ``batched=False``: the batched call converts nothing, so every series gets its own call (the
    conversion as it was before batching). ``workdirs``: every batched call's scratch tree
    (relative paths), listed before it is removed.
    """
    from hemocam.ingest import convert as cv, ingest as ing

    calls = {"series": 0, "batch": [], "workdirs": []}
    monkeypatch.undo()  # an earlier spy of the same test is replaced, not wrapped
    real_one, real_batch = cv.run_dcm2niix, cv.run_dcm2niix_batch

    def one(*args, **kwargs):
        calls["series"] += 1
        return real_one(*args, **kwargs)

    def batch(series, workdir, *args, **kwargs):
        calls["batch"].append(len(series))
        out = real_batch(series, workdir, *args, **kwargs) if batched else ({}, "", "off in this test")
        names = sorted(str(q.relative_to(workdir)) for q in Path(workdir).rglob("*"))
        calls["workdirs"].append((Path(workdir).name, names))
        return out

    monkeypatch.setattr(cv, "run_dcm2niix", one)
    monkeypatch.setattr(ing, "run_dcm2niix_batch", batch)
    return calls


def same_results(a: Path, b: Path):
    """Byte-identical scans.tsv, manifests, NIfTIs and label tables in two results folders."""

    def outputs(root):  # everything but the planning cache, plus the batch manifests
        files = [q for q in root.rglob("*") if q.is_file() and q.relative_to(root).parts[0] != "ingest"]
        return sorted(str(q.relative_to(root)) for q in files + list((root / "ingest" / "batches").glob("*.tsv")))

    files = outputs(a)
    assert files == outputs(b) and len(files) > 2
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_batched_dcm2niix_gives_the_per_series_outputs(tmp_path, monkeypatch):
    rng = np.random.default_rng(11)
    write_series(tmp_path / "dicom", n=8, rng=rng)
    write_series(tmp_path / "dicom", positions=[0, 2, 4, 6, 8, 14, 16, 18, 20, 22], rng=rng)  # _Eq volume
    write_series(tmp_path / "dicom", n=6, z0=200, wrap=True, rng=rng)
    short = write_series(tmp_path / "other", n=9, z0=400, padding=-2000, rng=rng)
    Path(short["path"][4]).write_bytes(Path(short["path"][4]).read_bytes()[:-100])  # dropped with a note
    cfg = cfg_for(tmp_path, fmt="dicom")
    calls = spy_dcm2niix(monkeypatch)
    plan, table = run_all(cfg, tmp_path / "batched")
    assert calls["batch"] == [4] and calls["series"] == 0  # one dcm2niix call for the four series
    assert (table["status"] == "ok").all() and len(table) == 4
    notes = " | ".join(table["notes"])
    for text in ("resampled to even spacing by dcm2niix", "12-bit wrap repaired", "dropped 1 truncated file(s)",
                 "padding -2000"):
        assert text in notes

    single = spy_dcm2niix(monkeypatch, batched=False)
    run_all(cfg, tmp_path / "single")
    assert single["series"] == 4
    same_results(tmp_path / "batched", tmp_path / "single")


def test_one_broken_series_in_a_batch_keeps_its_own_reason(tmp_path, monkeypatch):
    rng = np.random.default_rng(12)
    write_series(tmp_path / "dicom", n=6, rng=rng)
    write_series(tmp_path / "dicom", n=7, z0=100, rng=rng)
    broken = write_series(tmp_path / "dicom", n=6, z0=200, rng=rng)
    for path in broken["path"]:  # JPEG lossless that is no JPEG: planned fine, dcm2niix cannot decode it
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.70"
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8" + bytes(100) + b"\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
    cfg = cfg_for(tmp_path / "dicom", fmt="dicom")
    plan = plan_cohort(cfg, tmp_path / "p")
    assert (plan.scans["status"] == "ok").all() and len(plan.scans) == 3
    calls = spy_dcm2niix(monkeypatch)
    _, table = run_all(cfg, tmp_path / "batched")
    # the batched call fails: each series then gets its own call, and its own outcome
    assert calls["batch"] == [3] and calls["series"] == 3
    st = table.set_index("scan_id")["status"]
    assert sorted(st) == ["ok", "ok", "rejected"]
    reason = table.loc[table["status"] == "rejected", "reason"].iloc[0]
    assert "dcm2niix failed (exit" in reason and "JPEG" in reason
    single = spy_dcm2niix(monkeypatch, batched=False)
    run_all(cfg, tmp_path / "single")
    same_results(tmp_path / "batched", tmp_path / "single")

    # a series broken after planning (files truncated below min_slices) is rejected before the
    # batched call, naming its file; the others still share one call
    rng = np.random.default_rng(14)
    for z0 in (0, 100, 200):
        write_series(tmp_path / "later", n=6, z0=z0, rng=rng)
    cfg = cfg_for(tmp_path / "later", fmt="dicom")
    res = tmp_path / "later_res"
    plan = plan_cohort(cfg, res / "ingest")
    ids = sorted(plan.scans["scan_id"])
    victims = sorted(plan.files.loc[plan.files["scan_id"] == ids[1], "path"])[:2]
    for v in victims:
        Path(v).write_bytes(Path(v).read_bytes()[:-300])
    write_batch_plans(plan, {"c0000": ids}, res / "ingest" / "plan")
    calls = spy_dcm2niix(monkeypatch)
    man = ingest_batch(res / "ingest" / "plan" / "c0000.tsv", cfg, res, res / "ingest" / "batches" / "c0000.tsv")
    assert calls["batch"] == [2] and calls["series"] == 0
    by = man.set_index("scan_id")
    assert list(by["status"]) == ["ok", "rejected", "ok"]
    assert by.loc[ids[1], "reason"] == (f"ingest: {victims[0]}: truncated or without pixel data; 4 usable slices "
                                        "remain (< ingest.min_slices 5)")


def test_batched_scratch_names_carry_nothing_from_the_headers(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="hemocam")
    rng = np.random.default_rng(13)
    a = write_series(tmp_path / "dicom" / "PHIMARKERNAME_folder", n=6, rng=rng)
    b = write_series(tmp_path / "dicom" / "PHIMARKERNAME_folder", n=6, z0=100, rng=rng, patient="PHIMARKERID2")
    calls = spy_dcm2niix(monkeypatch)
    _, table = run_all(cfg_for(tmp_path / "dicom", fmt="dicom"), tmp_path / "res")
    assert (table["status"] == "ok").all() and calls["batch"] == [2] and calls["series"] == 0
    (root, names), = calls["workdirs"]
    assert root.startswith("hemocam-d2n-batch-")
    pattern = re.compile(r"(in|out)(/\d{6}(/s\d{6}_\d{6}\.dcm)?|/s\d{6}_\d{6}\.dcm(_\w+)?\.(nii|json))?")
    assert names and all(pattern.fullmatch(n) for n in names), names
    uids = {str(pydicom.dcmread(r["path"][0], stop_before_pixels=True).SeriesInstanceUID) for r in (a, b)}
    sops = {Path(p).stem for p in pd.concat([a, b])["path"]}
    assert not any(x in n for n in names for x in [*MARKERS, *uids, *sops, "ID_", "19700101"])
    # the log of the call: scan ids, no identifying value, no date
    batch_log = [r.getMessage() for r in caplog.records if "series in one call" in r.getMessage()]
    assert batch_log and all(f"scan {sid}" in batch_log[0] for sid in table["scan_id"])
    assert not any(m in caplog.text for m in [*MARKERS, "PHIMARKERID2", "19700101"])


# ----------------------------------------------------------------------------- masks


def test_dicom_mask_resampled_through_affines(tmp_path):
    rows = write_series(tmp_path / "dicom", n=8, dz=2.0, z0=0)
    labels = tmp_path / "labels.csv"
    write_rsna_labels(labels, rows, {2})
    plan = plan_cohort(cfg_for(tmp_path / "dicom", labels=labels), tmp_path / "tmpplan")
    sid = plan.scans["scan_id"].iloc[0]
    # mask on a finer grid in RAS: a box around world (x, y) = (0, 0), z in [4, 8]
    masks = tmp_path / "masks"
    aff = np.diag([0.4, 0.4, 1.0, 1.0])
    aff[:3, 3] = [-12.8, -12.8, -2]
    m = np.zeros((64, 64, 20), np.uint8)
    m[28:36, 28:36, 6:11] = 1  # x,y in [-1.6, 1.6), z in [4, 8]
    save_nifti(m, aff, masks / f"{sid}.nii.gz")
    res = tmp_path / "res"
    plan, table = run_all(cfg_for(tmp_path / "dicom", labels=labels, masks=masks), res)
    assert table["status"].iloc[0] == "ok" and "mask resampled" in table["notes"].iloc[0]
    img = nib.load(str(res / "masks" / f"{sid}.nii.gz"))
    got = np.asanyarray(img.dataobj)
    assert img.get_data_dtype() == np.uint8 and got.shape == nib.load(str(res / "nifti" / f"{sid}.nii.gz")).shape
    ijk = np.argwhere(got > 0)
    world = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    assert len(world) and np.all(np.abs(world[:, :2]) < 2.0) and world[:, 2].min() >= 4 - 1e-6 and world[:, 2].max() <= 8 + 1e-6
    assert sorted(set(np.round(world[:, 2], 3))) == [4.0, 6.0, 8.0]


# ----------------------------------------------------------------------------- plan + splits


def test_splits_grouped_by_patient_and_deterministic(tmp_path):
    for p in range(6):
        for j in range(2):
            write_series(tmp_path / "dicom" / f"p{p}" / f"s{j}", n=5, patient=f"PAT{p}")
    cfg = cfg_for(tmp_path / "dicom", fmt="dicom")
    a = plan_cohort(cfg, tmp_path / "r1").scans
    b = plan_cohort(cfg, tmp_path / "r2").scans
    pd.testing.assert_frame_equal(a, b)
    assert a.groupby("patient_group")["split"].nunique().max() == 1
    assert a["patient_group"].nunique() == 6
    assert {"train", "val", "test"} <= set(a["split"])
    assert a.groupby("patient_group")["source"].agg(lambda s: s.str.split("/").str[0].nunique()).max() == 1
    assert "PAT" not in a.to_csv() and "PHIMARKER" not in a.to_csv()


def test_assign_splits_minimums_and_fixed():
    keys = pd.Series(["a", "b", "c"])
    out = assign_splits(keys, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=1)
    assert sorted(out) == ["test", "train", "val"]
    keys = pd.Series([f"g{i // 2}" for i in range(40)])
    s1 = assign_splits(keys, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=1)
    assert s1.groupby(keys).nunique().max() == 1
    assert s1.value_counts().to_dict() == {"train": 24, "val": 8, "test": 8}
    s2 = assign_splits(keys, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=2)
    assert not s1.equals(s2)
    fixed = pd.Series(["test"] + [""] * 39)
    s3 = assign_splits(keys, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=1, fixed=fixed)
    assert s3[0] == "test" and s3[1] == "test"


def test_a_grown_cohort_keeps_its_recorded_splits():
    from hemocam.ingest.plan import keep_recorded_splits, split_settings

    fr = {"train": 0.6, "val": 0.2, "test": 0.2}
    keys = pd.Series([f"g{i // 2}" for i in range(40)])
    first = assign_splits(keys, fr, seed=1)
    # 20 more patients, and a follow-up exam of a known one (g3)
    grown_keys = pd.Series(list(keys) + [f"n{i}" for i in range(20)] + ["g3"])
    fresh = assign_splits(grown_keys, fr, seed=1)
    assert not fresh[:40].equals(first), "a fresh draw on the grown cohort moves earlier scans"
    kept = pd.Series(list(first) + [""] * 21)
    grown = assign_splits(grown_keys, fr, seed=1, kept=kept)
    assert grown[:40].equals(first) and grown.iloc[-1] == first[6]
    per_group = grown.groupby(grown_keys).first().value_counts().to_dict()
    assert per_group == {"train": 24, "val": 8, "test": 8}  # 40 patients: the fractions of the whole cohort
    assert assign_splits(keys, fr, seed=1, kept=pd.Series([""] * 40)).equals(first)

    # through the record of results/scans.tsv: kept only under the settings that made it
    cfg = {"split": fr, "seed": 1}
    scans = pd.DataFrame({"scan_id": [f"s{i}" for i in range(61)], "status": "ok", "split": list(fresh)})
    groups = pd.DataFrame({"group_key": grown_keys, "given_split": ""})
    record = {"settings": split_settings(cfg), "splits": {f"s{i}": first[i] for i in range(40)}}
    assert list(keep_recorded_splits(scans, groups, record, cfg)["split"]) == list(grown)
    assert keep_recorded_splits(scans, groups, record, {**cfg, "seed": 2}) is scans
    assert keep_recorded_splits(scans, groups, None, cfg) is scans
    given = groups.assign(given_split=["val"] + [""] * 60)  # a split the sample sheet gives wins
    assert keep_recorded_splits(scans, given, record, cfg)["split"][0] == "val"


def test_plan_is_cached_and_batches_rewritten_only_on_change(tmp_path, monkeypatch):
    rows = write_series(tmp_path / "dicom", n=6)
    cfg = cfg_for(tmp_path / "dicom", fmt="dicom")
    plan = plan_cohort(cfg, tmp_path / "r")
    write_batch_plans(plan, {"c0000": list(plan.scans["scan_id"])}, tmp_path / "plans")
    f = tmp_path / "plans" / "c0000.tsv"
    m0 = f.stat().st_mtime_ns
    monkeypatch.setattr(ix, "read_header", lambda *a: pytest.fail("header read on a cached plan"))
    again = plan_cohort(cfg, tmp_path / "r")
    pd.testing.assert_frame_equal(again.scans, plan.scans)
    assert write_batch_plans(again, {"c0000": list(plan.scans["scan_id"])}, tmp_path / "plans") == []
    assert f.stat().st_mtime_ns == m0
    # a split change alone does not change the batch plan (no needless re-ingestion)
    cfg["split"] = {"train": 1.0, "val": 0.0, "test": 0.0}
    third = plan_cohort(cfg, tmp_path / "r")
    assert write_batch_plans(third, {"c0000": list(plan.scans["scan_id"])}, tmp_path / "plans") == []
    assert f.stat().st_mtime_ns == m0
    bp = read_tsv(f)
    assert len(bp) == 6 and set(bp["path"]) == set(rows["path"])


def test_changed_conversion_settings_rewrite_the_batch_plans(tmp_path):
    from hemocam.ingest.hu import changed_conversion_settings, conversion_settings

    write_series(tmp_path / "dicom", n=6)
    cfg = cfg_for(tmp_path / "dicom", fmt="dicom")
    plan = plan_cohort(cfg, tmp_path / "r")
    ids = {"c0000": list(plan.scans["scan_id"])}
    write_batch_plans(plan, ids, tmp_path / "plans")
    f = tmp_path / "plans" / "c0000.tsv"
    at_defaults = f.read_bytes()
    # the shipped values, set or not, leave the plan as earlier versions wrote it: nothing reruns
    for ingest in ({}, {"hu_min": -1100, "hu_max": 3100, "max_outside_fraction": 0.01, "min_slices": 3}):
        assert changed_conversion_settings({"ingest": ingest}) == {}
        assert write_batch_plans(plan, ids, tmp_path / "plans", conversion={}) == []
    assert "conversion" not in read_tsv(f).columns
    # another plausibility check rewrites every plan (ingestion reruns) and says which
    changed = changed_conversion_settings({"ingest": {"hu_max": 2000, "hu_min": -1100}})
    assert changed == {"hu_max": 2000.0}
    assert conversion_settings({"ingest": {"hu_max": 2000}})["max_outside_fraction"] == 0.01
    assert write_batch_plans(plan, ids, tmp_path / "plans", conversion=changed) == ["c0000"]
    assert set(read_tsv(f)["conversion"]) == {'{"hu_max": 2000.0}'}
    assert write_batch_plans(plan, ids, tmp_path / "plans", conversion=changed) == []
    # a dry run previews the plans that would change and leaves the plans (and digests) alone
    digests = (tmp_path / "plans" / ".digests.json").read_bytes()
    stat = f.stat().st_mtime_ns
    preview = tmp_path / "plans" / "dryrun"
    assert write_batch_plans(plan, ids, tmp_path / "plans", conversion={}, dry_run=True) == ["c0000"]
    assert (preview / "c0000.tsv").read_bytes() == at_defaults
    assert f.stat().st_mtime_ns == stat and (tmp_path / "plans" / ".digests.json").read_bytes() == digests
    assert write_batch_plans(plan, ids, tmp_path / "plans", conversion=changed, dry_run=True) == []
    assert not preview.exists()  # an earlier dry run's previews go
    # back to the defaults: the plan is the original again
    assert write_batch_plans(plan, ids, tmp_path / "plans", conversion={}) == ["c0000"]
    assert f.read_bytes() == at_defaults


def test_min_slices_is_a_conversion_setting_of_nifti_cohorts():
    import yaml

    from hemocam.ingest.hu import CONVERSION_DEFAULTS, DEFAULT_MIN_SLICES, changed_conversion_settings

    shipped = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["ingest"]
    assert shipped["min_slices"] == DEFAULT_MIN_SLICES
    assert {k: shipped.get(k, v) for k, v in CONVERSION_DEFAULTS.items()} == CONVERSION_DEFAULTS
    for fmt in ("physionet", "samplesheet"):
        assert changed_conversion_settings({"input": {"format": fmt}, "ingest": shipped}) == {}
        cfg = {"input": {"format": fmt}, "ingest": {**shipped, "min_slices": 13}}
        assert changed_conversion_settings(cfg) == {"min_slices": 13}
    # a DICOM series' slice count is in the plan itself (its signature holds min_slices)
    for fmt in ("dicom", "rsna"):
        assert changed_conversion_settings({"input": {"format": fmt}, "ingest": {"min_slices": 13}}) == {}


def test_batch_plans_hold_paths_relative_to_the_workdir(tmp_path, monkeypatch):
    from hemocam.ingest.plan import _render, batch_table

    rows = write_series(tmp_path / "data" / "dicom", n=6)
    monkeypatch.chdir(tmp_path)  # Snakemake's workdir: the data lies inside it
    plan = plan_cohort(cfg_for(tmp_path / "data" / "dicom", fmt="dicom"), tmp_path / "r")
    ids = list(plan.scans["scan_id"])
    write_batch_plans(plan, {"c0000": ids}, tmp_path / "plans")
    bp = read_tsv(tmp_path / "plans" / "c0000.tsv")
    assert set(bp["path"]) == {os.path.relpath(p, tmp_path) for p in rows["path"]}
    assert all(not os.path.isabs(p) and os.path.isfile(p) for p in bp["path"])
    # a plan an older version wrote with absolute paths is kept: upgrading reruns nothing
    old = tmp_path / "old"
    old.mkdir()
    (old / "c0000.tsv").write_bytes(_render(batch_table(plan, ids)))
    assert write_batch_plans(plan, {"c0000": ids}, old) == []
    # data outside the workdir keeps absolute paths
    monkeypatch.chdir(tmp_path / "r")
    write_batch_plans(plan, {"c0000": ids}, tmp_path / "plans2")
    assert set(read_tsv(tmp_path / "plans2" / "c0000.tsv")["path"]) == set(rows["path"])


def test_plan_sees_new_files_and_ingest_sees_in_place_fixes(tmp_path):
    rows = write_series(tmp_path / "dicom", n=6)
    victim = Path(rows.sort_values("z")["path"].iloc[2])
    good = victim.read_bytes()
    victim.write_bytes(good[:-50])
    cfg = cfg_for(tmp_path / "dicom", fmt="dicom")
    first = plan_cohort(cfg, tmp_path / "r" / "ingest")
    assert first.scans["status"].iloc[0] == "ok"
    # a new series appears: its folder's mtime changes, the plan is rebuilt
    write_series(tmp_path / "dicom", n=6, z0=300)
    second = plan_cohort(cfg, tmp_path / "r" / "ingest")
    assert len(second.scans) == 2
    # the truncated file is replaced in place (no folder mtime change): ingest re-reads it
    with open(victim, "r+b") as fh:
        fh.write(good)
    res = tmp_path / "r"
    sid = first.scans["scan_id"].iloc[0]
    write_batch_plans(second, {"c0000": [sid]}, res / "ingest" / "plan")
    man = ingest_batch(res / "ingest" / "plan" / "c0000.tsv", cfg, res, res / "ingest" / "batches" / "c0000.tsv")
    assert man["status"].iloc[0] == "ok"
    assert "1 file(s) changed since planning" in man["notes"].iloc[0]
    assert "dropped" not in man["notes"].iloc[0] and int(man["n_slices"].iloc[0]) == 6


# ----------------------------------------------------------------------------- samplesheet + physionet


@pytest.mark.parametrize("bad, msg", [
    ("dup", "duplicate scan_id"), ("../x", "must match"), ("/abs/x", "must match"),
    ("has space", "must match"), ("..", "must match"), (".", "must match"),
])
def test_samplesheet_rejects_bad_ids(tmp_path, bad, msg):
    ids = ["dup", "dup"] if bad == "dup" else ["fine", bad]
    (tmp_path / "s.tsv").write_text("scan_id\timage\n" + "".join(f"{i}\tx.nii.gz\n" for i in ids))
    with pytest.raises(InputError, match=msg):
        read_samplesheet(tmp_path / "s.tsv")


def test_samplesheet_nifti_and_dicom(tmp_path):
    aff = np.diag([0.8, 0.8, 3.0, 1.0])
    vol = np.stack([slice_hu(s) for s in range(7)], axis=2)
    save_nifti(vol, aff, tmp_path / "data" / "a.nii.gz", dtype=np.int16)
    m = np.zeros_like(vol, dtype=np.uint8)
    m[10:14, 10:14, 2] = 1
    save_nifti(m, aff, tmp_path / "data" / "a_mask.nii.gz")
    write_series(tmp_path / "data" / "dcm", n=6)
    (tmp_path / "data" / "junk.txt").write_text("x")
    sheet = tmp_path / "sheet" / "s.tsv"
    sheet.parent.mkdir()
    sheet.write_text("scan_id\timage\tmask\tsplit\n"
                     "a\t../data/a.nii.gz\t../data/a_mask.nii.gz\ttest\n"
                     "b\t../data/dcm\t\t\n"
                     "c\t../data/missing.nii.gz\t\t\n"
                     "d\t../data/junk.txt\t\t\n")
    labels = tmp_path / "labels.tsv"
    lab = pd.DataFrame({"scan_id": "a", "slice": range(7), **{k: 0 for k in LABELS}})
    lab.loc[2, ["any", "epidural"]] = 1
    lab.to_csv(labels, sep="\t", index=False)
    res = tmp_path / "res"
    plan, table = run_all(cfg_for(sheet, fmt="samplesheet", labels=labels), res)
    t = table.set_index("scan_id")
    assert t.loc["a", "status"] == "ok" and t.loc["a", "split"] == "test"
    assert t.loc["b", "status"] == "ok"
    assert "not found" in t.loc["c", "reason"] and "neither" in t.loc["d", "reason"]
    assert plan.scans.set_index("scan_id").loc["a", "mask"].endswith("a_mask.nii.gz")
    got = read_tsv(res / "labels" / "a.tsv")
    assert got["epidural"].tolist() == [0, 0, 1, 0, 0, 0, 0]
    assert not (res / "labels" / "b.tsv").exists() and "no label rows" in t.loc["b", "notes"]
    mk = nib.load(str(res / "masks" / "a.nii.gz"))
    assert np.array_equal(np.asanyarray(mk.dataobj), m) and mk.get_data_dtype() == np.uint8
    out = nib.load(str(res / "nifti" / "a.nii.gz"))
    assert np.array_equal(np.asanyarray(out.dataobj), vol) and np.allclose(out.affine, aff)


def test_physionet_layout(tmp_path):
    root = tmp_path / "ctich"
    aff = np.diag([-0.5, 0.5, 5.0, 1.0])
    for n in (49, 50):
        vol = np.stack([slice_hu(s) for s in range(6)], axis=2)
        img = nib.Nifti1Image(vol.astype(np.int16), aff)
        (root / "ct_scans").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        nib.save(img, root / "ct_scans" / f"{n:03d}.nii")
        m = np.zeros(vol.shape, np.uint8)
        m[5:9, 5:9, 3] = 255
        nib.save(nib.Nifti1Image(m, aff), root / "masks" / f"{n:03d}.nii")
    rows = []
    for s in range(1, 7):
        rows.append({"PatientNumber": 49, "SliceNumber": s, "Intraventricular": 0, "Intraparenchymal": 0,
                     "Subarachnoid": 0, "Epidural": int(s == 4), "Subdural": 0, "No_Hemorrhage": int(s != 4),
                     "Fracture_Yes_No": 0})
    pd.DataFrame(rows).to_csv(root / "hemorrhage_diagnosis_raw_metadata.csv", index=False)
    res = tmp_path / "res"
    plan, table = run_all(cfg_for(root, fmt="physionet"), res)
    t = table.set_index("scan_id")
    assert t.loc["049", "status"] == "ok" and t.loc["050", "status"] == "rejected"
    assert "no rows" in t.loc["050", "reason"]
    lab = read_tsv(res / "labels" / "049.tsv", dtype={"slice": int})
    assert lab["epidural"].tolist() == [0, 0, 0, 1, 0, 0] and lab["any"].tolist() == [0, 0, 0, 1, 0, 0]
    mk = np.asanyarray(nib.load(str(res / "masks" / "049.nii.gz")).dataobj)
    assert mk.max() == 1 and mk[:, :, 3].sum() == 16


def test_hu_checks_same_on_integer_and_float_input():
    # the integer path (what dcm2niix output takes) and float input (scaled NIfTIs) agree
    rng = np.random.default_rng(3)
    vol = rng.integers(-1024, 1500, (40, 40, 6)).astype(np.int16)
    vol[:4] = -3024  # out-of-field padding
    for kw in ({}, {"pad_hu": -3024.0}, {"wrap": True}):
        a, na = hu_mod.to_hu_int16(vol, "x", **kw)
        b, nb = hu_mod.to_hu_int16(vol.astype(np.float64), "x", **kw)
        assert a.dtype == b.dtype == np.int16 and np.array_equal(a, b) and na == nb
        assert a.min() == -1024 and "padding -3024 HU -> -1024 (960 voxels)" in na
    assert vol.min() == -3024  # not modified without overwrite=True
    stored = (vol.astype(np.int32) + 3024).astype(np.uint16)  # unsigned storage + intercept
    assert np.array_equal(hu_mod.to_hu_int16(hu_mod.scaled(stored, 1.0, -3024.0), "x")[0], a)
    with pytest.raises(InputError, match="non-finite"):
        hu_mod.to_hu_int16(np.full((2, 2, 2), np.nan), "x")
    high = np.full((4, 4, 4), 30000, np.int16)
    high[0] = -1024
    with pytest.raises(InputError, match=r"75\.0% of voxels outside \[-1100, 3100\] HU \(values -1024\.\.30000\)"):
        hu_mod.to_hu_int16(high, "x")


def test_dcm2niix_scratch_on_tmpfs_only_with_room(tmp_path):
    from hemocam.ingest.convert import scratch_dir

    assert scratch_dir(0, shm=str(tmp_path)) == str(tmp_path)
    assert scratch_dir(1 << 60, shm=str(tmp_path)) is None  # no room: the default temp dir
    assert scratch_dir(0, shm=str(tmp_path / "missing")) is None


def test_index_reads_every_attribute_it_uses(tmp_path, monkeypatch):
    # read_header asks pydicom for _INDEX_TAGS only: a row must equal the one of a full read
    rows = write_series(tmp_path / "s", n=3, padding=-2000)
    for path in rows["path"]:
        ds = pydicom.dcmread(path)
        ds.GantryDetectorTilt, ds.NumberOfFrames = "12.5", 1
        ds.save_as(path)
    size = {p: os.path.getsize(p) for p in rows["path"]}
    fast = [ix.read_header(p, size[p]) for p in rows["path"]]
    full_read = pydicom.dcmread
    monkeypatch.setattr(ix.pydicom, "dcmread", lambda *a, specific_tags=None, **k: full_read(*a, **k))
    full = [ix.read_header(p, size[p]) for p in rows["path"]]
    assert fast == full
    assert fast[0]["gantry_tilt"] == 12.5 and fast[0]["pixel_padding_value"] == -2000
    assert fast[0]["patient_key"] == "pid:PHIMARKERID" and fast[0]["bits_stored"] == 16
