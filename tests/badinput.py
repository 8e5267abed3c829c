"""Builders of broken inputs for the reliability tests: small generated cohorts, then copies
with one fault each (made with pydicom/nibabel edits, never by hand-written bytes alone).

Every derived DICOM series gets new Series/SOP instance UIDs (RSNA-style ``ID_...``), so the
untouched series of the cohort stay byte-identical to a cohort without the faults and the
workflow's outputs for them can be compared by checksum.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import yaml

from hemocam.phantom import generate_cohort, generate_physionet_cohort
from hemocam.phantom.dicom import lenient_uids, truncate_in_pixel_data, write_dataset

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def uid(*parts, n_hex=10) -> str:
    return "ID_" + hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:n_hex]


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checksums(root, patterns=("nifti/*", "labels/*", "masks/*")) -> dict:
    """{relative path: sha256} of the files matching ``patterns`` under ``root``; '.'-prefixed
    names (temporary files of writes that were killed) are not outputs and are left out."""
    root = Path(root)
    return {str(p.relative_to(root)): sha256(p) for pat in patterns for p in sorted(root.glob(pat))
            if p.is_file() and not p.name.startswith(".")}


def read_scans(results) -> pd.DataFrame:
    return pd.read_csv(Path(results) / "scans.tsv", sep="\t", dtype=str, keep_default_na=False)


def stage_command(stage, results, seed=7, epochs=3) -> list[str]:
    """The command running one stage of ``_main`` in a fresh interpreter."""
    import sys

    return [sys.executable, str(Path(__file__).resolve()), stage, str(results), str(seed), str(epochs)]


def tree_state(root) -> dict:
    """{relative path: (mode, size, mtime_ns, sha256)} of everything under ``root`` (folders too)."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = sha256(p) if p.is_file() and not p.is_symlink() else ""
        out[str(p.relative_to(root))] = (stat.S_IMODE(st.st_mode), st.st_size if p.is_file() else 0,
                                         st.st_mtime_ns, digest)
    return out


