"""The Gluon Hopper backward with V's own head dim (backward_sm90.VALUE_DIMS: dK/dV by
backward_sm90_d256's kernel, dQ by the Triton kernel) on the GPU, through the public API.

1. flash_attn_func forward + backward at (192, 128) and (256, 128): causal or not, GQA, seqlen_q
   != seqlen_k, odd lengths, a sliding window, softcap + ALiBi, fp16, deterministic=True; errors
   of out, dq, dk, dv against fp64 on the same inputs, next to the Triton backward's (the flag
   off) on the same call. A case passes when the Gluon kernel ran and each error is finite and
   <= 2x the Triton path's + 1e-3. Then packed varlen batches (empty and one-token sequences)
   through flash_attn_varlen_func, against each sequence's fp64 reference.
2. Timing at 192/128 (bf16, 16k tokens, 16 heads): forward + backward with the Gluon backward,
   with the Triton one, and SDPA cuDNN.

    python benchmarks/gluon_value_dim_bwd_check.py [--out f.json] [--skip-bench] [--seqlens 4096]
"""

import argparse
import json
import math
import signal
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import ioattn
from ioattn.kernels import backward_sm90, configs
from ioattn.reference import attention_ref

CASES = [  # (d, dv, batch, sq, sk, h, hk, dtype, opts)
    (192, 128, 2, 700, 900, 8, 2, torch.bfloat16, dict(causal=False)),
    (192, 128, 2, 1000, 777, 4, 4, torch.bfloat16, dict(causal=True)),
    (256, 128, 1, 513, 513, 4, 1, torch.bfloat16, dict(causal=True)),
    (192, 128, 1, 600, 600, 4, 2, torch.float16, dict(causal=True)),
    (192, 128, 1, 900, 900, 4, 2, torch.bfloat16, dict(causal=True, window_size=(200, 0))),
    (192, 128, 1, 700, 700, 8, 2, torch.bfloat16, dict(causal=True, softcap=30.0, alibi=True)),
    (192, 128, 1, 640, 640, 4, 2, torch.bfloat16, dict(causal=False, deterministic=True)),
]


def _errors(q, k, v, dout, opts):
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_opts = {n: x for n, x in opts.items() if n != "deterministic"}
    ref, _ = attention_ref(qr, kr, vr, **ref_opts)
    ref.backward(dout.double())
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    configs.last_compiled.pop("dkdv", None)
    out = ioattn.flash_attn_func(qg, kg, vg, **opts)
    out.backward(dout)
    torch.cuda.synchronize()
    name = getattr(configs.last_compiled.get("dkdv"), "name", "?")
    return [(a.double() - r).abs().max().item() for a, r in ((out, ref), (qg.grad, qr.grad), (kg.grad, kr.grad),
                                                              (vg.grad, vr.grad))], name


VARLEN_CASES = [  # (d, dv, lens_q, lens_k, h, hk, causal)
    (192, 128, [300, 0, 1, 129, 700], [300, 0, 5, 129, 900], 4, 2, True),
    (192, 128, [64, 333, 1000], [64, 333, 1000], 4, 4, False),
    (256, 128, [257, 3, 640], [300, 3, 640], 4, 1, True),
]


