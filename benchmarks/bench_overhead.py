"""Fixed cost of one per-scan GPU job against its useful work, at the shipped job sizes.

A per-scan stage job (cam_batch, segment_batch) handles ceil(n_scans / batching.gpu_jobs) scans
(config/config.yaml: for 25,000 scans, 25000 / 32 -> 782 scans per job); a classify_batch job
handles ceil(n_scans / batching.classify_jobs) (25000 / 2 -> 12,500: a scan takes milliseconds
there). Its fixed cost is paid once per job:

- the interpreter, ``import hemocam.<stage>, torch`` and loading the model bundle onto the
  device (timed as a fresh ``python -c`` process, median of --repeats);
- where Snakemake is installed: the job's own Snakemake start on a cluster node (it parses the
  workflow and re-plans the cohort before running the script), timed as a dry run of one
  ``cam_batch`` job of a 25,000-scan sample sheet with its inputs in place.

Useful work: the stage's per-scan function (``classify_scan``, ``cam_scan``, ``segment_scan``:
read the cache, run the model, map back to the NIfTI grid, write the outputs) on generated,
preprocessed scans, model loaded once, after a warm-up scan; median seconds per scan.

Overhead = fixed / (per-scan x scans per job); target <= 10 % for the GPU stages.
Models have random weights (speed does not depend on what they learned). ``--preset``
production = config/config.yaml (the GPU default); small = config/presets/cpu-small.yaml.

    python benchmarks/bench_overhead.py --device cuda                   -> benchmarks/out/overhead.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

ROOT = bl.ROOT
TARGET = 0.10
STAGES = ("classify", "cam", "segment")
PRESETS = {"production": None, "small": "config/presets/cpu-small.yaml"}

LOAD_SNIPPETS = {
    "classify": "import torch, hemocam.classifier as m; from hemocam.models.resnet_lstm import load_bundle; "
                "d = torch.device({dev!r}); model, meta = load_bundle({path!r}, d)",
    "cam": "import torch, hemocam.cam as m; d = torch.device({dev!r}); model, meta = m.load_bundle({path!r}, d)",
    "segment": "import torch, hemocam.segmenter as m; model, meta, d = m.load_segmenter({path!r}, {dev!r})",
}
SYNC = "; torch.cuda.synchronize() if d.type == 'cuda' else None"


# ----------------------------------------------------------------------------- worker (subprocess)
def setup(work: Path, preset: str, n_scans: int, matrix: int, n_slices: int) -> dict:
    """Generated scans -> R/nifti, preprocessed caches, a classifier and a segmenter bundle."""
    import torch

    from hemocam.classifier import input_norm
    from hemocam.labelset import LABELS
    from hemocam.models.resnet_lstm import ResNetLSTM, save_bundle
    from hemocam.models.unet import UNet, in_channels_for
    from hemocam.phantom import write_nifti_cohort
    from hemocam.preprocess import preprocess_batch
    from hemocam.segmenter import seg_cfg

    cfg = bl.shipped_config(PRESETS[preset])
    windows, size = cfg["preprocess"]["windows"], int(cfg["preprocess"]["size"])
    R = work / "R"
    scans = write_nifti_cohort(R, n_scans, matrix=matrix, n_slices=n_slices, seed=11)
    ids = list(scans["scan_id"])
    df = preprocess_batch(ids, R, windows, size, R / "preprocess.tsv", processes=min(4, os.cpu_count() or 1))
    if (df["status"] != "ok").any():
        raise RuntimeError(f"preprocess failed: {df.to_dict('records')}")
    torch.manual_seed(0)
    c = cfg["classifier"]
    model = ResNetLSTM(c["arch"], in_channels=len(windows), n_labels=len(LABELS), lstm_hidden=int(c["lstm_hidden"]),
                       lstm_layers=int(c["lstm_layers"]), encoder_stride=int(c.get("encoder_stride", 32)))
    save_bundle(work / "classifier.pt", model, {"labels": list(LABELS), "windows": windows, "size": size,
                                                "input_norm": input_norm(len(windows)), "tta": True})
    sc = seg_cfg(cfg["segmenter"])
    k = int(sc["context_slices"])
    unet = UNet(in_channels_for(len(windows), k), encoder=sc["encoder"], base=int(sc["base_channels"]))
    torch.save({"format": 1, "kind": "unet",
                "model": {"in_channels": unet.in_channels, "encoder": sc["encoder"], "base": int(sc["base_channels"])},
                "state_dict": unet.state_dict(), "arch": f"unet-{sc['encoder']}", "windows": windows, "size": size,
                "context": k, "input_scale": 1.0 / 255.0, "target": "pseudomask", "config": sc,
                "threshold": float(sc["threshold"]), "min_component_ml": float(sc["min_component_ml"]),
                "tta_flip": bool(sc["tta_flip"])}, work / "segmenter.pt")
    return {"scan_ids": ids, "windows": [w["name"] for w in windows], "size": size,
            "classifier": {k2: c[k2] for k2 in ("arch", "lstm_hidden", "lstm_layers")},
            "segmenter": {"encoder": sc["encoder"], "context": k, "tta_flip": bool(sc["tta_flip"])}}


def work_per_scan(work: Path, device: str, preset: str) -> dict:
    """Median seconds per scan of each stage's per-scan function, model loaded once."""
    import statistics

    import torch

    from hemocam import cam, classifier, segmenter
    from hemocam.models.resnet_lstm import load_bundle
    from hemocam.train import select_device

    dev = select_device(device)
    cfg = bl.shipped_config(PRESETS[preset])
    R = work / "R"
    ids = sorted(p.name[:-4] for p in (R / "cache").glob("*.npy"))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(fn):
        fn(ids[0])  # warm-up: allocator, cuDNN/oneDNN kernel choice, first-call imports
        out = []
        for sid in ids:
            sync()
            t = time.perf_counter()
            fn(sid)
            sync()
            out.append(time.perf_counter() - t)
        return {"median_s": round(statistics.median(out), 4), "all_s": [round(x, 4) for x in out]}

    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "torch_threads": torch.get_num_threads(), "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}
    model, meta = load_bundle(work / "classifier.pt", dev)
    res["classify"] = timed(lambda s: classifier.classify_scan(s, model, meta, R, dev, tta=True))
    ccfg = cam.cam_config(cfg["cam"])
    res["cam"] = timed(lambda s: cam.cam_scan(s, model, meta, R, ccfg, dev))
    del model
    smodel, smeta, sdev = segmenter.load_segmenter(work / "segmenter.pt", dev)
    res["segment"] = timed(lambda s: segmenter.segment_scan(s, R, R / "segmentation", smodel, smeta, sdev))
    if dev.type == "cuda":
        res["max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    return res


# ----------------------------------------------------------------------------- driver
def snakemake_job_start(n: int, timeout: float) -> dict | None:
    """Wall time until a cluster job's Snakemake would start the cam_batch script, n scans."""
    try:
        snk = bl.venv_bin("snakemake")
    except FileNotFoundError:
        return None
    import bench_planning as bp

    cfg = bp.make_sheet_cohort(bl.cache_dir() / f"sheet-{n}", n)
    wd = Path(tempfile.mkdtemp(prefix="hemocam-jobstart-"))
    try:
        # the plan as the main Snakemake process leaves it (cached under results/ingest)
        bl.check(bl.measure(bp.hemocam_cmd(wd, cfg), sample=None, timeout=timeout), "dry run (plan cache)")
        gpu_jobs = int(bl.shipped_config()["batching"]["gpu_jobs"])
        cpu_jobs = int(bl.shipped_config()["batching"]["cpu_jobs"])
        (wd / "results" / "classifier").mkdir(parents=True, exist_ok=True)
        (wd / "results" / "classifier" / "model.pt").touch()
        (wd / "results" / "preprocess" / "batches").mkdir(parents=True, exist_ok=True)
        for i in range(min(cpu_jobs, n)):
            (wd / "results" / "preprocess" / "batches" / f"c{i:04d}.tsv").touch()
        target = "results/cam/batches/g0000.tsv"
        r = bl.check(bl.measure([snk, target, "-s", ROOT / "Snakefile", "-d", wd, "--configfile", cfg, "-n",
                                 "--cores", "1", "--allowed-rules", "cam_batch", "--quiet", "rules"], timeout=timeout),
                     "one-job dry run")
        jobs = bp.job_table(r["stdout"])
        if jobs != {"cam_batch": 1}:
            raise RuntimeError(f"expected one cam_batch job, got {jobs}")
        out = bl.strip(r)
        out.update(scans=n, gpu_jobs=gpu_jobs)
        return out
    finally:
        shutil.rmtree(wd, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="model sizes (default: production on CUDA, small on CPU)")
    ap.add_argument("--scans", type=int, default=3, help="scans timed per stage (after one warm-up)")
    ap.add_argument("--matrix", type=int, default=None, help="in-plane size of the NIfTI (default 512 on CUDA, 256 on CPU)")
    ap.add_argument("--slices", type=int, default=32)
    ap.add_argument("--cohort", type=int, default=25000, help="cohort size the job sizes are computed for")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the fixed-cost process (median)")
    ap.add_argument("--no-snakemake", action="store_true", help="skip the Snakemake job-start measurement")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", default=str(bl.DEFAULT_OUT))
    ap.add_argument("--_worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._worker:
        kind, work, *rest = a._worker
        if kind == "setup":
            res = setup(Path(work), rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        else:
            res = work_per_scan(Path(work), rest[0], rest[1])
        print("RESULT " + json.dumps(res))
        return None

    load0 = bl.loadavg()
    probe = bl.check(bl.measure([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], sample=None),
                     "torch probe")
    cuda = probe["stdout"].strip().endswith("True")
    device = ("cuda" if cuda else "cpu") if a.device == "auto" else a.device
    preset = a.preset or ("production" if device.startswith("cuda") else "small")
    matrix = a.matrix or (512 if device.startswith("cuda") else 256)
    batching = bl.shipped_config()["batching"]
    gpu_jobs = int(batching["gpu_jobs"])
    jobs = {stage: int(batching.get(f"{stage}_jobs", gpu_jobs)) for stage in STAGES}  # classify_jobs
    per_jobs = {stage: math.ceil(a.cohort / n) for stage, n in jobs.items()}
    work = Path(tempfile.mkdtemp(prefix="hemocam-overhead-"))

    def worker(*args, what):
        r = bl.check(bl.measure([sys.executable, __file__, "--_worker", *args], timeout=a.timeout), what)
        return json.loads(next(ln for ln in r["stdout"].splitlines() if ln.startswith("RESULT "))[7:]), bl.strip(r)

    t = time.perf_counter()
    info, _ = worker("setup", work, preset, str(a.scans + 1), str(matrix), str(a.slices), what="setup")
    setup_s = round(time.perf_counter() - t, 1)
    per_scan, per_scan_proc = worker("work", work, device, preset, what="per-scan work")

    bundles = {"classify": work / "classifier.pt", "cam": work / "classifier.pt", "segment": work / "segmenter.pt"}
    fixed = {"interpreter": [bl.strip(bl.check(bl.measure([sys.executable, "-c", "pass"], sample=None), "python"))
                             for _ in range(a.repeats)]}
    for stage in STAGES:
        code = LOAD_SNIPPETS[stage].format(dev=device, path=str(bundles[stage])) + SYNC
        fixed[stage] = [bl.strip(bl.check(bl.measure([sys.executable, "-c", code]), f"{stage} load"))
                        for _ in range(a.repeats)]
    job_start = None if a.no_snakemake else snakemake_job_start(a.cohort, a.timeout)
    shutil.rmtree(work, ignore_errors=True)

    figures, stages = [], {}
    snk_s = job_start["wall_s"] if job_start else 0.0
    for stage in STAGES:
        per_job = per_jobs[stage]
        f = round(bl.median([r["wall_s"] for r in fixed[stage]]), 2)
        w = per_scan[stage]["median_s"] * per_job
        frac = round((f + snk_s) / w, 4)
        stages[stage] = {"fixed_s": f, "snakemake_job_start_s": snk_s, "per_scan_s": per_scan[stage]["median_s"],
                         "scans_per_job": per_job, "useful_s": round(w, 2), "overhead_fraction": frac,
                         "overhead_fraction_without_snakemake": round(f / w, 4)}
        figures.append(bl.figure(f"{stage}: job overhead / useful work ({per_job} scans per job)", round(100 * frac, 2),
                                 "%", f"<= {100 * TARGET:.0f} %", frac <= TARGET,
                                 baseline=f"{per_scan[stage]['median_s']} s/scan x {per_job} = {round(w, 1)} s",
                                 note=f"fixed {f} s (python + import + bundle load)"
                                      + (f" + Snakemake job start {snk_s} s" if job_start else "")))
    record = {"device": device, "preset": preset, "matrix": matrix, "slices": a.slices, "cohort": a.cohort,
              "gpu_jobs": gpu_jobs, "jobs": jobs, "scans_per_job": per_jobs, "setup": info, "setup_s": setup_s,
              "per_scan": per_scan, "per_scan_process": per_scan_proc, "fixed": fixed, "snakemake_job_start": job_start,
              "stages": stages, "load_before": load0, "load_after": bl.loadavg(), "figures": figures}
    bl.print_figures(f"per-job overhead ({device}, {preset} model sizes)", figures)
    path = bl.write_record("overhead" if device == "cpu" else f"overhead_{device.split(':')[0]}", record, a.out, argv)
    print(f"  -> {path}")
    return record


if __name__ == "__main__":
    main()
