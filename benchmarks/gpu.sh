#!/usr/bin/env bash
# GPU benchmarks (issue "Performance and scale", items 4-6) on a CUDA machine, ~5 minutes:
#   4. classifier training step: full input pipeline vs bare model (bench_classifier.py)
#   5. Grad-CAM vs forward-only throughput (bench_cam.py)
#   6. per-job fixed cost vs useful work of classify/cam/segment jobs (bench_overhead.py)
# all with AMP and channels_last at the shipped (production) model sizes, while nvidia-smi
# samples GPU utilisation and memory every 500 ms.
#
#     bash benchmarks/gpu.sh                 (from the repository root)
#     OUT=/some/dir PYTHON=python3 bash benchmarks/gpu.sh
#
# Needs python3 with torch, torchvision, numpy, scipy, scikit-image, pandas, nibabel, pydicom
# and tqdm (hemocam.train imports it); no Snakemake. JSON records and nvidia-smi.csv go to
# $OUT (default benchmarks/out); the summary is printed and written to $OUT/gpu_summary.md.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HEMOCAM_BENCH_CACHE=${HEMOCAM_BENCH_CACHE:-${TMPDIR:-/tmp}/hemocam-bench-cache}

T_START=$(date +%s)
echo "== preflight"
if ! "$PY" - <<'EOF'
import importlib, sys
missing = []
for m in ("torch", "torchvision", "numpy", "scipy", "skimage", "pandas", "nibabel", "pydicom", "tqdm", "hemocam"):
    try:
        importlib.import_module(m)
    except Exception as exc:
        missing.append(f"{m} ({type(exc).__name__}: {exc})")
if missing:
    print("missing python modules: " + "; ".join(missing))
    sys.exit(2)
import torch
if not torch.cuda.is_available():
    print("CUDA is not available to torch " + torch.__version__)
    sys.exit(2)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"bf16 {torch.cuda.is_bf16_supported()}, {torch.get_num_threads()} CPU threads")
EOF
then
    echo "preflight failed: nothing was run"
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,utilization.gpu,memory.used --format=csv

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 > "$OUT/nvidia-smi.csv" &
SMI=$!
trap 'kill $SMI 2>/dev/null' EXIT
: > "$OUT/gpu_phases.tsv"
FAILED=""

phase() {  # phase NAME TIMEOUT_S CMD...: run one benchmark, log its time span for the summary
    local name=$1 limit=$2
    shift 2
    echo
    echo "== $name (limit ${limit}s): $*"
    local t0 rc
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$t0" "$(date +%s.%N)" "$rc" >> "$OUT/gpu_phases.tsv"
    if [ "$rc" -ne 0 ]; then
        echo "!! $name exited with $rc"
        FAILED="$FAILED $name"
    fi
}

# 4. production classifier: resnet34, 256 px, 2x256 bi-LSTM, 4 scans x 32 slices per step
# (--breakdown: each step's wait for the loader and its compute, apart; --profile: torch.profiler table)
phase classifier 150 "$PY" benchmarks/bench_classifier.py --device cuda --size 256 --arch resnet34 \
    --lstm-hidden 256 --lstm-layers 2 --slices 32 --batch-size 4 --steps 30 --warmup 5 --workers 8 \
    --breakdown --profile "$OUT/classifier_profile.txt" --out "$OUT/classifier_cuda.json"
# 5. Grad-CAM at the same sizes
phase cam 60 "$PY" benchmarks/bench_cam.py --device cuda --size 256 --arch resnet34 --slices 32 \
    --lstm-hidden 256 --lstm-layers 2 --repeats 10 --out "$OUT/cam_cuda.json"
# 6. job overhead at 782 scans per job (25,000 scans / batching.gpu_jobs 32), 512x512x32 scans
phase overhead 150 "$PY" benchmarks/bench_overhead.py --device cuda --preset production --matrix 512 \
    --slices 32 --scans 3 --repeats 2 --no-snakemake --out "$OUT"

sleep 1
kill $SMI 2>/dev/null
wait $SMI 2>/dev/null
echo
"$PY" benchmarks/run_all.py --gpu-summary "$OUT"
echo "gpu.sh: $(( $(date +%s) - T_START )) s in all; records in $OUT"
if [ -n "$FAILED" ]; then
    echo "failed:$FAILED"
    exit 1
fi
