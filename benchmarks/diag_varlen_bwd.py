"""Isolate a failing Gluon varlen backward: each variant in its own process (a CUDA error
poisons the context), CUDA_LAUNCH_BLOCKING=1. Usage: python benchmarks/diag_varlen_bwd.py [name]"""
import os
import subprocess
import sys

VARIANTS = {  # name: (lens, causal, mode[, nheads, nheads_k, what]); what: "both", "fwd", "tritonfwd"
    "len1_fwd": ([1, 256], False, "atomic", 2, 2, "fwd"),
    "len1_tritonfwd": ([1, 256], False, "atomic", 2, 2, "tritonfwd"),
    "len1_tritonbwd": ([1, 256], False, "0", 2, 2, "both"),
    "len1_end": ([256, 1], False, "atomic"),
    "len32": ([32, 256], False, "atomic"),
    "len64": ([64, 256], False, "atomic"),
    "len100": ([100, 256], False, "atomic"),
    "len1": ([1, 256], False, "atomic"),
}


def one(name):
    import torch
    import ioattn
    from ioattn.kernels import backward_sm90
    lens, causal, mode, h, hk, what = (VARIANTS[name] + (2, 2, "both")[len(VARIANTS[name]) - 3:])[:6]
    backward_sm90.MODE = mode
    from ioattn.kernels import forward_sm90
    forward_sm90.VARLEN = what != "tritonfwd"
    d = 128
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(sum(lens), h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(sum(lens), hk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    out = ioattn.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=causal)
    torch.cuda.synchronize()
    if what == "fwd":
        print(name, "ok", out.float().norm().item())
        return
    g = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    torch.cuda.synchronize()
    print(name, "ok", [x.float().norm().item() for x in g])


if __name__ == "__main__":
    if len(sys.argv) > 1:
        one(sys.argv[1])
    else:
        env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
        for name in VARIANTS:
            r = subprocess.run([sys.executable, __file__, name], env=env, capture_output=True, text=True, timeout=120)
            err = [ln for ln in r.stderr.splitlines() if "Error" in ln][-1:] if r.returncode else []
            print(name, "rc", r.returncode, r.stdout.strip()[-200:], *err, flush=True)
