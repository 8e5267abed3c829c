"""Multi-GPU training (DDP through torchrun), run on the CPU: two gloo processes.

- the epoch sampler's shards: disjoint, equally long, together the whole epoch, seeds unchanged;
- the launch decision: in-process for one GPU, torchrun ranks when the rule's ``resources.gpu``
  is above one (the rule scripts read it);
- a real two-rank classifier training through the rule script and torchrun on a tiny cohort:
  both ranks take part, rank 0 alone writes the outputs, SIGTERM stops both ranks and exits 143,
  and a rerun resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

from conftest import REPO
from hemocam import distributed, runlog
from hemocam.io import read_tsv
from hemocam.labelset import LABELS
from hemocam.models.resnet_lstm import load_bundle
from hemocam.phantom.cohort import write_nifti_cohort
from hemocam.preprocess import preprocess_batch
from hemocam.train import EpochSampler

WINDOWS = [{"name": "brain", "center": 40, "width": 80}, {"name": "subdural", "center": 80, "width": 200},
           {"name": "soft", "center": 40, "width": 380}]
SCRIPTS = REPO / "workflow" / "scripts"


# ----------------------------------------------------------------------------- sampler shards
@pytest.mark.parametrize("n, num_samples, weighted", [(10, None, False), (7, None, False), (5, 13, True), (1, None, False)])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_sampler_shards_are_disjoint_equal_and_cover_the_epoch(n, num_samples, weighted, world):
    weights = np.linspace(1, 2, n) if weighted else None
    whole = EpochSampler(n, seed=3, weights=weights, num_samples=num_samples)
    whole.set_epoch(4)
    epoch = list(whole)  # (index, seed) by position in the epoch, as a single process sees it
    shards = []
    for r in range(world):
        s = EpochSampler(n, seed=3, weights=weights, num_samples=num_samples)
        s.set_shard(r, world)
        s.set_epoch(4)
        shards.append(list(s))
        assert len(shards[-1]) == len(s) == -(-len(epoch) // world)  # equal lengths: equal batch counts
    seeds = [seed for shard in shards for _, seed in shard]
    assert len(set(seeds)) == len(seeds)  # disjoint: no position is taken twice
    real = [item for shard in shards for item in shard if item in epoch]
    assert sorted(real) == sorted(epoch)  # together: exactly the epoch, same seeds per position
    assert len(seeds) - len(real) < world  # padding only up to a multiple of the world size
    s = EpochSampler(n, seed=3)
    with pytest.raises(ValueError):
        s.set_shard(world, world)


# ----------------------------------------------------------------------------- launch decision
def test_plan():
    assert distributed.plan(1, 8) == (1, "") and distributed.plan(0, 0) == (1, "")
    assert distributed.plan(None, 2) == (1, "")
    assert distributed.plan(4, 4) == (4, "nccl") and distributed.plan("4", 8) == (4, "nccl")
    assert distributed.plan(4, 2) == (2, "nccl")  # fewer visible than given: use those
    assert distributed.plan(2, 1) == (1, "") and distributed.plan(2, 0) == (1, "")
    assert distributed.plan(2, 0, cpu=True) == (2, "gloo")


def _fake_snakemake(script, tmp, gpu, threads=4):
    ns = types.SimpleNamespace
    out = {"bundle": str(tmp / "model.pt"), "history": str(tmp / "history.tsv")}
    params = {"config": {"seed": 1}, "results": str(tmp), "target": "pseudomask"}
    if script == "train_classifier.py":
        out["metrics"] = str(tmp / "metrics.tsv")
    else:
        params["members"] = 1
    return ns(input=ns(scans=str(tmp / "scans.tsv")), output=ns(**out), params=ns(**params),
              log=[str(tmp / "log.txt")], threads=threads, resources=ns(gpu=gpu, mem_mb=1000), config={})


@pytest.mark.parametrize("script, what", [("train_classifier.py", "classifier"), ("train_segmenter.py", "segmenter")])
def test_rule_scripts_use_torchrun_when_given_several_gpus(tmp_path, monkeypatch, script, what):
    calls = []
    monkeypatch.setattr(runlog, "start", lambda log, threads: None)
    monkeypatch.setattr(distributed, "launch", lambda *a, **k: calls.append(("launch", a)))
    monkeypatch.setattr(distributed, "_task", lambda w: lambda **kw: calls.append(("in-process", w, kw)))
    monkeypatch.delenv(distributed.CPU_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)

    def run(gpu):
        calls.clear()
        runpy.run_path(str(SCRIPTS / script), init_globals={"snakemake": _fake_snakemake(script, tmp_path, gpu)})
        assert len(calls) == 1
        return calls[0]

    kind, w, kwargs = run(1)
    assert (kind, w) == ("in-process", what) and kwargs["bundle_out"] == str(tmp_path / "model.pt")
    kind, (w, kwargs, nproc, backend, threads) = run(4)
    assert (kind, w, nproc, backend, threads) == ("launch", what, 4, "nccl", 4)
    assert kwargs["results_dir"] == str(tmp_path)
    monkeypatch.setenv(distributed.CPU_ENV, "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert run(2)[1][2:4] == (2, "gloo")


# ----------------------------------------------------------------------------- a real 2-rank run
DRIVER = """
import json, runpy, sys, types
a = json.loads(sys.argv[1])
ns = lambda d: types.SimpleNamespace(**d)
snakemake = types.SimpleNamespace(input=ns(a["input"]), output=ns(a["output"]), params=ns(a["params"]),
                                  log=[a["log"]], threads=a["threads"], resources=ns(a["resources"]), config={})
