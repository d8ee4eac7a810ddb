#!/usr/bin/env bash
# Everything the GPU has to say, in as few device calls as possible. Writes JSON/logs under $OUT.
# Usage (on the device):
#   bash scripts/gpu_suite.sh check     correctness grid + feature costs + decode benchmark (~6 min)
#   bash scripts/gpu_suite.sh bench     the full benchmark against the peers (~5 min)
#   bash scripts/gpu_suite.sh quick     quick grid + quick side-by-side timing
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src:$PYTHONPATH PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ioattn-out}; mkdir -p "$OUT"
mode=${1:-quick}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1 | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
case "$mode" in
  quick)
    python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" 2>&1 | tee "$OUT/check.log"
    python3 benchmarks/quick_bench.py --hdim 128 --seqlen 1024,4096,16384 --out "$OUT/quick.json" 2>&1 | tee "$OUT/bench.log" ;;
  check)
    python3 benchmarks/bench_features.py --out "$OUT/features.json" > "$OUT/features.log" 2>&1
    python3 benchmarks/bench_decode.py --out "$OUT/decode.json" > "$OUT/decode.log" 2>&1
    python3 benchmarks/gpu_check.py --out "$OUT/check.json" > "$OUT/check.log" 2>&1
    tail -n 12 "$OUT/features.log"; tail -n 25 "$OUT/decode.log"; grep -E "FAIL|passed|compiled" "$OUT/check.log" ;;
  exp)  # session 2 experiments: dropout generator variants, the portable (sm_80) tile table
    timeout 150 python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" > "$OUT/check.log" 2>&1
    grep -E "FAIL|passed|compiled" "$OUT/check.log"
    timeout 230 python3 benchmarks/dropout_variants.py --out "$OUT/dropout.json" 2>&1 | tee "$OUT/dropout.log" | grep -v "^ \|^Traceback\|^triton\|^The above\|^$"
    IOATTN_PORTABLE=1 timeout 120 python3 benchmarks/gpu_check.py --quick --out "$OUT/check_portable.json" > "$OUT/check_portable.log" 2>&1
    grep -E "FAIL|passed|compiled" "$OUT/check_portable.log"
    timeout 120 python3 benchmarks/bench_features.py --out "$OUT/features.json" > "$OUT/features.log" 2>&1
    tail -n 12 "$OUT/features.log" ;;
  final1)  # host overhead per call, then the full benchmark (session 2 final numbers)
    timeout 60 python3 benchmarks/host_overhead.py --json "$OUT/host_overhead.json" 2>&1 | tail -n 25
    timeout 60 python3 benchmarks/host_overhead.py --batch 32 --seqlen 512 --nheads 16 --hdim 128 --json "$OUT/host_overhead_512.json" 2>&1 | tail -n 12
    mkdir -p /tmp/bench
    timeout 440 python3 benchmarks/bench_attention.py --out /tmp/bench/h100.json 2>&1 | tail -n 120
    tar -cf "$OUT/bench.tar" -C /tmp/bench . ;;  # one file: the device returns few files
  final2)  # correctness grid, feature costs (with SDPA flash's dropout), decode, the demo
    timeout 300 python3 benchmarks/gpu_check.py --out "$OUT/check.json" > "$OUT/check.log" 2>&1
    grep -E "FAIL|passed|compiled" "$OUT/check.log"
    timeout 150 python3 benchmarks/bench_features.py --out "$OUT/features.json" > "$OUT/features.log" 2>&1
    tail -n 16 "$OUT/features.log"
    timeout 30 python3 -m ioattn demo 2>&1 | tail -n 15
    timeout 100 python3 benchmarks/bench_decode.py --out "$OUT/decode.json" > "$OUT/decode.log" 2>&1
    tail -n 25 "$OUT/decode.log" ;;
  # final3 (the A/B in results/h100-ab) ran at commit 63e5b2e with knobs removed since:
  # IOATTN_SPECIALIZE=1 quick_bench (specialized backward) and IOATTN_DROPOUT_COMPARE=float|int
  # dropout_variants --variants 8x7. Check out that commit to rerun it.
  final4)  # feature costs and the quick grid after the session-2 kernel changes
    timeout 150 python3 benchmarks/bench_features.py --out "$OUT/features.json" > "$OUT/features.log" 2>&1
    tail -n 16 "$OUT/features.log"
    timeout 200 python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" > "$OUT/check.log" 2>&1
    grep -E "FAIL|passed|compiled" "$OUT/check.log" ;;
  fp16)  # the benchmark in fp16 against SDPA flash and cuDNN (FlexAttention's compiles skipped)
    mkdir -p /tmp/bench16
    timeout 400 python3 benchmarks/bench_attention.py --dtype fp16 --providers ioattn,sdpa_flash,sdpa_cudnn --no-memory --out /tmp/bench16/h100-fp16.json 2>&1 | tail -n 70
    tar -cf "$OUT/bench_fp16.tar" -C /tmp/bench16 . ;;
  final5)  # A/B: forward K/V loads through the TMA (default on sm_90, hdim <= 128) or pointers
    IOATTN_TMA=0 timeout 150 python3 benchmarks/quick_bench.py --hdim 64,128 --seqlen 1024,4096,16384 --out "$OUT/quick_pointers.json" 2>&1 | grep -E "fwd|regs" | tail -n 14
    timeout 150 python3 benchmarks/quick_bench.py --hdim 64,128 --seqlen 1024,4096,16384 --out "$OUT/quick_tma.json" 2>&1 | grep -E "fwd|regs" | tail -n 14
    timeout 200 python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" > "$OUT/check.log" 2>&1
    grep -E "FAIL|passed|compiled" "$OUT/check.log"
    timeout 60 python3 -m pytest tests/test_tma.py -q 2>&1 | tail -n 3 ;;
  final6)  # the TMA path as shipped (bf16/fp16, hdim padded to 128): grid, its tests, timing
    timeout 200 python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" > "$OUT/check.log" 2>&1
    grep -E "FAIL|passed|compiled|Error" "$OUT/check.log" | tail -n 5
    timeout 90 python3 -m pytest tests/test_tma.py tests/test_flash_attn.py -q -x 2>&1 | tail -n 3
    timeout 100 python3 benchmarks/quick_bench.py --hdim 128 --seqlen 4096,16384 --out "$OUT/quick_tma.json" 2>&1 | grep -E "fwd|bwd" | tail -n 8 ;;
  # s3a (session 3, results/h100-session3a): dQ by TMA reductions and the early-drawn dropout mask,
  # knobs since removed; check out commit 8094458 to rerun it.
  s3b)  # dropout generator grouped by the accumulator layout; dK/dV with queries as rows (QROWS)
    timeout 200 python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" > "$OUT/check.log" 2>&1
    grep -E "FAIL|passed|compiled|Error" "$OUT/check.log" | tail -n 6
    timeout 150 python3 benchmarks/dropout_variants.py --rounds 7 --out "$OUT/dropout.json" 2>&1 | grep -E "rounds|failed" | head -n 8
    timeout 200 python3 benchmarks/sweep_configs.py --plan round4 --out "$OUT/sweep4.json" 2>&1 | grep -E "^bwd|TFLOP|sdpa" | cut -c1-150 | tail -n 30 ;;
  s3c)  # the dK/dV tiles under dropout; correctness grid and feature costs with the session-3 defaults
    timeout 200 python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" > "$OUT/check.log" 2>&1
    grep -E "FAIL|passed|compiled|Error" "$OUT/check.log" | tail -n 6
    timeout 200 python3 benchmarks/sweep_configs.py --plan round5 --hdim 64,128 --out "$OUT/sweep5.json" 2>&1 | grep -E "^bwd" | cut -c1-140 | tail -n 24
    timeout 150 python3 benchmarks/bench_features.py --out "$OUT/features.json" > "$OUT/features.log" 2>&1
    tail -n 16 "$OUT/features.log" ;;
  s3d|s4j)  # the full benchmark (README table): s3d in session 3, s4j in session 4
    mkdir -p /tmp/bench
    timeout 560 python3 benchmarks/bench_attention.py --out /tmp/bench/h100.json 2>&1 | tail -n 60
    tar -cf "$OUT/bench.tar" -C /tmp/bench . ;;
  s3e)  # grid with the final dropout tiles, multi-GPU tests (single-GPU parts), the transformers
        # tests on the GPU (gpu_deps/hf.tgz: this machine's transformers and its deps, carried:
        # the device has no network), dropout cost
    python3 --version
    timeout 200 python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" > "$OUT/check.log" 2>&1
    grep -E "FAIL|passed|compiled|Error" "$OUT/check.log" | tail -n 6
    timeout 100 python3 -m pytest tests/test_multi_gpu.py -q 2>&1 | tail -n 3
    if [ -f gpu_deps/hf.tgz ]; then
      mkdir -p /tmp/hf && tar -xzf gpu_deps/hf.tgz -C /tmp/hf
      PYTHONPATH=$PYTHONPATH:/tmp/hf timeout 200 python3 -m pytest tests/test_transformers.py -q -x -p no:cacheprovider 2>&1 | tail -n 8 | cut -c1-300
    fi
    timeout 150 python3 benchmarks/dropout_variants.py --rounds 7 --out "$OUT/dropout.json" 2>&1 | grep -E "rounds|failed" | head -n 8 ;;
  s3f)  # the multi-GPU tests on one GPU, the transformers tests on the GPU (carried deps, a
        # stand-in `regex` module: the carried cp311 binary does not load on the device's 3.12)
    timeout 100 python3 -m pytest tests/test_multi_gpu.py -q 2>&1 | tail -n 3
    mkdir -p /tmp/hf && tar -xzf gpu_deps/hf.tgz -C /tmp/hf
    PYTHONPATH=$PYTHONPATH:/tmp/hf timeout 300 python3 -m pytest tests/test_transformers.py -q -p no:cacheprovider 2>&1 | tail -n 12 | cut -c1-300 ;;
  s3g)  # hdim 256 backward tiles around the session-3 default
    timeout 300 python3 benchmarks/sweep_configs.py --plan round6 --hdim 256 --out "$OUT/sweep6.json" 2>&1 | grep -E "^bwd" | cut -c1-150 | tail -n 14 ;;
  s3h)  # hdim 256: the round-6 winners together; quick grid with the new hdim-256 dQ tiles
    timeout 200 python3 benchmarks/sweep_configs.py --plan round7 --hdim 256 --out "$OUT/sweep7.json" 2>&1 | grep -E "^bwd" | cut -c1-150 | tail -n 6
    timeout 250 python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" > "$OUT/check.log" 2>&1
    grep -E "FAIL|passed|compiled|Error" "$OUT/check.log" | tail -n 6 ;;
  s3i)  # final defaults: quick grid, side-by-side at hdim 256 and 128
    timeout 250 python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" > "$OUT/check.log" 2>&1
    grep -E "FAIL|passed|compiled|Error" "$OUT/check.log" | tail -n 6
    timeout 250 python3 benchmarks/quick_bench.py --hdim 256,128 --seqlen 1024,4096,16384 --out "$OUT/quick.json" 2>&1 | grep -E "bwd|fwd" | tail -n 24 ;;
  s3j)  # dQ tiles under dropout
    timeout 300 python3 benchmarks/sweep_configs.py --plan round8 --hdim 64,128 --out "$OUT/sweep8.json" 2>&1 | grep -E "^bwd" | cut -c1-150 | tail -n 18 ;;
  s3k)  # packed dropout select (masks.drop_packed) vs the per-element select, grid with it
    timeout 200 python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" > "$OUT/check.log" 2>&1
    grep -E "FAIL|passed|compiled|Error" "$OUT/check.log" | tail -n 6
    timeout 100 python3 -m pytest tests/test_features.py -q -x -k "dropout" 2>&1 | tail -n 2
    timeout 120 python3 benchmarks/dropout_variants.py --rounds 7 --out "$OUT/dropout_packed.json" 2>&1 | grep -E "rounds|failed" | head -n 8
    IOATTN_PACKED_DROPOUT=0 timeout 120 python3 benchmarks/dropout_variants.py --rounds 7 --out "$OUT/dropout_select.json" 2>&1 | grep -E "rounds|failed" | head -n 8 ;;
  s4a)  # generator words as 2x2 blocks: grid, dropout tests, dK/dV orientation under dropout, costs
    timeout 200 python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" > "$OUT/check.log" 2>&1
    grep -E "FAIL|passed|compiled|Error" "$OUT/check.log" | tail -n 6
    timeout 100 python3 -m pytest tests/test_features.py -q -x -k "dropout" 2>&1 | tail -n 2
    timeout 300 python3 benchmarks/sweep_configs.py --plan round9 --hdim 64,128 --out "$OUT/sweep9.json" 2>&1 | grep -E "^bwd" | cut -c1-150 | tail -n 20
    timeout 120 python3 benchmarks/dropout_variants.py --rounds 7 --out "$OUT/dropout.json" 2>&1 | grep -E "rounds|failed" | head -n 8 ;;
  s4b|s4c)  # s4c: the same after folding 1/(1-p) into lse, delta. s4b: the new defaults (keys-as-rows dK/dV under dropout at hdim 128): grid, dropout costs, features
    timeout 200 python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" > "$OUT/check.log" 2>&1
    grep -E "FAIL|passed|compiled|Error" "$OUT/check.log" | tail -n 6
    timeout 100 python3 -m pytest tests/test_features.py -q -x -k "dropout" 2>&1 | tail -n 2
    timeout 120 python3 benchmarks/dropout_variants.py --rounds 7 --out "$OUT/dropout.json" 2>&1 | grep -E "rounds|failed" | head -n 8
    timeout 150 python3 benchmarks/bench_features.py --out "$OUT/features.json" > "$OUT/features.log" 2>&1
    tail -n 12 "$OUT/features.log" ;;
  s4d)  # forward tiles at 512 and 1k tokens (sweep round 10), hdim 128
    for n in 512 1024; do
      IOATTN_SWEEP_SEQLEN=$n timeout 280 python3 benchmarks/sweep_configs.py --plan round10 --hdim 128 --out "$OUT/sweep10_$n.json" 2>&1 | grep -E "^fwd d" | cut -c1-110
    done ;;
  s4e|s4f)  # forward tiles (sweep round 11), hdim 64 and 128: s4e 512..4k, s4f 8k, 16k
    ns="512 1024 2048 4096"; [ "$mode" = s4f ] && ns="8192 16384"
    for n in $ns; do
      IOATTN_SWEEP_SEQLEN=$n timeout 140 python3 benchmarks/sweep_configs.py --plan round11 --hdim 64,128 --out "$OUT/sweep11_$n.json" 2>&1 | grep -E "^fwd d=[0-9]+ causal=[TF][a-z]+:"
    done ;;
  s4g)  # hdim 128 forward on 64x64 tiles up to 8k keys: grid, side by side with the peers
    timeout 200 python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" > "$OUT/check.log" 2>&1
    grep -E "FAIL|passed|compiled|Error" "$OUT/check.log" | tail -n 6
    timeout 200 python3 benchmarks/quick_bench.py --hdim 128 --seqlen 512,1024,2048,4096,8192,16384 --out "$OUT/quick.json" 2>&1 | grep -E "fwd" | head -n 40 ;;
  s4h)  # A/B in one call: short-sequence forward tiles on/off (IOATTN_SHORT_FORWARD_SEQLEN=0), twice
    for rep in 1 2; do for v in 8192 0; do
      echo "== short-forward limit $v (round $rep)"
      IOATTN_SHORT_FORWARD_SEQLEN=$v timeout 100 python3 benchmarks/quick_bench.py --hdim 128 --seqlen 512,1024,4096,8192 --providers ioattn,sdpa_cudnn --out "$OUT/quick_${v}_$rep.json" 2>&1 | grep -E " fwd " | head -n 8
    done; done ;;
  s4i)  # backward tiles at 512, 1k, 2k (sweep round 12), hdim 128
    for n in 512 1024 2048; do
      IOATTN_SWEEP_SEQLEN=$n timeout 170 python3 benchmarks/sweep_configs.py --plan round12 --hdim 128 --out "$OUT/sweep12_$n.json" > /dev/null 2>&1
      python3 -c "import json; [print($n, r['causal'], r['dkdv'], r['dq'], round(r['tflops'], 1), (r['error'] or '')[:60]) for r in json.load(open('$OUT/sweep12_$n.json'))['rows']]"
    done ;;
  s4k)  # two CTAs per SM for the short-sequence forward? fresh, after other kernels, carveout hint
    timeout 200 python3 benchmarks/carveout_check.py --out "$OUT/carveout.json" 2>&1 | grep -v "^carveout set: 0" | tail -n 25 ;;
  s5a)  # session 5 (H200): GPU tests of the differentiable lse and paged varlen, their costs,
        # the quick side-by-side at hdim 128 on this GPU
    timeout 90 python3 -m pytest tests/test_lse_grad.py tests/test_paged_varlen.py -q -x -p no:cacheprovider 2>&1 | tail -n 4
    timeout 45 python3 benchmarks/bench_paged.py --out "$OUT/paged.json" 2>&1 | tail -n 8
    timeout 80 python3 benchmarks/quick_bench.py --hdim 128 --seqlen 4096,16384 --out "$OUT/quick.json" 2>&1 | tail -n 10 ;;
  s6a)  # session 6: the Gluon Hopper forward (correctness vs fp32, then timing vs Triton / cuDNN / FA2),
        # the paged forward after the page-index prefetch
    timeout 300 python3 benchmarks/gluon_check.py --out "$OUT/gluon.json" 2>&1 | tee "$OUT/gluon.log" | grep -v "^PASS"
    timeout 60 python3 benchmarks/bench_paged.py --out "$OUT/paged.json" 2>&1 | tail -n 8 ;;
  s6b)  # session 6: the Gluon forward dispatched; its check + A/B (hdim 256, 3 stages), then the
        # quick correctness grid (forward and backward through the public API)
    timeout 330 python3 benchmarks/gluon_check.py --out "$OUT/gluon.json" 2>&1 | tee "$OUT/gluon.log" | grep -v "^PASS"
    timeout 220 python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" > "$OUT/check.log" 2>&1
    grep -E "FAIL|passed|compiled|Error" "$OUT/check.log" | tail -n 8 ;;
  s6c)  # session 6: the Gluon backward (check through the public API vs fp32 + Triton path, timing),
        # then the side-by-side quick benchmark with both Gluon kernels dispatched
    timeout 200 python3 benchmarks/gluon_bwd_check.py --out "$OUT/gluon_bwd.json" 2>&1 | tee "$OUT/gluon_bwd.log" | grep -v "^PASS"
    timeout 240 python3 benchmarks/quick_bench.py --hdim 64,128,256 --seqlen 1024,4096,16384 --out "$OUT/quick.json" 2>&1 | tee "$OUT/quick.log" | grep -E "fwd|bwd" | tail -n 40 ;;
  s8dbg)  # session 8: which variant of the Gluon varlen backward fails (one process each)
    timeout 200 python3 benchmarks/diag_varlen_bwd.py 2>&1 | tail -n 20
    CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
    CUDA_LAUNCH_BLOCKING=1 timeout 150 $CS --print-limit 3 python3 benchmarks/diag_varlen_bwd.py len1 2>&1 | grep -v "Host Frame" | head -n 40
    exit 0
    timeout 200 python3 benchmarks/gluon_varlen_check.py --out "$OUT/varlen.json" 2>&1 | tee "$OUT/varlen.log" | grep -v "^PASS"
    timeout 100 python3 benchmarks/bench_features.py --out "$OUT/features.json" > "$OUT/features.log" 2>&1
    tail -n 13 "$OUT/features.log" ;;
  s8c)  # session 8: s8a after the varlen stats fix (16-byte aligned per sequence), shorter
    timeout 200 python3 benchmarks/gluon_varlen_check.py --out "$OUT/varlen.json" 2>&1 | tee "$OUT/varlen.log" | grep -v "^PASS"
    timeout 60 python3 benchmarks/gluon_bwd_check.py --cases 2 --modes atomic,0 --skip-bench --out "$OUT/gluon_bwd.json" 2>&1 | grep -v "^PASS" | tail -n 2
    timeout 100 python3 benchmarks/bench_features.py --out "$OUT/features.json" > "$OUT/features.log" 2>&1
    tail -n 13 "$OUT/features.log" ;;
  s24c)  # session 24: the persistent forward at head dim 256 with one Q buffer (IOATTN_GLUON_PERSISTENT_256=1,
          # opt-in): the Gluon forward's check vs fp32 (per-tile and persistent), then per-tile vs persistent vs
          # cuDNN at 1k/2k/4k, causal or not, CUDA graphs, 3 interleaved rounds, outputs compared (~4 min)
    export IOATTN_GLUON_PERSISTENT_256=1
    timeout 150 python3 benchmarks/gluon_check.py --skip-bench --hdims 256 --shapes 4 --out "$OUT/gluon_fwd256.json" \
      2>&1 | grep -v "^PASS" | tail -n 6
    timeout 200 python3 benchmarks/fwd_tiles_ab.py --hdims 256 --seqlens 1024,2048,4096 --out "$OUT/persistent256.json" \
      2>&1 | grep -v Warning | tail -n 12 ;;
  s24b)  # session 24: dropout, softcap and ALiBi on the persistent forward (IOATTN_GLUON_PERSISTENT_OPTIONS=1,
          # opt-in): the dropout checks vs fp32 with the replayed mask (packed mode) and the softcap / ALiBi checks
          # vs fp64, with it (rows list the kernels that ran), then the option costs at hdim 128, 4k causal, off / on
          # (the per-tile / the persistent kernel) (~5 min)
    export IOATTN_GLUON_PERSISTENT_OPTIONS=1
    timeout 120 python3 benchmarks/gluon_dropout_attn_check.py --skip-bench --modes packed \
      --out "$OUT/dropout_persistent.json" 2>&1 | grep -v "^PASS" | tail -n 6
    timeout 150 python3 benchmarks/gluon_scores_check.py --skip-bench --out "$OUT/scores_persistent.json" 2>&1 \
      | grep -v "^PASS" | tail -n 6
    for f in 0 1; do
      echo "IOATTN_GLUON_PERSISTENT_OPTIONS=$f"
      IOATTN_GLUON_PERSISTENT_OPTIONS=$f timeout 120 python3 benchmarks/bench_features.py --hdim 128 --parts options \
        --options plain,dropout,softcap,alibi --out "$OUT/options_$f.json" 2>&1 | grep -E "causal|overhead" | tail -n 14
    done ;;
  s24a)  # session 24: padded head dims 136-248 on the hdim-256 Gluon backward (backward_sm90_d256, 128-wide
          # halves of 256; then the Gluon dQ kernel as 256 / 256; its varlen stores mask the columns): gpu_check's
          # 32 padded-dim cases vs fp64, pad_dims_check at 160/136/200/192 (varlen and dense vs fp64, the kernels
          # that ran), the hdim-256 options check (varlen's stores changed), then the backward of 160/200/256 at
          # 1k/4k against cuDNN and FA2, and ioattn with IOATTN_GLUON_PAD_BWD256=0 at 200 (~6 min). Exports the
          # opt-in IOATTN_GLUON_PAD_BWD256=1. 8 files in $OUT (the device returns 8 at most: the check's log stays in /tmp)
    export IOATTN_GLUON_PAD_BWD256=1
    timeout 200 python3 benchmarks/gpu_check.py --cases 12,13,14,15,16,17,18,19,20,21,22,23,28,29,30,31,32,33,34,35,48,49,50,51,52,53,54,55,56,57,58,59 \
      --warm-workers 8 --out "$OUT/check_pad.json" > /tmp/check_pad.log 2>&1; grep -E "FAIL|grid" /tmp/check_pad.log | tail -n 12
    timeout 150 python3 benchmarks/pad_dims_check.py --dims 160,136,200,192 --out "$OUT/pad_varlen.json" 2>&1 \
      | grep -E "FAIL|passed|^\[1/" | cut -c1-400 | tail -n 8
    timeout 150 python3 benchmarks/gluon_bwd256_check.py --options --skip-bench --out "$OUT/bwd256_options.json" 2>&1 \
      | grep -v "^PASS" | tail -n 6
    timeout 150 python3 benchmarks/bench_attention.py --providers ioattn,sdpa_cudnn,sdpa_flash --hdim 160,200,256 \
      --seqlen 1024,4096 --mode bwd --no-memory --no-plot --out "$OUT/bench_pad1.json" 2>&1 | grep -E "^(fwd|bwd)"
    echo "IOATTN_GLUON_PAD_BWD256=0"
    IOATTN_GLUON_PAD_BWD256=0 timeout 90 python3 benchmarks/bench_attention.py --providers ioattn --hdim 200 \
      --seqlen 1024,4096 --mode bwd --no-memory --no-plot --out "$OUT/bench_pad0.json" 2>&1 | grep -E "^(fwd|bwd)" ;;
  s22c)  # session 22: padded head dims on the Gluon kernels (forward_sm90.PAD_DIMS, opt-in, set here): gpu_check's cases of
          # head dims 96, 40, 80, 160, 32, 192, 200, 136 (forward and backward vs fp64, bf16 and fp16, causal or not),
          # benchmarks/pad_dims_check.py (packed varlen and dense batches at 96, 40, 80, 160 vs fp64),
          # host time per forward+backward after the preprocess moved to the cached launch, then 96/80/160/32 at 1k and
          # 4k against cuDNN and FA2, and ioattn with IOATTN_GLUON_PAD_DIMS=0 (the Triton kernels) (~7 min)
    export IOATTN_GLUON_PAD_DIMS=1
    timeout 200 python3 benchmarks/gpu_check.py --cases 12,13,14,15,16,17,18,19,20,21,22,23,28,29,30,31,32,33,34,35,48,49,50,51,52,53,54,55,56,57,58,59 \
      --warm-workers 8 --out "$OUT/check_pad.json" > "$OUT/check_pad.log" 2>&1; grep -E "FAIL|grid" "$OUT/check_pad.log" | tail -n 12
    timeout 120 python3 benchmarks/pad_dims_check.py --out "$OUT/pad_varlen.json" 2>&1 | grep -v "^\[.*PASS" | tail -n 8
    timeout 60 python3 benchmarks/host_profile.py --grad --bwd --no-prof 2>&1 | tail -n 1
    timeout 200 python3 benchmarks/bench_attention.py --providers ioattn,sdpa_cudnn,sdpa_flash --hdim 96,80,160,32 \
      --seqlen 1024,4096 --mode fwd,bwd --no-memory --no-plot --out "$OUT/bench_pad1.json" 2>&1 | grep -E "^(fwd|bwd)"
    echo "IOATTN_GLUON_PAD_DIMS=0"
    IOATTN_GLUON_PAD_DIMS=0 timeout 120 python3 benchmarks/bench_attention.py --providers ioattn --hdim 96,80,160,32 \
      --seqlen 1024,4096 --mode fwd,bwd --no-memory --no-plot --out "$OUT/bench_pad0.json" 2>&1 | grep -E "^(fwd|bwd)" ;;
  s22b)  # session 22: host time per call after the preprocess moved to the cached launch (hdim 128 1k causal
          # forward+backward), then head dims the Gluon kernels do not take (96, 80, 32: the Triton kernels) against
          # cuDNN and FA2, 4k, forward and backward (~4 min)
    timeout 60 python3 benchmarks/host_profile.py --grad --bwd --no-prof 2>&1 | tail -n 2
    timeout 300 python3 benchmarks/bench_attention.py --providers ioattn,sdpa_cudnn,sdpa_flash --hdim 96,80,32 \
      --seqlen 4096 --mode fwd,bwd --no-memory --no-plot --out "$OUT/bench_dims.json" 2>&1 | grep -E "^(fwd|bwd)" ;;
  s22a)  # session 22, first call: the direct C launch of the Gluon kernels (kernels/launch.py _Direct, default on):
          # host time per call with it off / on (hdim 128 1k causal forward, forward+backward), the 1k rows of the
          # benchmark (ioattn, cuDNN, FA2; each output checked vs fp32 first) with it off / on, the hdim-256 1k
          # backward with the Gluon dQ kernel off, then the public-API quick grid vs fp64 (~8 min)
    for f in 0 1; do
      for m in "" --bwd; do
        IOATTN_DIRECT_LAUNCH=$f timeout 60 python3 benchmarks/host_profile.py --grad $m --no-prof \
          --json "$OUT/host_${f}${m:+_bwd}.json" 2>&1 | tail -n 1
      done
    done
    for f in 0 1; do
      echo "IOATTN_DIRECT_LAUNCH=$f"
      IOATTN_DIRECT_LAUNCH=$f timeout 130 python3 benchmarks/bench_attention.py --providers ioattn,sdpa_cudnn,sdpa_flash \
        --hdim 64,128,256 --seqlen 1024 --mode fwd,bwd --no-memory --no-plot --out "$OUT/bench1k_direct$f.json" 2>&1 \
        | grep -E "^(fwd|bwd)"
    done
    echo "IOATTN_GLUON_DQ=0"
    IOATTN_GLUON_DQ=0 timeout 60 python3 benchmarks/bench_attention.py --providers ioattn,sdpa_cudnn --hdim 256 \
      --seqlen 1024 --mode bwd --no-memory --no-plot --out "$OUT/bench1k_dq0.json" 2>&1 | grep -E "^(fwd|bwd)"
    timeout 200 python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" > "$OUT/check.log" 2>&1; tail -n 3 "$OUT/check.log" ;;
  s21)  # session 21, first call: session 20's defaults together (the value-dim Gluon backward, the forward mask from
          # per-row bounds, ALiBi as row + column terms, hdim-64 causal <= 2k keys on the persistent Gluon forward):
          # the public-API quick grid vs fp64, the hdim-64 dropout checks, the value-dim backward checks (~8 min)
    timeout 220 python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" > "$OUT/check.log" 2>&1; tail -n 3 "$OUT/check.log"
    timeout 150 python3 benchmarks/dropout64_check.py --out "$OUT/dropout64.json" 2>&1 | tee "$OUT/dropout64.log" | grep -v "^PASS"
    timeout 150 python3 benchmarks/gluon_value_dim_bwd_check.py --out "$OUT/value_dim_bwd.json" 2>&1 \
      | tee "$OUT/value_dim_bwd.log" | grep -v "^PASS" ;;
  s21b)  # session 21: the Gluon dQ kernel of the split-mode backward (IOATTN_GLUON_DQ; opt-in): its checks vs
          # fp64 next to the Triton dQ kernel (deterministic 64/128, 192/128, 256/128, 256/256, options), then
          # the backward alone with it off / on and cuDNN's (~4 min)
    timeout 280 python3 benchmarks/gluon_dq_check.py --out "$OUT/gluon_dq.json" 2>&1 | tee "$OUT/gluon_dq.log" \
      | grep -v "^PASS" ;;
  s20a)  # next session, first call: the value-dim Gluon backward (IOATTN_GLUON_BWD_VALUE_DIMS; compiled only): its
          # checks vs fp64 next to the Triton backward, then the 192/128 timing (gluon_value_dim_check's
          # ioattn_gluon_bwd rows, 4k and 16k), then the mask-bounds checks of s14c (~8 min); WITH_TESTS=1 adds s20d
    timeout 150 python3 benchmarks/gluon_value_dim_bwd_check.py --out "$OUT/value_dim_bwd.json" 2>&1 \
      | tee "$OUT/value_dim_bwd.log" | grep -v "^PASS"
    timeout 120 python3 benchmarks/gluon_value_dim_check.py --skip-check --seqlens 4096,16384 \
      --out "$OUT/value_dim_bench.json" 2>&1 | grep "^192/128"
    # session 13's forward mask from per-row bounds (IOATTN_GLUON_MASK_BOUNDS=1; compiled only): s14c's checks
    IOATTN_GLUON_MASK_BOUNDS=1 timeout 150 python3 benchmarks/gluon_check.py --skip-bench --hdims 128,64 --shapes 4 --out "$OUT/gluon_fwd_bounds.json" 2>&1 | tee "$OUT/gluon_fwd_bounds.log" | grep -v "^PASS"
    IOATTN_GLUON_MASK_BOUNDS=1 timeout 100 python3 benchmarks/gluon_window_check.py --out "$OUT/window_bounds.json" 2>&1 | tee "$OUT/window_bounds.log" | grep -v "^PASS" | tail -n 4
    if [ -n "$WITH_TESTS" ]; then bash scripts/gpu_suite.sh s20d; fi ;;
  s20d)  # session 20: the GPU tests that session 19's calls cut (s20a's third part) (~4 min)
    timeout 240 python3 -m pytest tests/test_features.py tests/test_value_headdim.py -q -p no:cacheprovider 2>&1 \
      | tee "$OUT/pytest.log" | tail -n 4 ;;
  s20b)  # session 20, after s20a: one round of s14c's A/B of the forward mask from per-row bounds (per-tile /
          # persistent / Triton / cuDNN under CUDA graphs, 1k and 4k causal, IOATTN_GLUON_MASK_BOUNDS 0 and 1), then
          # s14a (session 13's ALiBi as row + column terms, IOATTN_GLUON_ALIBI_LINEAR=1: its check vs fp64 and
          # costs, then the costs without it) (~8 min)
    for f in 0 1; do
      echo "IOATTN_GLUON_MASK_BOUNDS=$f"
      IOATTN_GLUON_MASK_BOUNDS=$f timeout 110 python3 benchmarks/fwd_tiles_ab.py --causal-only --seqlens 1024,4096 --rounds 2 --triton \
        --out "$OUT/bounds_$f.json" 2>&1 | grep -v Warning
    done
    bash scripts/gpu_suite.sh s14a ;;
  s19a)  # session 19, after the new defaults (V's own head dim in the Gluon forward; hdim-64 dropout on the Gluon
          # backward, 64-row blocks, each Philox call once): the public-API quick grid, the hdim-64 dropout checks
          # (dense, varlen) vs fp32, the value-head-dim tests, then the hdim-64 dropout cost (~5 min)
    timeout 200 python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" > "$OUT/check.log" 2>&1; tail -n 3 "$OUT/check.log"
    timeout 150 python3 benchmarks/dropout64_check.py --out "$OUT/dropout64.json" 2>&1 | tee "$OUT/dropout64.log" | grep -v "^PASS"
    timeout 120 python3 -m pytest tests/test_value_headdim.py tests/test_features.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -n 3
    timeout 100 python3 benchmarks/bench_features.py --hdim 64 --parts options --options plain,dropout,sdpa \
      --out "$OUT/features_d64.json" 2>&1 | tail -n 8 ;;
  s18a)  # session 18: one ping-pong A/B round over 0 and 2 (s14e), then V's own head dim in the Gluon forward
          # (IOATTN_GLUON_VALUE_DIMS=1; compiled only): the value-head-dim tests with it, the kernel / public-API
          # checks and the 192/128 timing (4k, 16k); files straight into $OUT (~8 min)
    SETTINGS="0 2" timeout 170 bash scripts/gpu_suite.sh s14e 2>&1 | tee -a "$OUT/s18a.log"
    IOATTN_GLUON_VALUE_DIMS=1 timeout 100 python3 -m pytest tests/test_value_headdim.py -q -x 2>&1 | tee "$OUT/value_headdim.log" | tail -n 5
    timeout 230 python3 benchmarks/gluon_value_dim_check.py --seqlens 4096,16384 --out "$OUT/value_dim.json" 2>&1 \
      | tee "$OUT/value_dim.log" | grep -v "^PASS" ;;
  s18c)  # session 18, little device time left: the value-head-dim checks of the Gluon forward alone, no timing (~3 min)
    timeout 200 python3 benchmarks/gluon_value_dim_check.py --skip-bench --out "$OUT/value_dim.json" 2>&1 \
      | tee "$OUT/value_dim.log" | grep -v "^PASS" ;;
  s18b)  # session 18, after s18a: the full benchmark (s14b; its files straight into $OUT), then the shared
          # dropout draws (s14f; its files under /tmp/s18b and one tar of them in $OUT) (~9 min)
    timeout 330 bash scripts/gpu_suite.sh s14b 2>&1 | tee -a "$OUT/s18b.log"
    dest=$OUT; export OUT=/tmp/s18b; mkdir -p "$OUT"
    HDIMS=64 timeout 220 bash scripts/gpu_suite.sh s14f 2>&1 | tee -a "$dest/s18b.log"
    tar -cf "$dest/s14f.tar" -C "$OUT" . ;;
  s17d)  # session 17, little device time left: the value-head-dim tests on the GPU (Triton kernels, dv != d), one
          # ping-pong A/B round over 0 and 2, then as much of the full benchmark (s14b) as the call allows; files
          # straight into $OUT (they come back from a cut call)
    timeout 150 python3 -m pytest tests/test_value_headdim.py -q -x 2>&1 | tee "$OUT/value_headdim.log" | tail -n 5
    SETTINGS="0 2" timeout 170 bash scripts/gpu_suite.sh s14e 2>&1 | tee -a "$OUT/s17d.log"
    bash scripts/gpu_suite.sh s14b 2>&1 | tee -a "$OUT/s17d.log" ;;
  s17a|s17b|s17c)  # session 17: s17a = the ping-pong A/B rounds 1 and 2 (s14e then s14g) in one call; s17b = the shared
          # dropout draws (s14f) then the option costs with ping-pong (s14h at hdim 64 only); s17c (little device time
          # left) = one round of the ping-pong A/B over 0, 2, 2b, then the full benchmark (s14b). Each writes its
          # files under /tmp/<mode> and one tar of them to $OUT (the device returns at most 8 files)
    # (s17c: its 6 files straight into $OUT, so that they come back even if the call is cut)
    dest=$OUT; [ "$mode" = s17c ] || export OUT=/tmp/$mode; mkdir -p "$OUT"
    if [ "$mode" = s17a ]; then parts="s14e:330 s14g:240"; else parts="s14f:300 s14h:240"; fi
    [ "$mode" = s17c ] && parts="s14e:200 s14b:390" && export SETTINGS="0 2 2b"
    for p in $parts; do HDIMS=64 timeout ${p#*:} bash scripts/gpu_suite.sh ${p%:*} 2>&1 | tee -a "$OUT/$mode.log"; done
    [ "$mode" = s17c ] || tar -cf "$dest/$mode.tar" -C "$OUT" . ;;
  s14a)  # next session: ALiBi as row + column terms in the Gluon forward (IOATTN_GLUON_ALIBI_LINEAR=1; compiled
          # only): softcap/ALiBi check vs fp64 with it (and its costs), then the costs without it (~4 min)
    IOATTN_GLUON_ALIBI_LINEAR=1 timeout 170 python3 benchmarks/gluon_scores_check.py --out "$OUT/scores_alibi_linear.json" 2>&1 | tee "$OUT/scores_alibi_linear.log" | grep -v "^PASS"
    timeout 80 python3 benchmarks/gluon_scores_check.py --skip-check --out "$OUT/scores_default.json" 2>&1 | tee "$OUT/scores_default.log" ;;
  s14c)  # next session: the forward's mask from per-row bounds (IOATTN_GLUON_MASK_BOUNDS=1; compiled only): the
          # Gluon forward's checks vs fp32 (dense, persistent, varlen), windows, then per-tile / persistent /
          # cuDNN under CUDA graphs at 1k and 4k causal, with it and without, two interleaved rounds (~7 min)
    IOATTN_GLUON_MASK_BOUNDS=1 timeout 150 python3 benchmarks/gluon_check.py --skip-bench --hdims 128,64 --shapes 4 --out "$OUT/gluon_fwd_bounds.json" 2>&1 | tee "$OUT/gluon_fwd_bounds.log" | grep -v "^PASS"
    IOATTN_GLUON_MASK_BOUNDS=1 timeout 100 python3 benchmarks/gluon_window_check.py --out "$OUT/window_bounds.json" 2>&1 | tee "$OUT/window_bounds.log" | grep -v "^PASS" | tail -n 4
    for r in 1 2; do
      for f in 0 1; do
        echo "round $r IOATTN_GLUON_MASK_BOUNDS=$f"
        IOATTN_GLUON_MASK_BOUNDS=$f timeout 100 python3 benchmarks/fwd_tiles_ab.py --causal-only --seqlens 1024,4096 --rounds 2 --triton \
          --out "$OUT/bounds_${f}_$r.json" 2>&1 | grep -v Warning
      done
    done ;;
  s14d)  # next session: ping-pong consumer warpgroups in the Gluon forward (IOATTN_GLUON_PINGPONG=2: turns, and K loaded
          # ahead of V; level 1 shares the turns; IOATTN_GLUON_FWD64_STAGES=3; compiled only), checks: the Gluon forward
          # vs fp32 (per-tile, persistent, varlen), windows, softcap / ALiBi / dropout (~4.5 min; timings: s14e, s14g)
    for v in 2 2s3; do
      pp=${v%s3}; st=2; [ "$v" = 2s3 ] && st=3
      echo "check PINGPONG=$pp STAGES64=$st"
      IOATTN_GLUON_PINGPONG=$pp IOATTN_GLUON_FWD64_STAGES=$st timeout 150 python3 benchmarks/gluon_check.py --skip-bench \
        --hdims "$([ "$st" = 3 ] && echo 64 || echo 128,64,256)" --shapes 4 --out "$OUT/gluon_fwd_pp$v.json" 2>&1 \
        | tee "$OUT/gluon_fwd_pp$v.log" | grep -v "^PASS"
    done
    IOATTN_GLUON_PINGPONG=2 timeout 100 python3 benchmarks/gluon_window_check.py --out "$OUT/window_pp2.json" 2>&1 \
      | tee "$OUT/window_pp2.log" | grep -v "^PASS" | tail -n 4
    # the options share _attend: softcap / ALiBi vs fp64, dropout vs fp32 with the replayed mask
    IOATTN_GLUON_PINGPONG=2 timeout 150 python3 benchmarks/gluon_scores_check.py --skip-bench --out "$OUT/scores_pp2.json" 2>&1 \
      | tee "$OUT/scores_pp2.log" | grep -v "^PASS"
    IOATTN_GLUON_PINGPONG=2 timeout 120 python3 benchmarks/gluon_dropout_attn_check.py --skip-bench --modes packed \
      --out "$OUT/dropout_pp2.json" 2>&1 | tee "$OUT/dropout_pp2.log" | grep -v "^PASS" ;;
  s14e|s14g)  # next session, after s14d: per-tile / persistent / cuDNN under CUDA graphs, hdim 128/64/256, 1k/4k/16k,
          # causal and not, one process per setting: s14e round 1 over 0 (with the Triton forward), 1, 2, 2b (level 2
          # with IOATTN_GLUON_MASK_BOUNDS=1) and 2s3 (level 2, 3 hdim-64 stages; hdim 64 only); s14g round 2 over
          # 0, 2, 2b. Each row records a hash of its output: the same in every setting (the schedule changes, not
          # the math; 2b: the same kept keys) (~5 / ~3.5 min)
    settings="0 1 2 2b 2s3"; [ "$mode" = s14g ] && settings="0 2 2b"; settings=${SETTINGS:-$settings}
    for v in $settings; do
      pp=${v%%[bs]*}; st=2; mb=0; [ "$v" = 2s3 ] && st=3; [ "$v" = 2b ] && mb=1
      echo "$mode PINGPONG=$pp STAGES64=$st MASK_BOUNDS=$mb"
      IOATTN_GLUON_PINGPONG=$pp IOATTN_GLUON_FWD64_STAGES=$st IOATTN_GLUON_MASK_BOUNDS=$mb timeout 120 python3 \
        benchmarks/fwd_tiles_ab.py --rounds 1 --hdims "$([ "$st" = 3 ] && echo 64 || echo 128,64,256)" \
        --seqlens 1024,4096,16384 $([ "$v" = 0 ] && echo --triton) --out "$OUT/pp_${v}_$mode.json" 2>&1 | grep -v Warning
    done ;;
  s14i)  # next session, optional (~1 min): DistributedDataParallel with both ranks on the one GPU (gloo), ioattn's
          # kernels and autograd inside DDP on CUDA, grads vs the single-process run (multi_gpu_check.py --one-gpu)
    timeout 150 python3 benchmarks/multi_gpu_check.py --one-gpu --out "$OUT/one_gpu_ddp.json" 2>&1 | grep -v Warning | tail -n 4 ;;
  s14h)  # next session, optional after s14e/s14g: the options' forward / forward+backward costs (dropout, softcap,
          # ALiBi) at hdim 128 and 64 (HDIMS) with ping-pong level 2 and without (~4 min)
    for d in ${HDIMS:-128 64}; do
      for pp in 0 2; do
        echo "hdim $d PINGPONG=$pp"
        IOATTN_GLUON_PINGPONG=$pp timeout 110 python3 benchmarks/bench_features.py --hdim $d --parts options \
          --options plain,dropout,softcap,alibi --out "$OUT/options_d${d}_pp$pp.json" 2>&1 | tail -n 7
      done
    done ;;
  s14f)  # next session: the backward's dropout draws with each Philox call once per warpgroup (IOATTN_GLUON_DROPOUT_COLS=
          # shared; compiled only; hdim-64 Gluon backward on 64-row blocks: SASS 2,968 -> 2,512, plain 1,872): the
          # transposed masks bit for bit against the Triton kernels' (and the mask's cost per element, both
          # forms), dropout attention at hdim 64 vs fp32 with the
          # replayed mask, then the option costs at hdim 64: default (Triton backward under dropout), 64-row Gluon
          # backward, and 64-row with the shared draws; plain and dropout only (~4 min)
    timeout 150 python3 benchmarks/gluon_dropout_check.py --layouts bwd --bench 2>&1 | grep "^bench"
    IOATTN_GLUON_DROPOUT_COLS=shared timeout 150 python3 benchmarks/gluon_dropout_check.py --layouts bwd --bench 2>&1 | tail -n 8
    IOATTN_GLUON_DROPOUT_COLS=shared IOATTN_GLUON_BWD64_OPTION_ROWS=64 timeout 120 python3 benchmarks/gluon_dropout_attn_check.py \
      --skip-bench --hdims 64 --modes packed --out "$OUT/dropout_shared.json" 2>&1 | tee "$OUT/dropout_shared.log" | grep -v "^PASS"
    timeout 100 python3 benchmarks/bench_features.py --hdim 64 --parts options --options plain,dropout,sdpa \
      --out "$OUT/features_d64_default.json" 2>&1 | tail -n 8
    IOATTN_GLUON_BWD64_OPTION_ROWS=64 timeout 100 python3 benchmarks/bench_features.py --hdim 64 --parts options \
      --options plain,dropout --out "$OUT/features_d64_rows64.json" 2>&1 | tail -n 6
    IOATTN_GLUON_DROPOUT_COLS=shared IOATTN_GLUON_BWD64_OPTION_ROWS=64 timeout 100 python3 benchmarks/bench_features.py --hdim 64 \
      --parts options --options plain,dropout --out "$OUT/features_d64_shared.json" 2>&1 | tail -n 6 ;;
  s14b)  # next session: the full benchmark (README table) after the persistent causal forward, as s13b (~4.5 min)
    timeout 560 python3 benchmarks/bench_attention.py --hdim 128,64,256 --seqlen 1024,4096,16384 --mode fwd,bwd \
      --memory-seqlen 2048,8192,16384 --graph-seqlen 1024 --no-plot --out "$OUT/h200.json" 2>&1 | grep -E "^(fwd|bwd|mem)" | tail -n 80 ;;
  s13f)  # session 13: the persistent forward under a causal mask, tiles in groups of 16 (batch, head) pairs
          # (longest first in each group) and a zigzag over the CTAs: the Gluon forward's check vs fp32
          # (per-tile and persistent, 36-pair shape first), the public-API quick grid with the persistent
          # causal default, then per-tile vs persistent (G = 16 / 4 / 1 / all) vs Triton vs cuDNN, CUDA graphs
    timeout 150 python3 benchmarks/gluon_check.py --skip-bench --hdims 128,64 --shapes 4 --out "$OUT/gluon_fwd.json" 2>&1 | tee "$OUT/gluon_fwd.log" | grep -v "^PASS"
    timeout 150 python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" > "$OUT/check.log" 2>&1
    grep -E "FAIL|passed|compiled" "$OUT/check.log"
    timeout 240 python3 benchmarks/fwd_tiles_ab.py --head-groups 16,4,1,0 --causal-only --triton --seqlens 1024,2048,4096 \
      --out "$OUT/persistent_causal.json" 2>&1 | tee "$OUT/persistent_causal.log" | grep -v Warning ;;
  s13e)  # session 13 (the option and fwd_tiles_ab --head-groups removed after it: commit 9435111 has them):
          # the per-tile forward's start order (forward_sm90.HEAD_GROUP: (batch, head) pairs in groups of
          # G, each group's longest causal blocks first; 0 = all in one group), causal, hdim 128/64, 1k..16k,
          # CUDA-graph GPU time with cuDNN, 3 interleaved rounds; outputs compared between the orders (~3 min)
    timeout 400 python3 benchmarks/fwd_tiles_ab.py --head-groups 1,4,16,0 --causal-only --seqlens 1024,2048,4096,16384 \
      --out "$OUT/head_groups.json" 2>&1 | tee "$OUT/head_groups.log" | grep -v Warning ;;
  s13d)  # session 13: the dQ accumulator split (one launch per group of KV heads above 64 MiB from 4k keys) on
          # and off (IOATTN_DQ_ACCUM_CHUNK_MIB=1000000), hdim 128/64 at 4k/16k, with cuDNN, two interleaved rounds
    for r in 1 2; do
      for mib in 64 1000000; do
        echo "round $r IOATTN_DQ_ACCUM_CHUNK_MIB=$mib"
        IOATTN_DQ_ACCUM_CHUNK_MIB=$mib timeout 120 python3 benchmarks/quick_bench.py --hdim 128,64 --seqlen 4096,16384 \
          --providers ioattn,sdpa_cudnn --out "$OUT/split_${mib}_$r.json" 2>&1 | grep -E " bwd "
      done
    done ;;
  s13c)  # session 13 (flag removed after it): ALiBi positions in fp32 in the Gluon forward (IOATTN_GLUON_ALIBI_FP32=1; compiled only):
          # the scores check vs fp64 with it, then the option costs (hdim 128 4k causal) with it and without (~4 min)
    IOATTN_GLUON_ALIBI_FP32=1 timeout 170 python3 benchmarks/gluon_scores_check.py --out "$OUT/scores_alibi_fp32.json" 2>&1 | tee "$OUT/scores_alibi_fp32.log" | grep -v "^PASS"
    timeout 80 python3 benchmarks/gluon_scores_check.py --skip-check --out "$OUT/scores_default.json" 2>&1 | tee "$OUT/scores_default.log" ;;
  s13b)  # next session: the full benchmark (README table) with the 1k forwards also timed as replayed CUDA
          # graphs (--graph-seqlen 1024: the kernels without the host, next to the eager rows) (~4.5 min)
    timeout 560 python3 benchmarks/bench_attention.py --hdim 128,64,256 --seqlen 1024,4096,16384 --mode fwd,bwd \
      --memory-seqlen 2048,8192,16384 --graph-seqlen 1024 --no-plot --out "$OUT/h200.json" 2>&1 | grep -E "^(fwd|bwd|mem)" | tail -n 80 ;;
  s13a)  # session 13 (64 rows became the default under softcap): the hdim-64 backward under softcap / ALiBi / dropout on 64-row query blocks
          # (IOATTN_GLUON_BWD64_OPTION_ROWS=64; compiled only: no spills, against 108-684 B at 128 rows):
          # checks vs fp64 / fp32 with the replayed mask next to the Triton kernels, then the option
          # costs at hdim 64 with 128 rows (the default) and with 64 (~6 min)
    IOATTN_GLUON_BWD64_OPTION_ROWS=64 timeout 150 python3 benchmarks/gluon_scores_check.py --skip-bench --out "$OUT/scores_rows64.json" 2>&1 | tee "$OUT/scores_rows64.log" | grep -v "^PASS"
    IOATTN_GLUON_BWD64_OPTION_ROWS=64 timeout 120 python3 benchmarks/gluon_dropout_attn_check.py --skip-bench --hdims 64 --modes packed --out "$OUT/dropout_rows64.json" 2>&1 | tee "$OUT/dropout_rows64.log" | grep -v "^PASS"
    timeout 100 python3 benchmarks/bench_features.py --hdim 64 --parts options --out "$OUT/features_d64_rows128.json" 2>&1 | tail -n 12
    IOATTN_GLUON_BWD64_OPTION_ROWS=64 timeout 100 python3 benchmarks/bench_features.py --hdim 64 --parts options --out "$OUT/features_d64_rows64.json" 2>&1 | tail -n 12 ;;
  s12e)  # session 12: the backward at 1k without the dQ accumulator split (hdim 128/64, quick_bench with cuDNN
          # and FA2), then the same rows with the split forced (IOATTN_DQ_ACCUM_CHUNK_MIB=0)
    timeout 120 python3 benchmarks/quick_bench.py --hdim 128,64 --seqlen 1024 --out "$OUT/quick_1k.json" 2>&1 | grep -v Warning
    IOATTN_DQ_ACCUM_CHUNK_MIB=0 timeout 100 python3 benchmarks/quick_bench.py --hdim 128 --seqlen 1024 --providers ioattn,sdpa_cudnn --out "$OUT/quick_1k_split.json" 2>&1 | grep -v Warning ;;
  s12d)  # session 12: the persistent forward on by default without a mask up to 4k keys (hdim <= 128):
          # the Gluon forward's shape grid (per-tile and persistent vs fp32), the quick public-API grid
          # (forward and backward vs fp64), eager vs CUDA-graph vs host time at 1k/4k (~4 min)
    timeout 170 python3 benchmarks/gluon_check.py --skip-bench --hdims 64,128 --out "$OUT/gluon_fwd.json" 2>&1 | tee "$OUT/gluon_fwd.log" | grep -v "^PASS"
    timeout 150 python3 benchmarks/gpu_check.py --quick --out "$OUT/check.json" > "$OUT/check.log" 2>&1
    grep -E "FAIL|passed|compiled" "$OUT/check.log"
    timeout 120 python3 benchmarks/host_bound_check.py --out "$OUT/host_bound.json" 2>&1 | grep -v Warning ;;
  s12c)  # session 12: the short-sequence forward, per-tile grid vs the persistent kernel vs cuDNN (CUDA-graph
          # GPU time, 3 interleaved rounds), hdim 128/64, 512..4k, causal or not (~3 min)
    timeout 400 python3 benchmarks/fwd_tiles_ab.py --out "$OUT/fwd_tiles.json" 2>&1 | tee "$OUT/fwd_tiles.log" | grep -v Warning ;;
  s12a)  # session 12: the dQ accumulator split over KV-head groups on packed varlen batches (forced:
          # IOATTN_DQ_ACCUM_CHUNK_MIB=0) vs the Triton path. (Run first with the ordered deterministic one
          # pass's check, benchmarks/gluon_ordered_check.py, removed with that mode after it: commit 637c402.)
    IOATTN_DQ_ACCUM_CHUNK_MIB=0 timeout 150 python3 benchmarks/gluon_varlen_check.py --out "$OUT/varlen_dqsplit.json" 2>&1 | tee "$OUT/varlen_dqsplit.log" | grep -v "^PASS" ;;
  s12b)  # session 12: the option costs at hdim 64 (dropout: Gluon forward + Triton backward; softcap, ALiBi;
          # SDPA flash's dropout). (Run first with gluon_bwd256_check.py --pipeline, removed with the
          # pipelined hdim-256 loop after it: commit 2e71608.)
    timeout 150 python3 benchmarks/bench_features.py --hdim 64 --parts options --out "$OUT/features_d64.json" 2>&1 | tee "$OUT/features_d64.log" ;;
  s10c)  # session 10: dropout masks applied to the packed bf16 P in the Gluon forward (IOATTN_GLUON_DROPOUT_APPLY
          # packed / early; compiled only): masks bit-identical to the Triton ones (the packed path's mask
          # kernel), forward+backward vs fp32 with the replayed mask per mode, then the cost of each mode
    timeout 60 python3 benchmarks/gluon_dropout_check.py --layouts fwdpacked,fwd 2>&1 | tee "$OUT/dropout_masks.log" | grep -v "^PASS" | tail -n 8
    timeout 100 python3 benchmarks/gluon_dropout_attn_check.py --skip-bench --modes packed,early --out "$OUT/dropout_check.json" 2>&1 | tee "$OUT/dropout_check.log" | grep -v "^PASS"
    timeout 75 python3 benchmarks/gluon_dropout_attn_check.py --skip-check --modes select,packed,early --out "$OUT/dropout_bench.json" 2>&1 | tee "$OUT/dropout_bench.log" ;;
  s10a)  # session 10: all providers in one run, hdim 128/64/256 at 1k/4k/16k (fwd, bwd), memory to 16k,
          # with the cached launch and Gluon softcap/ALiBi on by default; written to $OUT after every case
    timeout 560 python3 benchmarks/bench_attention.py --hdim 128,64,256 --seqlen 1024,4096,16384 --mode fwd,bwd \
      --memory-seqlen 2048,8192,16384 --no-plot --out "$OUT/h200.json" 2>&1 | grep -E "^(fwd|bwd|mem)" | tail -n 80 ;;
  s10e)  # session 10: the hdim-256 Gluon backward's options (IOATTN_GLUON_BWD256_OPTIONS=1; compiled only so far):
          # windows (left, 0) / (left, -1), softcap 30/50, ALiBi (h,)/(b, h), varlen with empty sequences, split and
          # atomic vs fp64 next to the Triton backward (6 cases), then 4k causal softcap 50 / window 1024 timing
    IOATTN_GLUON_BWD256_OPTIONS=1 timeout 200 python3 benchmarks/gluon_bwd256_check.py --options --out "$OUT/bwd256_options.json" 2>&1 | tee "$OUT/bwd256_options.log" | grep -v "^PASS" ;;
  s10b)  # session 10: the Gluon hdim-256 backward (IOATTN_GLUON_BWD256=1; off by default), atomic and split
          # modes vs fp64 next to the Triton backward on 6 shapes, then timing vs Triton and cuDNN at 1k/4k/16k
    IOATTN_GLUON_BWD256=1 timeout 230 python3 benchmarks/gluon_bwd256_check.py --out "$OUT/bwd256.json" 2>&1 | tee "$OUT/bwd256.log" | grep -v "^PASS" ;;
  s9c)  # session 9: softcap and ALiBi in the Gluon kernels (IOATTN_GLUON_SCORES; off by default), checked
        # vs fp64 next to the Triton kernels and timed
    timeout 250 python3 benchmarks/gluon_scores_check.py --out "$OUT/scores.json" 2>&1 | tee "$OUT/scores.log" | grep -v "^PASS" ;;
  s9b)  # next session: the full benchmark (hdim 64/128/256, 512..16k, all providers, memory to 64k) for the README
    mkdir -p /tmp/bench
    timeout 570 python3 benchmarks/bench_attention.py --out /tmp/bench/h200.json 2>&1 | tail -n 70
    tar -cf "$OUT/bench.tar" -C /tmp/bench . ;;
  s9a)  # next session: the cached Gluon launch (IOATTN_FAST_LAUNCH=1) checked (fwd+bwd vs fp32, varlen)
        # and timed against the full launch path at 1k-16k (the 1k rows were host-bound in s8b)
    IOATTN_FAST_LAUNCH=1 timeout 100 python3 benchmarks/gluon_bwd_check.py --cases 2 --modes atomic,0 --skip-bench --out "$OUT/gluon_bwd_fast.json" 2>&1 | grep -v "^PASS" | tail -n 2
    IOATTN_FAST_LAUNCH=1 timeout 150 python3 benchmarks/gluon_varlen_check.py --out "$OUT/varlen_fast.json" 2>&1 | grep -v "^PASS" | tail -n 2
    for f in 0 1; do IOATTN_FAST_LAUNCH=$f timeout 150 python3 benchmarks/bench_attention.py --quick --providers ioattn,sdpa_cudnn --no-memory --no-plot --out "$OUT/quick_fast$f.json" 2>&1 | grep -E "^(fwd|bwd) " ; done ;;
  s8d)  # session 8: dropout in the Gluon forward and backward (vs fp32 with the replayed mask, next
        # to the Triton kernels on the same rng_state), its cost per path
    timeout 230 python3 benchmarks/gluon_dropout_attn_check.py --out "$OUT/dropout.json" 2>&1 | tee "$OUT/dropout.log" | grep -v "^PASS" ;;
  s8b)  # session 8: the full benchmark (README table and plots) on this GPU with the Gluon kernels
    mkdir -p /tmp/bench
    timeout 570 python3 benchmarks/bench_attention.py --out /tmp/bench/h200.json 2>&1 | tail -n 70
    tar -cf "$OUT/bench.tar" -C /tmp/bench . ;;
  s8a)  # session 8: the Gluon backward over packed variable-length batches (checked per sequence vs
        # fp32 next to the Triton kernels), windows and the dense one pass once more, feature costs
    timeout 200 python3 benchmarks/gluon_varlen_check.py --out "$OUT/varlen.json" 2>&1 | tee "$OUT/varlen.log" | grep -v "^PASS"
    timeout 90 python3 benchmarks/gluon_window_check.py --out "$OUT/window.json" 2>&1 | tee "$OUT/window.log" | grep -v "^PASS"
    timeout 100 python3 benchmarks/gluon_bwd_check.py --cases 2 --modes atomic,0 --seqlens 4096,16384 --out "$OUT/gluon_bwd.json" 2>&1 | tee "$OUT/gluon_bwd.log" | grep -v "^PASS"
    timeout 100 python3 benchmarks/bench_features.py --out "$OUT/features.json" > "$OUT/features.log" 2>&1
    tail -n 13 "$OUT/features.log" ;;
  s7d)  # session 7: sliding windows in the Gluon forward and backward (checked vs fp32 next to the
        # Triton kernels), then the feature costs, and the dense Gluon checks once more
    timeout 120 python3 benchmarks/gluon_window_check.py --out "$OUT/window.json" 2>&1 | tee "$OUT/window.log" | grep -v "^PASS"
    timeout 100 python3 benchmarks/bench_features.py --out "$OUT/features.json" > "$OUT/features.log" 2>&1
    tail -n 13 "$OUT/features.log"
    timeout 70 python3 benchmarks/gluon_bwd_check.py --cases 2 --modes atomic,0 --skip-bench --out "$OUT/gluon_bwd.json" 2>&1 | grep -v "^PASS" | tail -n 3 ;;
  s7c)  # session 7: lse/delta through the TMA in the Gluon backward, hdim 64 one pass by default; the
        # persistent forward with the causal tile order by decreasing work; the Gluon varlen forward
        # (checked per sequence); feature costs (issue 4)
    timeout 150 python3 benchmarks/gluon_bwd_check.py --cases 2 --modes atomic,split,0 --seqlens 4096,16384 --out "$OUT/gluon_bwd.json" 2>&1 | tee "$OUT/gluon_bwd.log" | grep -v "^PASS"
    timeout 200 python3 benchmarks/gluon_check.py --hdims 128,64 --shapes 2 --out "$OUT/gluon_fwd.json" 2>&1 | tee "$OUT/gluon_fwd.log" | grep -v "^PASS"
    timeout 120 python3 benchmarks/bench_features.py --out "$OUT/features.json" > "$OUT/features.log" 2>&1
    tail -n 16 "$OUT/features.log" ;;
  s7b)  # session 7: hdim 64 query blocks of 128 vs 64 in the one-pass backward; the persistent Gluon forward
        # (check + timing vs cuDNN); then Nsight Compute on the one-pass backward kernel
    timeout 200 python3 benchmarks/gluon_bwd_check.py --cases 2 --modes atomic,atomic@128,0 --seqlens 1024,4096,16384 --out "$OUT/gluon_bwd.json" 2>&1 | tee "$OUT/gluon_bwd.log" | grep -v "^PASS"
    timeout 220 python3 benchmarks/gluon_check.py --hdims 128,64 --out "$OUT/gluon_fwd.json" 2>&1 | tee "$OUT/gluon_fwd.log" | grep -v "^PASS"
    timeout 120 ncu --clock-control none --kernel-name regex:_attn_bwd_sm90 --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis python3 benchmarks/ncu_bwd.py > "$OUT/ncu_bwd.txt" 2>&1
    grep -v "^==PROF==" "$OUT/ncu_bwd.txt" | tail -n 90 ;;
  s7a)  # session 7: the one-pass backward with dQ by bulk TMA reductions vs split vs Triton, kernel
        # times per mode, then timing against cuDNN and FA2
    timeout 420 python3 benchmarks/gluon_bwd_check.py --cases 3 --profile --seqlens 1024,4096,16384 --out "$OUT/gluon_bwd.json" 2>&1 | tee "$OUT/gluon_bwd.log" | grep -v "^PASS" ;;
  s6d)  # session 6: the three Hopper backwards (Gluon dK/dV + Triton dQ, one Gluon pass with atomic dQ,
        # Triton) checked against fp32 and timed side by side with cuDNN and FA2
    timeout 150 python3 benchmarks/gluon_bwd_check.py --cases 2 --seqlens 4096,16384 --out "$OUT/gluon_bwd.json" 2>&1 | tee "$OUT/gluon_bwd.log" | grep -v "^PASS" ;;
  bench)
    mkdir -p /tmp/bench
    python3 benchmarks/bench_attention.py --out /tmp/bench/h100.json 2>&1 | tail -n 150
    cp /tmp/bench/h100* "$OUT/" ;;
esac
