"""The demo cohort as DICOM in the RSNA ICH layout, with the quirks real exports have.

out_dir/dicom/ID_<hex>.dcm     flat folder of single-slice files (several series per study)
out_dir/labels.csv             RSNA long format: ID_<sop>_<subtype>,0/1, shuffled rows
out_dir/masks/{scan_id}.nii.gz ground truth (uint8 0/1) with a world-correct RAS affine
out_dir/truth.tsv              test truth per series (expected status, quirks, PHI markers):
                               never an input of the workflow
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..io import atomic_path, save_nifti, write_tsv
from ..labelset import SUBTYPES
from .anatomy import render_anatomy
from .cohort import opaque_id, plan_subtypes, scan_seed
from .dicom import (RAS_FROM_LPS, STORAGES, Identity, SeriesInfo, ct_slice_dataset, localizer_dataset, lps_affine,
                    lenient_uids, secondary_capture_dataset, truncate_in_pixel_data, write_dataset)
from .scan import (Phantom, add_noise, pixel_spacing, render_grid, render_scan, rng_streams, sample_phantom, scanner_blur,
                   visible_code)

QUIRKS = ("localizer", "shuffled_instance", "mixed_storage", "rescale_wrap", "gantry_tilt", "truncated",
          "secondary_capture", "fov_padding")
# quirks that each go to one distinct axial series
SINGLE_SERIES_QUIRKS = ("gantry_tilt", "rescale_wrap", "truncated", "fov_padding")
RSNA_ORDER = ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
TRUTH_COLUMNS = ["scan_id", "kind", "quirk", "expected_status", "patient", "study", "n_slices", "n_files",
                 "subtypes", "hemorrhage_ml", "positive_slices", "storage", "tilt_deg", "seed", "phi_values"]


def quirk_set(quirks) -> set:
    """``True``: all quirks; False/None: none; a name, list or {name: bool} selects some."""
    if quirks is True:
        chosen = set(QUIRKS)
    elif not quirks:
        chosen = set()
    elif isinstance(quirks, str):
        chosen = {quirks}
    elif isinstance(quirks, dict):
        chosen = {k for k, v in quirks.items() if v}
    else:
        chosen = set(quirks)
    unknown = chosen - set(QUIRKS)
    if unknown:
        raise ValueError(f"unknown phantom quirks {sorted(unknown)}; known: {', '.join(QUIRKS)}")
    return chosen


@dataclass
class ScanPlan:
    index: int
    seed: int
    subtypes: list
    patient: int
    anatomy_seed: int
    study_uid: str
    series_uid: str
    storage: str = "unsigned"
    quirks: list = field(default_factory=list)
    n_localizer: int = 0
    secondary_capture: bool = False


def plan_cohort(n_scans: int, seed: int, quirks) -> list[ScanPlan]:
    """Who is who: patients (some with two studies), subtypes, storage and quirks per series."""
    chosen = quirk_set(quirks)
    rng = np.random.default_rng([seed, 0xD1C])
    subtypes = plan_subtypes(n_scans, seed)
    # some patients come back for a second study: patient-grouped splits must keep them together
    n_pairs = n_scans // 6 if n_scans >= 6 else (1 if n_scans >= 3 else 0)
    order = rng.permutation(n_scans)
    patient = np.empty(n_scans, int)
    p = 0
    for j, i in enumerate(order):
        patient[i] = p
        if not (j < 2 * n_pairs and j % 2 == 0):
            p += 1
    plans = []
    for i in range(n_scans):
        pid = int(patient[i])
        plans.append(ScanPlan(
            index=i, seed=scan_seed(seed, i), subtypes=subtypes[i], patient=pid,
            anatomy_seed=scan_seed(seed, 100_000 + pid),
            study_uid=opaque_id("study", seed, i, n_hex=10), series_uid=opaque_id("series", seed, i, n_hex=10)))
    _assign_quirks(plans, chosen, rng)
    return plans


def _assign_quirks(plans, chosen, rng):
    n = len(plans)
    if "shuffled_instance" in chosen:
        for plan in plans:
            plan.quirks.append("shuffled_instance")
    # single-series quirks on distinct series; the tilted one is positive so its mask means something
    free = [int(i) for i in rng.permutation(n)]
    positives = [i for i in free if plans[i].subtypes]
    storage_fixed = set()
    for q in SINGLE_SERIES_QUIRKS:
        if q not in chosen or not free:
            continue
        pool = [i for i in positives if i in free] if q == "gantry_tilt" else []
        i = pool[0] if pool else free[0]
        free.remove(i)
        plans[i].quirks.append(q)
        if q in ("rescale_wrap", "fov_padding"):
            plans[i].storage = "wrap12" if q == "rescale_wrap" else "padded"
            storage_fixed.add(i)
    if "mixed_storage" in chosen:
        rest = [i for i in range(n) if i not in storage_fixed]
        kinds = ["unsigned", "signed", "signed0"]
        for j, i in enumerate(rng.permutation(rest)):
            plans[int(i)].storage = kinds[j % 3]
    if "localizer" in chosen:
        with_scout = rng.uniform(size=n) < 0.35
        with_scout[int(rng.integers(n))] = True
        for plan, on in zip(plans, with_scout):
            plan.n_localizer = int(rng.integers(1, 3)) if on else 0
    if "secondary_capture" in chosen:
        plans[int(rng.integers(n))].secondary_capture = True


# ----------------------------------------------------------------------------- identities


def make_identities(plans, seed: int) -> dict:
    """Marker PHI per study: patient values shared across a patient's studies, all unique."""
    out = {}
    base_birth = dt.date(1931, 3, 7)
    for plan in plans:
        h = opaque_id("phi", seed, plan.patient, n_hex=8)[3:]
        s = opaque_id("phi-study", seed, plan.index, n_hex=8)[3:]
        birth = base_birth + dt.timedelta(days=plan.patient * 211 + seed % 97)
        study_day = dt.date(2019, 1, 2) + dt.timedelta(days=(plan.index * 13 + seed) % 700)
        out[plan.index] = Identity(
            patient_name=f"PHIMARK^{h.upper()}^P{plan.patient:04d}",
            patient_id=f"PHIMARK-PID-{h}",
            birth_date=birth.strftime("%Y%m%d"),
            sex="MF"[plan.patient % 2],
            other_ids=f"PHIMARK-OPID-{h}",
            accession=f"PHIMARK{s}",
            institution=f"PHIMARK General Hospital {s}",
            referring=f"PHIMARK^Referrer^{s}",
            study_date=study_day.strftime("%Y%m%d"),
            study_time=f"{8 + plan.index % 10:02d}{(plan.index * 7) % 60:02d}00",
        )
    return out


