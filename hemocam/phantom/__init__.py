"""Synthetic head CT cohorts: the demo data and the ground truth behind every test.

- ``make_scan``            one scan in memory (HU, subtype mask, slice labels, affine)
- ``write_nifti_cohort``   already-ingested files (nifti/, labels/, masks/, scans.tsv)
- ``generate_cohort``      RSNA-layout DICOM (flat ID_*.dcm, labels.csv, masks/, truth.tsv) with quirks
- ``generate_physionet_cohort``  PhysioNet CT-ICH layout (ct_scans/NNN.nii, masks/, metadata csv)
"""

from .anatomy import INTRACRANIAL, TISSUES
from .cohort import assign_splits, plan_subtypes, write_nifti_cohort
from .physionet import generate_physionet_cohort
from .rsna import QUIRKS, generate_cohort
from .scan import Phantom, make_scan, render_grid, sample_phantom, slice_labels_from_mask

__all__ = [
    "INTRACRANIAL", "QUIRKS", "TISSUES", "generate_cohort", "generate_physionet_cohort", "Phantom", "assign_splits", "make_scan", "plan_subtypes", "render_grid",
    "sample_phantom", "slice_labels_from_mask", "write_nifti_cohort",
]
