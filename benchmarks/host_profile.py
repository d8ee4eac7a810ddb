"""Where the host time of one ioattn forward goes: the time per call of back-to-back calls, host
alone and with the GPU synchronized after them (equal times: the host is the bottleneck), then
cProfile over the same calls. The shape is the benchmark's 1k causal hdim-128 row (b 16, h 16).

    python benchmarks/host_profile.py [--calls 300] [--grad]
"""
import argparse
import cProfile
import pstats
import time

import torch

import ioattn

ap = argparse.ArgumentParser()
ap.add_argument("--calls", type=int, default=300)
ap.add_argument("--grad", action="store_true")
args = ap.parse_args()
q, k, v = (torch.randn(16, 1024, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=args.grad)
           for _ in range(3))
for _ in range(20):
    ioattn.flash_attn_func(q, k, v, causal=True)
torch.cuda.synchronize()
for rep in range(2):
    t = time.perf_counter()
    for _ in range(args.calls):
        ioattn.flash_attn_func(q, k, v, causal=True)
    t_host = (time.perf_counter() - t) / args.calls
    torch.cuda.synchronize()
    t_all = (time.perf_counter() - t) / args.calls
    print(f"host per call {t_host * 1e6:.0f} us, with the GPU {t_all * 1e6:.0f} us (grad={args.grad})")
prof = cProfile.Profile()
prof.enable()
for _ in range(args.calls):
    ioattn.flash_attn_func(q, k, v, causal=True)
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(25)
