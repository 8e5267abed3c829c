"""The synthetic cohort generator: anatomy, lesions, labels, files, DICOM quirks, dcm2niix geometry."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from hemocam.io import read_tsv
from hemocam.labelset import LABELS, SUBTYPES
from hemocam.phantom import (INTRACRANIAL, TISSUES, assign_splits, generate_cohort, generate_physionet_cohort,
                             make_scan, plan_subtypes, render_grid, sample_phantom, write_nifti_cohort)
from hemocam.phantom.dicom import lenient_uids
from hemocam.phantom.rsna import plan_cohort, render_axial_series
from hemocam.phantom.scan import axial_affine

T = {name: i for i, name in enumerate(TISSUES)}


@pytest.fixture(autouse=True)
def _rsna_uids():
    """RSNA-style ``ID_...`` UIDs are not valid UI values: read them without validation noise."""
    with lenient_uids():
        yield
DCM2NIIX = Path(sys.executable).with_name("dcm2niix")
MATRIX, N_SLICES = 48, 22


# ----------------------------------------------------------------------------- single scans


@pytest.fixture(scope="module")
def positive_scan():
    return make_scan(7, matrix=96, n_slices=28, subtypes=["epidural", "intraparenchymal", "intraventricular"])


def test_make_scan_arrays_geometry_and_labels(positive_scan):
    s = positive_scan
    assert s["hu"].shape == s["mask"].shape == (96, 96, 28)
    assert s["hu"].dtype == np.float32 and s["mask"].dtype == np.uint8
    assert nib.aff2axcodes(s["affine"]) == ("L", "A", "S")
    sx, sy, sz = s["spacing"]
    assert sx == sy and sz == 5.0 and 215 <= sx * 96 <= 260  # field of view, whatever the matrix
    assert np.allclose(np.abs(np.diag(s["affine"])[:3]), s["spacing"])
    assert set(np.unique(s["mask"])) <= {0, 1, 2, 3, 4, 5}
    assert s["subtypes"] == ["epidural", "intraparenchymal", "intraventricular"]
    labels = s["slice_labels"]
    assert list(labels.columns) == ["slice", *LABELS] and len(labels) == 28
    for code, name in enumerate(SUBTYPES, start=1):
        assert labels[name].tolist() == [int((s["mask"][:, :, k] == code).any()) for k in range(28)]
    assert labels["any"].tolist() == [int((s["mask"][:, :, k] > 0).any()) for k in range(28)]
    # every lesion spans several consecutive slices
    for name in s["subtypes"]:
        assert labels[name].sum() >= 2


def test_hu_ranges_per_tissue():
    phantom = sample_phantom(11, n_slices=28, subtypes=["subarachnoid", "subdural"])
    clean, code, tissue = render_grid(phantom, axial_affine(phantom, 128), (128, 128, 28))
    expected = {  # median HU of each tissue before blur and noise
        "air": (-1001, -999), "skin": (40, 70), "fat": (-110, -60), "grey_matter": (30, 42),
        "white_matter": (24, 34), "csf": (-2, 15), "ventricle": (0, 10), "diploe": (550, 1250),
        "cortical_bone": (1150, 1950), "falx": (25, 80), "blood": (35, 80),
    }
    for name, (lo, hi) in expected.items():
        values = clean[tissue == T[name]]
        assert values.size > 0, name
        assert lo <= np.median(values) <= hi, (name, np.median(values))
    # grey-white contrast of a few HU, as on real non-contrast CT
    assert np.median(clean[tissue == T["grey_matter"]]) > np.median(clean[tissue == T["white_matter"]]) + 4
    calc = clean[tissue == T["calcification"]]
    assert calc.size == 0 or 100 <= np.median(calc) <= 300
    # masks lie inside the cranial cavity, never in bone or scalp
    assert np.isin(tissue[code > 0], INTRACRANIAL).all()
    assert (tissue[code > 0] == T["blood"]).all()


def test_scanner_noise_and_rounding(positive_scan):
    s = positive_scan
    hu = s["hu"]
    assert np.array_equal(hu, np.rint(hu)) and hu.min() >= -1024 and hu.max() <= 3071
    # noise in deep white matter (flat region) is in the 6-12 HU band of a 5 mm head CT
    wm = s["tissue"] == T["white_matter"]
    from scipy import ndimage
    deep = ndimage.binary_erosion(wm, iterations=2)
    assert deep.sum() > 100
    resid = hu[deep] - np.median(hu[deep])
    assert 4.5 <= resid.std() <= 14


def test_negative_scan_has_empty_mask_and_labels():
    s = make_scan(3, matrix=64, n_slices=24, hemorrhage=False)
    assert s["mask"].max() == 0 and s["subtypes"] == []
    assert s["slice_labels"][list(LABELS)].to_numpy().sum() == 0


def test_determinism_by_seed():
    a = make_scan(5, matrix=48, n_slices=20)
    b = make_scan(5, matrix=48, n_slices=20)
    c = make_scan(6, matrix=48, n_slices=20)
    assert np.array_equal(a["hu"], b["hu"]) and np.array_equal(a["mask"], b["mask"])
    assert not np.array_equal(a["hu"], c["hu"])


def test_same_anatomy_on_any_matrix():
    small = make_scan(9, matrix=64, n_slices=24, hemorrhage=False)
    large = make_scan(9, matrix=128, n_slices=24, hemorrhage=False)
    head_small = (small["hu"] > -500).mean(axis=(0, 1))
    head_large = (large["hu"] > -500).mean(axis=(0, 1))
    assert np.allclose(head_small, head_large, atol=0.03)


def test_lesion_densities_and_places():
    for subtype, (lo, hi) in {"epidural": (50, 95), "subdural": (30, 82), "intraparenchymal": (50, 90),
                              "subarachnoid": (40, 75), "intraventricular": (45, 85)}.items():
        phantom = sample_phantom(21, n_slices=28, subtypes=[subtype])
        clean, code, tissue = render_grid(phantom, axial_affine(phantom, 96), (96, 96, 28))
        blood = clean[code == SUBTYPES.index(subtype) + 1]
        assert blood.size > 0 and lo <= np.median(blood) <= hi, (subtype, np.median(blood))
    # intraparenchymal bleeds carry a hypodense oedema rim, not part of the mask
    phantom = sample_phantom(22, n_slices=28, subtypes=["intraparenchymal"])
    clean, code, tissue = render_grid(phantom, axial_affine(phantom, 96), (96, 96, 28))
    oedema = clean[tissue == T["oedema"]]
    assert oedema.size > 0 and 14 <= np.median(oedema) <= 26 and (code[tissue == T["oedema"]] == 0).all()


def test_strict_subtypes_that_cannot_show():
    with pytest.raises(ValueError, match="intraventricular"):
        make_scan(1, matrix=32, n_slices=6, subtypes=["intraventricular"])
    # 64 px: on a 32 px grid (7.6 mm pixels) the replacement (a subdural) blurs into the skull
    # and the truth rightly leaves it unmarked (visible_code)
    s = make_scan(1, matrix=64, n_slices=6, subtypes=["intraventricular"], strict=False)
    assert s["mask"].any()  # replaced by a lesion that the slices do cover


# ----------------------------------------------------------------------------- cohorts


def test_plan_covers_all_subtypes_and_negatives():
    for n in (6, 10, 40):
        plan = plan_subtypes(n, seed=4)
        assert {s for p in plan for s in p} == set(SUBTYPES)
        negatives = sum(1 for p in plan if not p)
        assert 1 <= negatives and abs(negatives / n - 0.38) < 0.2


def test_assign_splits_grouped_and_complete():
    groups = ["a", "a", "b", "c", "d", "d", "e", "f", "g", "h"]
    positive = [True, False, True, False, True, True, False, False, True, False]
    split = assign_splits(groups, positive, seed=1)
    assert set(split) == set(groups) and set(split.values()) == {"train", "val", "test"}
    assert assign_splits(groups, positive, seed=1) == split
    three = assign_splits(["x", "y", "z"], [True, False, True], seed=0)
    assert sorted(three.values()) == ["test", "train", "val"]


def test_write_nifti_cohort(tmp_path):
    scans = write_nifti_cohort(tmp_path, 6, matrix=40, n_slices=22, seed=2)
    on_disk = read_tsv(tmp_path / "scans.tsv")
    assert list(on_disk.columns) == ["scan_id", "status", "reason", "split", "n_slices", "spacing_x", "spacing_y",
                                     "spacing_z", "source"]
    assert (on_disk["status"] == "ok").all() and set(on_disk["split"]) == {"train", "val", "test"}
    assert on_disk["scan_id"].tolist() == scans["scan_id"].tolist()
    seen = set()
    for sid in scans["scan_id"]:
        img = nib.load(tmp_path / "nifti" / f"{sid}.nii.gz")
        mask = nib.load(tmp_path / "masks" / f"{sid}.nii.gz")
        assert img.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
        assert img.shape == mask.shape == (40, 40, 22) and np.allclose(img.affine, mask.affine)
        m = np.asarray(mask.dataobj)
        assert set(np.unique(m)) <= {0, 1}
        labels = read_tsv(tmp_path / "labels" / f"{sid}.tsv")
        assert list(labels.columns) == ["slice", *LABELS]
        assert labels["any"].tolist() == [int(m[:, :, k].any()) for k in range(22)]
        seen |= {s for s in SUBTYPES if labels[s].any()}
    assert seen == set(SUBTYPES)


def test_physionet_layout(tmp_path):
    meta = generate_physionet_cohort(tmp_path, 2, matrix=32, n_slices=20, seed=1)
    assert list(meta.columns) == ["PatientNumber", "SliceNumber", "Intraventricular", "Intraparenchymal",
                                  "Subarachnoid", "Epidural", "Subdural", "No_Hemorrhage", "Fracture_Yes_No"]
    on_disk = pd.read_csv(tmp_path / "hemorrhage_diagnosis_raw_metadata.csv")
    assert on_disk.equals(meta)
    for number, rows in meta.groupby("PatientNumber"):
        ct = nib.load(tmp_path / "ct_scans" / f"{number:03d}.nii")
        mask = np.asarray(nib.load(tmp_path / "masks" / f"{number:03d}.nii").dataobj)
        assert ct.shape == mask.shape and rows["SliceNumber"].tolist() == list(range(1, ct.shape[2] + 1))
        assert rows["No_Hemorrhage"].tolist() == [int(not mask[:, :, k].any()) for k in range(ct.shape[2])]


# ----------------------------------------------------------------------------- DICOM cohort


@pytest.fixture(scope="module")
def dicom_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("rsna")
    truth = generate_cohort(out, n_scans=6, matrix=MATRIX, n_slices=N_SLICES, seed=5, quirks=True)
    headers = {p.name: pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((out / "dicom").glob("*.dcm"))}
    return out, truth, headers


def _series_files(headers, series_uid):
    return [name for name, ds in headers.items() if ds.SeriesInstanceUID == series_uid]


def test_dicom_layout_ids_and_phi(dicom_cohort):
    out, truth, headers = dicom_cohort
    on_disk = read_tsv(out / "truth.tsv")
    assert on_disk["scan_id"].tolist() == truth["scan_id"].tolist() and on_disk["kind"].tolist() == truth["kind"].tolist()
    for name, ds in headers.items():
        assert name == f"{ds.SOPInstanceUID}.dcm" and str(ds.SOPInstanceUID).startswith("ID_")
        assert str(ds.SeriesInstanceUID).startswith("ID_") and str(ds.StudyInstanceUID).startswith("ID_")
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        for kw in ("PatientName", "PatientID", "AccessionNumber", "InstitutionName", "ReferringPhysicianName",
                   "OtherPatientIDs"):
            assert "PHIMARK" in str(ds.get(kw)), kw
        dt = str(ds.PatientBirthDate)
        assert len(dt) == 8 and dt.isdigit()
    for _, row in truth.iterrows():
        files = _series_files(headers, row["scan_id"])
        assert len(files) == row["n_files"]
        values = row["phi_values"].split("|")
        ds = headers[files[0]]
        assert {str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate), str(ds.AccessionNumber)} <= set(values)
        assert "PHIMARK" not in row["patient"]
    # two studies of one patient share patient values but not the study
    axial = truth[truth["kind"] == "axial"]
    repeat = axial[axial["patient"].duplicated(keep=False)]
    assert len(repeat) >= 2
    first, second = repeat.iloc[0], repeat[repeat["patient"] == repeat.iloc[0]["patient"]].iloc[1]
    assert first["study"] != second["study"]
    a, b = headers[_series_files(headers, first["scan_id"])[0]], headers[_series_files(headers, second["scan_id"])[0]]
    assert a.PatientID == b.PatientID and a.PatientBirthDate == b.PatientBirthDate
    # birth dates are unique per patient
    births = {p: v.split("|")[2] for p, v in zip(truth["patient"], truth["phi_values"])}
    assert len(set(births.values())) == len(births)


def test_labels_csv_matches_masks(dicom_cohort):
    out, truth, headers = dicom_cohort
    labels = pd.read_csv(out / "labels.csv")
    assert list(labels.columns) == ["ID", "Label"]
    ids = labels["ID"].str.rsplit("_", n=1, expand=True)
    labels["sop"], labels["subtype"] = ids[0], ids[1]
    assert set(labels["subtype"]) == set(LABELS)
    axial_sops = {ds.SOPInstanceUID for ds in headers.values() if "AXIAL" in ds.ImageType}
    assert set(labels["sop"]) == axial_sops
    wide = labels.pivot(index="sop", columns="subtype", values="Label")
    assert (wide["any"] == wide[list(SUBTYPES)].max(axis=1)).all()
    assert not labels["sop"].is_monotonic_increasing  # shuffled rows
    for _, row in truth[truth["kind"] == "axial"].iterrows():
        mask = nib.load(out / "masks" / f"{row['scan_id']}.nii.gz")
        positive = wide.loc[[headers[f].SOPInstanceUID for f in _series_files(headers, row["scan_id"])], "any"]
        assert (positive.sum() > 0) == (np.asarray(mask.dataobj).sum() > 0) == bool(row["subtypes"])
        assert positive.sum() == row["positive_slices"]


def test_quirks_as_truth_says(dicom_cohort):
    out, truth, headers = dicom_cohort
    kinds = truth.set_index("scan_id")["kind"]
    assert {"localizer", "secondary_capture"} <= set(kinds)
    assert (truth.loc[truth["kind"] != "axial", "expected_status"] == "rejected").all()
    assert (truth.loc[truth["kind"] == "axial", "expected_status"] == "ok").all()
    for sid in truth.loc[truth["kind"] == "localizer", "scan_id"]:
        for f in _series_files(headers, sid):
            ds = headers[f]
            assert "LOCALIZER" in ds.ImageType and list(map(float, ds.ImageOrientationPatient))[5] == -1
    sc = truth.loc[truth["kind"] == "secondary_capture", "scan_id"].iloc[0]
    assert headers[_series_files(headers, sc)[0]].SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    axial = truth[truth["kind"] == "axial"].set_index("scan_id")
    # signed and unsigned storage with different intercepts across series
    storage = {(int(headers[_series_files(headers, s)[0]].PixelRepresentation),
                float(headers[_series_files(headers, s)[0]].RescaleIntercept)) for s in axial.index}
    assert {(0, -1024.0), (1, 0.0)} <= storage and len(storage) >= 3
    # InstanceNumber does not follow the table position
    for sid in axial.index:
        files = sorted(_series_files(headers, sid), key=lambda f: float(headers[f].ImagePositionPatient[2]))
        inst = [int(headers[f].InstanceNumber) for f in files]
        assert sorted(inst) == list(range(1, len(inst) + 1)) and inst != sorted(inst) and inst != sorted(inst)[::-1]
    for quirk in ("rescale_wrap", "gantry_tilt", "truncated", "fov_padding"):
        assert axial["quirk"].str.contains(quirk).sum() == 1, quirk
    tilted = axial.index[axial["quirk"].str.contains("gantry_tilt")][0]
    ds = headers[_series_files(headers, tilted)[0]]
    assert 15 <= float(ds.GantryDetectorTilt) <= 20 and abs(float(ds.ImageOrientationPatient[5])) > 0.25
    assert bool(axial.loc[tilted, "subtypes"])
    # truncated: one file cut inside its pixel data, the rest intact
    trunc = axial.index[axial["quirk"].str.contains("truncated")][0]
    assert axial.loc[trunc, "n_slices"] == axial.loc[trunc, "n_files"] - 1
    broken = 0
    for f in _series_files(headers, trunc):
        ds = pydicom.dcmread(out / "dicom" / f)
        broken += len(ds.PixelData) < MATRIX * MATRIX * 2
    assert broken == 1


def test_stored_pixels_decode_to_rendered_hu(dicom_cohort):
    """Each storage (incl. the 12-bit wrap with its known fix) decodes to the rendered HU."""
    out, truth, headers = dicom_cohort
    plans = {p.series_uid: p for p in plan_cohort(6, 5, True)}
    for sid, row in truth[truth["kind"] == "axial"].set_index("scan_id").iterrows():
        if "truncated" in row["quirk"] or "gantry_tilt" in row["quirk"]:
            continue
        series = render_axial_series(plans[sid], MATRIX, N_SLICES, 5.0)
        files = sorted(_series_files(headers, sid), key=lambda f: float(headers[f].ImagePositionPatient[2]))
        ds = pydicom.dcmread(out / "dicom" / files[3])
        stored = ds.pixel_array.astype(np.int32)
        expected = series["pixels"][:, :, 3]
        if row["storage"] == "wrap12":
            assert ds.BitsStored == 12 and ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) > -100
            x = stored + 1000
            x[x >= 4096] -= 4096
            hu = x - 1000 + float(ds.RescaleIntercept)
            assert np.array_equal(hu, np.clip(expected, -1000, 3000))
            assert stored.max() > 3000  # naive rescale gives wrapped air
        elif row["storage"] == "padded":
            hu = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            assert (hu == -2000).any() and int(ds.PixelPaddingValue) == -2000
            inside = hu != -2000
            assert np.array_equal(hu[inside], expected[inside])
        else:
            hu = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            assert np.array_equal(hu, expected)


def test_deterministic_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        generate_cohort(d, n_scans=3, matrix=24, n_slices=12, seed=8, quirks=True)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


# ----------------------------------------------------------------------------- dcm2niix


def _convert(dicom_cohort, sid, tmp_path):
    out, truth, headers = dicom_cohort
    src = tmp_path / "in"
    src.mkdir()
    for f in _series_files(headers, sid):
        shutil.copy(out / "dicom" / f, src / f)
    dst = tmp_path / "out"
    dst.mkdir()
    subprocess.run([str(DCM2NIIX), "-z", "y", "-f", "%s", "-o", str(dst), str(src)], check=True, capture_output=True)
    return sorted(dst.glob("*.nii.gz"))


def _world(affine, ijk):
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _index(affine, xyz):
    return np.rint(np.linalg.solve(affine[:3, :3], (xyz - affine[:3, 3]).T).T).astype(int)


@pytest.mark.skipif(not DCM2NIIX.exists(), reason="dcm2niix not installed in the environment")
def test_dcm2niix_geometry_matches_mask(dicom_cohort, tmp_path):
    out, truth, _ = dicom_cohort
    axial = truth[(truth["kind"] == "axial") & (truth["subtypes"] != "") & (truth["quirk"] == "shuffled_instance")]
    sid = axial["scan_id"].iloc[0]
    (nii,) = _convert(dicom_cohort, sid, tmp_path)
    img, mask = nib.load(nii), nib.load(out / "masks" / f"{sid}.nii.gz")
    assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(mask.affine) == ("L", "A", "S")
    assert img.shape == mask.shape and np.allclose(img.affine, mask.affine, atol=1e-3)
    # world round trip: lesion voxels of the mask land on blood-dense voxels of the conversion
    m = np.asarray(mask.dataobj)
    ijk = np.argwhere(m > 0)
    hu = img.get_fdata()  # scaled by scl_slope/scl_inter
    idx = _index(img.affine, _world(mask.affine, ijk.astype(float)))
    assert np.median(hu[tuple(idx.T)]) > 40
    corners = np.array([[0, 0, 0], [MATRIX - 1, 0, N_SLICES - 1], [5, MATRIX - 2, 7]], float)
    assert np.allclose(_index(img.affine, _world(mask.affine, corners)), corners)


@pytest.mark.skipif(not DCM2NIIX.exists(), reason="dcm2niix not installed in the environment")
def test_dcm2niix_tilt_volume(dicom_cohort, tmp_path):
    out, truth, _ = dicom_cohort
    sid = truth.loc[truth["quirk"].str.contains("gantry_tilt"), "scan_id"].iloc[0]
    files = _convert(dicom_cohort, sid, tmp_path)
    tilt = [f for f in files if "_Tilt" in f.name]
    assert len(tilt) == 1, [f.name for f in files]
    img, mask = nib.load(tilt[0]), nib.load(out / "masks" / f"{sid}.nii.gz")
    assert img.shape == mask.shape and np.allclose(img.affine, mask.affine, atol=1e-2)
    m = np.asarray(mask.dataobj)
    hu = img.get_fdata()  # scaled by scl_slope/scl_inter
    idx = _index(img.affine, _world(mask.affine, np.argwhere(m > 0).astype(float)))
    assert np.median(hu[tuple(idx.T)]) > 35
    # the head sits where the truth grid says it is (world round trip of the whole volume)
    plan = {p.series_uid: p for p in plan_cohort(6, 5, True)}[sid]
    phantom = render_axial_series(plan, MATRIX, N_SLICES, 5.0)["phantom"]
    _, _, tissue = render_grid(phantom, img.affine, img.shape)
    assert ((hu > -500) == (tissue != T["air"])).mean() > 0.95


def test_truth_leaves_blood_merged_into_bone_unmarked():
    """Masks and labels claim only blood the image shows: a thin subdural's voxels that the
    scanner blur merges into the skull read as bone and are not marked (no reader could)."""
    from hemocam.phantom.scan import BONE_PV_HU, render_grid, sample_phantom, scanner_blur, visible_code

    phantom = sample_phantom(5, n_slices=28, subtypes=["subdural"])
    clean, code, _ = render_grid(phantom, axial_affine(phantom, 96), (96, 96, 28))
    blurred = scanner_blur(clean, phantom.scanner)
    shown = visible_code(code, blurred)
    hidden = (code > 0) & (shown == 0)
    assert hidden.any() and (shown > 0).any()  # the rim next to the skull goes, the collection stays
    assert (blurred[hidden] > BONE_PV_HU).all() and (blurred[shown > 0] <= BONE_PV_HU).all()
    s = make_scan(5, matrix=96, n_slices=28, subtypes=["subdural"])
    assert np.array_equal(s["mask"], shown)
    assert s["slice_labels"]["any"].tolist() == [int(shown[:, :, k].any()) for k in range(28)]