runpy.run_path(a["script"], init_globals={"snakemake": snakemake}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    r = tmp_path_factory.mktemp("R")
    scans = write_nifti_cohort(r, 8, matrix=32, n_slices=6, seed=3)
    preprocess_batch(list(scans["scan_id"]), r, WINDOWS, 32, r / "pre.tsv")
    return r, scans


def _start(r, out, epochs, gpus=2, slice_epochs=0):
    cfg = {"seed": 1, "preprocess": {"size": 32, "windows": WINDOWS},
           "classifier": {"arch": "resnet18", "labels": list(LABELS), "lstm_hidden": 8, "lstm_layers": 1,
                          "epochs": epochs, "batch_size": 1, "lr": 1e-3, "patience": 100, "num_workers": 0,
                          "window": 0, "tta": False, "aux_weight": 0.5, "slice_epochs": slice_epochs,
                          "slice_batch_size": 4}}
    return _run_script("train_classifier.py", r, out, {"config": cfg, "results": str(r)}, gpus)


def _run_script(script, r, out, params, gpus):
    """The rule script in a fresh interpreter, as Snakemake would run it, HEMOCAM_DDP_CPU set."""
    output = {"bundle": str(out / "model.pt"), "history": str(out / "history.tsv")}
    if script == "train_classifier.py":
        output["metrics"] = str(out / "metrics.tsv")
    args = {"script": str(SCRIPTS / script), "input": {"scans": str(r / "scans.tsv")}, "output": output,
            "params": params, "log": str(out / "train.log"), "threads": 2, "resources": {"gpu": gpus}}
    env = dict(os.environ, **{distributed.CPU_ENV: "1"})
    return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, out, timeout=240):
    try:
        text, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (out / "train.log").read_text() if (out / "train.log").exists() else ""
    return proc.returncode, log, text


