"""Grad-CAM throughput vs a forward-only pass of the same ResNet-LSTM.

The CAM of every slice needs one forward with autograd from the hooked layer on, plus the
per-slice gradients through the LSTM; the target is a CAM rate of at least 0.4 x the inference
rate. Random weights and random inputs: speed does not depend on what the network learned.

    python benchmarks/bench_cam.py --device cuda --size 256 --arch resnet34 --slices 40
    -> benchmarks/out/cam.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hemocam import cam  # noqa: E402
from hemocam.models.resnet_lstm import ResNetLSTM  # noqa: E402
from hemocam.train import amp_dtype, autocast, select_device  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn, dev, repeats):
    out = []
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--slices", type=int, default=28)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--lstm-hidden", type=int, default=64)
    ap.add_argument("--lstm-layers", type=int, default=1)
    ap.add_argument("--method", default="gradcam", choices=cam.METHODS)
    ap.add_argument("--layer", default="layer4")
    ap.add_argument("--grad-mode", default="auto", choices=["auto", "batched", "loop"])
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "cam.json"))
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = select_device(a.device)
    torch.backends.cudnn.benchmark = dev.type == "cuda"
    torch.manual_seed(0)
    model = ResNetLSTM(a.arch, in_channels=a.channels, n_labels=6, lstm_hidden=a.lstm_hidden,
                       lstm_layers=a.lstm_layers).to(dev).eval()
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    x = torch.rand(1, a.slices, a.channels, a.size, a.size, device=dev)
    dtype = amp_dtype(dev, a.amp)

    @torch.no_grad()
    def forward():
        with autocast(dev, dtype):
            model(x)

    def cams():
        with autocast(dev, dtype):
            cam.slice_cams(model, x, a.layer, [0], a.method, out_size=a.size, grad_mode=a.grad_mode)

    forward(), cams()  # warm-up (cudnn autotuning, allocator)
    t_fwd = timeit(forward, dev, a.repeats)
    t_cam = timeit(cams, dev, a.repeats)
    res = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "arch": a.arch, "size": a.size, "slices": a.slices, "lstm_hidden": a.lstm_hidden, "lstm_layers": a.lstm_layers,
        "method": a.method, "layer": a.layer, "grad_mode": a.grad_mode, "amp": str(dtype) if dtype else "off",
        "forward_s_per_scan": round(t_fwd, 5), "cam_s_per_scan": round(t_cam, 5),
        "forward_slices_per_s": round(a.slices / t_fwd, 2), "cam_slices_per_s": round(a.slices / t_cam, 2),
        "ratio": round(t_fwd / t_cam, 3), "target_ratio": 0.4, "torch": str(torch.__version__),
    }
    res["meets_target"] = res["ratio"] >= res["target_ratio"]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
