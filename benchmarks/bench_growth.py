"""A cohort grown by one exam: `snakemake preprocess` with the per-scan stamps against without.

What is compared (same machine, same run, same files):

- the cohort: the generated RSNA-layout cohort (hemocam.phantom.generate_cohort, quirks off)
  without one exam, ingested and preprocessed by ``snakemake preprocess`` (CPU preset); then
  the exam is copied in (modification times kept), which re-cuts every batch;
- stamps: ``snakemake preprocess`` on that project: the rerun batches keep their earlier scans
  (hemocam.stamps) and convert and preprocess only the new exam;
- baseline: the same on a copy of the project (``cp -a``) whose ``stamps/`` folders were
  removed: what every batch cost before the stamps, every scan done again;
- per scan, without Snakemake's fixed costs: every scan of the grown project ingested and
  preprocessed again in one process as one batch, kept (stamps) against done (stamps removed).

Both reruns' outputs are checked to be the same files.

    python benchmarks/bench_growth.py --scans 40 --matrix 128      -> benchmarks/out/growth.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

ROOT = bl.ROOT
TARGET = 0.05  # CPU time of a kept scan / of a scan converted and preprocessed again


def series_files(dicom_dir: Path) -> dict[str, list[Path]]:
    import warnings

    import pydicom

    out: dict[str, list[Path]] = {}
    with warnings.catch_warnings():  # the phantom's RSNA-style UIDs ("ID_...") are not valid UIs
        warnings.simplefilter("ignore")
        for p in sorted(dicom_dir.rglob("*.dcm")):
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            out.setdefault(str(ds.SeriesInstanceUID), []).append(p)
    return out


def in_process(workdir: Path, cfg_path: Path) -> dict:
    """Ingest and preprocess the whole cohort again as one batch, in this process: the cost per
    scan without the fixed costs (interpreter, workflow parse, job starts)."""
    import yaml
    from snakemake.utils import update_config

    import hemocam.ingest as hi
    from hemocam.preprocess import preprocess_batch

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    for p in (ROOT / "config" / "presets" / "cpu-small.yaml", cfg_path):
        update_config(cfg, yaml.safe_load(Path(p).read_text()))
    os.chdir(workdir)
    plan = hi.plan_cohort(cfg, Path("results/ingest"))
    ids = sorted(plan.scans.loc[plan.scans["status"] == "ok", "scan_id"])
    hi.write_batch_plans(plan, {"c9999": ids}, Path("results/ingest/plan"))
    out = {"scans": len(ids)}
    t, c = time.perf_counter(), bl.cpu_now()
    hi.ingest_batch(Path("results/ingest/plan/c9999.tsv"), cfg, Path("results"), Path("results/ingest/batches/c9999.tsv"),
                    threads=1)
    out["ingest"] = {"wall_s": round(time.perf_counter() - t, 3), "cpu_s": round(bl.cpu_now() - c, 3)}
    t, c = time.perf_counter(), bl.cpu_now()
    preprocess_batch(ids, Path("results"), cfg["preprocess"]["windows"], cfg["preprocess"]["size"],
                     Path("results/preprocess/batches/c9999.tsv"))
    out["preprocess"] = {"wall_s": round(time.perf_counter() - t, 3), "cpu_s": round(bl.cpu_now() - c, 3)}
    return out


def digests(results: Path) -> dict:
    return {str(p.relative_to(results)): hashlib.sha256(p.read_bytes()).hexdigest()
            for sub in ("nifti", "labels", "brainmask", "cache") for p in sorted((results / sub).glob("*"))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=40)
    ap.add_argument("--matrix", type=int, default=128)
    ap.add_argument("--slices", type=int, default=28)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="snakemake --cores")
    ap.add_argument("--name", default="growth")
    ap.add_argument("--out", default=None)
    ap.add_argument("--_in-process", nargs=2, metavar=("WORKDIR", "CFG"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._in_process:
        print(json.dumps(in_process(Path(a._in_process[0]), Path(a._in_process[1]))))
        return
    src = bl.generated_cohort(a.scans, a.matrix, a.slices, seed=11, quirks=False)
    work = Path(tempfile.mkdtemp(prefix="hemocam-bench-growth-"))
    try:
        cohort = work / "cohort"
        series = series_files(src / "dicom")
        new = sorted(series)[len(series) // 2]
        held_back = {p.name for p in series[new]}
        shutil.copytree(src, cohort, ignore=lambda d, names: [n for n in names if n in held_back])
        cfg = work / "growth.yaml"
        cfg.write_text(f"input:\n  format: rsna\n  path: {cohort / 'dicom'}\n  labels: {cohort / 'labels.csv'}\n"
                       "  masks: ''\n  scan_id: uid\n  scan_id_key: ''\n")
        preset = ROOT / "config" / "presets" / "cpu-small.yaml"

        def snakemake(wd):
            return [bl.venv_bin("snakemake"), "-s", ROOT / "Snakefile", "-d", wd, "--cores", a.cores,
                    "--configfile", preset, cfg, "--", "preprocess"]

        first = bl.strip(bl.check(bl.measure(snakemake(work / "wf")), f"snakemake preprocess ({a.scans - 1} scans)"))
        shutil.copytree(work / "wf", work / "wf_base", symlinks=True)  # sizes and mtimes kept
        for stage in ("ingest", "preprocess"):
            shutil.rmtree(work / "wf_base" / "results" / stage / "stamps")
        for p in series[new]:
            shutil.copy2(p, cohort / "dicom" / p.relative_to(src / "dicom"))
        stamped = bl.strip(bl.check(bl.measure(snakemake(work / "wf")), "rerun with stamps"))
        base = bl.strip(bl.check(bl.measure(snakemake(work / "wf_base")), "rerun without stamps"))
        same = digests(work / "wf" / "results") == digests(work / "wf_base" / "results")
        r_wall, r_cpu = bl.ratio(stamped["wall_s"], base["wall_s"]), bl.ratio(stamped["cpu_s"], base["cpu_s"])
        # per scan: every scan of the project kept, against every scan done (stamps removed)
        for stage in ("ingest", "preprocess"):
            shutil.rmtree(work / "wf_base" / "results" / stage / "stamps")
        per = {}
        for side, wd in (("kept", work / "wf"), ("done", work / "wf_base")):
            r = bl.check(bl.measure([sys.executable, __file__, "--_in-process", wd, cfg]), f"in-process ({side})")
            per[side] = json.loads(r["stdout"].strip().splitlines()[-1])
        kept_cpu = per["kept"]["ingest"]["cpu_s"] + per["kept"]["preprocess"]["cpu_s"]
        done_cpu = per["done"]["ingest"]["cpu_s"] + per["done"]["preprocess"]["cpu_s"]
        r_scan = bl.ratio(kept_cpu, done_cpu)
        figures = [
            bl.figure(f"per scan, in one process: a kept scan / a scan done again (ingest + preprocess, CPU, "
                      f"{per['kept']['scans']} scans)", r_scan, "x", f"<= {TARGET}", r_scan is not None and r_scan <= TARGET,
                      baseline=f"{round(done_cpu / per['done']['scans'], 3)} s per scan",
                      note=f"kept {round(kept_cpu / per['kept']['scans'], 4)} s per scan"),
            bl.figure(f"one exam added to {a.scans - 1}: `snakemake preprocess` with stamps / without (wall)", r_wall,
                      "x", baseline=f"{base['wall_s']} s", note=f"with stamps {stamped['wall_s']} s; fixed costs "
                      "(workflow parse, job starts) included"),
            bl.figure("same, CPU time", r_cpu, "x", baseline=f"{base['cpu_s']} s",
                      note=f"with stamps {stamped['cpu_s']} s"),
            bl.figure(f"first run ({a.scans - 1} scans)", first["wall_s"], "s", note=f"CPU {first['cpu_s']} s"),
            bl.figure("outputs of both reruns identical", same, ""),
        ]
        bl.print_figures(f"cohort growth ({a.matrix}x{a.matrix}x{a.slices})", figures)
        record = {"figures": figures, "first": first, "with_stamps": stamped, "without_stamps": base,
                  "in_process": per, "outputs_agree": same}
        print(bl.write_record(a.name, record, a.out, argv))
        if not same:
            raise SystemExit("the reruns' outputs differ")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
