"""The Gluon dQ kernel of the split-mode backward (kernels/backward_sm90_dq.py, IOATTN_GLUON_DQ) on
the GPU, through the public API.

1. flash_attn_func forward + backward with the kernel on and off (the Triton dQ kernel) on the
   same inputs: (Q/K, V) head dims 128/128 under deterministic=True (the split mode
   there), 192/128, 256/128 and 256/256 (split by default); causal or not, GQA, seqlen_q !=
   seqlen_k both ways (causal with more queries than keys: rows that see nothing), odd lengths,
   sliding windows (left, 0) and (left, -1), softcap + ALiBi, fp16. Errors of out, dq, dk, dv
   against fp64. A case passes when the Gluon dQ kernel ran and each error is finite and <= 2x the
   Triton path's + 1e-3; dq of two deterministic calls must be bit-identical.
2. Timing (--skip-check to run it alone): the backward alone (autograd.grad of a kept graph,
   do_bench medians), the kernel off / on, bf16, 16k tokens, and cuDNN's backward (SDPA) where it
   takes the shape.

    python benchmarks/gluon_dq_check.py [--skip-check] [--skip-bench] [--out f.json]
"""

import argparse
import json
import math
import signal
import sys

import torch
import triton

import ioattn
from ioattn.kernels import backward_sm90_dq, configs
from ioattn.reference import attention_ref

CASES = [  # (d, dv, batch, sq, sk, h, hk, dtype, opts)
    (128, 128, 2, 700, 900, 8, 2, torch.bfloat16, dict(causal=False, deterministic=True)),
    (128, 128, 2, 1000, 777, 4, 4, torch.bfloat16, dict(causal=True, deterministic=True)),
    (128, 128, 1, 1200, 513, 4, 1, torch.bfloat16, dict(causal=True, deterministic=True)),
    (128, 128, 1, 900, 900, 4, 2, torch.float16, dict(causal=True, window_size=(200, 0), deterministic=True)),
    (128, 128, 1, 700, 650, 4, 2, torch.bfloat16, dict(causal=False, window_size=(100, -1), deterministic=True)),
    (128, 128, 1, 700, 700, 8, 2, torch.bfloat16, dict(causal=True, softcap=30.0, alibi=True, deterministic=True)),
    (192, 128, 2, 700, 900, 8, 2, torch.bfloat16, dict(causal=False)),
    (192, 128, 2, 1000, 777, 4, 4, torch.bfloat16, dict(causal=True)),
    (192, 128, 1, 600, 600, 4, 2, torch.float16, dict(causal=True)),
    (192, 128, 1, 900, 900, 4, 2, torch.bfloat16, dict(causal=True, window_size=(200, 0))),
    (192, 128, 1, 700, 700, 8, 2, torch.bfloat16, dict(causal=True, softcap=30.0, alibi=True)),
    (256, 128, 1, 513, 513, 4, 1, torch.bfloat16, dict(causal=True)),
    (256, 256, 1, 777, 640, 4, 2, torch.bfloat16, dict(causal=False)),
    (256, 256, 2, 1000, 1000, 4, 4, torch.bfloat16, dict(causal=True)),
    (256, 256, 1, 700, 700, 4, 2, torch.bfloat16, dict(causal=True, softcap=30.0, window_size=(300, 0))),
]

BENCH = [  # (d, dv, seqlen, causal, deterministic)
    (192, 128, 4096, False, False), (192, 128, 4096, True, False), (192, 128, 16384, True, False),
    (256, 256, 4096, False, False), (256, 256, 4096, True, False),
    (128, 128, 4096, False, True), (128, 128, 4096, True, True),
]


def _run(q, k, v, dout, opts, seed):
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(seed)
    configs.last_compiled.pop("dq", None)
    out = ioattn.flash_attn_func(qg, kg, vg, **opts)
    out.backward(dout)
    torch.cuda.synchronize()
    return out, qg.grad, kg.grad, vg.grad, getattr(configs.last_compiled.get("dq"), "name", "?")


