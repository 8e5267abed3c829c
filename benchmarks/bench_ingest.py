"""Ingestion against plain dcm2niix on the same DICOM files.

What is compared (same machine, same run, same files):

- baseline: ``dcm2niix -z y -f %j -o OUT DICOM_DIR``, one call on the flat RSNA-layout folder of
  the generated cohort (hemocam.phantom.generate_cohort, quirks off): it sorts the files into
  series and writes one gzipped NIfTI (+ JSON sidecar) per series. ``-z y`` is what a user
  gets by default (pigz when installed, else dcm2niix's internal zlib); the pipeline's outputs
  are gzipped too (zlib level 1, hemocam.io.save_nifti).
- hemocam: ``snakemake --cores N ingest`` from an empty results folder: workflow parse, the
  cohort plan (every DICOM header is indexed before the DAG is built), the batched
  ``ingest_batch`` jobs (dcm2niix ``-z n`` once per batch on symlinks in a private folder, one
  subfolder per series; per series: HU checks and repair, gzipped write of the int16 HU volume,
  slice labels from labels.csv) and
  ``scans.tsv``. Ground-truth masks are switched off (``input.masks: ''``) so both sides write
  the CT volumes only (plus hemocam's small label TSVs).
- the same work without Snakemake, in one process (``plan_cohort`` + ``ingest_batch``): what
  each scan costs once fixed costs (interpreter starts, workflow parse) are spread over many
  scans, as on an RSNA-sized cohort; and a no-op rerun of ``snakemake ingest`` (fixed cost).

Both volumes are checked to agree (same series, shape, affine and voxel values).

    python benchmarks/bench_ingest.py --scans 40 --matrix 128        -> benchmarks/out/ingest.json
    python benchmarks/bench_ingest.py --scans 6 --matrix 512 --slices 32 --name ingest512   (RSNA-sized slices)
"""

from __future__ import annotations

import argparse
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
TARGET = 1.3


def components(workdir: Path, cfg_path: Path) -> dict:
    """In-process plan + ingest of the whole cohort as one batch (run in a fresh subprocess)."""
    import yaml

    t0, c0 = time.perf_counter(), bl.cpu_now()
    from snakemake.utils import update_config

    import hemocam.ingest as hi

    t1, c1 = time.perf_counter(), bl.cpu_now()
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    for p in (ROOT / "config" / "presets" / "cpu-small.yaml", cfg_path):
        update_config(cfg, yaml.safe_load(Path(p).read_text()))
    R = workdir / "results"
    plan = hi.plan_cohort(cfg, R / "ingest")
    ids = sorted(plan.scans.loc[plan.scans["status"] == "ok", "scan_id"])
    hi.write_batch_plans(plan, {"c0000": ids}, R / "ingest" / "plan")
    t2, c2 = time.perf_counter(), bl.cpu_now()
    df = hi.ingest_batch(R / "ingest" / "plan" / "c0000.tsv", cfg, R, R / "ingest" / "batches" / "c0000.tsv", threads=1)
    t3, c3 = time.perf_counter(), bl.cpu_now()
    return {"scans_ok": int((df["status"] == "ok").sum()), "scans": len(df),
            "import": {"wall_s": round(t1 - t0, 3), "cpu_s": round(c1 - c0, 3)},
            "plan": {"wall_s": round(t2 - t1, 3), "cpu_s": round(c2 - c1, 3)},
            "ingest_batch": {"wall_s": round(t3 - t2, 3), "cpu_s": round(c3 - c2, 3)}}


