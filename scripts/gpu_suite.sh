#!/usr/bin/env bash
# Everything the GPU has to say in one device call: the correctness grid, then the benchmark.
# Usage (on the device): bash scripts/gpu_suite.sh [quick|full]   (writes JSON/logs under $OUT)
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src:$PYTHONPATH PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ioattn-out}; mkdir -p "$OUT"
mode=${1:-quick}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1 | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
if [ "$mode" = quick ]; then
  python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" 2>&1 | tee "$OUT/check.log"
  python3 benchmarks/quick_bench.py --hdim 128 --seqlen 1024,4096,16384 --out "$OUT/quick.json" 2>&1 | tee "$OUT/bench.log"
else
  python3 benchmarks/gpu_check.py --out "$OUT/check.json" 2>&1 | tee "$OUT/check.log"
  python3 benchmarks/quick_bench.py --hdim 64,128,256 --seqlen 1024,4096,16384 --out "$OUT/quick.json" 2>&1 | tee "$OUT/bench.log"
fi
