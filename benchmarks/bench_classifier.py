#!/usr/bin/env python
"""Classifier training throughput: full pipeline vs bare model, and the loader alone.

    python benchmarks/bench_classifier.py --device cpu --size 96 --arch resnet18 --steps 6
    python benchmarks/bench_classifier.py --device cuda --size 256 --arch resnet34 --steps 30

- pipeline: memory-mapped cache -> ScanDataset/EpochSampler/DataLoader -> device -> augmentation
  -> ResNet-LSTM forward/backward -> AdamW step (AMP + channels_last on CUDA), i.e. one step of
  hemocam.train.fit with the classifier's loss;
- bare: the same model/optimizer step on a batch already on the device (the ceiling);
- loader: batches/s of the DataLoader alone for 0..N workers, reported per worker.
Prints the numbers and ratios and writes a JSON record (default benchmarks/out/classifier.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hemocam.classifier import (ScanDataset, batch_inputs, classifier_config, collate_scans, input_norm,
                                label_weights, weighted_bce)
from hemocam.io import write_json, write_tsv
from hemocam.labelset import LABELS
from hemocam.models.resnet_lstm import ResNetLSTM, versions
from hemocam.train import (EpochSampler, amp_dtype, autocast, available_cpus, make_loader, param_groups,
                           seed_everything, select_device, set_loader_epoch)

WINDOWS = [{"name": "brain", "center": 40, "width": 80}, {"name": "subdural", "center": 80, "width": 200},
           {"name": "soft", "center": 40, "width": 380}]


def make_cache(root: Path, n_scans: int, n_slices: int, size: int, seed: int = 0) -> list[str]:
    """Random uint8 caches + labels in the results layout (content does not change speed)."""
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(n_scans):
        sid = f"bench{i:03d}"
        z = n_slices + (i % 3) - 1  # different lengths: exercises padding
        np.save(root / "cache" / f"{sid}.npy", rng.integers(0, 256, (z, len(WINDOWS), size, size), dtype=np.uint8))
        meta = {"shape": [size, size, z], "size": size, "side": size, "windows": WINDOWS}
        (root / "cache" / f"{sid}.json").write_text(json.dumps(meta))
        lab = pd.DataFrame({"slice": np.arange(z), **{k: rng.integers(0, 2, z) for k in LABELS}})
        write_tsv(lab, root / "labels" / f"{sid}.tsv")
        ids.append(sid)
    return ids


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(step, n, warmup, device) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per measurement")
    ap.add_argument("--warmup", type=int, default=5,
                    help="untimed steps first (worker start-up, cudnn.benchmark tuning of the few batch shapes)")
    ap.add_argument("--batch-size", type=int, default=4, help="scans per step")
    ap.add_argument("--slices", type=int, default=28)
    ap.add_argument("--window", type=int, default=0)
    ap.add_argument("--lstm-hidden", type=int, default=64)
    ap.add_argument("--lstm-layers", type=int, default=1)
    ap.add_argument("--workers", type=int, default=None, help="loader workers for the pipeline (default: min(8, cpus-1))")
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time each pipeline step's wait for the loader and its compute apart (synchronised)")
    ap.add_argument("--profile", metavar="TXT", help="also write torch.profiler's table for a few pipeline steps")
    ap.add_argument("--out", default="benchmarks/out/classifier.json")
    args = ap.parse_args(argv)

    seed_everything(0, deterministic=False)
    device = select_device(args.device)
    dtype = amp_dtype(device, not args.no_amp)
    cpus = available_cpus()
    workers = args.workers if args.workers is not None else min(8, max(1, cpus - 1))
    c = classifier_config({})
    norm = input_norm(len(WINDOWS))
    steps = args.steps
    n_scans = max(args.batch_size * (steps + args.warmup + (5 if args.profile else 0)), 8)

    with tempfile.TemporaryDirectory(prefix="hemocam-bench-") as tmp:
        root = Path(tmp)
        (root / "cache").mkdir()
        (root / "labels").mkdir()
        ids = make_cache(root, n_scans, args.slices, args.size)
        ds = ScanDataset(root, ids, LABELS, window=args.window, train=True)
        slices_per_batch = args.batch_size * (args.window or args.slices)

        model = ResNetLSTM(args.arch, len(WINDOWS), len(LABELS), args.lstm_hidden, args.lstm_layers).to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(param_groups(model, 1e-4), lr=1e-4)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        lw = torch.tensor(label_weights(LABELS), dtype=torch.float32, device=device)
        model.train()

        def train_step(batch, aug=True):
            x = batch_inputs(batch, device, norm, c["augment"] if aug else None)
            y = batch["y"].to(device, non_blocking=True)
            with autocast(device, dtype):
                logits, auxl = model(x, batch["lengths"], return_aux=True)
                loss = weighted_bce(logits, y, batch["lengths"], lw, None) + 0.5 * weighted_bce(auxl, y, batch["lengths"], lw, None)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()

        # 1. full pipeline (fresh iterator per epoch like fit; enough scans for all steps)
        sampler = EpochSampler(len(ds), shuffle=True, seed=0)
        loader = make_loader(ds, args.batch_size, True, workers, 0, device, collate_fn=collate_scans, sampler=sampler)
        real_workers = loader.num_workers
        set_loader_epoch(loader, 1)
        it = iter(loader)
        pipe_s = timed_steps(lambda: train_step(next(it)), steps, args.warmup, device)
        del it, loader

        # 1b. where a pipeline step's time goes: waiting for the next batch vs the step itself
        breakdown = None
        if args.breakdown or args.profile:
            set_loader_epoch(loader := make_loader(ds, args.batch_size, True, workers, 0, device,
                                                   collate_fn=collate_scans, sampler=sampler), 2)
            it = iter(loader)
            for _ in range(args.warmup):
                train_step(next(it))
            sync(device)
            waits, computes = [], []
            for _ in range(steps):
                t0 = time.perf_counter()
                b = next(it)
                t1 = time.perf_counter()
                train_step(b)
                sync(device)
                waits.append(t1 - t0)
                computes.append(time.perf_counter() - t1)
            breakdown = {"wait_s_median": float(np.median(waits)), "wait_s_max": float(np.max(waits)),
                         "step_s_median": float(np.median(computes)), "step_s_max": float(np.max(computes)),
                         "wait_s": [round(w, 4) for w in waits], "step_s": [round(c, 4) for c in computes]}
            if args.profile:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if device.type == "cuda":
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                with torch.profiler.profile(activities=acts) as prof:
                    for _ in range(min(5, steps)):
                        train_step(next(it))
                    sync(device)
                key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
                Path(args.profile).parent.mkdir(parents=True, exist_ok=True)
                Path(args.profile).write_text(
                    prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30) + "\n\n"
                    + prof.key_averages().table(sort_by=key, row_limit=30) + "\n")
            del it, loader

        # 2. bare model on a batch already on the device
        batch = collate_scans([ds[(i, i)] for i in range(args.batch_size)])
        xb = batch_inputs(batch, device, norm).contiguous()
        dev_batch = {"x": None, "y": batch["y"].to(device), "lengths": batch["lengths"], "seeds": batch["seeds"]}

        def bare_step():
            with autocast(device, dtype):
                logits, auxl = model(xb, dev_batch["lengths"], return_aux=True)
                loss = weighted_bce(logits, dev_batch["y"], dev_batch["lengths"], lw, None) + 0.5 * weighted_bce(
                    auxl, dev_batch["y"], dev_batch["lengths"], lw, None)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()

        bare_s = timed_steps(bare_step, steps, args.warmup, device)

        # 3. augmentation alone (on the device)
        def aug_step():
            batch_inputs(batch, device, norm, c["augment"])

        aug_s = timed_steps(aug_step, steps, 1, device)

        # 4. loader alone, per worker count
        loader_rates = {}
        for w in sorted({0, 1, min(2, cpus), min(4, cpus), real_workers}):
            ld = make_loader(ds, args.batch_size, True, w, 0, device, collate_fn=collate_scans,
                             sampler=EpochSampler(len(ds), True, 0))
            w_real = ld.num_workers
            n_b = 0
            t0 = time.perf_counter()
            for epoch in range(2):
                set_loader_epoch(ld, epoch + 1)
                for b in ld:
                    if device.type == "cuda":
                        b["x"].to(device, non_blocking=True)
                    n_b += 1
            dt = time.perf_counter() - t0
            n_sl = sum(min(n, args.window or n) for n in ds.n_slices) * 2
            loader_rates[w_real] = {"slices_per_s": n_sl / dt, "slices_per_s_per_worker": n_sl / dt / max(1, w_real),
                                    "batches": n_b}
            del ld

    pipe = slices_per_batch * steps / pipe_s
    bare = slices_per_batch * steps / bare_s
    aug = slices_per_batch * steps / aug_s
    rec = {
        "benchmark": "classifier", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpus} cores: {platform.processor() or platform.machine()})",
        "amp": str(dtype).replace("torch.", "") if dtype else "off", "arch": args.arch, "size": args.size,
        "batch_scans": args.batch_size, "slices_per_scan": args.slices, "window": args.window,
        "slices_per_step": slices_per_batch, "steps": steps, "pipeline_workers": real_workers,
        "pipeline_slices_per_s": pipe, "bare_model_slices_per_s": bare, "pipeline_over_bare": pipe / bare,
        "augment_slices_per_s": aug, "loader": loader_rates, "versions": versions(),
        "torch_threads": torch.get_num_threads(), "breakdown": breakdown,
    }
    print(f"device            {rec['device']}  amp={rec['amp']}  {args.arch} {args.size}px  "
          f"{slices_per_batch} slices/step  workers={real_workers}")
    print(f"pipeline          {pipe:10.1f} slices/s  (loader + augmentation + model + optimizer)")
    print(f"bare model        {bare:10.1f} slices/s  (forward + backward + step on device tensors)")
    print(f"pipeline / bare   {pipe / bare:10.3f}")
    print(f"augmentation      {aug:10.1f} slices/s  (alone, on {device.type})")
    if breakdown:
        print(f"per step          wait for batch {1000 * breakdown['wait_s_median']:.1f} ms (max "
              f"{1000 * breakdown['wait_s_max']:.1f}), step {1000 * breakdown['step_s_median']:.1f} ms (max "
              f"{1000 * breakdown['step_s_max']:.1f}); bare step {1000 * bare_s / steps:.1f} ms")
    for w, r in loader_rates.items():
        print(f"loader {w:2d} workers {r['slices_per_s']:10.1f} slices/s  ({r['slices_per_s_per_worker']:.1f} per worker)")
    write_json(rec, args.out)
    print(f"wrote {args.out}")
    return rec


if __name__ == "__main__":
    main()
