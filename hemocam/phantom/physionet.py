"""The demo cohort in the PhysioNet CT-ICH layout (Hssayeni et al., computed tomography images for
intracranial hemorrhage detection and segmentation).

out_dir/ct_scans/NNN.nii   HU (int16), 3-digit zero-padded patient numbers
out_dir/masks/NNN.nii      binary hemorrhage mask on the same grid
out_dir/hemorrhage_diagnosis_raw_metadata.csv
    PatientNumber, SliceNumber (1-based along the 3rd NIfTI axis), Intraventricular,
    Intraparenchymal, Subarachnoid, Epidural, Subdural, No_Hemorrhage, Fracture_Yes_No
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..io import atomic_path, save_nifti
from .cohort import plan_subtypes, scan_seed
from .scan import make_scan

FIRST_PATIENT = 49  # the public dataset's numbering starts at 049
METADATA_COLUMNS = ["PatientNumber", "SliceNumber", "Intraventricular", "Intraparenchymal", "Subarachnoid",
                    "Epidural", "Subdural", "No_Hemorrhage", "Fracture_Yes_No"]


def generate_physionet_cohort(out_dir, n_scans, matrix=64, n_slices=24, seed=0) -> pd.DataFrame:
    """Write the PhysioNet CT-ICH layout; returns the metadata frame (one row per slice)."""
    out = Path(out_dir)
    rows = []
    for i, subtypes in enumerate(plan_subtypes(n_scans, seed)):
        scan = make_scan(scan_seed(seed, 50_000 + i), matrix=matrix, n_slices=n_slices, subtypes=subtypes,
                         hemorrhage=bool(subtypes), strict=False)
        number = FIRST_PATIENT + i
        name = f"{number:03d}.nii"
        save_nifti(scan["hu"], scan["affine"], out / "ct_scans" / name, dtype=np.int16)
        save_nifti((scan["mask"] > 0).astype(np.uint8), scan["affine"], out / "masks" / name, dtype=np.uint8)
        labels = scan["slice_labels"]
        for _, lab in labels.iterrows():
            rows.append({
                "PatientNumber": number, "SliceNumber": int(lab["slice"]) + 1,
                "Intraventricular": int(lab["intraventricular"]), "Intraparenchymal": int(lab["intraparenchymal"]),
                "Subarachnoid": int(lab["subarachnoid"]), "Epidural": int(lab["epidural"]),
                "Subdural": int(lab["subdural"]), "No_Hemorrhage": int(1 - lab["any"]),
                # skull fractures are not modelled; epidural bleeds usually come with one
                "Fracture_Yes_No": int(lab["epidural"]),
            })
    meta = pd.DataFrame(rows, columns=METADATA_COLUMNS)
    with atomic_path(out / "hemorrhage_diagnosis_raw_metadata.csv") as tmp:
        meta.to_csv(tmp, index=False)
    return meta