# ----------------------------------------------------------------------------- axial series


TILT_RANGE = (15.0, 20.0)


def _tilted_geometry(phantom: Phantom, matrix: int, tilt_deg: float):
    """GE-style gantry tilt: rows along x, columns tilted in y-z, positions stepping along the table."""
    d = pixel_spacing(phantom.scanner, matrix)
    t = np.deg2rad(tilt_deg)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, np.cos(t), -np.sin(t)])
    n = len(phantom.slice_z)
    step = phantom.slice_thickness / np.cos(t)  # table increment between tilted slices
    z_mid = float(np.mean(phantom.slice_z))
    zc = z_mid + (np.arange(n) - (n - 1) / 2) * step
    half = (matrix - 1) / 2 * d
    ipps = [np.round([-half, -half * np.cos(t), z + half * np.sin(t)], 4) for z in zc]
    return ipps, row, col, d, step


def render_axial_series(plan: ScanPlan, matrix: int, n_slices: int, thickness: float):
    """HU slices in DICOM pixel order, subtype codes per slice, LPS geometry and the truth mask."""
    phantom = sample_phantom(plan.seed, n_slices, thickness, hemorrhage=bool(plan.subtypes),
                             subtypes=plan.subtypes, anatomy_seed=plan.anatomy_seed, strict=False)
    if "gantry_tilt" in plan.quirks:
        tilt = float(np.round(np.random.default_rng(plan.seed).uniform(*TILT_RANGE), 1))
        ipps, row, col, d, step = _tilted_geometry(phantom, matrix, tilt)
        aff = lps_affine(ipps[0], row, col, [0, 0, step], d)
        clean, code, _ = render_grid(phantom, aff, (matrix, matrix, n_slices))
        blurred = scanner_blur(clean, phantom.scanner)
        hu = add_noise(blurred, phantom.scanner, rng_streams(phantom.seed)[3])
        pixels = hu.transpose(1, 0, 2)  # [row, column, slice]
        slice_code = visible_code(code, blurred).transpose(1, 0, 2)
        mask_aff, mask_shape = tilt_corrected_grid(ipps, row, col, d, phantom.slice_thickness, matrix)
        mask_clean, mask_code, _ = render_grid(phantom, mask_aff, mask_shape)
        # same spacing in-plane and ~ along the normal: the same blur decides what shows
        mask_code = visible_code(mask_code, scanner_blur(mask_clean, phantom.scanner))
        iop = np.concatenate([row, col])
    else:
        tilt = 0.0
        scan = render_scan(phantom, matrix)
        pixels = scan["hu"][:, ::-1, :].transpose(1, 0, 2)  # dcm2niix flips rows: undo it
        slice_code = scan["mask"][:, ::-1, :].transpose(1, 0, 2)
        mask_aff, mask_code = scan["affine"], scan["mask"]
        d = scan["spacing"][0]
        ipps = []
        for k in range(n_slices):
            ras = scan["affine"] @ [0, matrix - 1, k, 1]
            ipps.append(np.round([-ras[0], -ras[1], ras[2]], 4))
        iop = np.array([1.0, 0, 0, 0, 1.0, 0])
    return dict(phantom=phantom, pixels=pixels, slice_code=slice_code, ipps=ipps, iop=iop, spacing=d,
                tilt=tilt, mask_affine=mask_aff, mask_code=mask_code)


