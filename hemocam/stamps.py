"""Per-scan stamps: the scans a rerun batch job may keep as they are.

A batch job reruns when its batch plan changes, and a cohort grown by one scan re-cuts every
batch (scans are cut in sorted order), so without stamps one new exam would convert and
preprocess the whole cohort again. A stamp records per scan a key (the sizes and modification
times of its inputs, the stage's settings, and the source of the code and the library versions
that made its outputs) with the manifest row and the outputs it wrote (size and modification
time). A rerun whose key and outputs match keeps the scan; any difference does it again.
Accepted scans only: a rejected scan is tried again, and one whose stage failed unexpectedly is
never kept as rejected.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Callable

from hemocam.io import write_json

STAMP_VERSION = 1


def file_sig(path) -> list | None:
    """[size, mtime_ns] of a file, or None when it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


@cache
def source_digest(*modules: str) -> str:
    """SHA-256 of the source of modules and packages (every ``.py`` below a package)."""
    import importlib

    h = hashlib.sha256()
    for name in modules:
        mod = importlib.import_module(name)
        path = Path(mod.__file__)
        files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
        for f in files:
            h.update(f"{name}:{f.name}".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@cache
def library_versions(*dists: str) -> tuple:
    out = []
    for d in dists:
        try:
            out.append((d, metadata.version(d)))
        except metadata.PackageNotFoundError:
            out.append((d, None))
    return tuple(out)


def _name(path) -> str:
    """An output's name in a stamp: its folder and file (``nifti/x.nii.gz``, ``masks/x.nii.gz``)."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}"


def digest(parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Stamps:
    """``folder/{scan_id}.json`` per accepted scan of a stage.

    ``key_of(scan_id)``: the scan's key, taken once before its work; ``outputs_of(scan_id)``:
    every file the stage may write for it (those it did not write must still be absent).
    """

    def __init__(self, folder, key_of: Callable[[str], str], outputs_of: Callable[[str], list]):
        self.folder, self.key_of, self.outputs_of = Path(folder), key_of, outputs_of
        self._keys: dict[str, str] = {}
        self._kept: dict[str, dict | None] = {}

    def _path(self, scan_id) -> Path:
        return self.folder / f"{scan_id}.json"

    def key(self, scan_id) -> str:
        if scan_id not in self._keys:
            self._keys[scan_id] = self.key_of(scan_id)
        return self._keys[scan_id]

    def kept(self, scan_id) -> dict | None:
        """The scan's manifest row when its stamp still holds, else None."""
        if scan_id not in self._kept:
            self._kept[scan_id] = self._check(scan_id)
        return self._kept[scan_id]

    def _check(self, scan_id) -> dict | None:
        try:
            stamp = json.loads(self._path(scan_id).read_text())
        except (OSError, ValueError):
            return None
        if stamp.get("version") != STAMP_VERSION or stamp.get("key") != self.key(scan_id):
            return None
        wrote = stamp.get("outputs") or {}
        for path in map(str, self.outputs_of(scan_id)):
            if file_sig(path) != wrote.get(_name(path)):
                return None
        row = dict(stamp.get("row") or [])
        return row if row.get("scan_id") == scan_id and row.get("status") == "ok" else None

    def drop(self, scan_id):
        """A scan not accepted now: remove its stamp and whatever an earlier run wrote for it,
        which a user opening the stage's folder would take for this run's."""
        self._path(scan_id).unlink(missing_ok=True)
        for path in self.outputs_of(scan_id):
            Path(path).unlink(missing_ok=True)

    def record(self, row: dict):
        """Stamp an accepted scan's row with the outputs now on disk."""
        scan_id = row["scan_id"]
        path = self._path(scan_id)
        if row.get("status") != "ok":
            self.drop(scan_id)
            return
        row = {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}  # numpy scalars
        outputs = {_name(p): file_sig(p) for p in self.outputs_of(scan_id)}
        self.folder.mkdir(parents=True, exist_ok=True)
        # the row as pairs: its column order is the manifest's
        write_json({"version": STAMP_VERSION, "key": self.key(scan_id), "row": list(row.items()),
                    "outputs": {k: v for k, v in outputs.items() if v is not None}}, path)


def stamps_folder(manifest_out) -> Path:
    """A stage's stamps: ``stamps/`` beside its ``batches/`` folder of manifests (the workflow's
    layout), else beside the manifest."""
    folder = Path(manifest_out).parent
    return (folder.parent if folder.name == "batches" else folder) / "stamps"


def file_stamps(folder, inputs_of: Callable[[str], list], outputs_of: Callable[[str], list], settings: dict,
                modules: tuple = ("hemocam",), libraries: tuple = ()) -> Stamps:
    """Stamps keyed on the scan's input files (size and mtime), the stage's settings, the source
    of ``modules`` (the whole package by default) and the ``libraries``' versions."""
    fixed = {"settings": settings, "code": source_digest(*modules), "libraries": library_versions(*libraries)}

    def key_of(scan_id):
        return digest({**fixed, "inputs": [(_name(p), file_sig(p)) for p in inputs_of(scan_id)]})

    return Stamps(folder, key_of, outputs_of)


# what the model stages' outputs depend on besides hemocam itself
MODEL_LIBRARIES = ("nibabel", "numpy", "scikit-image", "scipy", "torch", "torchvision")