def make_read_only(root):
    """chmod -R a-w: what a write attempt would hit (root skips permission checks: tested by state)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) & ~0o222)
        os.chmod(dirpath, stat.S_IMODE(os.stat(dirpath).st_mode) & ~0o222)


def make_writable(root):
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, stat.S_IMODE(os.stat(dirpath).st_mode) | 0o200)
        for name in filenames:
            p = os.path.join(dirpath, name)
            os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) | 0o200)


def write_config(path, **sections) -> Path:
    """A config overlay (YAML) merged by snakemake over the shipped defaults and presets."""
    path = Path(path)
    path.write_text(yaml.safe_dump(sections, sort_keys=True))
    return path


# ----------------------------------------------------------------------------- DICOM (RSNA layout)


def rsna_cohort(out_dir, n_scans=4, matrix=48, n_slices=14, seed=3) -> pd.DataFrame:
    """A clean RSNA-layout cohort (no quirks): out_dir/dicom, labels.csv, masks/, truth.tsv."""
    return generate_cohort(out_dir, n_scans=n_scans, matrix=matrix, n_slices=n_slices, seed=seed, quirks=False)


def rsna_config(cohort, **input_extra) -> dict:
    cohort = Path(cohort)
    return {"input": {"format": "rsna", "path": str(cohort / "dicom"), "labels": str(cohort / "labels.csv"),
                      "masks": str(cohort / "masks"), "scan_id": "uid", "scan_id_key": "", **input_extra}}


def series_files(dicom_dir) -> dict[str, list[Path]]:
    """SeriesInstanceUID -> its files, ordered along the slice normal (inferior first)."""
    out: dict[str, list[tuple[float, Path]]] = {}
    with lenient_uids():
        for p in sorted(Path(dicom_dir).glob("*.dcm")):
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            out.setdefault(str(ds.SeriesInstanceUID), []).append((float(ds.ImagePositionPatient[2]), p))
    return {k: [p for _, p in sorted(v)] for k, v in out.items()}


def derive_series(src: list[Path], dst_dir, tag: str, edit=None, keep=None, labels: pd.DataFrame | None = None):
    """Copy a series under new UIDs, applying ``edit(ds, k)`` to each kept file.

    ``keep``: indices (into ``src``) of the files to copy. Returns (series_uid, new paths,
    label rows for the new SOPs copied from ``labels`` (the RSNA long CSV), or None).
    """
    dst_dir = Path(dst_dir)
    keep = range(len(src)) if keep is None else keep
    series_uid = uid("bad-series", tag)
    paths, rows = [], []
    with lenient_uids():
        for j, k in enumerate(keep):
            ds = pydicom.dcmread(src[k])
            old_sop = str(ds.SOPInstanceUID)
            sop = uid("bad-sop", tag, k, n_hex=9)
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.SeriesInstanceUID = series_uid
            ds.InstanceNumber = j + 1
            if edit is not None:
                edit(ds, j)
            path = dst_dir / f"{sop}.dcm"
            write_dataset(ds, path)
            paths.append(path)
            if labels is not None:
                mine = labels[labels["ID"].str.startswith(old_sop + "_")]
                rows.append(mine.assign(ID=mine["ID"].str.replace(old_sop, sop, regex=False)))
    return series_uid, paths, (pd.concat(rows, ignore_index=True) if rows else None)


def _as_mr(ds, k):
    ds.Modality = "MR"
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE


def _reorient(row, col, along):
    """Edit: a non-axial reconstruction (IOP ``row``/``col``), slices stepping 5 mm ``along`` (LPS)."""

    def edit(ds, k):
        ds.ImageOrientationPatient = [str(v) for v in (*row, *col)]
        ds.ImagePositionPatient = [f"{-100.0 + 5.0 * k * a:.1f}" for a in along]

    return edit


def _slope(value):
    def edit(ds, k):
        ds.RescaleSlope = str(value)

    return edit


def rsna_bad_cohort(base, out_dir) -> dict:
    """A copy of the RSNA cohort ``base`` plus one broken copy of its series per fault.

    Returns {fault: series_uid or file name} and writes out_dir/labels.csv with label rows for
    every derived SOP (so label-based planning never hides the fault under test).
    """
    base, out = Path(base), Path(out_dir)
    shutil.copytree(base, out)
    dicom = out / "dicom"
    series = series_files(base / "dicom")
    first, second = sorted(series)[:2]
    src, src2 = series[first], series[second]
    labels = pd.read_csv(base / "labels.csv", dtype=str)
    made, extra_rows = {"source": first}, []

    def add(fault, files, **kw):
        sid, paths, rows = derive_series(files, dicom, fault, labels=labels, **kw)
        made[fault] = sid
        if rows is not None:
            extra_rows.append(rows)
        return paths

    # a truncated file inside a good series: the most superior slice, and one in the middle
    top = add("truncated_top", src)
    truncate_in_pixel_data(top[-1])
    made["truncated_top_file"] = top[-1].name
    mid = add("truncated_mid", src2)
    truncate_in_pixel_data(mid[len(mid) // 2])
    made["truncated_mid_file"] = mid[len(mid) // 2].name
    add("few_slices", src, keep=range(5))
    add("mr", src, edit=_as_mr)
    add("coronal", src, edit=_reorient((1, 0, 0), (0, 0, -1), (0, 1, 0)))
    add("sagittal", src, edit=_reorient((0, 1, 0), (0, 0, -1), (1, 0, 0)))
    add("slope100", src, edit=_slope(100))
    # files that are no DICOM at all, among the slices
    (dicom / "README.txt").write_text("exported by PACS viewer\n")
    (dicom / "ID_0000junk.dcm").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (dicom / "empty.dcm").write_bytes(b"")
    made["non_dicom"] = ["README.txt", "ID_0000junk.dcm", "empty.dcm"]
    all_labels = pd.concat([labels, *extra_rows], ignore_index=True)
    all_labels.to_csv(out / "labels.csv", index=False)
    return made


def all_rejected_cohort(base, out_dir) -> dict:
    """Only broken series (from the first series of ``base``): every candidate is rejected."""
    base, out = Path(base), Path(out_dir)
    (out / "dicom").mkdir(parents=True)
    src = series_files(base / "dicom")[sorted(series_files(base / "dicom"))[0]]
    labels = pd.read_csv(base / "labels.csv", dtype=str)
    made, rows = {}, []
    for fault, kw in (("mr", {"edit": _as_mr}), ("few_slices", {"keep": range(4)}),
                      ("coronal", {"edit": _reorient((1, 0, 0), (0, 0, -1), (0, 1, 0))})):
        sid, _, r = derive_series(src, out / "dicom", fault, labels=labels, **kw)
        made[fault] = sid
        rows.append(r)
    pd.concat(rows, ignore_index=True).to_csv(out / "labels.csv", index=False)
    return made


# ----------------------------------------------------------------------------- NIfTI (PhysioNet layout)


def physionet_cohort(out_dir, n_scans=3, matrix=48, n_slices=12, seed=5) -> pd.DataFrame:
    return generate_physionet_cohort(out_dir, n_scans=n_scans, matrix=matrix, n_slices=n_slices, seed=seed)


def physionet_config(root) -> dict:
    return {"input": {"format": "physionet", "path": str(root), "labels": "", "masks": "", "scan_id": "uid",
                      "scan_id_key": ""}}


def _meta_rows(meta: pd.DataFrame, number: int, like: int) -> pd.DataFrame:
    return meta[meta["PatientNumber"] == like].assign(PatientNumber=number)


def physionet_bad_cohort(base, out_dir) -> dict:
    """A copy of the PhysioNet cohort ``base`` plus one broken scan per fault.

    Scan numbers from 060 on; each copies scan 049's image (and labels unless the fault is in
    them). Returns {fault: scan_id}.
    """
    base, out = Path(base), Path(out_dir)
    shutil.copytree(base, out)
    ct, masks = out / "ct_scans", out / "masks"
    meta = pd.read_csv(base / "hemorrhage_diagnosis_raw_metadata.csv")
    src = 49
    img = nib.load(ct / f"{src:03d}.nii")
    data = np.asanyarray(img.dataobj)
    mask = np.asanyarray(nib.load(masks / f"{src:03d}.nii").dataobj)
    n_slices = data.shape[2]
    rows, made = [], {}
    raw = (ct / f"{src:03d}.nii").read_bytes()

    def number(fault):
        n = 60 + len(made)
        made[fault] = f"{n:03d}"
        return n

    # a NIfTI cut short (an interrupted copy)
    n = number("truncated_nifti")
    (ct / f"{n:03d}.nii").write_bytes(raw[: len(raw) // 2])
    rows.append(_meta_rows(meta, n, src))
    # a broken header: dim[0] (number of dimensions) out of range
    n = number("broken_header")
    hdr = bytearray(raw)
    hdr[40:42] = np.int16(11).tobytes()
    (ct / f"{n:03d}.nii").write_bytes(bytes(hdr))
    rows.append(_meta_rows(meta, n, src))
    # a mask with two slices fewer than its scan (same affine): resampled through the affines
    n = number("mask_shape")
    shutil.copy(ct / f"{src:03d}.nii", ct / f"{n:03d}.nii")
    nib.save(nib.Nifti1Image(mask[:, :, :-2], img.affine), masks / f"{n:03d}.nii")
    rows.append(_meta_rows(meta, n, src))
    # a mask whose affine puts it 1 m away from its scan
    n = number("mask_affine")
    shutil.copy(ct / f"{src:03d}.nii", ct / f"{n:03d}.nii")
    far = img.affine.copy()
    far[:3, 3] += 1000.0
    nib.save(nib.Nifti1Image(mask, far), masks / f"{n:03d}.nii")
    rows.append(_meta_rows(meta, n, src))
    # a 2D mask
    n = number("mask_2d")
    shutil.copy(ct / f"{src:03d}.nii", ct / f"{n:03d}.nii")
    nib.save(nib.Nifti1Image(mask[:, :, 0], img.affine), masks / f"{n:03d}.nii")
    rows.append(_meta_rows(meta, n, src))
    # label rows for slices beyond the volume
    n = number("labels_beyond")
    shutil.copy(ct / f"{src:03d}.nii", ct / f"{n:03d}.nii")
    shutil.copy(masks / f"{src:03d}.nii", masks / f"{n:03d}.nii")
    extra = _meta_rows(meta, n, src)
    beyond = extra.tail(2).assign(SliceNumber=[n_slices + 1, n_slices + 5])
    rows += [extra, beyond]
    # a scan without any label row
    n = number("no_labels")
    shutil.copy(ct / f"{src:03d}.nii", ct / f"{n:03d}.nii")
    shutil.copy(masks / f"{src:03d}.nii", masks / f"{n:03d}.nii")
    # label rows for only some slices
    n = number("labels_missing")
    shutil.copy(ct / f"{src:03d}.nii", ct / f"{n:03d}.nii")
    shutil.copy(masks / f"{src:03d}.nii", masks / f"{n:03d}.nii")
    rows.append(_meta_rows(meta, n, src).iloc[2:])
    # HU out of range: a wrong scaling stored in the header (scl_slope 100)
    n = number("slope100")
    scaled = nib.Nifti1Image(data.astype(np.int16), img.affine)
    scaled.header.set_slope_inter(100.0, 0.0)
    nib.save(scaled, ct / f"{n:03d}.nii")
    shutil.copy(masks / f"{src:03d}.nii", masks / f"{n:03d}.nii")
    rows.append(_meta_rows(meta, n, src))
    pd.concat([meta, *rows], ignore_index=True).to_csv(out / "hemorrhage_diagnosis_raw_metadata.csv", index=False)
    made["n_slices"] = n_slices
    return made


# ----------------------------------------------------------------------------- running


def snakemake(workdir, overlay: dict | None = None, *targets, check=True, extra=(), timeout=1800):
    """The real snakemake (tests/conftest.run_snakemake) with a config overlay, on ``targets``.

    Returns the CompletedProcess; ``.out`` holds stdout and stderr together (snakemake logs to
    stdout in dry runs, to stderr otherwise).
    """
    from conftest import CPU_SMALL, TINY, run_snakemake

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    files = [CPU_SMALL, TINY]
    if overlay is not None:
        files.append(write_config(workdir.parent / f"{workdir.name}.config.yaml", **overlay))
    proc = run_snakemake(workdir, *extra, "--", *targets, configfiles=files, check=check, timeout=timeout)
    proc.out = proc.stdout + proc.stderr
    return proc


# ----------------------------------------------------------------------------- the stages in-process

WINDOWS = [{"name": "brain", "center": 40, "width": 80}, {"name": "subdural", "center": 80, "width": 200},
           {"name": "soft", "center": 40, "width": 380}]


def tiny_config(seed=7, epochs=2, seg_epochs=2) -> dict:
    """Stage configs small enough for a CPU test (a ResNet-18 on 32 x 32 slices)."""
    return {
        "seed": seed,
        "preprocess": {"size": 32, "windows": WINDOWS},
        "classifier": {"arch": "resnet18", "pretrained": "", "lstm_hidden": 16, "lstm_layers": 1, "epochs": epochs,
                       "batch_size": 2, "lr": 1e-3, "weight_decay": 1e-4, "patience": 10, "num_workers": 0,
                       "amp": False, "slice_epochs": 0},  # one stage: the interruption tests count its epochs
        # layer4 is 1 x 1 on 32 x 32 slices (a flat CAM); layer2 is 4 x 4
        "cam": {"method": "gradcam", "layer": "layer2", "label": "any", "per_subtype": False},
        # a low CAM threshold and no clustering: pseudo-masks that are not empty after 2 epochs
        "pseudomask": {"cam_threshold": 0.2, "hu_min": 45, "hu_max": 95, "refine": "none",
                       "min_component_ml": 0.2, "prob_threshold": 0.5},
        "segmenter": {"encoder": "plain", "base_channels": 8, "context_slices": 1, "epochs": seg_epochs,
                      "batch_size": 8, "lr": 1e-3, "patience": 10, "num_workers": 0, "amp": False,
                      "samples_per_epoch": 16},
    }


def tiny_cohort(results, n_scans=4, matrix=48, n_slices=10, seed=12) -> list[str]:
    """An already-ingested cohort (R/nifti, labels, masks, scans.tsv) and its preprocess cache."""
    from hemocam.phantom import write_nifti_cohort
    from hemocam.preprocess import preprocess_batch

    results = Path(results)
    scans = write_nifti_cohort(results, n_scans, matrix=matrix, n_slices=n_slices, seed=seed)
    ids = sorted(scans["scan_id"])
    preprocess_batch(ids, results, WINDOWS, 32, results / "preprocess" / "batches" / "c0000.tsv")
    return ids


def train_classifier_stage(results, cfg):
    from hemocam.classifier import train_classifier

    r = Path(results)
    return train_classifier(cfg, r / "scans.tsv", r, r / "classifier" / "model.pt", r / "classifier" / "history.tsv",
                            r / "classifier" / "metrics.tsv", device="cpu")


def downstream_stages(results, cfg, ids):
    """CAM -> pseudo-mask -> segmenter training -> segmentation (what follows the classifier)."""
    from hemocam.cam import cam_batch
    from hemocam.pseudomask import pseudomask_batch
    from hemocam.segmenter import segment_batch, train_segmenter

    r = Path(results)
    pre = [r / "preprocess" / "batches" / "c0000.tsv"]
    cam_batch(r / "classifier" / "model.pt", ids, r, cfg["cam"], r / "cam" / "batches" / "g0000.tsv", upstream=pre,
              device="cpu")
    pseudomask_batch(ids, r, cfg["pseudomask"], True, r / "pseudomask" / "batches" / "g0000.tsv",
                     upstream=[r / "cam" / "batches" / "g0000.tsv"])
    train_segmenter(cfg, r / "scans.tsv", r, "pseudomask", r / "segmenter" / "model.pt", r / "segmenter" / "history.tsv",
                    device="cpu")
    segment_batch(r / "segmenter" / "model.pt", ids, r, r / "segmentation", r / "segmentation" / "batches" / "g0000.tsv",
                  upstream=pre, device="cpu")


def _main(argv):
    """``python tests/badinput.py STAGE RESULTS [SEED EPOCHS]``: a stage in a fresh process."""
    import json
    import logging
    import sys

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    stage, results = argv[0], Path(argv[1])
    seed, epochs = (int(argv[2]), int(argv[3])) if len(argv) > 3 else (7, 2)
    cfg = tiny_config(seed, epochs)
    if stage == "cohort":
        print(json.dumps(tiny_cohort(results)))
    elif stage == "classifier":  # on the cohort made by an earlier call, or a new one
        if not (results / "preprocess" / "batches" / "c0000.tsv").exists():
            tiny_cohort(results)
        train_classifier_stage(results, cfg)
    elif stage == "downstream":
        downstream_stages(results, cfg, sorted(read_scans(results)["scan_id"]))
    elif stage == "pipeline":  # everything from scratch: cohort, classifier, CAM ... segmentation
        ids = tiny_cohort(results)
        train_classifier_stage(results, cfg)
        downstream_stages(results, cfg, ids)
    else:
        raise SystemExit(f"unknown stage {stage}")


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])


# ----------------------------------------------------------------------------- identifying values

# every attribute that identifies a person, a place or a visit, with the VR its marker must fit
PHI_ATTRIBUTES = {
    "PatientName": "PN", "PatientID": "LO", "PatientBirthDate": "DA", "OtherPatientIDs": "LO",
    "OtherPatientNames": "PN", "PatientAddress": "LO", "PatientTelephoneNumbers": "SH",
    "PatientMotherBirthName": "PN", "MilitaryRank": "LO", "PatientComments": "LT",
    "MedicalRecordLocator": "LO", "AccessionNumber": "SH", "InstitutionName": "LO",
    "InstitutionAddress": "ST", "InstitutionalDepartmentName": "LO", "ReferringPhysicianName": "PN",
    "PerformingPhysicianName": "PN", "OperatorsName": "PN", "PhysiciansOfRecord": "PN",
    "NameOfPhysiciansReadingStudy": "PN", "RequestingPhysician": "PN", "StationName": "SH",
    "DeviceSerialNumber": "LO", "StudyID": "SH", "RequestedProcedureID": "SH",
    "PerformedProcedureStepID": "SH", "ScheduledProcedureStepID": "SH",
}


def phi_marker(attribute: str, study: int, vr: str) -> str:
    """A value no code path could produce by chance, unique per attribute and study."""
    tag = hashlib.sha256(f"{attribute}:{study}".encode()).hexdigest()[:6].upper()
    if vr == "DA":
        return f"1{study % 10}{int(tag[:4], 16) % 90 + 10:02d}0{int(tag[4], 16) % 9 + 1}{int(tag[5], 16) % 18 + 10:02d}"
    if vr == "PN":
        return f"QZPN{tag}^QZGIVEN{tag}"
    if vr == "SH":  # 16 characters at most
        return f"QZ{tag}{attribute[:6].upper()}"[:16]
    return f"QZ{attribute.upper()}{tag}"


def fill_identifiers(dicom_dir) -> list[str]:
    """Set every ``PHI_ATTRIBUTES`` attribute of every file (in place) to a marker per study.

    Returns the markers, with the parts of person names as well (what a log could split out).
    """
    markers = set()
    studies = {}
    with lenient_uids():
        for p in sorted(Path(dicom_dir).glob("*.dcm")):
            try:
                ds = pydicom.dcmread(p)
            except Exception:
                continue  # a truncated or foreign file: left as it is
            study = studies.setdefault(str(ds.StudyInstanceUID), len(studies))
            for attr, vr in PHI_ATTRIBUTES.items():
                value = phi_marker(attr, study, vr)
                setattr(ds, attr, value)
                markers.add(value)
                if vr == "PN":
                    markers.update(value.split("^"))
            write_dataset(ds, p)
    return sorted(markers)


def leaked(roots, markers) -> list[tuple[str, str]]:
    """(file, marker) for every marker in a file's bytes (gzip members too) or name under ``roots``.

    Same answer as conftest.assert_no_markers, but fast with hundreds of markers and large
    model files: one search per distinct 2-byte prefix, then the markers with that prefix are
    compared where it occurs (binary data has few candidates; text files are small).
    """
    from conftest import file_texts

    atoms = sorted({m for m in markers if m})
    by_prefix: dict[bytes, list[bytes]] = {}
    for m in atoms:
        by_prefix.setdefault(m.encode()[:2], []).append(m.encode())
    found = []
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for path, data in file_texts(root):
            name = str(path.relative_to(root))
            hits = {m for m in atoms if m in name}
            for prefix, group in by_prefix.items():
                pos = data.find(prefix)
                while pos != -1 and len(hits) < len(atoms):
                    hits.update(m.decode() for m in group if data.startswith(m, pos))
                    pos = data.find(prefix, pos + 1)
            found += [(str(path), m) for m in sorted(hits)]
    return found