def tilt_corrected_grid(ipps, row, col, spacing, thickness, matrix):
    """Orthogonal grid of the tilted slice planes, stacked along their normal (L, A, S-like).

    This is the grid dcm2niix writes as ``*_Tilt_*``: the slice planes themselves (rows flipped
    like every dcm2niix axial output), with enough extra rows to hold the de-sheared stack.
    """
    n = len(ipps)
    row, col = np.asarray(row, float), np.asarray(col, float)
    corner = np.asarray(ipps[0], float) + (matrix - 1) * spacing * col
    aff = np.eye(4)
    aff[:3, 0] = RAS_FROM_LPS @ row * spacing
    aff[:3, 1] = -(RAS_FROM_LPS @ col) * spacing
    aff[:3, 2] = RAS_FROM_LPS @ np.cross(row, col) * thickness
    aff[:3, 3] = RAS_FROM_LPS @ corner
    # where the original pixels land on that grid: extend the row axis to hold all of them
    pts = [np.asarray(p, float) + c * spacing * row + r * spacing * col
           for p in (ipps[0], ipps[-1]) for c in (0, matrix - 1) for r in (0, matrix - 1)]
    ijk = np.linalg.solve(aff[:3, :3], (np.array([RAS_FROM_LPS @ p for p in pts]) - aff[:3, 3]).T)
    j_lo, j_hi = int(np.floor(ijk[1].min() + 1e-3)), int(np.ceil(ijk[1].max() - 1e-3))
    aff[:3, 3] += j_lo * aff[:3, 1]
    return aff, (matrix, j_hi - j_lo + 1, n)


def _write_axial(plan: ScanPlan, identity: Identity, series: dict, dicom_dir: Path, seed: int):
    n = series["pixels"].shape[2]
    storage = STORAGES[plan.storage]
    info = SeriesInfo(plan.study_uid, plan.series_uid, opaque_id("frame", seed, plan.index, n_hex=10),
                      series_number=2, identity=identity, description="HEAD 5mm STD")
    rng = np.random.default_rng([plan.seed, 0x1A5])
    instance = rng.permutation(n) + 1 if "shuffled_instance" in plan.quirks else np.arange(1, n + 1)
    pixels = series["pixels"]
    outside = None
    if storage.padding is not None:
        m = pixels.shape[0]
        rr, cc = np.mgrid[0:m, 0:m]
        outside = (rr - (m - 1) / 2) ** 2 + (cc - (m - 1) / 2) ** 2 > (m / 2) ** 2
    sops, paths = [], []
    for k in range(n):
        sop = opaque_id("sop", seed, plan.index, k)
        stored = storage.encode(pixels[:, :, k])
        if outside is not None:
            stored[outside] = storage.padding
        ds = ct_slice_dataset(info, sop, stored, storage, ipp=series["ipps"][k], iop=series["iop"],
                              spacing=series["spacing"], thickness=series["phantom"].slice_thickness,
                              instance=int(instance[k]), tilt=series["tilt"], fov=series["phantom"].scanner.fov_mm)
        path = dicom_dir / f"{sop}.dcm"
        write_dataset(ds, path)
        sops.append(sop)
        paths.append(path)
    if "truncated" in plan.quirks:
        # the most superior slice: dropping it leaves a contiguous, still valid volume
        truncate_in_pixel_data(paths[-1])
    return sops


