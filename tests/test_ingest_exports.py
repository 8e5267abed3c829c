"""Raw PACS-export quirks at ingestion: copies, compressed files with trailing elements, files
without file meta, missing UIDs, spacing or slices, and names that are not UTF-8."""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import RLELossless

from hemocam.ingest import index as ix
from test_ingest import cfg_for, decode_slices, run_all, write_series


def _rewrite(paths, edit, **save):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in paths:
            ds = pydicom.dcmread(p)
            edit(ds)
            ds.save_as(p, **save)


def test_an_intact_copy_of_a_slice_wins_over_a_truncated_one(tmp_path):
    rows = write_series(tmp_path / "in" / "a_first", n=9)
    victim = rows.sort_values("z")["path"].iloc[4]
    (tmp_path / "in" / "b_retry").mkdir()
    shutil.copy(victim, tmp_path / "in" / "b_retry" / Path(victim).name)  # the export retried
    Path(victim).write_bytes(Path(victim).read_bytes()[:-300])
    _, table = run_all(cfg_for(tmp_path / "in", fmt="dicom"), tmp_path / "res")
    row = table.iloc[0]
    assert row["status"] == "ok", row["reason"]
    assert "truncated" not in row["notes"] and "missing" not in row["notes"], row["notes"]
    assert "1 duplicate SOP instance file(s) ignored" in row["notes"]
    assert decode_slices(tmp_path / "res" / "nifti" / f"{row['scan_id']}.nii.gz").round().tolist() == list(range(9))


def test_compressed_slices_followed_by_other_elements_are_complete(tmp_path):
    rows = write_series(tmp_path / "in", n=6)

    def rle_then_padding(ds):
        ds.compress(RLELossless)
        ds.add_new(0xFFFCFFFC, "OB", b"\0" * 16)  # trailing padding after the pixel data

    _rewrite(rows["path"], rle_then_padding)
    idx = ix.index_dicom(tmp_path / "in", threads=1)
    assert idx["readable"].all() and idx["has_pixels"].all() and not idx["truncated"].any()
    cut = rows["path"][0]  # cut inside a fragment: truncated still
    Path(cut).write_bytes(Path(cut).read_bytes()[:-200])
    idx = ix.index_dicom(tmp_path / "in", threads=1).set_index("path")
    assert idx.loc[cut, "truncated"] and int(idx["truncated"].sum()) == 1
    _, table = run_all(cfg_for(tmp_path / "in", fmt="dicom"), tmp_path / "res")
    assert table["status"].iloc[0] == "ok" and "dropped 1 truncated file(s)" in table["notes"].iloc[0]


