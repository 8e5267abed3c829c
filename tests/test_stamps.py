"""Per-scan stamps: a rerun batch keeps the scans that did not change (hemocam.stamps).

Unit tests on hemocam.batch.run_batch, then the real snakemake on a cohort grown by one exam:
the earlier exams are neither converted nor preprocessed again, and every output equals a
fresh run's on the grown cohort.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from badinput import checksums, rsna_cohort, rsna_config, series_files, snakemake
from hemocam.batch import run_batch
from hemocam.io import InputError
from hemocam.stamps import Stamps, digest, file_sig


def _stage(tmp_path, calls):
    """A stage copying in/{sid} to out/{sid}, stamped on the input's size and mtime."""
    src, out = tmp_path / "in", tmp_path / "out"
    out.mkdir(exist_ok=True)

    def fn(sid):
        calls.append(sid)
        text = (src / sid).read_text()
        if text == "bad":
            raise InputError(f"{sid}: bad")
        if text == "crash":
            raise RuntimeError("unexpected")
        (out / sid).write_text(text.upper())
        return {"n": len(text)}

    def stamps():
        return Stamps(tmp_path / "stamps", lambda sid: digest(file_sig(src / sid)), lambda sid: [out / sid])

    return src, out, fn, stamps


def test_a_rerun_keeps_what_did_not_change(tmp_path):
    calls = []
    src, out, fn, stamps = _stage(tmp_path, calls)
    src.mkdir()
    for sid, text in {"a": "one", "b": "two", "c": "bad", "d": "crash"}.items():
        (src / sid).write_text(text)
    first = run_batch("stage", list("abcd"), fn, tmp_path / "m1.tsv", stamps=stamps())
    assert calls == list("abcd") and list(first["status"]) == ["ok", "ok", "rejected", "rejected"]
    assert sorted(p.name for p in (tmp_path / "stamps").iterdir()) == ["a.json", "b.json"]

    calls.clear()
    second = run_batch("stage", list("abcd"), fn, tmp_path / "m2.tsv", stamps=stamps())
    assert calls == ["c", "d"]  # rejections are tried again
    pd.testing.assert_frame_equal(first, second)
    assert (tmp_path / "m1.tsv").read_bytes() == (tmp_path / "m2.tsv").read_bytes()

    # a changed input, a removed output, an output changed by hand: each is done again
    (src / "a").write_text("three")
    (out / "b").unlink()
    calls.clear()
    run_batch("stage", ["a", "b"], fn, tmp_path / "m3.tsv", stamps=stamps())
    assert calls == ["a", "b"] and (out / "a").read_text() == "THREE"
    (out / "a").write_text("edited")
    calls.clear()
    run_batch("stage", ["a", "b"], fn, tmp_path / "m4.tsv", stamps=stamps())
    assert calls == ["a"] and (out / "a").read_text() == "THREE"

    # a scan rejected now loses its stamp (fixing nothing else, it is tried on every rerun) and
    # the output an earlier run wrote for it, here or when an upstream stage rejects it
    (src / "b").write_text("bad")
    run_batch("stage", ["b"], fn, tmp_path / "m5.tsv", stamps=stamps())
    assert not (tmp_path / "stamps" / "b.json").exists() and not (out / "b").exists()
    assert (out / "a").exists() and (tmp_path / "stamps" / "a.json").exists()
    pd.DataFrame({"scan_id": ["a"], "status": ["rejected"], "reason": ["upstream: bad"]}).to_csv(
        tmp_path / "up.tsv", sep="\t", index=False)
    calls.clear()
    df = run_batch("stage", ["a"], fn, tmp_path / "m6.tsv", upstream=[tmp_path / "up.tsv"], stamps=stamps())
    assert calls == [] and list(df["status"]) == ["rejected"]
    assert not (out / "a").exists() and not (tmp_path / "stamps" / "a.json").exists()