def _label_rows(sops, slice_code):
    rows = []
    for k, sop in enumerate(sops):
        present = {name: int((slice_code[:, :, k] == i + 1).any()) for i, name in enumerate(SUBTYPES)}
        present["any"] = int((slice_code[:, :, k] > 0).any())
        rows += [(f"{sop}_{name}", present[name]) for name in RSNA_ORDER]
    return rows


# ----------------------------------------------------------------------------- extra series


def scout_projections(phantom: Phantom, spacing=3.0, margin=25.0):
    """Radiograph-like line integrals through the head: lateral (along x) and AP (along y).

    Returns [(image, horizontal_axis_coords, z_coords), ...] with image rows running
    superior -> inferior and columns along the remaining horizontal axis (ascending RAS).
    """
    anat = phantom.anatomy
    c = anat.centre
    r = max(anat.a, anat.b) + margin
    z_lo, z_hi = phantom.slice_z[0] - 60, anat.vertex_world_z() + margin
    xs = np.arange(c[0] - r, c[0] + r, spacing)
    ys = np.arange(c[1] - r, c[1] + r, spacing)
    zs = np.arange(z_hi, z_lo, -spacing)
    gx, gy, gz = np.meshgrid(xs, ys, zs, indexing="ij")
    pts = np.column_stack([gx.ravel(), gy.ravel(), gz.ravel()]).astype(np.float32)
    hu = render_anatomy(anat, pts, voxel_mm=spacing).hu.reshape(gx.shape)
    mu = np.clip(hu + 1000, 0, None) / 1000.0  # relative to water
    out = []
    for axis, other in ((0, ys), (1, xs)):
        path = mu.sum(axis=axis) * spacing  # water-equivalent mm along each ray
        img = 4095 * (1 - np.exp(-path / 120.0))
        out.append((np.rint(img.T).astype(np.uint16), other, zs))
    return out


def _write_localizers(plan, identity, phantom, dicom_dir, seed):
    info = SeriesInfo(plan.study_uid, opaque_id("scout-series", seed, plan.index, n_hex=10),
                      opaque_id("frame", seed, plan.index, n_hex=10), series_number=1, identity=identity,
                      description="TOPOGRAM")
    spacing = 3.0
    views = scout_projections(phantom, spacing)[: plan.n_localizer]
    for j, (img, other, zs) in enumerate(views):
        # columns must run along LPS +y (lateral view) or LPS +x (AP view): descending RAS
        img = img[:, ::-1]
        if j == 0:
            ipp = [-phantom.anatomy.centre[0], -other[-1], zs[0]]
            iop = [0, 1, 0, 0, 0, -1]
        else:
            ipp = [-other[-1], -phantom.anatomy.centre[1], zs[0]]
            iop = [1, 0, 0, 0, 0, -1]
        sop = opaque_id("scout", seed, plan.index, j)
        ds = localizer_dataset(info, sop, img, ipp=ipp, iop=iop, spacing=spacing, instance=j + 1)
        write_dataset(ds, dicom_dir / f"{sop}.dcm")
    return info.series_uid, len(views)


def _dose_report_page(rng, size=256):
    """A screenshot-like page: dark background with rows of bright 'text' blocks."""
    page = np.zeros((size, size), np.uint8)
    for line in range(12, size - 12, 14):
        x = 10
        while x < size - 20 and rng.uniform() < 0.93:
            w = int(rng.integers(4, 18))
            page[line:line + 8, x:x + w] = 220
            x += w + int(rng.integers(3, 8))
    return page


def _write_secondary_capture(plan, identity, dicom_dir, seed):
    info = SeriesInfo(plan.study_uid, opaque_id("sc-series", seed, plan.index, n_hex=10),
                      opaque_id("frame", seed, plan.index, n_hex=10), series_number=999, identity=identity,
                      description="DOSE REPORT")
    sop = opaque_id("sc", seed, plan.index)
    page = _dose_report_page(np.random.default_rng([seed, plan.index, 0x5C]))
    write_dataset(secondary_capture_dataset(info, sop, page), dicom_dir / f"{sop}.dcm")
    return info.series_uid


