"""Cluster execution: `snakemake --cores 8 --profile slurm` on a real single-node Slurm.

tests/slurm/start_slurm.sh starts Slurm (munge, MariaDB + slurmdbd, slurmctld, slurmd) with
one node, one fake GPU (type "fake") and two partitions. The demo workflow then runs from
the repository root through the shipped profile slurm/config.yaml (its cluster settings
given by the environment variables it reads) plus the test overlay tests/slurm/profile.
Slurm's own accounting records (sacct) must show every job Snakemake ran on the cluster,
GPU requests exactly for the GPU rules, and the outputs must equal a local run's.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = BIN / "snakemake"
SLURM_TESTS = REPO / "tests" / "slurm"
PROFILE = REPO / "slurm" / "config.yaml"
CONFIGS = [
    REPO / "config" / "presets" / "cpu-small.yaml",
    REPO / "tests" / "config" / "tiny.yaml",
    SLURM_TESTS / "config.yaml",
]
DAEMONS = ("munged", "slurmctld", "slurmd", "slurmdbd", "mariadbd", "sbatch", "sacct", "sacctmgr", "sinfo")
# What the shipped profile reads from the environment, set to the test cluster's names.
CLUSTER_ENV = {
    "HEMOCAM_SLURM_PARTITION": "hemocam",
    "HEMOCAM_SLURM_GPU_PARTITION": "hemocam-gpu",
    "HEMOCAM_SLURM_ACCOUNT": "hemocam",
    "HEMOCAM_SLURM_GPU_MODEL": "fake",
}
# Outputs that differ between any two runs: the planner caches record absolute input
# paths and file mtimes; the training-curve figures plot every history column, wall-clock
# seconds per epoch included (history.tsv itself is compared without that column).
RUN_SPECIFIC = (
    "ingest/index.tsv", "ingest/index.tsv.key", "ingest/plan.json", "ingest/plan/",
    "figures/training_",
)
JOB_HEADER = re.compile(r"^(?P<local>local)?(?:rule|checkpoint) (?P<rule>\w+):\s*$", re.M)
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+)")
SUBMITTED_AS = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+)")
JOB_BLOCK = re.compile(r"^(?:rule|checkpoint) \w+:\n((?:    .*\n)*)", re.M)
RUN_ID = re.compile(r"SLURM run ID: (\S+)")


def profile_settings(env):
    """The shipped profile as Snakemake parses it, under the given environment."""
    from snakemake.profiles import ProfileConfigFileParser

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("HEMOCAM_SLURM_")}
    os.environ.update(env)
    try:
        with open(PROFILE) as stream:
            return ProfileConfigFileParser().parse(stream)
    finally:
        for k in env:
            os.environ.pop(k, None)
        os.environ.update(saved)


def set_resources(settings):
    """{rule: {resource: value}} from parsed `set-resources` entries "rule:name=value"."""
    out = collections.defaultdict(dict)
    for item in settings.get("set-resources", []):
        rule, _, assignment = item.partition(":")
        name, _, value = assignment.partition("=")
        out[rule][name] = value
    return dict(out)


def workflow_rules(tmp_path):
    """The workflow's rules, parsed (not run): ({rules with a gpu resource}, {local rules})."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow = api.workflow(
            snakefile=REPO / "Snakefile",
            workdir=tmp_path,
            resource_settings=ResourceSettings(),
            config_settings=ConfigSettings(configfiles=CONFIGS),
        )
        wf = workflow._workflow  # the parsed workflow; the API has no public rule list
        gpu = {r.name for r in wf.rules if "gpu" in r.resources and r.resources["gpu"].value}
        # Rules without an action, and declared localrules, run on the submitting host.
        local = {r.name for r in wf.rules if r.norun or r.name in wf._localrules}
        return gpu, local


def test_profile_covers_every_gpu_rule(tmp_path):
    settings = profile_settings({})
    per_rule = set_resources(settings)
    profile_gpu = {rule for rule, res in per_rule.items() if res.get("gpu") == "1"}
    assert profile_gpu == workflow_rules(tmp_path)[0], "slurm/config.yaml GPU_RULES differ from the workflow's gpu rules"
    assert settings["executor"] == "slurm"
    # Nothing cluster-specific unless asked for: the cluster's default partition, a guessed account.
    flat = settings["default-resources"] + settings["set-resources"]
    assert not [x for x in flat if re.search(r"slurm_partition|slurm_account|gpu_model", x)]


def test_profile_cluster_settings_come_from_the_environment():
    settings = profile_settings(CLUSTER_ENV)
    assert "slurm_partition=hemocam" in settings["default-resources"]
    assert "slurm_account=hemocam" in settings["default-resources"]
    for rule, res in set_resources(settings).items():
        assert res == {"gpu": "1", "slurm_partition": "hemocam-gpu", "gpu_model": "fake"}, rule
    # The GPU partition falls back to the general one.
    only_partition = set_resources(profile_settings({"HEMOCAM_SLURM_PARTITION": "short"}))
    assert {res["slurm_partition"] for res in only_partition.values()} == {"short"}


