"""Shared helpers of the benchmark scripts: process measurement, machine facts, JSON records.

Standard library only (the GPU machine has no psutil or snakemake): the process tree is read
from /proc.

Why both wall and CPU time: benchmarks run on shared machines. Wall time stretches with other
users' load; CPU time (user + system of the whole process tree, from ``wait4``) mostly does not.
Every speed figure is a ratio to a baseline measured in the same run, so both stretch alike.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "out")


# ----------------------------------------------------------------------------- machine
def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            info["gpus"] = [g.strip() for g in out.stdout.strip().splitlines()]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


# ----------------------------------------------------------------------------- process tree
def _proc_table() -> dict[int, int]:
    """pid -> ppid for every process readable in /proc."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # comm may hold spaces/parentheses: fields after the last ')'
        rest = stat[stat.rfind(b")") + 2:].split()
        if len(rest) > 1:
            out[int(d)] = int(rest[1])
    return out


def _tree(pid: int) -> list[int]:
    parent = _proc_table()
    kids: dict[int, list[int]] = {}
    for p, pp in parent.items():
        kids.setdefault(pp, []).append(p)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def _status_kb(pid: int, keys=("VmRSS", "RssAnon", "VmHWM")) -> dict:
    vals = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                k = line.split(":", 1)[0]
                if k in keys:
                    vals[k] = int(line.split()[1])
    except OSError:
        pass
    return vals


class TreeSampler(threading.Thread):
    """Samples the summed RSS and anonymous RSS of a process tree every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss_kb = self.peak_anon_kb = self.peak_hwm_kb = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            rss = anon = 0
            for p in _tree(self.pid):
                s = _status_kb(p)
                rss += s.get("VmRSS", 0)
                anon += s.get("RssAnon", 0)
                self.peak_hwm_kb = max(self.peak_hwm_kb, s.get("VmHWM", 0))
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self.peak_anon_kb = max(self.peak_anon_kb, anon)
            self.samples += 1
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join(timeout=5)


def measure(cmd, *, cwd=None, env=None, timeout: float | None = None, sample: float | None = 0.1,
            keep_output: int = 4000) -> dict:
    """Run ``cmd`` and return its wall time, CPU time and memory.

    ``max_rss_mb``: the largest resident set of any single process of the tree. ``wait4`` gives
    the child's peak or that of a descendant it waited for, but Linux carries the spawning
    process's own peak into it (exec keeps ``signal->maxrss``): when it does not exceed this
    process's peak, the sampled per-process high-water mark (VmHWM) is used instead.
    ``tree_rss_mb`` / ``tree_anon_mb``:
    the peak of the summed RSS / anonymous (non file-backed) RSS of the whole tree, sampled
    every ``sample`` seconds (short peaks between samples are missed).
    """
    own_hwm_kb = _status_kb(os.getpid()).get("VmHWM", 0)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        # same process group as this one: a `timeout` around the benchmark (gpu.sh) kills it too
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=out, stderr=err)
        sampler = TreeSampler(proc.pid, sample) if sample else None
        if sampler:
            sampler.start()
        timer = None
        timed_out = threading.Event()
        if timeout:
            def _kill():
                timed_out.set()
                for p in reversed(_tree(proc.pid)):
                    try:
                        os.kill(p, signal.SIGKILL)
                    except OSError:
                        pass
            timer = threading.Timer(timeout, _kill)
            timer.start()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if timer:
            timer.cancel()
        if sampler:
            sampler.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    res = {
        "cmd": " ".join(str(c) for c in cmd), "rc": proc.returncode, "timed_out": timed_out.is_set(),
        "wall_s": round(wall, 3), "cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
        "max_rss_mb": round(ru.ru_maxrss / 1024, 1), "max_rss_source": "wait4",
    }
    if sampler and ru.ru_maxrss <= own_hwm_kb:
        res["max_rss_mb"], res["max_rss_source"] = round(sampler.peak_hwm_kb / 1024, 1), "sampled VmHWM"
    if sampler:
        res["tree_rss_mb"] = round(sampler.peak_rss_kb / 1024, 1)
        res["tree_anon_mb"] = round(sampler.peak_anon_kb / 1024, 1)
    res["stdout"] = stdout
    res["stderr_tail"] = stderr[-keep_output:]
    return res


def check(res: dict, what: str) -> dict:
    if res["rc"] != 0 or res["timed_out"]:
        raise RuntimeError(f"{what} failed (exit {res['rc']}{', timed out' if res['timed_out'] else ''}): "
                           f"{res['cmd']}\n{res['stderr_tail'][-2000:]}\n{res['stdout'][-1500:]}")
    return res


def strip(res: dict) -> dict:
    """The record of a run without its (long) output."""
    return {k: v for k, v in res.items() if k not in ("stdout", "stderr_tail")}


def cpu_now() -> float:
    """CPU seconds of this process and its finished children so far."""
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b, nd=3):
    if a is None or b is None or b == 0 or (isinstance(b, float) and math.isnan(b)):
        return None
    return round(a / b, nd)


# ----------------------------------------------------------------------------- records
def figure(name, value, unit, target=None, met=None, baseline=None, note=""):
    """One reported number; ``target`` is text ('<= 60 s'), ``met`` True/False/None (no target)."""
    return {"name": name, "value": value, "unit": unit, "target": target, "met": met, "baseline": baseline,
            "note": note}


def write_record(name: str, record: dict, out_dir=None, argv=None) -> Path:
    out_dir = Path(out_dir or DEFAULT_OUT)
    out_dir.mkdir(parents=True, exist_ok=True)
    rec = {
        "benchmark": name,
        "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *(argv if argv is not None else sys.argv)]),
        "git": git_commit(),
        "machine": machine(),
        **record,
    }
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def print_figures(title: str, figures: list[dict]) -> None:
    print(f"\n== {title}")
    for f in figures:
        met = "" if f["met"] is None else ("  [met]" if f["met"] else "  [NOT met]")
        tgt = f"  (target {f['target']})" if f["target"] else ""
        print(f"  {f['name']}: {f['value']} {f['unit']}{tgt}{met}" + (f"  - {f['note']}" if f["note"] else ""))
    sys.stdout.flush()


def venv_bin(name: str) -> str:
    """An executable beside this interpreter (the venv's snakemake, dcm2niix), else on PATH."""
    cand = Path(sys.executable).with_name(name)
    if cand.exists():
        return str(cand)
    import shutil

    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} or on PATH")
    return found


