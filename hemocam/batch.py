"""Per-scan work done in batches: one job handles many scans and writes one manifest.

A manifest is a TSV with ``scan_id``, ``status`` (``ok`` or ``rejected``), ``reason`` and any
columns the stage adds. A scan rejected upstream stays rejected downstream with the upstream
reason; a scan that fails in this stage is rejected with the stage name and the error, and the
other scans of the batch go on.
"""

from __future__ import annotations

import logging
import traceback
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable

import pandas as pd

from hemocam.io import InputError, read_tsv, write_tsv
from hemocam.stamps import Stamps

log = logging.getLogger("hemocam")


def read_manifests(paths: Iterable) -> pd.DataFrame:
    frames = [read_tsv(p, dtype={"scan_id": str}) for p in paths]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=["scan_id", "status", "reason"])
    return pd.concat(frames, ignore_index=True)


def ok_scans(paths: Iterable) -> list[str]:
    df = read_manifests(paths)
    return sorted(df.loc[df["status"] == "ok", "scan_id"].astype(str))


def one_line(text) -> str:
    """A reason on one line: library messages (nibabel's, say) carry newlines and tabs, which
    would split a manifest or scans.tsv row for line-based readers (grep, cut, awk)."""
    return " ".join(str(text).split())


def _run_one(stage, fn, scan_id):
    try:
        extra = fn(scan_id) or {}
        return {"scan_id": scan_id, "status": "ok", "reason": "", **extra}
    except InputError as exc:
        return {"scan_id": scan_id, "status": "rejected", "reason": one_line(f"{stage}: {exc}")}
    except Exception as exc:  # one broken scan must not stop the batch
        log.error("%s failed for %s:\n%s", stage, scan_id, traceback.format_exc())
        return {"scan_id": scan_id, "status": "rejected", "reason": one_line(f"{stage}: {type(exc).__name__}: {exc}")}


def run_batch(
    stage: str,
    scan_ids: list[str],
    fn: Callable[[str], dict | None],
    manifest_out,
    upstream: Iterable = (),
    processes: int = 1,
    stamps: Stamps | None = None,
) -> pd.DataFrame:
    """Apply ``fn(scan_id)`` to every scan of the batch and write the manifest.

    ``upstream`` are manifests of the previous stages: scans not ``ok`` there are passed through
    as rejected without calling ``fn``. With ``processes > 1`` scans run in a process pool
    (``fn`` must then be picklable, e.g. a ``functools.partial`` of a module-level function).
    ``stamps`` (:class:`hemocam.stamps.Stamps`): scans whose stamp holds keep their outputs and
    row without calling ``fn``; the scans done are stamped; a scan rejected, here or upstream,
    loses the outputs an earlier run wrote for it.
    """
    up = read_manifests(upstream) if upstream else None
    rows, todo = [], []
    for sid in scan_ids:
        if up is not None:
            hit = up[up["scan_id"].astype(str) == sid]
            if hit.empty:
                rows.append({"scan_id": sid, "status": "rejected", "reason": f"{stage}: missing from upstream manifest"})
                continue
            bad = hit[hit["status"] != "ok"]  # several upstream stages: ok only if ok in every one
            if len(bad):
                rows.append({"scan_id": sid, "status": bad.iloc[0]["status"], "reason": bad.iloc[0]["reason"]})
                continue
        todo.append(sid)
    if stamps is not None:
        kept = [row for row in map(stamps.kept, todo) if row is not None]
        if kept:
            log.info("%s: %d of %d scan(s) kept: unchanged since they were done", stage, len(kept), len(todo))
            rows.extend(kept)
            done_ids = {row["scan_id"] for row in kept}
            todo = [sid for sid in todo if sid not in done_ids]
        for sid in todo:
            stamps.key(sid)  # the inputs as they are before the work
    if processes > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=min(processes, len(todo))) as pool:
            done = list(pool.map(_run_one, [stage] * len(todo), [fn] * len(todo), todo))
    else:
        done = []
        for i, sid in enumerate(todo, 1):
            log.info("%s: scan %d/%d %s", stage, i, len(todo), sid)
            done.append(_run_one(stage, fn, sid))
    if stamps is not None:
        for row in done:
            stamps.record(row)
        for row in rows:  # rejected upstream (kept rows are ok)
            if row["status"] != "ok":
                stamps.drop(row["scan_id"])
    rows.extend(done)
    order = {sid: i for i, sid in enumerate(scan_ids)}
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=["scan_id", "status", "reason"])
    df = df.sort_values("scan_id", key=lambda s: s.map(order)).reset_index(drop=True)
    for sid, reason in df.loc[df["status"] != "ok", ["scan_id", "reason"]].itertuples(index=False):
        log.warning("%s: %s rejected: %s", stage, sid, reason)
    write_tsv(df, manifest_out)
    return df
