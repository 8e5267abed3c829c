"""Planning cost at RSNA scale: `snakemake -n` of the FULL hemocam workflow for big cohorts,
against a bare 4-rules-per-sample Snakemake workflow planned for the same sample sheet.

Cohorts are sample sheets (input.format samplesheet) of N scans whose `image` and `mask` are
empty placeholder .nii.gz files plus a (header-only) slice-label TSV: hemocam plans a sample
sheet from stat() calls alone (plan_cohort never opens a NIfTI while planning), and with
labels and masks present the DAG of the default target `all` holds every stage: ingest,
preprocess, classifier training, classify, CAM, pseudo-masks, both segmenters, segmentation,
evaluation and the report rules. The shipped config/config.yaml is used as is
(batching.cpu_jobs / gpu_jobs), so the job counts are those a 25,000-scan Slurm run submits.

Per size: hemocam cold (empty results/: the plan is built), hemocam warm (a second dry run:
the cached plan is reused, which is what every later invocation and every cluster job pays),
and the bare baseline. Reported: wall and CPU seconds, peak memory (largest process, and the
summed process tree), job counts, and the ratios hemocam / bare.

    python benchmarks/bench_planning.py --sizes 1000,5000,25000      -> benchmarks/out/planning.json
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

ROOT = bl.ROOT
SNAKEFILE = ROOT / "Snakefile"
TARGET_S, TARGET_MB = 60.0, 2048.0
LABEL_HEADER = "scan_id\tslice\tany\tepidural\tintraparenchymal\tintraventricular\tsubarachnoid\tsubdural\n"

BARE_SNAKEFILE = '''\
# Baseline: the cheapest Snakemake workflow over the same sample sheet, 4 rules per sample.
import pandas as pd

S = pd.read_csv(config["sheet"], sep="\\t", dtype=str).set_index("scan_id")
IDS = list(S.index)


rule all:
    input:
        expand("out/d/{s}.txt", s=IDS),


rule a:
    input:
        lambda w: S.loc[w.s, "image"],
    output:
        "out/a/{s}.txt",
    shell:
        "touch {output}"


rule b:
    input:
        "out/a/{s}.txt",
    output:
        "out/b/{s}.txt",
    shell:
        "touch {output}"


rule c:
    input:
        "out/b/{s}.txt",
    output:
        "out/c/{s}.txt",
    shell:
        "touch {output}"


rule d:
    input:
        "out/c/{s}.txt",
    output:
        "out/d/{s}.txt",
    shell:
        "touch {output}"
'''


def make_sheet_cohort(folder: Path, n: int) -> Path:
    """N placeholder scans (+ masks), a sample sheet, a labels TSV and a config; idempotent."""
    cfg = folder / "config.yaml"
    if cfg.exists():
        return cfg
    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "img").mkdir(parents=True)
    (tmp / "mask").mkdir()
    lines = ["scan_id\timage\tmask\n"]
    for i in range(n):
        sid = f"scan{i:06d}"
        for sub in ("img", "mask"):
            (tmp / sub / f"{sid}.nii.gz").touch()
        lines.append(f"{sid}\t{folder}/img/{sid}.nii.gz\t{folder}/mask/{sid}.nii.gz\n")
    (tmp / "sheet.tsv").write_text("".join(lines))
    (tmp / "labels.tsv").write_text(LABEL_HEADER)
    (tmp / "config.yaml").write_text(
        f"input:\n  format: samplesheet\n  path: {folder}/sheet.tsv\n  labels: {folder}/labels.tsv\n"
        "  masks: ''\ndemo:\n  generate: false\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return cfg


def job_table(stdout: str) -> dict:
    """The 'Job stats' table of a dry run: {rule: count}."""
    jobs, on = {}, False
    for line in stdout.splitlines():
        if line.startswith("Job stats"):
            on = True
            continue
        if on:
            m = re.match(r"^(\S+)\s+(\d+)\s*$", line)
            if m:
                if m.group(1) == "total":
                    break
                jobs[m.group(1)] = int(m.group(2))
    return jobs


def norun_rules() -> set:
    """Rules with no shell/script/run: Snakemake never submits them (no sbatch)."""
    texts = [SNAKEFILE.read_text()] + [p.read_text() for p in sorted((ROOT / "workflow" / "rules").glob("*.smk"))]
    out = set()
    for text in texts:
        blocks = re.split(r"(?m)^\s*(?:rule|checkpoint)\s+", text)[1:]
        for b in blocks:
            name = b.split(":", 1)[0].strip()
            body = b.split("\n", 1)[1] if "\n" in b else ""
            if not re.search(r"(?m)^\s+(shell|script|run|wrapper|notebook|cwl)\s*:", body):
                out.add(name)
    return out


def report_included() -> bool:
    return bool(re.search(r"(?m)^include:.*report\.smk", SNAKEFILE.read_text()))


def hemocam_cmd(workdir: Path, *cfgs, targets=()):
    """A dry run; ``cfgs`` are merged over config/config.yaml in order (one --configfile flag)."""
    return [bl.venv_bin("snakemake"), *targets, "-s", SNAKEFILE, "-d", workdir, "--configfile", *cfgs,
            "-n", "--quiet", "rules"]


def bare_cmd(snakefile: Path, workdir: Path, sheet: Path):
    return [bl.venv_bin("snakemake"), "-s", snakefile, "-d", workdir, "--config", f"sheet={sheet}",
            "-n", "--quiet", "rules"]


def profile_cold(workdir: Path, cfg: Path, targets, top: int = 14) -> list[dict]:
    """cProfile of a cold hemocam dry run (in a subprocess): the costliest hemocam/workflow calls."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    prof = workdir.parent / f"{workdir.name}.prof"
    bl.check(bl.measure([sys.executable, "-m", "cProfile", "-o", prof, *hemocam_cmd(workdir, cfg, targets=targets)],
                        sample=None), "profiled dry run")
    st = pstats.Stats(str(prof))
    ours = (str(ROOT / "hemocam"), str(ROOT / "workflow"), str(SNAKEFILE))
    phases = {("workflow.py", "include"): "snakemake: parse the Snakefile (incl. its module-level code)",
              ("workflow.py", "_build_dag"): "snakemake: build the DAG (incl. input functions)",
              ("utils.py", "_validate_pandas"): "snakemake.utils.validate of a DataFrame (per row)"}
    rows = []
    for (fn, line, func), (cc, nc, tt, ct, callers) in st.stats.items():
        label = phases.get((os.path.basename(fn), func)) if "snakemake" in fn else None
        if fn.startswith(ours) or label:
            name = label or f"{os.path.relpath(fn, ROOT)}:{line}({func})"
            rows.append({"function": name, "calls": nc, "cum_s": round(ct, 3), "own_s": round(tt, 3)})
    total = max(ct for (_, _, _), (_, _, _, ct, _) in st.stats.items())
    rows.sort(key=lambda r: -r["cum_s"])
    return [{"total_s": round(total, 3)}] + rows[:top]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,5000,25000", help="cohort sizes (scans), comma-separated")
    ap.add_argument("--baseline-sizes", default=None, help="sizes for the bare baseline (default: --sizes; \"\" for none)")
    ap.add_argument("--workdir", default=None, help="scratch (default: a temp dir; cohorts are cached)")
    ap.add_argument("--profile", action="store_true", help="cProfile a cold run at the largest size "
                                                           "(automatic when the target is missed)")
    ap.add_argument("--demo", action="store_true",
                    help="also count the jobs of the demo cohort (40 scans, cpu-small preset); generates it once")
    ap.add_argument("--timeout", type=float, default=900, help="per dry run, seconds")
    ap.add_argument("--out", default=str(bl.DEFAULT_OUT))
    a = ap.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",") if s]
    base_sizes = [int(s) for s in (a.sizes if a.baseline_sizes is None else a.baseline_sizes).split(",") if s]
    scratch = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="hemocam-plan-"))
    cohorts = bl.cache_dir()
    bare_sf = scratch / "bare" / "Snakefile"
    bare_sf.parent.mkdir(parents=True, exist_ok=True)
    bare_sf.write_text(BARE_SNAKEFILE)
    targets = []  # the default target `all`: every stage, evaluation and (when included) the report
    norun = norun_rules()
    load0 = bl.loadavg()
    runs, figures = [], []
    for n in sorted(set(sizes) | set(base_sizes)):
        t = time.perf_counter()
        cfg = make_sheet_cohort(cohorts / f"sheet-{n}", n)
        row = {"scans": n, "cohort_setup_s": round(time.perf_counter() - t, 2), "load_before": bl.loadavg()}
        if n in sizes:
            wd = scratch / f"hemocam-{n}"
            shutil.rmtree(wd, ignore_errors=True)
            wd.mkdir(parents=True)
            for phase in ("cold", "warm"):
                r = bl.check(bl.measure(hemocam_cmd(wd, cfg, targets=targets), timeout=a.timeout), f"hemocam {phase} n={n}")
                row[f"hemocam_{phase}"] = bl.strip(r)
                if phase == "cold":
                    jobs = job_table(r["stdout"])
                    row["jobs"] = jobs
                    row["jobs_total"] = sum(jobs.values())
                    row["sbatch_submissions"] = sum(c for k, c in jobs.items() if k not in norun)
            print(f"  n={n}: hemocam cold {row['hemocam_cold']['wall_s']} s / {row['hemocam_cold']['tree_rss_mb']} MB, "
                  f"warm {row['hemocam_warm']['wall_s']} s, {row['jobs_total']} jobs", flush=True)
        if n in base_sizes:
            wd = scratch / f"bare-{n}"
            shutil.rmtree(wd, ignore_errors=True)
            wd.mkdir(parents=True)
            r = bl.check(bl.measure(bare_cmd(bare_sf, wd, cfg.parent / "sheet.tsv"), timeout=a.timeout), f"bare n={n}")
            row["bare"] = bl.strip(r)
            row["bare_jobs_total"] = sum(job_table(r["stdout"]).values())
            print(f"  n={n}: bare {row['bare']['wall_s']} s / {row['bare']['tree_rss_mb']} MB, "
                  f"{row['bare_jobs_total']} jobs", flush=True)
        if "bare" in row and "hemocam_cold" in row:
            for phase in ("cold", "warm"):
                h, b = row[f"hemocam_{phase}"], row["bare"]
                row[f"ratio_{phase}"] = {"wall": bl.ratio(h["wall_s"], b["wall_s"]), "cpu": bl.ratio(h["cpu_s"], b["cpu_s"]),
                                         "memory": bl.ratio(h["tree_rss_mb"], b["tree_rss_mb"])}
        row["load_after"] = bl.loadavg()
        runs.append(row)

    big = max(sizes)
    rb = next(r for r in runs if r["scans"] == big)
    cold, warm = rb["hemocam_cold"], rb["hemocam_warm"]
    peak = max(cold["tree_rss_mb"], cold["max_rss_mb"], warm["tree_rss_mb"])
    met_t, met_m = cold["wall_s"] <= TARGET_S, peak <= TARGET_MB
    figures += [
        bl.figure(f"plan {big} scans, cold (wall)", cold["wall_s"], "s", f"<= {TARGET_S:.0f} s", met_t,
                  note=f"CPU {cold['cpu_s']} s; warm {warm['wall_s']} s wall / {warm['cpu_s']} s CPU"),
        bl.figure(f"plan {big} scans, peak memory", peak, "MB", f"<= {TARGET_MB:.0f} MB", met_m,
                  note="max of summed process-tree RSS (sampled) and wait4 max RSS"),
        bl.figure(f"jobs for {big} scans", rb["jobs_total"], "jobs",
                  note=f"{rb['sbatch_submissions']} sbatch submissions (rules without a command are not submitted)"),
    ]
    for r in runs:
        if "ratio_cold" in r:
            figures.append(bl.figure(f"plan {r['scans']} scans: hemocam / bare", r["ratio_cold"]["wall"], "x wall",
                                     baseline=f"bare 4-rule workflow {r['bare']['wall_s']} s, {r['bare_jobs_total']} jobs",
                                     note=f"CPU x{r['ratio_cold']['cpu']}, memory x{r['ratio_cold']['memory']}; "
                                          f"warm wall x{r['ratio_warm']['wall']}"))
    record = {"sizes": sizes, "baseline_sizes": base_sizes, "targets_planned": "all (default)",
              "report_rules_included": report_included(),
              "config": "config/config.yaml + input.format samplesheet (labels, masks)",
              "norun_rules": sorted(norun), "runs": runs, "load_before": load0}

    if a.demo:
        demo = bl.generated_cohort(40, 128, 28, 42, True)
        dcfg = scratch / "demo.yaml"
        dcfg.write_text(f"input:\n  format: rsna\n  path: {demo}/dicom\n  labels: {demo}/labels.csv\n"
                        f"  masks: {demo}/masks\ndemo:\n  generate: false\n")
        wd = scratch / "demo"
        shutil.rmtree(wd, ignore_errors=True)
        wd.mkdir()
        r = bl.check(bl.measure(hemocam_cmd(wd, ROOT / "config/presets/cpu-small.yaml", dcfg, targets=targets),
                                timeout=a.timeout), "demo dry run")
        jobs = job_table(r["stdout"])
        n_jobs = sum(jobs.values()) + 1  # + the demo_cohort job of a fresh clone
        n_sb = sum(c for k, c in jobs.items() if k not in norun) + 1
        record["demo"] = {"jobs": jobs, "jobs_total_fresh_clone": n_jobs, "sbatch_submissions": n_sb,
                          "run": bl.strip(r)}
        figures.append(bl.figure("jobs for the demo cohort (cpu-small preset)", n_jobs, "jobs",
                                 note=f"{n_sb} would be submitted; incl. the demo_cohort job"))

    if a.profile or not (met_t and met_m):
        record["profile_cold"] = profile_cold(scratch / f"profile-{big}", cohorts / f"sheet-{big}" / "config.yaml",
                                              targets)
        print("  profile (cold, largest size):")
        for p in record["profile_cold"][:10]:
            print("   ", p)
    record["figures"] = figures
    record["load_after"] = bl.loadavg()
    bl.print_figures("planning", figures)
    path = bl.write_record("planning", record, a.out, argv)
    print(f"  -> {path}")
    if not a.workdir:
        shutil.rmtree(scratch, ignore_errors=True)
    return record


if __name__ == "__main__":
    main()
