"""Identifying header values, and keeping them out of what hemocam writes.

PACS exports often name folders after the patient or the accession number, so a file's path can
carry the very values its header holds. The header index records where in each path such a
value occurs (``path_spans``, offsets from the end of the path, so they survive a moved root);
whatever shows a path or a file name (``results/scans.tsv``, logs, the report) shows it with
those parts replaced (``shown``).
"""

from __future__ import annotations

import re

import pydicom
import pydicom.datadict

# header values that identify a person or a place
PHI_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames",
    "PatientAddress", "PatientTelephoneNumbers", "AccessionNumber", "InstitutionName",
    "InstitutionAddress", "InstitutionalDepartmentName", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy",
    "RequestingPhysician", "StationName", "DeviceSerialNumber", "StudyID", "PatientMotherBirthName",
    "MilitaryRank", "EthnicGroup", "PatientComments", "MedicalRecordLocator",
)
_PHI_TAGS = tuple(pydicom.datadict.tag_for_keyword(k) for k in PHI_KEYWORDS)
REMOVED = "[removed]"
_DATE8 = re.compile(r"^(\d{4})(\d\d)(\d\d)$")


def identifying_values(ds) -> list[str]:
    """Identifying strings of a header (whole values, name parts, dates as folders spell them;
    at least 3 characters), longest first."""
    out = set()
    for tag in _PHI_TAGS:  # by tag, raw: most are absent, and pydicom's conversion costs more
        if tag not in ds:
            continue
        val = ds.get_item(tag).value
        if val is None:
            continue
        if isinstance(val, bytes):
            try:
                val = val.decode("utf-8")
            except UnicodeDecodeError:
                val = val.decode("latin-1")
            vals = val.strip("\x00 ").split("\\")
        else:
            vals = val if isinstance(val, (list, tuple, pydicom.multival.MultiValue)) else [val]
        for v in vals:
            text = str(v).strip("\x00 ")
            for part in [text, *re.split(r"[\^=\s,]+", text)]:
                if len(part) >= 3:
                    out.add(part)
            m = _DATE8.match(text)
            if m:
                y, mo, d = m.groups()
                out.update({f"{y}-{mo}-{d}", f"{y}_{mo}_{d}", f"{y}.{mo}.{d}", f"{d}.{mo}.{y}"})
    return sorted(out, key=len, reverse=True)


def redact(text: str, values) -> str:
    """``text`` with every value (case-insensitive) replaced by ``[removed]``."""
    low = text.lower() if text.isascii() else None
    for value in values:
        # ASCII text and value: one whose lower case is absent cannot match (skips the regex)
        if low is not None and value.isascii() and value.lower() not in low:
            continue
        text = re.sub(re.escape(value), REMOVED, text, flags=re.I)
        low = text.lower() if text.isascii() else None
    return text


def path_spans(path: str, values) -> str:
    """Where ``values`` occur in ``path`` (case-insensitive): merged ``start:end`` offsets from
    the end of the path, comma separated; "" when none does."""
    low, n = path.lower(), len(path)
    hits = []
    for value in values:
        v = value.lower()
        start = low.find(v)
        while start >= 0:
            hits.append((start, start + len(v)))
            start = low.find(v, start + 1)
    if not hits:
        return ""
    merged = []
    for a, b in sorted(hits):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return ",".join(f"{a - n}:{b - n}" for a, b in merged)


def shown(path: str, spans: str) -> str:
    """``path`` (or any tail of the path the spans were taken on) with the spans replaced."""
    if not spans:
        return path
    n = len(path)
    out, last = [], n
    for part in reversed(spans.split(",")):
        a, b = (max(0, n + int(x)) for x in part.split(":"))
        if b <= 0:
            continue  # wholly in the part of the path cut off (the input root)
        out.append(path[b:last])
        out.append(REMOVED)
        last = a
    out.append(path[:last])
    return "".join(reversed(out))
