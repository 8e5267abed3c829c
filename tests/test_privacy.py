"""Patient privacy: no identifying DICOM value reaches any output, log, report or file name.

Every identifying attribute of a generated cohort (with its quirks: localizers, a secondary
capture, a tilted series, a 12-bit wrap, a truncated file) is set to a unique marker, the whole
workflow runs on it, then its report is made; no marker may appear in any file under the
working directory (results/, logs/, .snakemake/, report.html), gzip members included, nor in
any file name.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pydicom
import pytest

from badinput import PHI_ATTRIBUTES, fill_identifiers, leaked, read_scans, rsna_config, snakemake
from conftest import file_texts
from hemocam.ingest.series import scan_id_for
from hemocam.phantom import generate_cohort
from hemocam.phantom.dicom import lenient_uids

pytestmark = pytest.mark.workflow

KEY = "QZSCANIDKEY7731"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("privacy")
    truth = generate_cohort(root / "cohort", n_scans=6, matrix=48, n_slices=14, seed=5, quirks=True)
    markers = fill_identifiers(root / "cohort" / "dicom")
    # files pydicom cannot rewrite (the truncated one) keep the phantom's own markers
    markers += sorted({v for values in truth["phi_values"] for v in values.split("|")})
    in_paths = nest_first_study(root / "cohort" / "dicom")
    return {"root": root, "truth": truth, "markers": sorted({m for m in markers if len(m) >= 6}),
            "in_paths": in_paths}


def nest_first_study(dicom_dir) -> set[str]:
    """Move the first study's files into folders named as PACS exports name them, after the
    patient and the accession number; returns the markers the folder names spell."""
    with lenient_uids():
        headers = [(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in sorted(Path(dicom_dir).glob("*.dcm"))]
    study = headers[0][1].StudyInstanceUID
    first = headers[0][1]
    folder = Path(dicom_dir) / str(first.PatientName).replace("^", "_") / f"{first.AccessionNumber}_CT_HEAD"
    folder.mkdir(parents=True)
    for p, ds in headers:
        if ds.StudyInstanceUID == study:
            p.rename(folder / p.name)
    return {*str(first.PatientName).split("^"), str(first.AccessionNumber), str(first.PatientName)}


def leaked_beyond_inputs(work, cohort) -> list[tuple[str, str]]:
    """Leaks under ``work``, except the input paths that results/ingest (the header index and
    the batch plans, which must find the files again) holds: folder names are the user's."""
    ingest = str(Path(work) / "results" / "ingest")
    return [(f, m) for f, m in leaked([work], cohort["markers"])
            if not (f.startswith(ingest) and m in cohort["in_paths"])]


@pytest.fixture(scope="module")
def full_run(cohort):
    """The whole workflow (tiny sizes) and its report, on the marked cohort."""
    root = cohort["root"]
    cfg = rsna_config(root / "cohort")
    cfg.update({"preprocess": {"size": 32}, "classifier": {"epochs": 2},
                "segmenter": {"encoder": "plain", "epochs": 2, "batch_size": 8, "upper_bound": False}})
    work = root / "run"
    proc = snakemake(work, cfg)
    report = snakemake(work, cfg, extra=("--report", str(work / "report.html")))
    return {"work": work, "out": proc.out + report.out}


def test_the_inputs_really_carry_the_markers(cohort):
    files = sorted((cohort["root"] / "cohort" / "dicom").glob("*.dcm"))
    with lenient_uids():
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    for attr in PHI_ATTRIBUTES:
        assert str(ds.get(attr, "")) and any(str(ds.get(attr)).split("^")[0] in m for m in cohort["markers"]), attr
    assert len(cohort["markers"]) > 10 * len(PHI_ATTRIBUTES)
    # the search below can fail: markers in a text file, a gzip member, binary data and a name
    import gzip

    probe = cohort["root"] / "probe"
    probe.mkdir(exist_ok=True)
    m = cohort["markers"]
    (probe / "x.tsv").write_text(f"scan\t{m[0]}\n")
    (probe / "y.json.gz").write_bytes(gzip.compress(f'{{"a": "{m[1]}"}}'.encode()))
    (probe / "z.pt").write_bytes(bytes(range(256)) * 999 + m[2].encode() + b"\0" * 7)
    (probe / f"{m[3]}.nii.gz").write_bytes(b"")
    assert {x for _, x in leaked([probe], m)} == set(m[:4])