def _errors_varlen(d, dv, lens_q, lens_k, h, hk, causal):
    dtype = torch.bfloat16
    cu_q = torch.tensor([0] + lens_q, device="cuda").cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(sum(lens_q), h, d, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=dtype)
    v = torch.randn(sum(lens_k), hk, dv, device="cuda", dtype=dtype)
    dout = torch.randn(sum(lens_q), h, dv, device="cuda", dtype=dtype)
    refs = [torch.zeros(t.shape, dtype=torch.float64, device="cuda") for t in (dout, q, k, v)]
    for i in range(len(lens_q)):
        a, e = int(cu_q[i]), int(cu_q[i + 1])
        c, f = int(cu_k[i]), int(cu_k[i + 1])
        if e == a or f == c:
            continue
        qr, kr, vr = (t[None, lo:hi].detach().double().requires_grad_() for t, lo, hi in ((q, a, e), (k, c, f), (v, c, f)))
        o, _ = attention_ref(qr, kr, vr, causal=causal)
        o.backward(dout[None, a:e].double())
        refs[0][a:e], refs[1][a:e], refs[2][c:f], refs[3][c:f] = o[0].detach(), qr.grad[0], kr.grad[0], vr.grad[0]

    def run():
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
        configs.last_compiled.pop("dkdv", None)
        out = ioattn.flash_attn_varlen_func(qg, kg, vg, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
        out.backward(dout)
        torch.cuda.synchronize()
        name = getattr(configs.last_compiled.get("dkdv"), "name", "?")
        return [(x.double() - r).abs().max().item() for x, r in zip((out, qg.grad, kg.grad, vg.grad), refs)], name

    backward_sm90.VALUE_DIMS = True
    try:
        e_g, kname = run()
        backward_sm90.VALUE_DIMS = False
        e_t, _ = run()
    finally:
        backward_sm90.VALUE_DIMS = True
    return e_g, e_t, kname


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
        try:
            backward_sm90.VALUE_DIMS = True
            e_g, kname = _errors(q, k, v, dout, opts)
            backward_sm90.VALUE_DIMS = False
            e_t, tname = _errors(q, k, v, dout, opts)
            good = "d256" in kname and all(math.isfinite(a) and a <= 2 * t + 1e-3 for a, t in zip(e_g, e_t))
        except Exception as exc:  # noqa: BLE001
            print("ERROR", i, repr(exc)[:300], flush=True)
            e_g = e_t = None
            kname = tname = "?"
            good = False
        finally:
            backward_sm90.VALUE_DIMS = True
        n_fail += not good
        row = dict(kind="check", hdim=d, hdim_v=dv, batch=b, seqlen_q=sq, seqlen_k=sk, nheads=h, nheads_k=hk,
                   dtype=str(dtype), opts={n: x for n, x in opts.items() if n != "alibi_slopes"},
                   alibi="alibi_slopes" in opts, kernel=kname, kernel_triton=tname, err_gluon=e_g, err_triton=e_t,
                   ok=good)
        rows.append(row)
        print("PASS" if good else "FAIL", row, flush=True)
    for i, case in enumerate(VARLEN_CASES):
        torch.manual_seed(100 + i)
        try:
            e_g, e_t, kname = _errors_varlen(*case)
            good = "d256" in kname and all(math.isfinite(a) and a <= 2 * t + 1e-3 for a, t in zip(e_g, e_t))
        except Exception as exc:  # noqa: BLE001
            print("ERROR varlen", i, repr(exc)[:300], flush=True)
            e_g = e_t = None
            kname, good = "?", False
        n_fail += not good
        d, dv, lens_q, lens_k, h, hk, causal = case
        row = dict(kind="check_varlen", hdim=d, hdim_v=dv, lens_q=lens_q, lens_k=lens_k, nheads=h, nheads_k=hk,
                   causal=causal, kernel=kname, err_gluon=e_g, err_triton=e_t, ok=good)
        rows.append(row)
        print("PASS" if good else "FAIL", row, flush=True)
    configs.poison_outputs = False
    n_all = len(CASES) + len(VARLEN_CASES)
    print(f"value-dim backward check: {n_all - n_fail}/{n_all} passed", flush=True)
    return n_fail


def bench(rows, seqlens):
    d, dv, h = 192, 128, 16
    for n in seqlens:
        b = 16384 // n
        for causal in (False, True):
            q, k = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
            v = torch.randn(b, n, h, dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            dout = torch.randn(b, n, h, dv, device="cuda", dtype=torch.bfloat16)
            qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
            dout_t = dout.transpose(1, 2)
            fl = 2 * b * h * n * n * (4 * d + 3 * dv) / (2 if causal else 1)  # forward + backward

            def ours(on):
                def f():
                    backward_sm90.VALUE_DIMS = on
                    ioattn.flash_attn_func(q, k, v, causal=causal).backward(dout)
                return f

            def cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).backward(dout_t)

            line = []
            for name, fn in (("ioattn_gluon_bwd", ours(True)), ("ioattn_triton_bwd", ours(False)),
                             ("sdpa_cudnn", cudnn)):
                try:
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                except Exception as exc:  # noqa: BLE001
                    print(name, "failed", repr(exc)[:160])
                    ms = float("nan")
                rows.append(dict(kind="bench", provider=name, mode="fwd_bwd", hdim=d, hdim_v=dv, seqlen=n, batch=b,
                                 nheads=h, causal=causal, dtype="bf16", ms=ms, tflops=fl / ms / 1e9))
                line.append(f"{name} {fl / ms / 1e9:6.1f}")
            backward_sm90.VALUE_DIMS = True
            print(f"192/128 n {n:5d} causal {causal!s:5} fwd+bwd TFLOP/s: " + "  ".join(line), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--seqlens", default="4096,16384")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # a `timeout` still writes the rows so far
    rows, n_fail = [], 0
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    try:
        n_fail = check(rows)
        if not args.skip_bench:
            bench(rows, [int(x) for x in args.seqlens.split(",")])
    finally:
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                               triton=triton.__version__, rows=rows), fh, indent=1)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