def cache_dir() -> Path:
    """Persistent scratch for generated cohorts (reused across runs: generation is slow)."""
    d = Path(os.environ.get("HEMOCAM_BENCH_CACHE") or Path(tempfile.gettempdir()) / "hemocam-bench-cache")
    d.mkdir(parents=True, exist_ok=True)
    return d


def generated_cohort(n_scans: int, matrix: int, n_slices: int, seed: int, quirks: bool) -> Path:
    """An RSNA-layout DICOM cohort (hemocam.phantom.generate_cohort), generated once and cached."""
    d = cache_dir() / f"rsna-n{n_scans}-m{matrix}-z{n_slices}-s{seed}-q{int(bool(quirks))}"
    if not (d / "truth.tsv").exists():
        import shutil

        from hemocam.phantom import generate_cohort

        tmp = d.with_name(d.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        t = time.perf_counter()
        generate_cohort(tmp, n_scans=n_scans, matrix=matrix, n_slices=n_slices, seed=seed, quirks=quirks)
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        print(f"  generated {d.name} in {time.perf_counter() - t:.0f} s", flush=True)
    return d


def _scalar(v: str):
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _mini_yaml(text: str) -> dict:
    """Just enough YAML for config/config.yaml (two levels of mappings, inline lists, lists of
    inline mappings), for machines without PyYAML."""
    out: dict = {}
    section = key = None
    for raw in text.splitlines():
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        body = line.strip()
        if body.startswith("- "):
            item = body[2:].strip()
            if item.startswith("{"):
                item = {k.strip(): _scalar(v) for k, v in (kv.split(":", 1) for kv in item.strip("{}").split(","))}
            else:
                item = _scalar(item)
            out[section].setdefault(key, [])
            if not isinstance(out[section][key], list):
                out[section][key] = []
            out[section][key].append(item)
            continue
        k, _, v = body.partition(":")
        v = v.strip()
        val = [_scalar(x) for x in v.strip("[]").split(",") if x.strip()] if v.startswith("[") else (
            _scalar(v) if v else {})
        if indent == 0:
            section = k
            out[k] = val
        else:
            key = k
            out[section][k] = val
    return out


def _merge(a: dict, b: dict) -> dict:
    """``b`` over ``a``, nested sections key by key, as Snakemake merges ``--configfile``."""
    for k, v in b.items():
        a[k] = _merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return a


def shipped_config(preset: str | None = None, root: Path = ROOT) -> dict:
    """config/config.yaml, with a preset (e.g. config/presets/cpu-small.yaml) merged over it;
    ``root``: the checkout (or a finished run's working directory) they are read from."""
    paths = [Path(root) / "config" / "config.yaml"] + ([Path(root) / preset] if preset else [])
    try:
        import yaml

        load = yaml.safe_load
    except ImportError:  # the GPU machine may lack PyYAML
        load = _mini_yaml
    cfg: dict = {}
    for p in paths:
        _merge(cfg, load(Path(p).read_text()) or {})
    return cfg