def test_files_without_file_meta_are_read(tmp_path):
    rows = write_series(tmp_path / "in", n=6)

    def strip_meta(ds):
        del ds.file_meta
        ds.preamble = None

    # old archives: the bare dataset, implicit VR, no preamble, no 'DICM', no group 0002
    _rewrite(rows["path"], strip_meta, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert Path(rows["path"][0]).read_bytes()[128:132] != b"DICM"
    (tmp_path / "in" / "notes.bin").write_bytes(b"\x08\x00 not a dataset at all")
    idx = ix.index_dicom(tmp_path / "in", threads=1).set_index("path")
    dicom = idx.loc[rows["path"]]
    assert dicom["readable"].all() and dicom["has_pixels"].all() and not dicom["truncated"].any()
    assert (dicom["transfer_syntax"] == "1.2.840.10008.1.2").all()
    assert not idx.loc[str(tmp_path / "in" / "notes.bin"), "readable"]
    _, table = run_all(cfg_for(tmp_path / "in", fmt="dicom"), tmp_path / "res")
    assert table["status"].iloc[0] == "ok", table["reason"].iloc[0]
    assert decode_slices(tmp_path / "res" / "nifti" / f"{table['scan_id'].iloc[0]}.nii.gz").round().tolist() == list(range(6))


def test_a_missing_sop_instance_uid_falls_back_to_the_file_meta(tmp_path):
    rows = write_series(tmp_path / "in", n=6)

    def drop_sop(ds):
        del ds.SOPInstanceUID

    _rewrite(rows["path"], drop_sop)
    idx = ix.index_dicom(tmp_path / "in", threads=1).set_index("path")
    assert idx.loc[rows["path"], "sop_uid"].tolist() == rows["sop"].tolist()
    _, table = run_all(cfg_for(tmp_path / "in", fmt="dicom"), tmp_path / "res")
    assert table["status"].iloc[0] == "ok" and "duplicate" not in table["notes"].iloc[0]


def test_a_series_without_pixel_spacing_is_rejected(tmp_path):
    rows = write_series(tmp_path / "in", n=6)

    def drop_spacing(ds):
        del ds.PixelSpacing  # dcm2niix would take 1 mm: every volume in mL silently wrong

    _rewrite(rows["path"], drop_spacing)
    _, table = run_all(cfg_for(tmp_path / "in", fmt="dicom"), tmp_path / "res")
    assert table["status"].iloc[0] == "rejected"
    assert table["reason"].iloc[0] == "no pixel size (PixelSpacing missing, malformed or not positive)"


def test_a_missing_slice_is_named_in_the_notes(tmp_path):
    rows = write_series(tmp_path / "in", n=10, dz=5.0)
    os.remove(rows.sort_values("z")["path"].iloc[5])  # lost in transfer
    _, table = run_all(cfg_for(tmp_path / "in", fmt="dicom"), tmp_path / "res")
    row = table.iloc[0]
    assert row["status"] == "ok"
    assert "1 slice position(s) missing (gaps up to 10.00 mm against 5.00 mm spacing)" in row["notes"], row["notes"]


def test_an_image_that_lost_its_series_uid_is_named_beside_its_series(tmp_path, caplog):
    rows = write_series(tmp_path / "in" / "PHIMARKERACC_CT", n=10, dz=5.0)
    lost = rows.sort_values("z")["path"].iloc[5]
    _rewrite([lost], lambda ds: delattr(ds, "SeriesInstanceUID"))
    _, table = run_all(cfg_for(tmp_path / "in", fmt="dicom"), tmp_path / "res")
    row = table.iloc[0]
    assert len(table) == 1 and row["status"] == "ok"
    assert "1 slice position(s) missing" in row["notes"], row["notes"]
    assert f"1 image file(s) in its folder without SeriesInstanceUID not used, e.g. {Path(lost).name}" in row["notes"]
    assert row["source"] == "[removed]_CT"
    # a folder holding several series (flat, RSNA-style): the file cannot be placed, so a warning
    flat = tmp_path / "flat"
    a = write_series(flat, n=6)
    write_series(flat, n=6)
    _rewrite([a["path"][2]], lambda ds: delattr(ds, "SeriesInstanceUID"))
    with caplog.at_level(logging.WARNING, logger="hemocam"):
        _, table = run_all(cfg_for(flat, fmt="dicom"), tmp_path / "res_flat")
    assert len(table) == 2 and not table["notes"].str.contains("SeriesInstanceUID").any()
    assert f"1 image file(s) without SeriesInstanceUID belong to no series and are not used, e.g. {Path(a['path'][2]).name}" in caplog.text


def test_a_folder_name_that_is_not_utf8_is_skipped_not_fatal(tmp_path, caplog):
    root = tmp_path / "in"
    write_series(root / "good", n=6)
    bad = os.path.join(os.fsencode(root), b"M\xfcller")  # Latin-1, as Windows/USB exports write it
    os.makedirs(bad)
    for p in (root / "good").iterdir():
        shutil.copy(p, os.path.join(bad, os.fsencode(p.name)))
    with open(os.path.join(os.fsencode(root / "good"), b"IM\xe9.dcm"), "wb") as fh:
        fh.write(b"x")
    with caplog.at_level(logging.WARNING, logger="hemocam"):
        plan, table = run_all(cfg_for(root, fmt="dicom"), tmp_path / "res")
    assert (table["status"] == "ok").sum() == 1 and table["source"].tolist() == ["good"]
    assert "skipping folder b'" in caplog.text and "M\\xfcller" in caplog.text
    assert "not valid UTF-8" in caplog.text and "IM\\xe9.dcm" in caplog.text


def test_folder_names_spelling_header_values_are_shown_removed(tmp_path):
    # a PACS export: patient folder, study folder named after the accession number
    patient = tmp_path / "in" / "Doe_PHIMARKERNAME_PHIMARKERID"
    a = write_series(patient / "PHIMARKERACC_CT_HEAD", n=8)
    b = write_series(patient / "PHIMARKERACC_CT_BONE", n=4)
    Path(a["path"][3]).write_bytes(Path(a["path"][3]).read_bytes()[:-100])  # dropped, noted
    Path(b["path"][1]).write_bytes(Path(b["path"][1]).read_bytes()[:-100])  # too few left: rejected
    res = tmp_path / "res"
    _, table = run_all(cfg_for(tmp_path / "in", fmt="dicom"), res)
    table = table.set_index("source")
    assert set(table.index) == {"[removed]_[removed]_[removed]/[removed]_CT_HEAD",
                                "[removed]_[removed]_[removed]/[removed]_CT_BONE"}
    head, bone = table.loc["[removed]_[removed]_[removed]/[removed]_CT_HEAD"], table.loc["[removed]_[removed]_[removed]/[removed]_CT_BONE"]
    assert head["status"] == "ok" and f"dropped 1 truncated file(s): {Path(a['path'][3]).name}" in head["notes"]
    assert bone["reason"].startswith(f"[removed]_[removed]_[removed]/[removed]_CT_BONE/{Path(b['path'][1]).name}: truncated")
    shown = (res / "scans.tsv").read_text()
    assert "PHIMARKER" not in shown and "Doe" not in shown
    # the planning cache alone keeps the paths it reads the files from
    assert "PHIMARKERNAME" in (res / "ingest" / "index.tsv").read_text()


def test_path_spans_survive_a_moved_root_and_shown_keeps_the_rest():
    from hemocam.ingest.phi import REMOVED, path_spans, redact, shown

    values = ["Doe^Jane", "Doe", "Jane", "ACC123"]
    path = "/mnt/export/DOE_JANE/acc123_ct/IM0001"
    spans = path_spans(path, values)
    assert shown(path, spans) == f"/mnt/export/{REMOVED}_{REMOVED}/{REMOVED}_ct/IM0001"
    assert shown("DOE_JANE/acc123_ct/IM0001", spans) == f"{REMOVED}_{REMOVED}/{REMOVED}_ct/IM0001"
    assert shown("/elsewhere/DOE_JANE/acc123_ct/IM0001", spans).startswith(f"/elsewhere/{REMOVED}")
    assert shown("acc123_ct/IM0001", path_spans("/data/doe/acc123_ct/IM0001", values)) == f"{REMOVED}_ct/IM0001"
    assert path_spans("/data/ct/IM0001", values) == "" and shown("/data/ct/IM0001", "") == "/data/ct/IM0001"
    assert redact("Doe^Jane in /x/doe_jane", values) == f"{REMOVED} in /x/{REMOVED}_{REMOVED}"


def test_a_localizer_image_inside_an_axial_series_is_dropped_not_the_series(tmp_path):
    rows = write_series(tmp_path / "in" / "axial", n=8)
    write_series(tmp_path / "in" / "scout", n=2, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    scout_in_series = rows.sort_values("z")["path"].iloc[0]
    _rewrite([scout_in_series], lambda ds: setattr(ds, "ImageType", ["DERIVED", "SECONDARY", "LOCALIZER"]))
    _, table = run_all(cfg_for(tmp_path / "in", fmt="dicom"), tmp_path / "res")
    table = table.set_index("source")
    assert table.loc["scout", "reason"] == "localizer (ImageType LOCALIZER)"
    axial = table.loc["axial"]
    assert axial["status"] == "ok" and "1 LOCALIZER image(s) dropped" in axial["notes"], axial.to_dict()
    assert int(axial["n_slices"]) == 7
    assert decode_slices(tmp_path / "res" / "nifti" / f"{axial['scan_id']}.nii.gz").round().tolist() == list(range(1, 8))
