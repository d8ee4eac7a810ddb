"""One backward of the dispatched path for Nsight Compute to profile (hdim 128, 4k, bf16, 16k
tokens): ncu --kernel-name regex:_attn_bwd_sm90 --launch-count 1 python benchmarks/ncu_bwd.py"""
import sys

import torch

import ioattn

d, n = 128, int(sys.argv[1]) if len(sys.argv) > 1 else 4096
causal = len(sys.argv) > 2 and sys.argv[2] == "causal"
b, h = 16384 // n, 2048 // d
q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
out = ioattn.flash_attn_func(q, k, v, causal=causal)
out.backward(torch.randn_like(out))
torch.cuda.synchronize()
