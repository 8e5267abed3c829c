"""Logging for workflow jobs: everything a job prints goes to its Snakemake log file."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def start(log_path, threads: int = 1) -> logging.Logger:
    """Send logging, stdout and stderr (progress bars, warnings) to ``log_path``; cap threads."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    stream = open(log_path, "w", buffering=1)
    sys.stdout = sys.stderr = stream
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=stream,
        force=True,
    )
    threads = max(1, int(threads))
    # numeric libraries otherwise grab every core of a shared node
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return logging.getLogger("hemocam")
