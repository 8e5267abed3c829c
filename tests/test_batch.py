"""run_batch: upstream rejections pass through, one failing scan does not stop the batch."""

import pandas as pd

from hemocam.batch import run_batch
from hemocam.io import InputError, read_tsv, write_tsv


def _manifest(path, rows):
    write_tsv(pd.DataFrame(rows, columns=["scan_id", "status", "reason"]), path)
    return path


def test_a_scan_runs_only_when_ok_in_every_upstream_manifest(tmp_path):
    # pseudo-masks read two stages (CAMs and slice probabilities), batched differently
    cams = _manifest(tmp_path / "cam.tsv", [("a", "ok", ""), ("b", "ok", ""), ("c", "ok", "")])
    # the CAM manifest lists b first as ok: the later rejection must still win
    slices = _manifest(tmp_path / "classifier.tsv", [("a", "ok", ""), ("b", "rejected", "classify: no cache"),
                                                     ("c", "ok", "")])
    called = []
    out = run_batch("pseudomask", ["a", "b", "c"], lambda sid: called.append(sid), tmp_path / "out.tsv",
                    upstream=[cams, slices])
    assert called == ["a", "c"]
    got = read_tsv(tmp_path / "out.tsv", dtype={"scan_id": str}).set_index("scan_id")
    assert got.loc["a", "status"] == "ok"
    assert got.loc["b", "reason"] == "classify: no cache"  # the stage that rejected it, whichever comes first
    assert got.loc["c", "status"] == "ok"
    assert list(out["scan_id"]) == ["a", "b", "c"]


def test_a_failing_scan_is_recorded_and_the_rest_go_on(tmp_path):
    def fn(sid):
        if sid == "bad":
            raise InputError("bad.nii.gz: not a NIfTI")
        if sid == "boom":
            raise ValueError("shape mismatch")
        return {"slices": 3}

    out = run_batch("preprocess", ["x", "bad", "boom", "y"], fn, tmp_path / "m.tsv").set_index("scan_id")
    assert list(out["status"]) == ["ok", "rejected", "rejected", "ok"]
    assert out.loc["bad", "reason"] == "preprocess: bad.nii.gz: not a NIfTI"
    assert out.loc["boom", "reason"] == "preprocess: ValueError: shape mismatch"
    assert out.loc["y", "slices"] == 3
