"""Grad-CAM peak memory against the number of slices: chunked head passes vs all copies at once.

The sequence path differentiates each slice's logit through the LSTM by running the head on
copies of the scan's features. ``cam.grad_chunk`` copies per pass keep memory at chunk x T; all T
copies in one pass (``--baseline``, what the code did before) need T x T. Each measurement runs
in a fresh process (peak RSS on the CPU, peak allocated memory on CUDA), at the GPU defaults'
LSTM (2 x 256, bidirectional) on small slices, so the LSTM's share dominates as it does in long
thin-slice scans.

    python benchmarks/bench_cam_memory.py --slices 64 128 256 -> a line per T, and the ratio
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(slices: int, chunk: int, size: int, device: str) -> dict:
    import torch

    from hemocam.cam import slice_cams
    from hemocam.models.resnet_lstm import ResNetLSTM
    from hemocam.train import select_device

    torch.manual_seed(0)
    dev = select_device(device)
    model = ResNetLSTM("resnet18", in_channels=3, n_labels=6, lstm_hidden=256, lstm_layers=2).to(dev).eval()
    x = torch.rand(1, slices, 3, size, size, device=dev)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_cuda = torch.cuda.memory_allocated(dev)
    t = time.perf_counter()
    slice_cams(model, x, "layer4", [0], out_size=size, chunk=chunk)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak_mb = (torch.cuda.max_memory_allocated(dev) - base_cuda) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {"slices": slices, "chunk": chunk, "peak_mb": round(peak_mb, 1), "seconds": round(time.perf_counter() - t, 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--chunk", type=int, default=32, help="cam.grad_chunk")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", type=int, nargs=2, help=argparse.SUPPRESS)  # child: slices, chunk
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "cam_memory.json"))
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(measure(a.one[0], a.one[1], a.size, a.device)))
        return 0

    def child(slices, chunk):
        cmd = [sys.executable, __file__, "--one", str(slices), str(chunk), "--size", str(a.size), "--device", a.device]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])

    rows = []
    for t in a.slices:
        new, old = child(t, a.chunk), child(t, t)
        rows.append({"slices": t, "chunked": new, "all_copies": old,
                     "memory_ratio": round(new["peak_mb"] / max(old["peak_mb"], 1e-9), 3)})
        print(f"T={t:4d}  chunk {a.chunk}: {new['peak_mb']:8.0f} MB {new['seconds']:6.1f} s   all {t} copies: "
              f"{old['peak_mb']:8.0f} MB {old['seconds']:6.1f} s   memory ratio {rows[-1]['memory_ratio']:.2f}x", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"device": a.device, "size": a.size, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
