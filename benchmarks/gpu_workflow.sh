#!/usr/bin/env bash
# The whole workflow at config/config.yaml's sizes (the GPU defaults: ResNet-34 at 256 px, a
# ResNet-18 U-Net) on the 40-scan demo cohort, on a CUDA machine: every rule through `evaluate`
# and the figures, then a second call that must find nothing to do. Prints the wall time of each
# rule (from the rules' benchmark files) and the test split's quality figures.
#
#     bash benchmarks/gpu_workflow.sh                      (from the repository root)
#     SNAKEMAKE="python3 -m snakemake" CORES=16 DIR=/tmp/run OUT=/some/dir bash benchmarks/gpu_workflow.sh
#
# The run lives in $DIR (default /tmp/hemocam-gpu-demo; `snakemake -d`); $OUT (default
# benchmarks/out) gets the log and gpu_workflow.tar.gz (tables, logs and benchmark files; no images).
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-benchmarks/out}
DIR=${DIR:-/tmp/hemocam-gpu-demo}
CORES=${CORES:-all}
LIMIT=${LIMIT:-900}
read -r -a SM <<<"${SNAKEMAKE:-snakemake}"
mkdir -p "$OUT" "$DIR"
OUT=$(cd "$OUT" && pwd)

pack() {
    (cd "$DIR" && tar czf "$OUT/gpu_workflow.tar.gz" --exclude='*.nii.gz' --exclude='*.npy' \
        --exclude='*.pt' --exclude='*.png' --exclude='resources' results logs 2>/dev/null)
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 1000 >"$OUT/nvidia-smi.csv" 2>/dev/null &
SMI=$!
trap 'kill $SMI 2>/dev/null' EXIT

t0=$(date +%s)
timeout --kill-after=10 "$LIMIT" "${SM[@]}" -s "$REPO/Snakefile" -d "$DIR" \
    --configfile "$REPO/config/config.yaml" --cores "$CORES" >"$OUT/workflow.log" 2>&1
rc=$?
t1=$(date +%s)
grep -E "Error in rule|Exception|Traceback" "$OUT/workflow.log" | head -n 20
echo "workflow: rc $rc, $((t1 - t0)) s wall, $(grep -E ' steps \(' "$OUT/workflow.log" | tail -n 1)"
pack
if [ "$rc" -eq 0 ]; then
    # a second call with nothing changed must do nothing
    "${SM[@]}" -s "$REPO/Snakefile" -d "$DIR" --configfile "$REPO/config/config.yaml" --cores "$CORES" -n \
        >"$OUT/second_call.log" 2>&1
    echo "second call: $(grep -cE '^(rule|localrule|checkpoint) ' "$OUT/second_call.log") jobs planned;" \
        "$(grep -c 'Nothing to be done' "$OUT/second_call.log") 'Nothing to be done'"
fi
kill $SMI 2>/dev/null

PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" python3 - "$DIR" <<'EOF'
import sys
from pathlib import Path
import pandas as pd
d = Path(sys.argv[1])
rows = []
for f in sorted((d / "logs" / "benchmarks").rglob("*.tsv")):
    b = pd.read_csv(f, sep="\t")
    rule = f.relative_to(d / "logs" / "benchmarks").parts[0].removesuffix(".tsv")
    rows.append((rule, float(b.s.iloc[-1]), float(b.max_rss.iloc[-1]) if "max_rss" in b else float("nan")))
if rows:
    t = pd.DataFrame(rows, columns=["rule", "s", "max_rss_mb"]).groupby("rule").agg(
        jobs=("s", "size"), s_sum=("s", "sum"), s_max=("s", "max"), max_rss_mb=("max_rss_mb", "max"))
    print(t.round(1).to_string())
m = d / "results" / "classifier" / "metrics.tsv"
if m.exists():
    c = pd.read_csv(m, sep="\t")
    print(c[c.label == "any"].to_string(index=False))
s = d / "results" / "metrics" / "summary.tsv"
if s.exists():
    print(pd.read_csv(s, sep="\t").to_string(index=False))
EOF
exit "$rc"
