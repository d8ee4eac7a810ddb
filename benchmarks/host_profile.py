"""Where the host time of one ioattn call goes: the time per call of back-to-back calls, host
alone and with the GPU synchronized after them (equal times: the host is the bottleneck), then
cProfile over the same calls. The shape is the benchmark's 1k causal row (b 16, h 2048 / hdim).
--bwd times forward+backward (torch.autograd.grad) instead of the forward; IOATTN_DIRECT_LAUNCH=0/1
in the environment compares the two launch paths of kernels/launch.py.

    python benchmarks/host_profile.py [--calls 300] [--grad] [--bwd] [--hdim 128] [--no-prof] [--json F]
"""
import argparse
import cProfile
import json
import os
import pstats
import time

import torch

import ioattn

ap = argparse.ArgumentParser()
ap.add_argument("--calls", type=int, default=300)
ap.add_argument("--grad", action="store_true")
ap.add_argument("--bwd", action="store_true")
ap.add_argument("--hdim", type=int, default=128)
ap.add_argument("--no-prof", action="store_true")
ap.add_argument("--json", default=None)
args = ap.parse_args()
grad = args.grad or args.bwd
q, k, v = (torch.randn(16, 1024, 2048 // args.hdim, args.hdim, device="cuda", dtype=torch.bfloat16,
                       requires_grad=grad) for _ in range(3))
dout = torch.randn_like(q)


def call():
    out = ioattn.flash_attn_func(q, k, v, causal=True)
    if args.bwd:
        torch.autograd.grad(out, (q, k, v), dout)


for _ in range(20):
    call()
torch.cuda.synchronize()
rows = []
for rep in range(3):
    t = time.perf_counter()
    for _ in range(args.calls):
        call()
    t_host = (time.perf_counter() - t) / args.calls
    torch.cuda.synchronize()
    t_all = (time.perf_counter() - t) / args.calls
    rows.append(dict(host_us=t_host * 1e6, with_gpu_us=t_all * 1e6))
    print(f"hdim {args.hdim} {'fwd+bwd' if args.bwd else 'fwd'}: host per call {t_host * 1e6:.0f} us, with the GPU "
          f"{t_all * 1e6:.0f} us (grad={grad}, IOATTN_DIRECT_LAUNCH={os.environ.get('IOATTN_DIRECT_LAUNCH', '1')})")
if args.json:
    with open(args.json, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), hdim=args.hdim, bwd=args.bwd, grad=grad,
                       direct=os.environ.get("IOATTN_DIRECT_LAUNCH", "1"), rounds=rows), f, indent=1)
if not args.no_prof:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        call()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