def test_a_stamp_names_its_key_and_outputs(tmp_path):
    calls = []
    src, out, fn, stamps = _stage(tmp_path, calls)
    src.mkdir()
    (src / "a").write_text("one")
    run_batch("stage", ["a"], fn, tmp_path / "m.tsv", stamps=stamps())
    other = Stamps(tmp_path / "stamps", lambda sid: "another key", lambda sid: [out / sid])
    assert other.kept("a") is None  # other settings or code: done again
    # an output the stamp does not list must be absent, as the stage would have left it
    extra = Stamps(tmp_path / "stamps", lambda sid: digest(file_sig(src / sid)),
                   lambda sid: [out / sid, out / f"{sid}.extra"])
    assert extra.kept("a") is not None
    (out / "a.extra").write_text("stale")
    assert Stamps(tmp_path / "stamps", lambda sid: digest(file_sig(src / sid)),
                  lambda sid: [out / sid, out / f"{sid}.extra"]).kept("a") is None


@pytest.mark.workflow
def test_a_grown_cohort_converts_only_its_new_exam(tmp_path):
    full = tmp_path / "full"
    rsna_cohort(full, n_scans=5)
    series = series_files(full / "dicom")
    new_uid = sorted(series)[2]  # in the middle: every batch of the sorted scans is re-cut
    grown = tmp_path / "grown"
    shutil.copytree(full, grown, ignore=shutil.ignore_patterns(*[p.name for p in series[new_uid]]))
    run = tmp_path / "run"
    snakemake(run, rsna_config(grown), "preprocess", "results/scans.tsv")
    r = run / "results"
    splits = pd.read_csv(r / "scans.tsv", sep="\t", dtype=str).set_index("scan_id")["split"]
    before = {p: p.stat().st_mtime_ns for sub in ("nifti", "labels", "brainmask", "cache") for p in (r / sub).iterdir()}
    assert len(list((r / "nifti").iterdir())) == 4

    for p in series[new_uid]:
        shutil.copy2(p, grown / "dicom" / p.name)
    started = time.time_ns()
    proc = snakemake(run, rsna_config(grown), "preprocess", "results/scans.tsv")
    grown_splits = pd.read_csv(r / "scans.tsv", sep="\t", dtype=str).set_index("scan_id")["split"]
    assert len(grown_splits) == 5 and grown_splits[splits.index].equals(splits)  # the earlier exams keep theirs
    for stage in ("ingest", "preprocess"):
        # the batches that reran (the batch gaining the exam, and those re-cut) did one scan
        logs = [p.read_text() for p in (run / "logs" / stage).glob("*.log") if p.stat().st_mtime_ns > started]
        kept = sum(int(n) for log in logs for n in re.findall(rf"{stage}: (\d+) of \d+ scan\(s\) kept", log))
        done = sum(len(re.findall(rf"{stage}: scan \d+/\d+ ", log)) for log in logs)
        rows = sum(len(pd.read_csv(p, sep="\t")) for p in (r / stage / "batches").glob("*.tsv")
                   if p.stat().st_mtime_ns > started)
        assert logs and done == 1 and kept == rows - 1, logs
    assert {p: p.stat().st_mtime_ns for p in before} == before, "an earlier exam was written again"
    assert len(list((r / "nifti").iterdir())) == 5, proc.out[-3000:]

    fresh = tmp_path / "fresh"
    snakemake(fresh, rsna_config(grown), "preprocess")  # a fresh project on the grown cohort
    patterns = ("nifti/*", "labels/*", "masks/*", "brainmask/*", "cache/*")
    assert checksums(r, patterns) == checksums(fresh / "results", patterns)
    for stage in ("ingest", "preprocess"):
        kept = pd.concat(pd.read_csv(p, sep="\t", dtype=str) for p in sorted((r / stage / "batches").glob("*.tsv")))
        new = pd.concat(pd.read_csv(p, sep="\t", dtype=str)
                        for p in sorted((fresh / "results" / stage / "batches").glob("*.tsv")))
        key = kept.columns[0]
        pd.testing.assert_frame_equal(kept.sort_values(key).reset_index(drop=True),
                                      new.sort_values(key).reset_index(drop=True))
    assert Path(r / "ingest" / "stamps").is_dir() and len(list((r / "ingest" / "stamps").iterdir())) == 5