# ----------------------------------------------------------------------------- the cohort


def generate_cohort(out_dir, n_scans=40, matrix=128, n_slices=28, seed=0, quirks=False, slice_thickness=5.0) -> pd.DataFrame:
    """Write an RSNA-layout DICOM cohort with labels, masks and test truth; return the truth frame.

    ``quirks``: True for all of ``QUIRKS``, or a list / {name: bool} of some. Deterministic:
    the same arguments give byte-identical files.
    """
    out = Path(out_dir)
    dicom_dir = out / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    plans = plan_cohort(n_scans, seed, quirks)
    identities = make_identities(plans, seed)
    with lenient_uids():
        label_rows, truth = _write_series(plans, identities, out, matrix, n_slices, slice_thickness, seed)
    _write_labels_csv(label_rows, out / "labels.csv", seed)
    frame = pd.DataFrame(truth, columns=TRUTH_COLUMNS + ["expected_reason"])
    write_tsv(frame, out / "truth.tsv")
    return frame


def _write_series(plans, identities, out, matrix, n_slices, slice_thickness, seed):
    dicom_dir = out / "dicom"
    label_rows, truth = [], []
    for plan in plans:
        idn = identities[plan.index]
        series = render_axial_series(plan, matrix, n_slices, slice_thickness)
        sops = _write_axial(plan, idn, series, dicom_dir, seed)
        label_rows += _label_rows(sops, series["slice_code"])
        mask = (series["mask_code"] > 0).astype(np.uint8)
        save_nifti(mask, series["mask_affine"], out / "masks" / f"{plan.series_uid}.nii.gz", dtype=np.uint8)
        truth.append(_truth_axial(plan, idn, series, n_slices))
        if plan.n_localizer:
            uid, n_img = _write_localizers(plan, idn, series["phantom"], dicom_dir, seed)
            truth.append(_truth_extra(plan, idn, uid, "localizer", n_img, "localizer (ImageType LOCALIZER)"))
        if plan.secondary_capture:
            uid = _write_secondary_capture(plan, idn, dicom_dir, seed)
            truth.append(_truth_extra(plan, idn, uid, "secondary_capture", 1, "secondary capture"))
    return label_rows, truth


def _write_labels_csv(rows, path, seed):
    df = pd.DataFrame(rows, columns=["ID", "Label"])
    df = df.iloc[np.random.default_rng([seed, 0x1AB]).permutation(len(df))].reset_index(drop=True)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _truth_axial(plan, idn, series, n_slices):
    code = series["slice_code"]
    shown = [s for i, s in enumerate(SUBTYPES) if (code == i + 1).any()]
    truncated = "truncated" in plan.quirks
    quirks = list(plan.quirks)
    return {
        "scan_id": plan.series_uid, "kind": "axial", "quirk": ",".join(quirks), "expected_status": "ok",
        "patient": f"P{plan.patient:04d}", "study": plan.study_uid,
        "n_slices": n_slices - 1 if truncated else n_slices, "n_files": n_slices,
        "subtypes": ",".join(shown), "hemorrhage_ml": round(float((series["mask_code"] > 0).sum()) * _mask_voxel_ml(series), 3),
        "positive_slices": int((code > 0).any(axis=(0, 1)).sum()), "storage": plan.storage,
        "tilt_deg": series["tilt"], "seed": plan.seed, "phi_values": "|".join(idn.phi_values()),
        "expected_reason": "",
    }


def _mask_voxel_ml(series):
    return abs(np.linalg.det(series["mask_affine"][:3, :3])) / 1000.0


def _truth_extra(plan, idn, uid, kind, n_files, reason):
    return {
        "scan_id": uid, "kind": kind, "quirk": kind, "expected_status": "rejected",
        "patient": f"P{plan.patient:04d}", "study": plan.study_uid, "n_slices": n_files, "n_files": n_files,
        "subtypes": "", "hemorrhage_ml": 0.0, "positive_slices": 0, "storage": "", "tilt_deg": 0.0,
        "seed": plan.seed, "phi_values": "|".join(idn.phi_values()), "expected_reason": reason,
    }
