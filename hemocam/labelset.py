"""The RSNA label set: ``any`` plus the five hemorrhage subtypes, in the column order used everywhere."""

SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
LABELS = ("any",) + SUBTYPES