def test_no_identifying_value_in_any_output_log_report_or_name(cohort, full_run):
    work = full_run["work"]
    scans = read_scans(work / "results")
    assert (scans["status"] == "ok").sum() >= 4
    assert (work / "results" / "metrics" / "summary.tsv").exists() and (work / "report.html").stat().st_size > 0
    assert not leaked_beyond_inputs(work, cohort)
    # the folders named after the patient are shown with those names removed
    nested = scans.loc[scans["source"] != ".", "source"].tolist()
    assert nested and all(s.startswith("[removed]_[removed]/[removed]") for s in nested), nested
    # the report embeds its files base64-encoded: decoded, they must be clean too
    payloads = [base64.b64decode(m.group(1)) for m in
                re.finditer(rb";base64,([A-Za-z0-9+/=]+)", (work / "report.html").read_bytes())]
    assert any(p.startswith(b"scan_id\t") for p in payloads), "scans.tsv not found in the report"
    decoded = work.parent / "report_payloads"
    decoded.mkdir(exist_ok=True)
    for i, p in enumerate(payloads):
        (decoded / f"{i}.bin").write_bytes(p)
    assert not leaked([decoded], cohort["markers"])
    found = [m for m in cohort["markers"] if m in full_run["out"]]
    assert not found, f"snakemake's own output shows identifying values: {found[:5]}"


def test_scan_ids_and_output_names_come_from_uids_only(cohort, full_run):
    scans = read_scans(full_run["work"] / "results")
    series = set(cohort["truth"]["scan_id"])  # the phantom's truth lists series by SeriesInstanceUID
    assert set(scans["scan_id"]) == {scan_id_for(uid) for uid in series}
    names = {p.name.split(".")[0].removesuffix("_prob") for sub in ("nifti", "cam", "pseudomask", "segmentation")
             for p in (full_run["work"] / "results" / sub).glob("*.nii.gz")}
    assert names == set(scans.loc[scans["status"] == "ok", "scan_id"])


@pytest.fixture(scope="module")
def hashed(cohort):
    """`ingest` and provenance with input.scan_id: hash."""
    root = cohort["root"]
    cfg = rsna_config(root / "cohort", scan_id="hash", scan_id_key=KEY)
    work = root / "hashed"
    proc = snakemake(work, cfg, "ingest", "results/provenance.json")
    return {"work": work, "out": proc.out, "cfg": cfg}


def test_hashed_scan_ids_are_not_the_series_uids(cohort, hashed):
    scans = read_scans(hashed["work"] / "results")
    uids = sorted(cohort["truth"]["scan_id"])
    assert len(scans) == len(uids)
    assert all(re.fullmatch(r"s[0-9a-f]{16}", sid) for sid in scans["scan_id"])
    assert set(scans["scan_id"]) == {scan_id_for(u, "hash", KEY) for u in uids}  # the keyed hash, stable
    assert set(scans["scan_id"]).isdisjoint({scan_id_for(u, "hash", KEY + "x") for u in uids})
    # the UIDs stay in the planning cache (results/ingest) only: no other file or name has one
    results = hashed["work"] / "results"
    leaks = [(str(path.relative_to(results)), uid) for path, data in file_texts(results)
             if path.relative_to(results).parts[0] != "ingest"
             for uid in uids if uid in str(path.relative_to(results)) or uid.encode() in data]
    assert not leaks, leaks
    assert not leaked([hashed["work"] / "logs"], uids)
    assert not leaked_beyond_inputs(hashed["work"], cohort)


def test_the_scan_id_key_is_not_written(hashed):
    """The hash key is what keeps hashed ids from being recomputed from known UIDs."""
    assert not leaked([hashed["work"]], [KEY])  # results, logs and Snakemake's metadata
    assert KEY not in hashed["out"]
    provenance = json.loads((hashed["work"] / "results" / "provenance.json").read_text())
    assert provenance["config"]["input"]["scan_id"] == "hash"
    assert provenance["config"]["input"]["scan_id_key"] != KEY
