"""Synthetic head CT cohorts: the demo data and the ground truth behind every test.

- ``make_scan``            one scan in memory (HU, subtype mask, slice labels, affine)
- ``write_nifti_cohort``   already-ingested files (nifti/, labels/, masks/, scans.tsv)
"""

from .anatomy import INTRACRANIAL, TISSUES
from .cohort import assign_splits, plan_subtypes, write_nifti_cohort
from .scan import Phantom, make_scan, render_grid, sample_phantom, slice_labels_from_mask

__all__ = [
    "INTRACRANIAL", "TISSUES", "Phantom", "assign_splits", "make_scan", "plan_subtypes", "render_grid",
    "sample_phantom", "slice_labels_from_mask", "write_nifti_cohort",
]