def check(rows):
    configs.poison_outputs = True
    n_fail = 0
    for i, (d, dv, b, sq, sk, h, hk, dtype, opts) in enumerate(CASES):
        torch.manual_seed(i)
        q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
        k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
        v = torch.randn(b, sk, hk, dv, device="cuda", dtype=dtype)
        dout = torch.randn(b, sq, h, dv, device="cuda", dtype=dtype)
        opts = dict(opts)
        if opts.pop("alibi", False):
            opts["alibi_slopes"] = torch.rand(h, device="cuda", dtype=torch.float32)
        kname = tname = "?"
        e_g = e_t = None
        try:
            qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
            ref, _ = attention_ref(qr, kr, vr, **{n: x for n, x in opts.items() if n != "deterministic"})
            ref.backward(dout.double())
            refs = (ref, qr.grad, kr.grad, vr.grad)
            backward_sm90_dq.ENABLED = True
            *got, kname = _run(q, k, v, dout, opts, i)
            *again, _ = _run(q, k, v, dout, opts, i)
            e_g = [(a.double() - r).abs().max().item() for a, r in zip(got, refs)]
            backward_sm90_dq.ENABLED = False
            *tri, tname = _run(q, k, v, dout, opts, i)
            e_t = [(a.double() - r).abs().max().item() for a, r in zip(tri, refs)]
            same = torch.equal(got[1], again[1])
            good = kname == "_attn_bwd_dq_sm90" and same and all(
                math.isfinite(a) and a <= 2 * t + 1e-3 for a, t in zip(e_g, e_t))
        except Exception as exc:  # noqa: BLE001
            print("ERROR", i, repr(exc)[:400], flush=True)
            good = same = False
        finally:
            backward_sm90_dq.ENABLED = True
        n_fail += not good
        row = dict(kind="check", hdim=d, hdim_v=dv, batch=b, seqlen_q=sq, seqlen_k=sk, nheads=h, nheads_k=hk,
                   dtype=str(dtype), opts={n: x for n, x in opts.items() if n != "alibi_slopes"},
                   alibi="alibi_slopes" in opts, kernel=kname, kernel_triton=tname, err_gluon=e_g, err_triton=e_t,
                   dq_bit_identical=same, ok=good)
        rows.append(row)
        print("PASS" if good else "FAIL", row, flush=True)
    configs.poison_outputs = False
    print(f"gluon dQ check: {len(CASES) - n_fail}/{len(CASES)} passed", flush=True)
    return n_fail


def bench(rows):
    from triton.testing import do_bench
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for d, dv, n, causal, det in BENCH:
        b, h = 16384 // n, 16 if d <= 128 else 8
        q = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, n, h, dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dout = torch.randn(b, n, h, dv, device="cuda", dtype=torch.bfloat16)
        flops = 2.5 * 2 * b * h * n * n * (d + dv) * (0.5 if causal else 1.0)
        res = {}
        for flag in (False, True):
            backward_sm90_dq.ENABLED = flag
            out = ioattn.flash_attn_func(q, k, v, causal=causal, deterministic=det)
            res["gluon_dq" if flag else "triton_dq"] = do_bench(
                lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), warmup=50, rep=300)
        backward_sm90_dq.ENABLED = True
        try:
            qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            dt = dout.transpose(1, 2).contiguous()
            res["cudnn"] = do_bench(lambda: torch.autograd.grad(out, (qt, kt, vt), dt, retain_graph=True),
                                    warmup=50, rep=300)
        except Exception as exc:  # noqa: BLE001
            print("cudnn", repr(exc)[:120], flush=True)
        for prov, ms in res.items():
            row = dict(kind="bench", mode="bwd", provider=prov, hdim=d, hdim_v=dv, seqlen=n, batch=b, nheads=h,
                       causal=causal, deterministic=det, ms=ms, tflops=flops / ms * 1e-9)
            rows.append(row)
        print(f"{d}/{dv} {n} causal={causal} det={det}: " + "  ".join(
            f"{p} {ms:.3f} ms {flops / ms * 1e-9:.0f}" for p, ms in res.items()), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # a `timeout` still writes the rows so far
    rows, n_fail = [], 0
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    try:
        if not args.skip_check:
            n_fail = check(rows)
        if not args.skip_bench:
            bench(rows)
    finally:
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                               triton=triton.__version__, rows=rows), fh, indent=1)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