def test_two_rank_gloo_training_interrupt_and_resume(cohort, tmp_path):
    r, scans = cohort
    out = tmp_path / "out"
    ckpt = r / "classifier" / "checkpoints" / "last.pt"
    n_train = int((scans["split"] == "train").sum())

    # 1. two ranks train one epoch of each stage (the model is wrapped in DDP twice); rank 0
    # alone writes the outputs
    t0 = time.time()
    rc, log, text = _finish(_start(r, out, epochs=1, slice_epochs=1), out)
    assert rc == 0, f"{text}\n{log}"
    first = time.time() - t0
    for k in (0, 1):
        assert f"classifier training: rank {k} of 2 on cpu (gloo" in log, log
    assert "DDP: 2 CPU/gloo processes" in log
    assert log.count(f"DDP: 2 ranks, {-(-n_train // 2)} batches per rank per epoch") == 1, log
    assert log.count("epoch 1/1 train_loss=") == 2 and log.count("classifier test weighted") == 1, log
    hist = read_tsv(out / "history.tsv")
    assert hist["stage"].tolist() == ["slices", "scans"] and hist["epoch"].tolist() == [1, 1]
    _, meta = load_bundle(out / "model.pt")
    assert meta["world_size"] == 2 and meta["best_epoch"] == 1
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    # 2. SIGTERM to the rule's process (what Slurm sends before a time limit): both ranks stop at
    # the same batch, the last complete checkpoint stays, the job exits 143
    proc = _start(r, out, epochs=500)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            if torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"] >= 1:
                break
        except (OSError, RuntimeError, EOFError, KeyError):
            pass
        time.sleep(0.2)
    assert proc.poll() is None, _finish(proc, out)
    proc.send_signal(signal.SIGTERM)
    rc, log, text = _finish(proc, out, timeout=120)
    assert rc == 143, f"{text}\n{log}"
    assert "[rank 0/2]" in log and "[rank 1/2]" in log
    for k in (0, 1):
        assert f"ERROR [rank {k}/2] interrupted by SIGTERM" in log, log
    stopped = torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"]
    assert 1 <= stopped < 500

    # 3. a rerun resumes after the last complete epoch and trains only what is missing
    rc, log, text = _finish(_start(r, out, epochs=stopped + 1), out)
    assert rc == 0, f"{text}\n{log}"
    assert f"resuming from {ckpt} after epoch {stopped}" in log
    assert log.count(f"epoch {stopped + 1}/{stopped + 1} train_loss=") == 1
    assert "epoch 1/" not in log
    hist = read_tsv(out / "history.tsv")
    assert hist["epoch"].tolist() == list(range(1, stopped + 2))
    print(f"first 2-rank run {first:.1f} s")


def test_two_rank_gloo_segmenter_training(cohort, tmp_path):
    r, _ = cohort
    out = tmp_path / "segmenter_gt"
    seg = {"encoder": "plain", "base_channels": 4, "context_slices": 1, "epochs": 2, "batch_size": 2,
           "lr": 1e-3, "patience": 5, "num_workers": 0, "samples_per_epoch": 10, "augment": True}
    # a self-training round's ensemble of two: every rank trains each member in turn
    params = {"config": {"seed": 2, "segmenter": seg}, "results": str(r), "target": "groundtruth", "members": 2}
    rc, log, text = _finish(_run_script("train_segmenter.py", r, out, params, gpus=2), out)
    assert rc == 0, f"{text}\n{log}"
    for k in (0, 1):
        assert f"segmenter training: rank {k} of 2 on cpu (gloo" in log, log
    assert log.count("DDP: 2 ranks, 2 batches per rank per epoch") == 2, log  # 10 draws: 5 per rank, per member
    hist = read_tsv(out / "history.tsv")
    assert hist["epoch"].tolist() == [1, 2, 1, 2] and hist["stage"].tolist() == ["member 1"] * 2 + ["member 2"] * 2
    bundle = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert bundle["world_size"] == 2 and bundle["kind"] == "unet_ensemble"
    assert [m["seed"] for m in bundle["members"]] == [2, 3]
    for ck in (out / "checkpoints" / "last.pt", out / "checkpoints" / "member1" / "last.pt"):
        assert torch.load(ck, map_location="cpu", weights_only=False)["epoch"] == 2
