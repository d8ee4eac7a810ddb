"""Softcap and ALiBi in the Gluon Hopper kernels on the GPU (IOATTN_GLUON_SCORES; on by default
since this passed on an H200, session 9): forward and backward through the public API against the fp64 reference
(ioattn.reference.attention_ref, gradients by autograd), next to the Triton kernels on the same
inputs (outputs NaN-prefilled). A case passes when each Gluon error is finite and at most 2x
the Triton path's + 1e-3 (each row lists the Gluon run's kernels: configs.kernels_ran). Then the
cost per option (hdim 128, 4k causal, bf16) on each path.

    python benchmarks/gluon_scores_check.py [--out f.json] [--skip-bench | --skip-check]
"""

import argparse
import json
import math
import sys

import torch
import triton

import ioattn
from ioattn.kernels import backward_sm90, configs, forward_sm90
from ioattn.reference import attention_ref


DEFAULT = forward_sm90.SCORES


def run(q, k, v, dout, kw, gluon):
    forward_sm90.SCORES = gluon
    try:
        qi, ki, vi = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = ioattn.flash_attn_func(qi, ki, vi, **kw)
        return (out.detach(), *torch.autograd.grad(out, (qi, ki, vi), dout))
    finally:
        forward_sm90.SCORES = DEFAULT


def reference(q, k, v, dout, kw):
    qf, kf, vf = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, _ = attention_ref(qf, kf, vf, **kw)
    return (out.detach(), *torch.autograd.grad(out, (qf, kf, vf), dout.double()))


def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def check(rows):
    configs.poison_outputs = True
    n_fail = 0
    cases = [(128, 2, 1000, 1000, 4, 2, True, 30.0, False), (128, 1, 777, 1300, 2, 2, False, 0.0, True),
             (128, 1, 2048, 2048, 4, 1, True, 20.0, True), (64, 2, 3000, 3000, 2, 2, True, 30.0, False),
             (64, 1, 700, 500, 4, 4, False, 0.0, True), (256, 1, 600, 600, 2, 2, True, 50.0, True)]
    for d, b, sq, sk, h, hk, causal, softcap, alibi in cases:
        torch.manual_seed(len(rows))
        q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16)
        dout = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16)
        kw = dict(causal=causal, softcap=softcap)
        if alibi:
            kw["alibi_slopes"] = torch.rand(b, h, device="cuda", dtype=torch.float32) * 0.3
        forward_sm90.SCORES = True
        common = dict(window_left=-1, window_right=0 if causal else -1, softcap=softcap,
                      alibi_slopes=kw.get("alibi_slopes"), dropout_p=0.0)
        paths = dict(fwd=forward_sm90.supported(q, k, v, varlen=False, block_table=None, **common,
                                                capability=torch.cuda.get_device_capability()),
                     bwd=backward_sm90.supported(q, k, v, dout, varlen=False, deterministic=False, **common,
                                                 capability=torch.cuda.get_device_capability()))
        forward_sm90.SCORES = DEFAULT
        try:
            ref = reference(q, k, v, dout, kw)
            configs.last_compiled.clear()
            eg = [rel(x, r) for x, r in zip(run(q, k, v, dout, kw, True), ref)]
            kernels = configs.kernels_ran()
            et = [rel(x, r) for x, r in zip(run(q, k, v, dout, kw, False), ref)]
            good = all(math.isfinite(a) and a <= 2 * t + 1e-3 for a, t in zip(eg, et))
        except Exception as exc:  # noqa: BLE001
            good, eg, et, kernels = False, [], [], []
            print("ERROR", repr(exc)[:300], flush=True)
        n_fail += not good
        row = dict(kind="check", hdim=d, batch=b, seqlen_q=sq, seqlen_k=sk, nheads=h, nheads_k=hk, causal=causal,
                   softcap=softcap, alibi=alibi, paths=paths, err_out_dq_dk_dv_gluon=eg, err_triton=et,
                   kernels=kernels, ok=good)
        rows.append(row)
        print("PASS" if good else "FAIL", row, flush=True)
    configs.poison_outputs = False
    print(f"gluon softcap/alibi check: {len(cases) - n_fail}/{len(cases)} passed", flush=True)
    return n_fail


def bench(rows):
    d, n, b = 128, 4096, 4
    h = 2048 // d
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    slopes = torch.rand(h, device="cuda") * 0.1
    fl = 4 * b * h * n * n * d / 2
    base = None
    for name, kw, gluon in (("plain", {}, True), ("softcap 30 gluon", dict(softcap=30.0), True),
                            ("softcap 30 triton", dict(softcap=30.0), False),
                            ("alibi gluon", dict(alibi_slopes=slopes), True),
                            ("alibi triton", dict(alibi_slopes=slopes), False)):
        forward_sm90.SCORES = gluon
        fwd = lambda kw=kw: ioattn.flash_attn_func(q, k, v, causal=True, **kw)  # noqa: E731
        tf = triton.testing.do_bench(fwd)
        tfb = triton.testing.do_bench(lambda: torch.autograd.grad(fwd(), (q, k, v), dout))
        forward_sm90.SCORES = DEFAULT
        base = base or (tf, tfb)
        row = dict(kind="bench", case=name, fwd_ms=tf, fwd_bwd_ms=tfb, fwd_tflops=fl / tf * 1e-9,
                   fwd_overhead=tf / base[0] - 1, fwd_bwd_overhead=tfb / base[1] - 1)
        rows.append(row)
        print(f"hdim 128 4k causal {name:18s} fwd {tf:.3f} ms ({row['fwd_overhead']:+.1%})  "
              f"fwd+bwd {tfb:.3f} ms ({row['fwd_bwd_overhead']:+.1%})", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    n_fail = 0 if args.skip_check else check(rows)
    if not args.skip_bench:
        bench(rows)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           rows=rows), fh, indent=1)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