# --------------------------------------------------------------------------------------------
# The real cluster


def _unavailable():
    if os.geteuid() != 0:
        return "starting a Slurm test cluster needs root"
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return f"Slurm binaries missing ({', '.join(missing)}): run tests/slurm/install_slurm.sh as root"
    return None


def _skip_or_fail(reason):
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the Slurm test: {reason}")
    pytest.skip(reason)


def _log_tails(state, n=30):
    out = []
    for log in sorted(Path(state).rglob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-n:]
        out.append(f"--- {log}\n" + "\n".join(lines))
    return "\n".join(out)


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = _unavailable()
    if reason:
        _skip_or_fail(reason)
    state = Path(tempfile.mkdtemp(prefix="hemocam-slurm-"))
    start, stop = SLURM_TESTS / "start_slurm.sh", SLURM_TESTS / "stop_slurm.sh"
    try:
        try:
            proc = subprocess.run([str(start), str(state)], capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"the Slurm test cluster did not start within 300 s: {exc.stdout}\n{_log_tails(state)}")
        if proc.returncode == 3:  # a real Slurm configuration is in place: leave it alone
            _skip_or_fail(proc.stderr.strip())
        if proc.returncode != 0:
            pytest.fail(f"the Slurm test cluster did not start:\n{proc.stdout}\n{proc.stderr}\n{_log_tails(state)}")
        print(proc.stdout, end="")
        yield state
    finally:
        subprocess.run([str(stop), str(state)], capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def _snakemake(args, workdir, env, log):
    cmd = [str(SNAKEMAKE), *args, "-d", str(workdir), "--configfile", *map(str, CONFIGS)]
    return cmd, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _wait(cmd, proc, log, timeout, workdir):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.seek(0)
    text = log.read()
    if proc.returncode != 0:
        # The reason a cluster job failed is in its Slurm log, not in Snakemake's.
        failed = set(re.findall(r"SLURM-job '(\d+)' failed", text))
        logs = [p for p in (workdir / ".snakemake" / "slurm_logs").rglob("*.log") if p.stem in failed]
        tails = "".join(f"\n--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-12:]) for p in logs)
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-15000:]}{tails}")
    return text


def _sacct(run_id, since):
    fields = "JobID,JobName,Comment,Partition,Account,State,ReqTRES,AllocTRES,Timelimit"
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", f"--name={run_id}", f"--starttime={since}", f"--format={fields}"],
        capture_output=True, text=True, check=True,
    ).stdout
    return pd.read_csv(io.StringIO(out), sep="|", names=fields.split(","), dtype=str, keep_default_na=False)


def _minutes(timelimit):
    """sacct's [D-]HH:MM:SS -> minutes."""
    days, _, hms = timelimit.rpartition("-")
    h, m, sec = map(int, hms.split(":"))
    return (int(days or 0) * 24 + h) * 60 + m + sec / 60


def _runtimes(text):
    """Slurm job id -> the runtime (minutes) Snakemake computed for the job it submitted."""
    by_job = {}
    for block in JOB_BLOCK.finditer(text):
        jobid, runtime = re.search(r"jobid: (\d+)", block[1]), re.search(r"\bruntime=(\d+)", block[1])
        if jobid and runtime:
            by_job[jobid[1]] = int(runtime[1])
    return {slurm_id: by_job[job] for job, slurm_id in SUBMITTED_AS.findall(text)}


def _rule_of(comment):
    """The plugin's job comment is rule_<rule> or rule_<rule>_wildcards_<values>."""
    assert comment.startswith("rule_"), comment
    return comment[len("rule_"):].split("_wildcards_")[0]


def _digest(path):
    data = path.read_bytes()
    if path.suffix == ".gz":  # the gzip header holds a time stamp: compare the content
        data = gzip.decompress(data)
    elif path.name == "history.tsv":  # drop the wall-clock column
        table = pd.read_csv(io.BytesIO(data), sep="\t", dtype=str, keep_default_na=False)
        data = table.drop(columns=["seconds"], errors="ignore").to_csv(sep="\t", index=False).encode()
    elif path.suffix == ".pt":
        return _tensors(path)
    return hashlib.sha256(data).hexdigest()