def compare_outputs(d2n_dir: Path, ours_dir: Path) -> dict:
    """Same series, shapes, affines and voxels (HU) in dcm2niix's and hemocam's volumes."""
    import nibabel as nib
    import numpy as np

    theirs = {p.name[:-7]: p for p in d2n_dir.glob("*.nii.gz")}
    ours = {p.name[:-7]: p for p in ours_dir.glob("*.nii.gz")}
    common = sorted(set(theirs) & set(ours))
    same_shape = same_affine = 0
    equal_vox = total_vox = 0
    for k in common:
        a, b = nib.load(theirs[k]), nib.load(ours[k])
        if a.shape[:3] != b.shape[:3]:
            continue
        same_shape += 1
        same_affine += bool(np.allclose(a.affine, b.affine, atol=1e-3))
        x, y = a.get_fdata(), b.get_fdata()
        x = x.reshape(y.shape)
        equal_vox += int((np.abs(x - y) < 0.5).sum())
        total_vox += y.size
    return {"dcm2niix_volumes": len(theirs), "hemocam_volumes": len(ours), "common_series": len(common),
            "same_shape": same_shape, "same_affine": same_affine,
            "equal_voxel_fraction": round(equal_vox / total_vox, 6) if total_vox else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=40)
    ap.add_argument("--matrix", type=int, default=128)
    ap.add_argument("--slices", type=int, default=28)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="snakemake --cores")
    ap.add_argument("--cpu-jobs", type=int, default=None,
                    help="batching.cpu_jobs (default: config/presets/cpu-small.yaml, as `make demo`)")
    ap.add_argument("--repeats", type=int, default=3, help="dcm2niix repeats (median)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the workdir (bench_preprocess can reuse its NIfTIs)")
    ap.add_argument("--name", default="ingest", help="record name (benchmarks/out/<name>.json)")
    ap.add_argument("--out", default=str(bl.DEFAULT_OUT))
    ap.add_argument("--_components", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._components:
        print("COMPONENTS " + json.dumps(components(Path(a._components[0]), Path(a._components[1]))))
        return None

    load0 = bl.loadavg()
    cohort = bl.generated_cohort(a.scans, a.matrix, a.slices, a.seed, False)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="hemocam-ingest-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "ingest.yaml"
    text = (f"input:\n  format: rsna\n  path: {cohort}/dicom\n  labels: {cohort}/labels.csv\n  masks: ''\n"
            "demo:\n  generate: false\n")
    if a.cpu_jobs:
        text += f"batching:\n  cpu_jobs: {a.cpu_jobs}\n"
    cfg.write_text(text)
    preset = ROOT / "config" / "presets" / "cpu-small.yaml"
    snk = [bl.venv_bin("snakemake"), "-s", ROOT / "Snakefile", "-d", work / "wf", "--configfile", preset, cfg,
           "--cores", str(a.cores), "ingest"]
    d2n_out = work / "dcm2niix"

    def dcm2niix():
        shutil.rmtree(d2n_out, ignore_errors=True)
        d2n_out.mkdir()
        return bl.strip(bl.check(bl.measure([bl.venv_bin("dcm2niix"), "-z", "y", "-f", "%j", "-o", d2n_out,
                                             cohort / "dicom"]), "dcm2niix"))

    base = [dcm2niix()]  # interleaved with the hemocam runs: load drifts alike for both
    shutil.rmtree(work / "wf", ignore_errors=True)
    full = bl.strip(bl.check(bl.measure(snk), "snakemake ingest"))
    base.append(dcm2niix())
    noop = bl.strip(bl.check(bl.measure(snk), "snakemake ingest (no-op rerun)"))
    for _ in range(max(0, a.repeats - 2)):
        base.append(dcm2niix())
    comp_dir = work / "inproc"
    shutil.rmtree(comp_dir, ignore_errors=True)
    r = bl.check(bl.measure([sys.executable, __file__, "--_components", comp_dir, cfg]), "in-process ingest")
    comp = json.loads(next(ln for ln in r["stdout"].splitlines() if ln.startswith("COMPONENTS "))[11:])
    comp["process"] = bl.strip(r)
    agree = compare_outputs(d2n_out, work / "wf" / "results" / "nifti")

    b_wall = bl.median([b["wall_s"] for b in base])
    b_cpu = bl.median([b["cpu_s"] for b in base])
    n_ok = comp["scans_ok"]
    marginal_cpu = comp["plan"]["cpu_s"] + comp["ingest_batch"]["cpu_s"]
    marginal_wall = comp["plan"]["wall_s"] + comp["ingest_batch"]["wall_s"]
    r_wall, r_cpu = bl.ratio(full["wall_s"], b_wall), bl.ratio(full["cpu_s"], b_cpu)
    figures = [
        bl.figure(f"snakemake ingest / dcm2niix ({n_ok} scans of {a.matrix}x{a.matrix}x{a.slices}, wall)", r_wall, "x", f"<= {TARGET}", r_wall <= TARGET,
                  baseline=f"dcm2niix {b_wall} s wall", note=f"hemocam {full['wall_s']} s, --cores {a.cores}"),
        bl.figure("snakemake ingest / dcm2niix (CPU time)", r_cpu, "x", f"<= {TARGET}", r_cpu <= TARGET,
                  baseline=f"dcm2niix {b_cpu} s CPU", note=f"hemocam {full['cpu_s']} s CPU (whole process tree)"),
        bl.figure("conversion only: ingest_batch / dcm2niix (CPU)", bl.ratio(comp["ingest_batch"]["cpu_s"], b_cpu), "x",
                  note=f"in one process, no Snakemake; wall x{bl.ratio(comp['ingest_batch']['wall_s'], b_wall)}"),
        bl.figure("per scan at scale: (plan + ingest_batch) / dcm2niix (CPU)", bl.ratio(marginal_cpu, b_cpu), "x",
                  f"<= {TARGET}", bl.ratio(marginal_cpu, b_cpu) <= TARGET,
                  note=f"fixed costs left out; wall x{bl.ratio(marginal_wall, b_wall)}"),
        bl.figure("fixed cost: no-op `snakemake ingest`", noop["wall_s"], "s", note=f"CPU {noop['cpu_s']} s"),
    ]
    # At scale: per-scan CPU from the in-process run, plus the fixed CPU of each job (interpreter,
    # imports, script preamble) estimated from this run: what the Snakemake run cost beyond the
    # in-process work and the no-op parse, over its ingest jobs + the scans_table job.
    shipped = bl.shipped_config()
    jobs_here = min(int(bl.shipped_config("config/presets/cpu-small.yaml")["batching"]["cpu_jobs"]), n_ok) \
        if not a.cpu_jobs else min(a.cpu_jobs, n_ok)
    per_job = max(0.0, full["cpu_s"] - marginal_cpu - noop["cpu_s"]) / (jobs_here + 1)
    big_n, big_jobs = 25000, int(shipped["batching"]["cpu_jobs"])
    est = (big_n * marginal_cpu / n_ok + (big_jobs + 1) * per_job + noop["cpu_s"]) / (big_n * b_cpu / n_ok)
    figures.append(bl.figure(f"extrapolated: {big_n} such scans in {big_jobs} ingest jobs / dcm2niix (CPU)", round(est, 3),
                             "x", f"<= {TARGET}", est <= TARGET,
                             note=f"per-scan CPU of this run + {round(per_job, 2)} s CPU fixed per job (measured here) "
                                  f"x {big_jobs + 1} jobs + one parse"))
    record = {"scans": a.scans, "matrix": a.matrix, "slices": a.slices, "quirks": False, "cores": a.cores,
              "cohort": str(cohort), "config": text, "preset": str(preset.relative_to(ROOT)),
              "dcm2niix_runs": base, "dcm2niix_median": {"wall_s": b_wall, "cpu_s": b_cpu},
              "snakemake_ingest": full, "snakemake_noop": noop, "in_process": comp, "outputs_agree": agree,
              "load_before": load0, "load_after": bl.loadavg(), "figures": figures,
              "compared": "dcm2niix -z y on the flat folder (all series, one call) vs snakemake ingest "
                          "(plan + ingest jobs + scans.tsv), masks off; both write one gzipped NIfTI per series"}
    bl.print_figures(f"ingestion ({a.matrix}x{a.matrix}x{a.slices})", figures)
    print(f"  outputs: {agree}")
    path = bl.write_record(a.name, record, a.out, argv)
    print(f"  -> {path}")
    if a.keep:
        print(f"  workdir kept: {work}")
    elif not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return record


if __name__ == "__main__":
    main()
