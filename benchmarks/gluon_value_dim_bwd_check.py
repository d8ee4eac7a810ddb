"""The Gluon Hopper backward with V's own head dim (backward_sm90.VALUE_DIMS: dK/dV by
backward_sm90_d256's kernel, dQ by the Triton kernel) on the GPU, through the public API.

1. flash_attn_func forward + backward at (192, 128) and (256, 128): causal or not, GQA, seqlen_q
   != seqlen_k, odd lengths, a sliding window, softcap + ALiBi, fp16, deterministic=True; errors
   of out, dq, dk, dv against fp64 on the same inputs, next to the Triton backward's (the flag
   off) on the same call. A case passes when the Gluon kernel ran and each error is finite and
   <= 2x the Triton path's + 1e-3. Then packed varlen batches (empty and one-token sequences)
   through flash_attn_varlen_func, against each sequence's fp64 reference.
Its timing is gluon_value_dim_check.py's (--skip-check): the "ioattn_gluon_bwd" rows.

    python benchmarks/gluon_value_dim_bwd_check.py [--out f.json]
"""

import argparse
import json
import math
import signal
import sys

import torch
import triton

import ioattn
from ioattn.kernels import backward_sm90, configs
from ioattn.reference import attention_ref

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from gluon_value_dim_check import _api_errors  # noqa: E402

CASES = [  # (d, dv, batch, sq, sk, h, hk, dtype, opts)
    (192, 128, 2, 700, 900, 8, 2, torch.bfloat16, dict(causal=False)),
    (192, 128, 2, 1000, 777, 4, 4, torch.bfloat16, dict(causal=True)),
    (256, 128, 1, 513, 513, 4, 1, torch.bfloat16, dict(causal=True)),
    (192, 128, 1, 600, 600, 4, 2, torch.float16, dict(causal=True)),
    (192, 128, 1, 900, 900, 4, 2, torch.bfloat16, dict(causal=True, window_size=(200, 0))),
    (192, 128, 1, 700, 700, 8, 2, torch.bfloat16, dict(causal=True, softcap=30.0, alibi=True)),
    (192, 128, 1, 640, 640, 4, 2, torch.bfloat16, dict(causal=False, deterministic=True)),
]


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
            e_g, kname = _api_errors(q, k, v, dout, opts, None, i, kernel="dkdv")
            backward_sm90.VALUE_DIMS = False
            e_t, tname = _api_errors(q, k, v, dout, opts, None, i, kernel="dkdv")
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


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # a `timeout` still writes the rows so far
    rows, n_fail = [], 0
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    try:
        n_fail = check(rows)
    finally:
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                               triton=triton.__version__, rows=rows), fh, indent=1)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
