"""Where short sequences lose time: the GPU time of one forward (CUDA-graph replay, no host in
the loop) next to the eager call (do_bench of single calls, as bench_attention.py times them,
inputs requiring grad) and the host's time per call, for ioattn and SDPA's cuDNN backend.

At 1k tokens per sequence the ioattn forward is host-bound on the lent H200 (bench_attention:
the causal row takes as long as the non-causal one). This prints, per case, the three times and
the TFLOP/s each gives; a serving engine that replays CUDA graphs (or a model whose host runs
ahead of the GPU) sees the graph column.

    PYTHONPATH=src python benchmarks/host_bound_check.py [--out f.json]
"""

import argparse
import json
import os
import sys
import time

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F

import ioattn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import graph_ms  # noqa: E402  (per-call time of a CUDA graph replaying the call)


def host_us(fn, calls=200):
    """Wall time per call of back-to-back calls: the host's cost when it exceeds the GPU's."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = []
    for d, seqlen in ((128, 1024), (64, 1024), (128, 4096)):
        h, b = 2048 // d, 16384 // seqlen
        for causal in (False, True):
            q, k, v = (torch.randn(b, seqlen, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            qtg, ktg, vtg = (t.detach().clone().requires_grad_() for t in (qt, kt, vt))
            flops = 4 * b * h * seqlen * seqlen * d / (2 if causal else 1)

            def cudnn(a, bb, c):
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(a, bb, c, is_causal=causal)

            fns = {"ioattn": (lambda: ioattn.flash_attn_func(qg, kg, vg, causal=causal),
                              lambda: ioattn.flash_attn_func(q, k, v, causal=causal)),
                   "sdpa_cudnn": (lambda: cudnn(qtg, ktg, vtg), lambda: cudnn(qt, kt, vt))}
            for name, (train_fn, infer_fn) in fns.items():
                eager = triton.testing.do_bench(train_fn, warmup=25, rep=100, return_mode="median")
                with torch.no_grad():
                    g = graph_ms(infer_fn)
                host = host_us(train_fn)
                row = dict(provider=name, hdim=d, seqlen=seqlen, batch=b, nheads=h, causal=causal, eager_ms=eager,
                           graph_ms=g, host_us_per_call=host, eager_tflops=flops / eager * 1e-9,
                           graph_tflops=flops / g * 1e-9)
                rows.append(row)
                print(f"hdim {d:3d} {seqlen // 1024}k causal={causal!s:5s} {name:10s} eager {eager * 1e3:6.0f} us "
                      f"({row['eager_tflops']:4.0f} TFLOP/s)  graph {g * 1e3:6.0f} us ({row['graph_tflops']:4.0f})  "
                      f"back-to-back {host:6.0f} us/call", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
