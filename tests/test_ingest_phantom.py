"""Ingestion of the generated demo cohorts against their truth (RSNA layout with quirks, PhysioNet)."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import assert_no_markers
from hemocam.ingest import ingest_batch, plan_cohort, write_batch_plans, write_scans_table
from hemocam.io import read_tsv

phantom_rsna = pytest.importorskip("hemocam.phantom.rsna")
phantom_physionet = pytest.importorskip("hemocam.phantom.physionet")


def _run(cfg, res, batches=2, threads=1):
    plan = plan_cohort(cfg, res / "ingest")
    ok = sorted(plan.scans.loc[plan.scans["status"] == "ok", "scan_id"])
    groups = {f"c{i:04d}": ok[i::batches] for i in range(batches) if ok[i::batches]}
    write_batch_plans(plan, groups, res / "ingest" / "plan")
    for b in groups:
        ingest_batch(res / "ingest" / "plan" / f"{b}.tsv", cfg, res, res / "ingest" / "batches" / f"{b}.tsv",
                     threads=threads)
    table = write_scans_table(plan, [res / "ingest" / "batches" / f"{b}.tsv" for b in groups], res / "scans.tsv")
    return plan, table


def _cfg(fmt, path, labels="", masks=""):
    return {"seed": 1, "input": {"format": fmt, "path": str(path), "labels": str(labels), "masks": str(masks),
                                 "scan_id": "uid", "scan_id_key": ""},
            "split": {"train": 0.6, "val": 0.2, "test": 0.2},
            "ingest": {"min_slices": 5, "hu_min": -1100, "hu_max": 3100, "index_threads": 2}}


def test_rsna_phantom_with_quirks_matches_truth(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hemocam")
    src = tmp_path / "demo"
    truth = phantom_rsna.generate_cohort(src, n_scans=8, matrix=64, n_slices=12, seed=1, quirks=True)
    res = tmp_path / "results"
    plan, table = _run(_cfg("rsna", src / "dicom", src / "labels.csv", src / "masks"), res, threads=2)
    m = truth.merge(table, on="scan_id", how="outer", suffixes=("_truth", ""), indicator=True)
    assert (m["_merge"] == "both").all(), "every generated series is accounted for in scans.tsv"
    assert (m["status"] == m["expected_status"]).all(), m[["scan_id", "quirk", "status", "reason"]]
    rej = m[m["expected_status"] == "rejected"]
    assert (rej["reason"] == rej["expected_reason"]).all()
    ok = m[m["status"] == "ok"]
    assert (ok["n_slices"].astype(int) == ok["n_slices_truth"].astype(int)).all()
    for r in ok.itertuples():
        lab = read_tsv(res / "labels" / f"{r.scan_id}.tsv")
        assert int(lab["any"].sum()) == int(r.positive_slices), r.quirk
        mk = nib.load(str(res / "masks" / f"{r.scan_id}.nii.gz"))
        ml = np.asanyarray(mk.dataobj).astype(bool).sum() * abs(np.linalg.det(mk.affine[:3, :3])) / 1000
        assert ml == pytest.approx(float(r.hemorrhage_ml), rel=0.02, abs=0.05), r.quirk
        ct = np.asanyarray(nib.load(str(res / "nifti" / f"{r.scan_id}.nii.gz")).dataobj)
        assert ct.min() >= -1024 and ct.max() <= 3100 and (ct < -900).any()
    by_quirk = {q: n for q, n in zip(ok["quirk"], ok["notes"])}
    assert any("12-bit wrap repaired" in n for q, n in by_quirk.items() if "rescale_wrap" in q)
    assert any("dropped 1 truncated" in n for q, n in by_quirk.items() if "truncated" in q)
    assert any("tilt corrected" in n for q, n in by_quirk.items() if "gantry_tilt" in q)
    # patients with two studies stay in one split
    splits = plan.scans.merge(truth[["scan_id", "patient"]])
    splits = splits[splits["status"] == "ok"]
    assert splits.groupby("patient")["split"].nunique().max() == 1
    markers = sorted({v for vals in truth["phi_values"] for v in str(vals).split("|") if len(v) >= 6})
    assert markers
    assert_no_markers([res], markers)
    assert not any(mk in caplog.text for mk in markers)


def test_physionet_phantom(tmp_path):
    src = tmp_path / "ctich"
    meta = phantom_physionet.generate_physionet_cohort(src, n_scans=3, matrix=48, n_slices=8, seed=2)
    res = tmp_path / "results"
    plan, table = _run(_cfg("physionet", src), res, batches=1)
    assert list(table["scan_id"]) == ["049", "050", "051"] and (table["status"] == "ok").all()
    for sid in table["scan_id"]:
        lab = read_tsv(res / "labels" / f"{sid}.tsv")
        want = meta[meta["PatientNumber"] == int(sid)].sort_values("SliceNumber")
        assert lab["slice"].tolist() == (want["SliceNumber"] - 1).tolist()
        assert lab["subdural"].tolist() == want["Subdural"].tolist()
        assert lab["any"].tolist() == (1 - want["No_Hemorrhage"]).tolist()
        src_img = nib.load(str(src / "ct_scans" / f"{sid}.nii"))
        out = nib.load(str(res / "nifti" / f"{sid}.nii.gz"))
        assert np.allclose(out.affine, src_img.affine)
        assert np.array_equal(np.asanyarray(out.dataobj), np.clip(np.asanyarray(src_img.dataobj), -1024, None))
        mk = np.asanyarray(nib.load(str(res / "masks" / f"{sid}.nii.gz")).dataobj)
        assert np.array_equal(mk > 0, np.asanyarray(nib.load(str(src / "masks" / f"{sid}.nii")).dataobj) > 0)
