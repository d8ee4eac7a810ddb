"""Sliding windows in the Gluon Hopper kernels on the GPU: forward and backward through the
public API (flash_attn_func with window_size=(left, 0) or (left, -1)) against an fp32
reference, next to the Triton kernels on the same inputs (outputs NaN-prefilled).

    python benchmarks/gluon_window_check.py [--out f.json]
"""

import argparse
import json
import math
import sys

import torch

import ioattn
from ioattn.kernels import backward_sm90, configs, forward_sm90
from gluon_bwd_check import reference_grads  # (benchmarks/ is the script's folder)


def run(q, k, v, dout, causal, left, gluon):
    forward_sm90.ENABLED = gluon
    backward_sm90.MODE = "auto" if gluon else "0"
    try:
        qi, ki, vi = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = ioattn.flash_attn_func(qi, ki, vi, causal=causal, window_size=(left, 0 if causal else -1))
        return (out.detach(), *torch.autograd.grad(out, (qi, ki, vi), dout))
    finally:
        forward_sm90.ENABLED, backward_sm90.MODE = True, "auto"


def rel(x, ref):
    return ((x.float() - ref).norm() / ref.norm().clamp_min(1e-6)).item()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    configs.poison_outputs = True
    rows, n_fail = [], 0
    cases = [(d, b, sq, sk, h, hk, causal, left)
             for d in (128, 64)
             for (b, sq, sk, h, hk, causal, left) in ((2, 1000, 1000, 4, 2, True, 256), (1, 777, 1300, 2, 2, True, 100),
                                                      (1, 1500, 900, 4, 4, False, 300), (2, 4096, 4096, 2, 1, True, 1024))]
    for d, b, sq, sk, h, hk, causal, left in cases:
        torch.manual_seed(len(rows))
        q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16)
        dout = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16)
        wr = 0 if causal else -1
        paths = dict(fwd=forward_sm90.supported(q, k, v, varlen=False, window_left=left, window_right=wr, softcap=0.0,
                                                alibi_slopes=None, dropout_p=0.0, block_table=None,
                                                capability=torch.cuda.get_device_capability()),
                     bwd=backward_sm90.supported(q, k, v, dout, varlen=False, window_left=left, window_right=wr,
                                                 softcap=0.0, alibi_slopes=None, dropout_p=0.0, deterministic=False,
                                                 capability=torch.cuda.get_device_capability()))
        try:
            ref = reference_grads(q, k, v, dout, causal, left, with_out=True)
            eg = [rel(x, r) for x, r in zip(run(q, k, v, dout, causal, left, True), ref)]
            et = [rel(x, r) for x, r in zip(run(q, k, v, dout, causal, left, False), ref)]
            good = all(math.isfinite(a) and a <= 2 * t + 1e-3 for a, t in zip(eg, et))
        except Exception as exc:  # noqa: BLE001
            good, eg, et = False, [], []
            print("ERROR", repr(exc)[:300], flush=True)
        n_fail += not good
        row = dict(hdim=d, batch=b, seqlen_q=sq, seqlen_k=sk, nheads=h, nheads_k=hk, causal=causal, left=left,
                   paths=paths, err_out_dq_dk_dv_gluon=eg, err_triton=et, ok=good)
        rows.append(row)
        print("PASS" if good else "FAIL", row, flush=True)
    print(f"gluon window check: {len(cases) - n_fail}/{len(cases)} passed", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), fh, indent=1)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
