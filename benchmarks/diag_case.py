"""Reproduce one failing case on the GPU with CUDA_LAUNCH_BLOCKING=1, under several tile configs.

Kept because it found the hdim-160 causal forward fault (see kernels/configs.py).
    python benchmarks/diag_case.py
"""
import os, sys, subprocess
code = r'''
import sys, traceback, torch
sys.path.insert(0, "benchmarks")
import gpu_check as g
from ioattn.kernels import configs
import ioattn
variant = sys.argv[1]
if variant == "fwd_small":
    configs.forward_override = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
if variant == "dkdv_other":
    configs.backward_override = dict(dkdv=dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1), dq=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2))
if variant == "dq_other":
    configs.backward_override = dict(dkdv=dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=1), dq=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1))
q = torch.randn(1, 513, 4, 160, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k, v = (torch.randn(1, 513, 2, 160, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
try:
    out = ioattn.flash_attn_func(q, k, v, causal=True); torch.cuda.synchronize(); print("fwd ok")
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out)); torch.cuda.synchronize(); print("bwd ok")
except Exception as e:
    tb = traceback.format_exc().splitlines()
    print(variant, "FAILED:", [l for l in tb if "ioattn/kernels" in l or "Error" in l][-4:])
'''
for variant in ["default", "fwd_small", "dkdv_other", "dq_other"]:
    r = subprocess.run([sys.executable, "-c", code, variant], env=dict(os.environ, CUDA_LAUNCH_BLOCKING="1"), capture_output=True, text=True)
    print(variant, "rc", r.returncode, (r.stdout + r.stderr).strip().splitlines()[-3:])
