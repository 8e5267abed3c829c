"""Ingestion: DICOM or NIfTI cohorts -> HU NIfTI, slice labels and masks on one grid.

- ``plan_cohort(cfg, cache_dir)``          candidate scans, header-level rejections, splits
- ``write_batch_plans(plan, batches, dir)`` one TSV per ingest job (rewritten only on change)
- ``ingest_batch(plan_tsv, cfg, R, manifest, threads)``  convert a batch, write its manifest
- ``write_scans_table(plan, manifests, out)``  R/scans.tsv: every candidate scan accounted for
- ``write_split_record(cache_dir, cfg, table)``  its splits, kept when the cohort grows

Modules: ``index`` (DICOM header index + cache), ``series`` (series classification, scan ids),
``convert`` (dcm2niix), ``hu`` (HU sanity, 12-bit wrap), ``labels``, ``masks``, ``nifti``.
"""

from hemocam.ingest.ingest import ingest_batch, ingest_scan
from hemocam.ingest.plan import Plan, plan_cohort, write_batch_plans, write_scans_table, write_split_record

__all__ = ["Plan", "ingest_batch", "ingest_scan", "plan_cohort", "write_batch_plans", "write_scans_table",
           "write_split_record"]
