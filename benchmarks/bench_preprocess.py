"""Preprocessing throughput per core and peak memory of one scan job.

Throughput: ``hemocam.preprocess.preprocess_scan`` (brain mask, windows, cache, meta) over
already-ingested scans (hemocam.phantom.write_nifti_cohort: int16 HU NIfTI, the file contract
of R/nifti) in ONE process pinned to one thread (OMP/MKL/OpenBLAS threads = 1), so scans/s is
per core. Baseline in the same process: reading the same NIfTI files (nibabel, gunzip), the
floor any stage reading them pays.

Memory: one 512 x 512 x 64 scan (hemocam.phantom.make_scan) through ``preprocess_batch`` (what
the preprocess job calls) in a fresh process; its peak resident set against a process that
only imports hemocam.preprocess and reads the same NIfTI.

    python benchmarks/bench_preprocess.py --scans 8 --matrix 256          -> benchmarks/out/preprocess.json
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
TARGET_MB = 1024.0
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def preprocess_cfg():
    cfg = bl.shipped_config()
    return cfg["preprocess"]["windows"], int(cfg["preprocess"]["size"])


# ----------------------------------------------------------------------------- workers (subprocesses)
def worker_throughput(nifti_dir: Path, out_dir: Path, size: int) -> dict:
    from hemocam.io import load_nifti  # one thread: OMP/MKL/OpenBLAS_NUM_THREADS=1 in the environment
    from hemocam.preprocess import preprocess_scan

    windows, _ = preprocess_cfg()
    files = sorted(nifti_dir.glob("*.nii.gz"))
    preprocess_scan(files[0], out_dir / "warm_bm.nii.gz", out_dir / "warm.npy", out_dir / "warm.json", windows, size)
    res = {"scans": len(files), "size": size, "shape": None}
    t, c = time.perf_counter(), bl.cpu_now()
    for f in files:
        hu, _ = load_nifti(f)
        res["shape"] = list(hu.shape)
    res["read"] = {"wall_s": round(time.perf_counter() - t, 3), "cpu_s": round(bl.cpu_now() - c, 3)}
    t, c = time.perf_counter(), bl.cpu_now()
    for f in files:
        sid = f.name[:-7]
        preprocess_scan(f, out_dir / f"{sid}_bm.nii.gz", out_dir / f"{sid}.npy", out_dir / f"{sid}.json", windows, size)
    res["preprocess"] = {"wall_s": round(time.perf_counter() - t, 3), "cpu_s": round(bl.cpu_now() - c, 3)}
    return res


def worker_memory(mode: str, scan: Path, out_dir: Path, size: int) -> dict:
    if mode == "import":
        import hemocam.preprocess  # noqa: F401
        return {}
    from hemocam.io import load_nifti

    if mode == "read":
        import hemocam.preprocess  # noqa: F401
        hu, _ = load_nifti(scan)
        return {"shape": list(hu.shape)}
    from hemocam.preprocess import preprocess_batch

    # the job's layout: R/nifti/{id}.nii.gz -> R/brainmask, R/cache, manifest
    R = out_dir / "R"
    (R / "nifti").mkdir(parents=True, exist_ok=True)
    link = R / "nifti" / scan.name
    if not link.exists():
        os.symlink(scan, link)
    windows, _ = preprocess_cfg()
    df = preprocess_batch([scan.name[:-7]], R, windows, size, R / "manifest.tsv")
    if (df["status"] != "ok").any():
        raise RuntimeError(f"preprocess failed: {df.to_dict('records')}")
    return {"status": "ok"}


def big_scan(matrix: int, n_slices: int, seed: int = 7) -> Path:
    """A make_scan head CT as int16 NIfTI, generated once (cached)."""
    d = bl.cache_dir() / f"scan-m{matrix}-z{n_slices}-s{seed}"
    path = d / f"big{matrix}x{n_slices}.nii.gz"
    if not path.exists():
        import numpy as np

        from hemocam.io import save_nifti
        from hemocam.phantom import make_scan

        t = time.perf_counter()
        s = make_scan(seed, matrix=matrix, n_slices=n_slices)
        save_nifti(s["hu"], s["affine"], path, dtype=np.int16)
        print(f"  generated {path.name} in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def nifti_cohort(n: int, matrix: int, n_slices: int, seed: int = 3) -> Path:
    d = bl.cache_dir() / f"nifti-n{n}-m{matrix}-z{n_slices}-s{seed}"
    if not (d / "scans.tsv").exists():
        from hemocam.phantom import write_nifti_cohort

        tmp = d.with_name(d.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        t = time.perf_counter()
        write_nifti_cohort(tmp, n, matrix=matrix, n_slices=n_slices, seed=seed)
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        print(f"  generated {d.name} in {time.perf_counter() - t:.0f} s", flush=True)
    return d / "nifti"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=8)
    ap.add_argument("--matrix", type=int, default=256)
    ap.add_argument("--slices", type=int, default=32)
    ap.add_argument("--nifti-dir", default=None, help="ingested scans to use instead of a generated cohort")
    ap.add_argument("--size", type=int, default=None, help="cache size (default: config/config.yaml)")
    ap.add_argument("--big-matrix", type=int, default=512)
    ap.add_argument("--big-slices", type=int, default=64)
    ap.add_argument("--out", default=str(bl.DEFAULT_OUT))
    ap.add_argument("--_worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    size = a.size or preprocess_cfg()[1]
    if a._worker:
        kind, *rest = a._worker
        if kind == "throughput":
            res = worker_throughput(Path(rest[0]), Path(rest[1]), size)
        else:
            res = worker_memory(rest[0], Path(rest[1]), Path(rest[2]), size)
        print("RESULT " + json.dumps(res))
        return None

    load0 = bl.loadavg()
    work = Path(tempfile.mkdtemp(prefix="hemocam-pre-"))
    env = {**os.environ, **ONE_THREAD}
    nifti_dir = Path(a.nifti_dir) if a.nifti_dir else nifti_cohort(a.scans, a.matrix, a.slices)
    big = big_scan(a.big_matrix, a.big_slices)

    def run(*args, what, env=env):
        r = bl.check(bl.measure([sys.executable, __file__, "--size", str(size), "--_worker", *args], env=env), what)
        return json.loads(next(ln for ln in r["stdout"].splitlines() if ln.startswith("RESULT "))[7:]), bl.strip(r)

    (work / "tp").mkdir()
    tp, tp_proc = run("throughput", nifti_dir, work / "tp", what="throughput")
    n = tp["scans"]
    mem = {}
    for mode in ("import", "read", "preprocess"):
        _, proc = run("memory", mode, big, work / mode, what=f"memory {mode}")
        mem[mode] = proc
    shutil.rmtree(work, ignore_errors=True)

    pre, rd = tp["preprocess"], tp["read"]
    sps_wall = round(n / pre["wall_s"], 3)
    sps_cpu = round(n / pre["cpu_s"], 3)
    peak = mem["preprocess"]["max_rss_mb"]
    figures = [
        bl.figure(f"preprocess throughput, 1 core ({'x'.join(map(str, tp['shape']))} scans -> {size}px cache)",
                  sps_wall, "scans/s/core", note=f"{sps_cpu} scans per CPU-second; {round(pre['wall_s'] / n, 3)} s wall per scan"),
        bl.figure("preprocess / NIfTI read (same scans, same process)", bl.ratio(pre["wall_s"], rd["wall_s"]), "x wall",
                  baseline=f"read {round(n / rd['wall_s'], 2)} scans/s", note=f"CPU x{bl.ratio(pre['cpu_s'], rd['cpu_s'])}"),
        bl.figure(f"peak memory, preprocess job, one {a.big_matrix}x{a.big_matrix}x{a.big_slices} scan", peak, "MB",
                  f"<= {TARGET_MB:.0f} MB", peak <= TARGET_MB,
                  baseline=f"import only {mem['import']['max_rss_mb']} MB, import + read {mem['read']['max_rss_mb']} MB",
                  note=f"max RSS; anonymous (non file-backed) peak {mem['preprocess']['tree_anon_mb']} MB "
                       f"(import only {mem['import']['tree_anon_mb']} MB)"),
    ]
    record = {"size": size, "windows": preprocess_cfg()[0], "nifti_dir": str(nifti_dir), "threads": 1,
              "throughput": tp, "throughput_process": tp_proc, "big_scan": str(big), "memory": mem,
              "load_before": load0, "load_after": bl.loadavg(), "figures": figures}
    bl.print_figures("preprocessing", figures)
    path = bl.write_record("preprocess", record, a.out, argv)
    print(f"  -> {path}")
    return record


if __name__ == "__main__":
    main()
