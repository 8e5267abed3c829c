"""What a run was made with: seed, config and the versions of every component."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

from hemocam.io import write_json

PACKAGES = (
    "hemocam", "torch", "torchvision", "snakemake", "snakemake-executor-plugin-slurm",
    "pydicom", "nibabel", "numpy", "pandas", "scipy", "scikit-image", "dcm2niix",
)


def dcm2niix_binary() -> str:
    """The dcm2niix executable shipped by the PyPI package (next to the interpreter), else PATH."""
    import shutil
    import sys

    local = Path(sys.executable).with_name("dcm2niix")
    if local.exists():
        return str(local)
    found = shutil.which("dcm2niix")
    if not found:
        raise FileNotFoundError("dcm2niix not found: install the 'dcm2niix' PyPI package")
    return found


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        text = subprocess.run([dcm2niix_binary(), "-v"], capture_output=True, text=True, timeout=30).stdout
        out["dcm2niix_binary"] = next((line.strip() for line in text.splitlines() if "v1." in line), text.strip()[:80])
    except Exception as exc:  # provenance must not fail a run
        out["dcm2niix_binary"] = f"unavailable: {exc}"
    try:
        import torch

        out["cuda"] = torch.version.cuda
        out["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        pass
    return out


# what a bundle says of itself, for the record (everything but the weights)
BUNDLE_FIELDS = ("kind", "arch", "model", "target", "size", "windows", "labels", "context", "threshold", "seed",
                 "epoch", "best_epoch", "members", "config", "versions")


def bundle_record(path) -> dict:
    """Path, SHA-256 and self-description of a trained bundle given to this run."""
    import hashlib

    import torch

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    bundle = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {"path": str(path), "sha256": h.hexdigest(), **{k: bundle[k] for k in BUNDLE_FIELDS if k in bundle}}


def write_provenance(config: dict, out, models: dict | None = None):
    """The run's seed, versions and config; ``models``: role -> bundle given to it (inference on
    a new cohort), recorded with its hash and its own settings, which the config does not hold."""
    record = {"seed": config.get("seed"), "versions": versions(), "config": config}
    if models:
        record["models"] = {role: bundle_record(path) for role, path in models.items()}
    write_json(record, out)
