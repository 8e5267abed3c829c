"""Shared test helpers: run the real snakemake on generated cohorts in temporary workdirs."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
CPU_SMALL = REPO / "config" / "presets" / "cpu-small.yaml"
TINY = REPO / "tests" / "config" / "tiny.yaml"
REALCT = (REPO / ".." / "shared" / "data" / "realct").resolve()


def run_snakemake(workdir, *args, configfiles=(CPU_SMALL, TINY), config=(), cores=2, check=True, timeout=3600):
    """Run snakemake from the repository's Snakefile in ``workdir``; return the CompletedProcess."""
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", str(cores)]
    if configfiles:
        cmd += ["--configfile", *map(str, configfiles)]
    if config:
        cmd += ["--config", *config]
    cmd += list(args)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-5000:]}\n{proc.stderr[-15000:]}")
    return proc


def dry_run_jobs(output: str) -> dict:
    """Rule -> job count from a dry run's job table."""
    table = output.split("Job stats:", 1)[-1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}


def file_texts(root):
    """(path, bytes) for every file under root, gzip members decompressed as well."""
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            yield path, data
            if path.suffix == ".gz":
                try:
                    yield path, gzip.decompress(data)
                except OSError:
                    pass


def assert_no_markers(roots, markers):
    """No marker in any file's bytes or in any file name under the given folders."""
    markers = [m for m in markers if m]
    found = []
    for root in roots:
        if not Path(root).exists():
            continue
        for path, data in file_texts(root):
            for m in markers:
                if m in str(path.relative_to(root)) or m.encode() in data:
                    found.append((str(path), m))
    assert not found, f"identifying values leaked: {found[:20]}"


def requires_realct():
    return pytest.mark.skipif(not REALCT.exists(), reason=f"real CT test data not found at {REALCT}")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One full run of the workflow on the tiny demo cohort (quirks on), shared by every test."""
    workdir = tmp_path_factory.mktemp("demo")
    run_snakemake(workdir)
    return workdir
