"""`make bench`: every CPU benchmark in turn, then one summary table.

    python benchmarks/run_all.py                 # ~15 min on 2 busy cores
    python benchmarks/run_all.py --quick         # small sizes: a smoke test of the scripts (~3 min)
    python benchmarks/run_all.py --only planning,ingest

Each benchmark runs as its own process (a failure is reported and the others go on), prints its
figures and writes benchmarks/out/<name>.json; this script then writes benchmarks/out/summary.md
(the table of benchmarks/README.md: figure, target, met, baseline, load average) and prints it.
Every speed is a ratio to a baseline measured in the same run on the same machine.
GPU figures: `bash benchmarks/gpu.sh` on a CUDA machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

HERE = Path(__file__).resolve().parent
PY = sys.executable


def plan(quick: bool, out: Path) -> list[tuple[str, list[str]]]:
    """(name, argv) per benchmark; the sizes keep the whole run near 15 min on 2 loaded cores."""
    o = ["--out", str(out)]
    if quick:
        return [
            ("planning", [PY, HERE / "bench_planning.py", "--sizes", "200,1000", *o]),
            ("ingest", [PY, HERE / "bench_ingest.py", "--scans", "6", "--matrix", "64", "--slices", "16",
                        "--repeats", "2", *o]),
            ("preprocess", [PY, HERE / "bench_preprocess.py", "--scans", "2", "--matrix", "128", "--slices", "16",
                            "--big-matrix", "256", "--big-slices", "24", *o]),
            ("classifier", [PY, HERE / "bench_classifier.py", "--device", "cpu", "--size", "64", "--steps", "1",
                            "--warmup", "1", "--batch-size", "1", "--slices", "12", "--out", str(out / "classifier.json")]),
            ("cam", [PY, HERE / "bench_cam.py", "--device", "cpu", "--size", "64", "--slices", "12", "--repeats", "1",
                     "--out", str(out / "cam.json")]),
            ("overhead", [PY, HERE / "bench_overhead.py", "--device", "cpu", "--scans", "1", "--matrix", "128",
                          "--slices", "16", "--repeats", "1", "--no-snakemake", *o]),
            ("growth", [PY, HERE / "bench_growth.py", "--scans", "8", "--matrix", "64", "--slices", "16", *o]),
        ]
    return [
        ("planning", [PY, HERE / "bench_planning.py", "--sizes", "1000,5000,25000", "--demo", *o]),
        ("ingest", [PY, HERE / "bench_ingest.py", "--scans", "40", "--matrix", "128", *o]),
        ("ingest512", [PY, HERE / "bench_ingest.py", "--scans", "6", "--matrix", "512", "--slices", "32",
                       "--name", "ingest512", *o]),
        ("preprocess", [PY, HERE / "bench_preprocess.py", "--scans", "8", "--matrix", "256", *o]),
        ("classifier", [PY, HERE / "bench_classifier.py", "--device", "cpu", "--size", "96", "--arch", "resnet18",
                        "--steps", "3", "--warmup", "1", "--batch-size", "2", "--out", str(out / "classifier.json")]),
        ("cam", [PY, HERE / "bench_cam.py", "--device", "cpu", "--repeats", "3", "--out", str(out / "cam.json")]),
        ("overhead", [PY, HERE / "bench_overhead.py", "--device", "cpu", "--scans", "2", "--repeats", "2", *o]),
        ("growth", [PY, HERE / "bench_growth.py", "--scans", "40", "--matrix", "128", *o]),
    ]


def figures_of(name: str, rec: dict) -> list[dict]:
    """The figures of a record; the classifier/CAM scripts (other owners) get theirs derived."""
    if "figures" in rec:
        return rec["figures"]
    if name == "cam" and "ratio" in rec:
        return [bl.figure(f"CAM / forward-only rate ({rec.get('arch')}, {rec.get('size')}px, {rec.get('slices')} slices)",
                          rec["ratio"], "x", f">= {rec.get('target_ratio')}", rec.get("meets_target"),
                          baseline=f"forward {rec.get('forward_slices_per_s')} slices/s",
                          note=f"CAM {rec.get('cam_slices_per_s')} slices/s on {rec.get('device')}")]
    if name == "classifier" and "pipeline_over_bare" in rec:
        tgt = rec.get("target")
        val = round(rec["pipeline_over_bare"], 3)
        return [bl.figure(f"training pipeline / bare model step ({rec.get('arch')}, {rec.get('size')}px)", val, "x",
                          tgt, (val >= float(str(tgt).lstrip(">= "))) if tgt else None,
                          baseline=f"bare {round(rec['bare_model_slices_per_s'], 1)} slices/s",
                          note=f"pipeline {round(rec['pipeline_slices_per_s'], 1)} slices/s, "
                               f"{rec.get('pipeline_workers')} loader workers, on {rec.get('device')}")]
    return []


def fmt(v):
    return "" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


def summary(results: list[dict], out: Path, argv: list[str]) -> str:
    m = bl.machine()
    lines = [
        f"Machine: {m.get('cpus_usable', m.get('cpus'))} usable cores ({m.get('cpu_model', '?')}), "
        f"{m.get('mem_gib', '?')} GiB" + (f", GPU {', '.join(m['gpus'])}" if m.get("gpus") else "") + ". "
        f"Commit {bl.git_commit()}, {time.strftime('%Y-%m-%d %H:%M')}. Command: `{' '.join(argv)}`.",
        "",
        "| benchmark | figure | value | target | met | baseline (same run) | load 1-min (start/end) | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        load = f"{r['load_before'][0] if r['load_before'] else '?'} / {r['load_after'][0] if r['load_after'] else '?'}"
        if r["error"]:
            lines.append(f"| {r['name']} | FAILED | | | | | {load} | {r['error'][:200]} |")
            continue
        for f in r["figures"]:
            met = "" if f["met"] is None else ("yes" if f["met"] else "**no**")
            lines.append(f"| {r['name']} | {f['name']} | {fmt(f['value'])} {f['unit']} | {f['target'] or ''} | {met} | "
                         f"{f['baseline'] or ''} | {load} | {f['note'] or ''} |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def _smi_rows(path: Path) -> list[tuple[float, float, float]]:
    """(epoch seconds, utilisation %, memory MiB) from `nvidia-smi --query-gpu=timestamp,...`."""
    import datetime as dt

    rows = []
    for line in path.read_text(errors="replace").splitlines()[1:]:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            continue
        try:
            t = dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            rows.append((t, float(parts[1].split()[0]), float(parts[2].split()[0])))
        except ValueError:
            continue
    return rows


def gpu_summary(out: Path) -> str:
    """Figures of the CUDA records and GPU utilisation per phase (benchmarks/gpu.sh)."""
    smi = _smi_rows(out / "nvidia-smi.csv") if (out / "nvidia-smi.csv").exists() else []
    phases = []
    if (out / "gpu_phases.tsv").exists():
        for line in (out / "gpu_phases.tsv").read_text().splitlines():
            name, t0, t1, rc = line.split("\t")
            phases.append((name, float(t0), float(t1), int(rc)))
    m = bl.machine()
    lines = [f"GPU run: {', '.join(m.get('gpus', ['no GPU seen']))}; {m.get('cpus_usable', m.get('cpus'))} CPU cores "
             f"({m.get('cpu_model', '?')}); commit {bl.git_commit()}; {time.strftime('%Y-%m-%d %H:%M')}; "
             f"command `bash benchmarks/gpu.sh`.", "",
             "| phase | exit | wall s | GPU util mean % | GPU util max % | samples >= 50 % | GPU memory max MiB |",
             "|---|---|---|---|---|---|---|"]
    for name, t0, t1, rc in phases:
        mine = [r for r in smi if t0 <= r[0] <= t1]
        if mine:
            u = [r[1] for r in mine]
            lines.append(f"| {name} | {rc} | {t1 - t0:.1f} | {sum(u) / len(u):.1f} | {max(u):.0f} | "
                         f"{100 * sum(x >= 50 for x in u) / len(u):.0f} % | {max(r[2] for r in mine):.0f} |")
        else:
            lines.append(f"| {name} | {rc} | {t1 - t0:.1f} | no samples | | | |")
    lines += ["", "| benchmark | figure | value | target | met | baseline (same run) | notes |", "|---|---|---|---|---|---|---|"]
    for name, file in (("classifier", "classifier_cuda.json"), ("cam", "cam_cuda.json"), ("overhead", "overhead_cuda.json")):
        path = out / file
        if not path.exists():
            lines.append(f"| {name} | no {file} | | | | | |")
            continue
        for f in figures_of(name, json.loads(path.read_text())):
            met = "" if f["met"] is None else ("yes" if f["met"] else "**no**")
            lines.append(f"| {name} | {f['name']} | {fmt(f['value'])} {f['unit']} | {f['target'] or ''} | {met} | "
                         f"{f['baseline'] or ''} | {f['note'] or ''} |")
    text = "\n".join(lines) + "\n"
    (out / "gpu_summary.md").write_text(text)
    print(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-summary", metavar="OUT", help="only summarise a benchmarks/gpu.sh run in OUT")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--only", default="",
                    help="comma-separated subset of: planning,ingest,ingest512,preprocess,classifier,cam,overhead,growth")
    ap.add_argument("--out", default=str(bl.DEFAULT_OUT))
    a = ap.parse_args(argv)
    if a.gpu_summary:
        gpu_summary(Path(a.gpu_summary))
        return 0
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    only = {s for s in a.only.split(",") if s}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(bl.ROOT), os.environ.get("PYTHONPATH")) if p)}
    results = []
    t_all = time.perf_counter()
    for name, cmd in plan(a.quick, out):
        if only and name not in only:
            continue
        json_path = out / f"{name}.json"
        json_path.unlink(missing_ok=True)
        print(f"\n##### {name}: {' '.join(str(c) for c in cmd)}  (load {bl.loadavg()})", flush=True)
        load0, t = bl.loadavg(), time.perf_counter()
        rc = subprocess.run([str(c) for c in cmd], cwd=bl.ROOT, env=env).returncode
        res = {"name": name, "rc": rc, "wall_s": round(time.perf_counter() - t, 1), "load_before": load0,
               "load_after": bl.loadavg(), "error": "", "figures": []}
        if rc != 0:
            res["error"] = f"exit {rc}"
        elif not json_path.exists():
            res["error"] = f"no {json_path.name} written"
        else:
            res["figures"] = figures_of(name, json.loads(json_path.read_text()))
        print(f"##### {name}: {'ok' if not res['error'] else res['error']} in {res['wall_s']} s", flush=True)
        results.append(res)
    # benchmarks left out by --only: their last records (if any) complete the table
    ran = {r["name"] for r in results}
    for name, _ in plan(a.quick, out):
        path = out / f"{name}.json"
        if name in ran or not path.exists():
            continue
        rec = json.loads(path.read_text())
        figs = [{**f, "note": f"(earlier run, {rec.get('when', rec.get('time', '?'))}) {f['note'] or ''}"}
                for f in figures_of(name, rec)]
        results.append({"name": name, "rc": 0, "wall_s": None, "load_before": rec.get("load_before") or [],
                        "load_after": rec.get("load_after") or [], "error": "", "figures": figs})
    order = [n for n, _ in plan(a.quick, out)]
    results.sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    total = round(time.perf_counter() - t_all, 1)
    text = summary(results, out, [Path(PY).name, *(argv if argv is not None else sys.argv)])
    bl.write_record("run_all", {"total_s": total, "benchmarks": results, "quick": a.quick}, out,
                    argv if argv is not None else sys.argv)
    print(f"\n##### summary ({total} s in all) -> {out / 'summary.md'}\n")
    print(text)
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
