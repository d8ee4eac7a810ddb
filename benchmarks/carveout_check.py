"""Does the 64 x 64 hdim-128 forward get two CTAs per SM? (session 4)

The short-sequence forward tiles (configs.SHORT_FORWARD_SEQLEN) use 113 KB of shared memory
per CTA, so two CTAs per SM need the driver to pick (nearly) the largest shared-memory
carveout. Without a hint the driver chooses; this times the 512-token forward in a fresh
process, after kernels that use other carveouts, and with
CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT = 100 set on the kernel.

    python benchmarks/carveout_check.py [--out f.json]
"""

import argparse
import ctypes
import json

import torch
import triton

import ioattn
from ioattn.kernels import configs

CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT = 9


def time_fwd(n, causal, d=128):
    b, h = 16384 // n, 2048 // d
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ms = triton.testing.do_bench(lambda: ioattn.flash_attn_func(q, k, v, causal=causal), warmup=25, rep=100,
                                 return_mode="median")
    return 4 * b * h * n * n * d / (2 if causal else 1) / ms * 1e-9


def occupancy(ck):
    lib = ctypes.CDLL("libcuda.so.1")
    ck._init_handles()
    nblocks = ctypes.c_int(0)
    lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(nblocks), ctypes.c_void_p(ck.function),
                                                     ctypes.c_int(ck.metadata.num_warps * 32),
                                                     ctypes.c_size_t(ck.metadata.shared))
    return nblocks.value


def set_carveout(ck, percent):
    lib = ctypes.CDLL("libcuda.so.1")
    ck._init_handles()
    return lib.cuFuncSetAttribute(ctypes.c_void_p(ck.function),
                                  ctypes.c_int(CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT),
                                  ctypes.c_int(percent))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []

    def rec(stage):
        for n in (512, 1024, 2048):
            for causal in (False, True):
                t = time_fwd(n, causal)
                ck = configs.last_compiled["fwd"]
                rows.append(dict(stage=stage, seqlen=n, causal=causal, tflops=t, smem=ck.metadata.shared,
                                 warps=ck.metadata.num_warps, occupancy=occupancy(ck)))
                print(f"{stage:12} n={n:5} causal={causal!s:5} {t:6.1f} TFLOP/s  smem={ck.metadata.shared} "
                      f"warps={ck.metadata.num_warps} max CTAs/SM={rows[-1]['occupancy']}", flush=True)

    rec("fresh")
    # other kernels first: the long-sequence forward (230 KB) and a backward
    for n in (16384, 4096):
        b = 16384 // n
        q, k, v = (torch.randn(b, n, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        out = ioattn.flash_attn_func(q, k, v, causal=True)
        out.sum().backward()
        torch.cuda.synchronize()
    rec("after-others")
    for n in (512, 1024, 2048):
        for causal in (False, True):
            time_fwd(n, causal)
            print("carveout set:", set_carveout(configs.last_compiled["fwd"], 100))
    rec("carveout100")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
