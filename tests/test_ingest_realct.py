"""Ingestion on real scanner exports (GE tilted head CT, Philips multi-series study)."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import assert_no_markers
from hemocam.ingest import ingest_batch, plan_cohort, write_batch_plans, write_scans_table
from hemocam.ingest.convert import check_affine
from hemocam.ingest.index import index_dicom
from hemocam.ingest.series import classify_series

REALCT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "realct"
pytestmark = pytest.mark.skipif(not REALCT.is_dir(), reason=f"real CT test data not found at {REALCT.resolve()}")
# identifying header values of these series (PatientID, Philips institution/address/station)
PHI = ["QMNx85rKkkg", "PLASTIC", "NOTTINGHAM", "BRCONN", "RA_CT_04WK"]


def _cfg(path):
    return {"seed": 3, "input": {"format": "dicom", "path": str(path), "scan_id": "uid", "labels": "", "masks": ""},
            "split": {"train": 0.6, "val": 0.2, "test": 0.2},
            "ingest": {"min_slices": 10, "hu_min": -1100, "hu_max": 3100, "index_threads": 2}}


def test_philips_study_only_the_brain_series_is_a_scan():
    root = REALCT / "philips_multiseries"
    idx = index_dicom(root, threads=1)
    assert len(idx) == 38 and idx["readable"].all()
    dirfiles = idx[idx["path"].str.endswith("DIRFILE")]
    assert len(dirfiles) == 3 and not dirfiles["has_pixels"].any() and (dirfiles["series_uid"] == "").all()
    ser = classify_series(idx, min_slices=10, roots=[root]).set_index("source")
    assert list(ser.index[ser["status"] == "ok"]) == ["S2010"]
    assert ser.loc["S2010", "n_slices"] == 28
    assert ser.loc["S1000", "reason"].startswith("localizer")
    assert ser.loc["S4010", "reason"] == "secondary capture"


def test_ge_tilted_series_and_philips_end_to_end(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hemocam")
    res = tmp_path / "results"
    cfg = _cfg(REALCT)
    plan = plan_cohort(cfg, res / "ingest")
    ok = sorted(plan.scans.loc[plan.scans["status"] == "ok", "scan_id"])
    assert len(ok) == 2 and len(plan.scans) == 4
    write_batch_plans(plan, {"c0000": ok}, res / "ingest" / "plan")
    man = ingest_batch(res / "ingest" / "plan" / "c0000.tsv", cfg, res, res / "ingest" / "batches" / "c0000.tsv")
    table = write_scans_table(plan, [res / "ingest" / "batches" / "c0000.tsv"], res / "scans.tsv")
    assert (man["status"] == "ok").all(), man["reason"].tolist()
    assert len(table) == 4 and set(table["status"]) == {"ok", "rejected"}

    ge = table[table["source"] == "ge_head_tilt"].iloc[0]
    assert "tilt corrected" in ge["notes"]
    img = nib.load(str(res / "nifti" / f"{ge['scan_id']}.nii.gz"))
    data = np.asanyarray(img.dataobj)
    assert img.get_data_dtype() == np.int16
    zooms = check_affine(img.affine, "ge")  # raises on a sheared (untilted, wrong) geometry
    assert np.allclose(zooms, [0.4883, 0.4883, 2.62], atol=0.01)
    assert data.shape == (512, 611, 56)  # the _Tilt_Eq volume, not the 28-slice sheared one
    # slice normal is the tilted acquisition axis: 18.5 deg from z
    k = img.affine[:3, 2] / zooms[2]
    assert np.degrees(np.arccos(abs(k[2]))) == pytest.approx(18.5, abs=0.2)
    assert data.min() == -1024  # PixelPaddingValue -1500 clipped to air
    centre = data[206:306, 256:356, 28]
    assert 0 < np.median(centre) < 60  # brain parenchyma
    brain = data[(data > 0) & (data < 80)]
    assert brain.size > 1e5

    ph = table[table["source"] == "philips_multiseries/S2010"].iloc[0]
    assert int(ph["n_slices"]) == 28 and float(ph["spacing_z"]) == pytest.approx(5.0)
    pdata = np.asanyarray(nib.load(str(res / "nifti" / f"{ph['scan_id']}.nii.gz")).dataobj)
    assert pdata.min() >= -1024 and pdata.max() < 3100

    # the same scans cut into other batches, as a grown cohort re-cuts them: kept, not converted
    done = {p: p.stat().st_mtime_ns for p in (res / "nifti").iterdir()}
    write_batch_plans(plan, {"c0001": ok[:1], "c0002": ok[1:]}, res / "ingest" / "plan")
    for b in ("c0001", "c0002"):
        ingest_batch(res / "ingest" / "plan" / f"{b}.tsv", cfg, res, res / "ingest" / "batches" / f"{b}.tsv")
    assert caplog.text.count("ingest: 1 of 1 scan(s) kept") == 2
    assert {p: p.stat().st_mtime_ns for p in (res / "nifti").iterdir()} == done
    rows = [line for b in ("c0001", "c0002") for line in (res / "ingest" / "batches" / f"{b}.tsv").read_text().splitlines()[1:]]
    assert sorted(rows) == sorted((res / "ingest" / "batches" / "c0000.tsv").read_text().splitlines()[1:])

    assert_no_markers([res], PHI)
    assert not any(m in caplog.text for m in PHI)