def _tensors(path):
    """Every tensor in a torch bundle/checkpoint (weights, optimizer state, RNG), by key path."""
    import torch

    found = {}

    def walk(obj, key):
        if isinstance(obj, torch.Tensor):
            found[key] = hashlib.sha256(obj.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{key}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{key}/{i}")

    walk(torch.load(path, map_location="cpu", weights_only=False), "")
    assert found, f"{path}: no tensors"
    return found


def _outputs(results):
    # per-scan stamps (results/<stage>/stamps/) hold the modification times of this run's files
    return {
        str(p.relative_to(results)): _digest(p)
        for p in sorted(results.rglob("*"))
        if p.is_file() and not str(p.relative_to(results)).startswith(RUN_SPECIFIC) and p.parent.name != "stamps"
    }


@pytest.mark.slurm
def test_demo_workflow_runs_on_slurm_through_the_shipped_profile(slurm_cluster, tmp_path, record_property):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "HEMOCAM_SLURM_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    since = (datetime.now() - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S")

    # The README's command from the repository root (`--profile slurm` resolves to ./slurm),
    # with the test overlay last; outputs go to a temporary workdir. The local reference
    # run goes on meanwhile: the cluster run mostly waits on Slurm.
    slurm_wd, local_wd = tmp_path / "slurm", tmp_path / "local"
    slurm_log, local_log = (tmp_path / "slurm.log").open("w+"), (tmp_path / "local.log").open("w+")
    t0 = time.monotonic()
    slurm_cmd, slurm_proc = _snakemake(
        ["--cores", "8", "--profile", "slurm", "--profile", "tests/slurm/profile"], slurm_wd,
        dict(env, **CLUSTER_ENV), slurm_log,
    )
    local_cmd, local_proc = _snakemake(["--cores", "2"], local_wd, env, local_log)
    try:
        local_text = _wait(local_cmd, local_proc, local_log, 1800, local_wd)
        t_local = time.monotonic() - t0
        slurm_text = _wait(slurm_cmd, slurm_proc, slurm_log, 1800, slurm_wd)
        t_slurm = time.monotonic() - t0
    finally:  # one run failed: do not leave the other one behind
        for proc in (local_proc, slurm_proc):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # Slurm's records: exactly the jobs the plugin submitted for this run, all completed.
    run_id = RUN_ID.search(slurm_text).group(1)
    submitted = set(SUBMITTED.findall(slurm_text))
    jobs = _sacct(run_id, since)
    assert set(jobs["JobID"]) == submitted, (sorted(jobs["JobID"]), sorted(submitted))
    assert set(jobs["State"]) == {"COMPLETED"}, jobs[["JobID", "Comment", "State"]].to_string()

    # One sbatch job per Snakemake cluster job, and the same jobs as the local run.
    jobs["rule"] = jobs["Comment"].map(_rule_of)
    remote = collections.Counter(m["rule"] for m in JOB_HEADER.finditer(slurm_text) if not m["local"])
    local_in_slurm_run = collections.Counter(m["rule"] for m in JOB_HEADER.finditer(slurm_text) if m["local"])
    assert collections.Counter(jobs["rule"]) == remote
    assert remote + local_in_slurm_run == collections.Counter(m["rule"] for m in JOB_HEADER.finditer(local_text))
    gpu_rules, local_rules = workflow_rules(tmp_path / "parse")
    assert set(local_in_slurm_run) <= local_rules, f"ran outside Slurm: {local_in_slurm_run}"

    # GPU requests exactly for the GPU rules, in the GPU partition, of the configured model;
    # everything charged to the configured account.
    assert gpu_rules <= set(jobs["rule"]), "the demo must exercise every GPU rule"
    for _, job in jobs.iterrows():
        what = f"job {job.JobID} ({job.Comment}): {job.Partition} {job.ReqTRES}"
        if job.rule in gpu_rules:
            assert job.Partition == "hemocam-gpu" and "gres/gpu:fake=1" in job.ReqTRES, what
        else:
            assert job.Partition == "hemocam" and "gres/gpu" not in job.ReqTRES, what
        assert job.Account == "hemocam", what

    # Each job's time limit is the runtime Snakemake computed for it (batch jobs: their rule's
    # minutes plus batching.seconds_per_scan per scan), so the plugin passed it on as sbatch -t.
    runtimes = _runtimes(slurm_text)
    assert set(runtimes) == submitted
    limits = {job.JobID: _minutes(job.Timelimit) for _, job in jobs.iterrows()}
    assert limits == runtimes, (limits, runtimes)

    # Same results as the local run: NIfTI voxels and headers, tables, model weights.
    slurm_out, local_out = _outputs(slurm_wd / "results"), _outputs(local_wd / "results")
    assert sorted(slurm_out) == sorted(local_out)
    differ = [k for k in local_out if slurm_out[k] != local_out[k]]
    assert not differ, f"outputs differ between the Slurm and the local run: {differ}"
    assert any(k.startswith("nifti/") for k in local_out) and any(k.endswith("model.pt") for k in local_out)

    n_gpu = int(jobs["rule"].isin(gpu_rules).sum())
    summary = (
        f"slurm: {len(jobs)} sbatch jobs ({n_gpu} GPU), wall {t_slurm:.0f} s; "
        f"local reference run alongside: {t_local:.0f} s"
    )
    print(summary)
    record_property("slurm_jobs", len(jobs))
    record_property("slurm_wall_s", round(t_slurm))
