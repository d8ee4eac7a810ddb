"""The Gluon Hopper backward at head dim 256 (kernels/backward_sm90_d256.py, opt-in by
IOATTN_GLUON_BWD256=1) on the GPU: numbers, then speed.

1. Correctness through the public API (ioattn.flash_attn_func, autograd): out, dq, dk, dv of the
   Gluon backward in both modes ("atomic": dK, dV, dQ in one pass; "split": Gluon dK/dV, then the
   Triton dQ kernel) and of the Triton backward, against the fp64 reference
   (ioattn.reference.attention_ref, gradients by autograd), on the same inputs; outputs
   NaN-prefilled (configs.poison_outputs). Odd lengths, seqlen_q != seqlen_k (rows that see no
   key under the causal mask), GQA/MQA, bf16 and fp16. A case passes when each Gluon error is
   finite and at most 2x the Triton path's + 1e-3, and the hdim-256 kernel did run.
2. Backward timing at 1k/4k/16k (16k tokens, 8 heads of 256, bf16, causal or not): both Gluon
   modes, the Triton backward and SDPA cuDNN, in TFLOP/s (2.5 x 4 b h n^2 d, halved when causal).

With --options (and IOATTN_GLUON_BWD256_OPTIONS=1, which the script also sets in the module):
the options of the hdim-256 kernel instead, sliding windows (left, 0) / (left, -1) with odd
left, softcap 30 / 50, ALiBi slopes (h,) and (b, h), packed varlen batches with mixed lengths
and empty sequences, against the fp64 reference (varlen: attention_varlen_ref, each sequence
alone) next to the Triton backward, same pass rule; then the backward time at hdim 256, 4k,
causal with softcap 50 and with a window of 1024 keys: Gluon split / atomic vs Triton (ms).

    IOATTN_GLUON_BWD256=1 python benchmarks/gluon_bwd256_check.py [--out f.json] [--skip-bench]
    IOATTN_GLUON_BWD256_OPTIONS=1 python benchmarks/gluon_bwd256_check.py --options [--out f.json]
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import ioattn
from ioattn.kernels import backward_sm90, configs
from ioattn.reference import attention_ref, attention_varlen_ref

MODES = ("atomic", "split")  # the Gluon modes; "triton" is the Triton backward
CASES = [  # (dtype, batch, seqlen_q, seqlen_k, heads, kv heads, causal)
    (torch.bfloat16, 1, 257, 300, 4, 2, False),
    (torch.bfloat16, 1, 300, 70, 4, 4, True),  # seqlen_q > seqlen_k: rows that see no key
    (torch.bfloat16, 2, 1000, 1000, 2, 1, True),  # MQA
    (torch.float16, 1, 777, 1300, 2, 2, True),  # seqlen_k > seqlen_q
    (torch.float16, 2, 2048, 2048, 2, 2, False),
    (torch.bfloat16, 1, 130, 4100, 8, 2, False),
]


def set_path(path, options=False):
    """'atomic' / 'split': the hdim-256 Gluon kernel in that mode; 'triton': the Triton backward.
    options: the window / softcap / ALiBi / varlen coverage as well (IOATTN_GLUON_BWD256_OPTIONS)."""
    backward_sm90.D256 = path != "triton"
    backward_sm90.D256_OPTIONS = options and path != "triton"
    backward_sm90.MODE = path if path != "triton" else "auto"


def ran_d256():
    """Whether the last backward ran the hdim-256 Gluon kernel (the launchers keep what they ran)."""
    names = [getattr(configs.last_compiled.get(k), "name", "") or "" for k in ("bwd_sm90", "dkdv")]
    return any("d256" in n for n in names)


def grads(q, k, v, dout, causal, path):
    set_path(path)
    configs.last_compiled.clear()
    qi, ki, vi = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = ioattn.flash_attn_func(qi, ki, vi, causal=causal)
    g = torch.autograd.grad(out, (qi, ki, vi), dout)
    torch.cuda.synchronize()
    return (out.detach(), *g), ran_d256()


def reference(q, k, v, dout, causal):
    qf, kf, vf = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, _ = attention_ref(qf, kf, vf, causal=causal)
    return (out.detach(), *torch.autograd.grad(out, (qf, kf, vf), dout.double()))


def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def check(rows):
    configs.poison_outputs = True
    n_fail = 0
    for dtype, b, sq, sk, h, hk, causal in CASES:
        torch.manual_seed(len(rows))
        q = torch.randn(b, sq, h, 256, device="cuda", dtype=dtype)
        k = torch.randn(b, sk, hk, 256, device="cuda", dtype=dtype)
        v = torch.randn(b, sk, hk, 256, device="cuda", dtype=dtype)
        dout = torch.randn(b, sq, h, 256, device="cuda", dtype=dtype)
        shape = f"{str(dtype)[6:]} b{b} sq{sq} sk{sk} h{h}/{hk} causal={causal}"
        errs, ran = {}, {}
        try:
            ref = reference(q, k, v, dout, causal)
            for path in ("triton", ) + MODES:  # (each printed at once: a hang shows where it is)
                g, ran[path] = grads(q, k, v, dout, causal, path)
                errs[path] = [rel(x, r) for x, r in zip(g, ref)]
                print(f"  {shape} {path:6s} ran_d256={ran[path]} err out/dq/dk/dv " +
                      " ".join(f"{e:.2e}" for e in errs[path]), flush=True)
            good = all(ran[m] for m in MODES) and not ran["triton"] and all(
                math.isfinite(eg) and eg <= 2 * et + 1e-3 for m in MODES for eg, et in zip(errs[m], errs["triton"]))
        except Exception as exc:  # noqa: BLE001
            good = False
            print("ERROR", shape, repr(exc)[:400], flush=True)
        n_fail += not good
        row = dict(kind="check", dtype=str(dtype), batch=b, seqlen_q=sq, seqlen_k=sk, nheads=h, nheads_k=hk,
                   causal=causal, ran_d256=ran, err_out_dq_dk_dv=errs, ok=good)
        rows.append(row)
        print("PASS" if good else "FAIL", row, flush=True)
    configs.poison_outputs = False
    set_path("atomic")
    print(f"gluon hdim256 backward check: {len(CASES) - n_fail}/{len(CASES)} passed", flush=True)
    return n_fail


def flops(b, h, n, d, causal):
    return 2.5 * 4 * b * h * n * n * d / (2 if causal else 1)


def bench(rows, seqlens):
    d, h = 256, 8
    for n in seqlens:
        b = 16384 // n
        for causal in (False, True):
            q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            dout = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)
            out = ioattn.flash_attn_func(q, k, v, causal=causal)
            runs = {f"ioattn_{p}": (out, (q, k, v), dout, p) for p in MODES + ("triton", )}
            qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                runs["sdpa_cudnn"] = (F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal), (qt, kt, vt),
                                      dout.transpose(1, 2), None)
            res = {}
            for name, (o, inputs, g, path) in runs.items():
                if path is not None:
                    set_path(path)
                try:
                    ms = triton.testing.do_bench(lambda: torch.autograd.grad(o, inputs, g, retain_graph=True),
                                                 warmup=25, rep=100, return_mode="median")
                    res[name] = flops(b, h, n, d, causal) / ms / 1e9
                except Exception as exc:  # noqa: BLE001
                    print(name, "failed", repr(exc)[:200], flush=True)
                    res[name] = float("nan")
                rows.append(dict(kind="bench", provider=name, mode="bwd", hdim=d, seqlen=n, batch=b, nheads=h,
                                 causal=causal, tflops=res[name]))
            set_path("atomic")
            print(f"bwd hdim 256 n {n:5d} causal {causal!s:5}: " + "  ".join(f"{k} {v:6.1f}" for k, v in res.items())
                  + f"  atomic/triton {res['ioattn_atomic'] / res['ioattn_triton']:.2f}"
                  + f"  atomic/cudnn {res['ioattn_atomic'] / res['sdpa_cudnn']:.2f}"
                  + f"  split/triton {res['ioattn_split'] / res['ioattn_triton']:.2f}", flush=True)


# --options: (dtype, batch or varlen lengths (q, k), seqlen_q, seqlen_k, heads, kv heads, causal, left,
# softcap, alibi: None, "h" or "bh"); left -1: no window, else (left, 0) causal / (left, -1) not.
# (Six option sets: each compiles its own Triton and Gluon kernels, ~20 s on a cold cache.)
OPTION_CASES = [
    (torch.bfloat16, 1, 1000, 1000, 4, 2, True, 255, 0.0, None),  # (left, 0)
    (torch.bfloat16, 2, 777, 900, 2, 1, False, 127, 0.0, "bh"),  # (left, -1), ALiBi (b, h), MQA
    (torch.bfloat16, 1, 1025, 1025, 4, 4, True, -1, 30.0, None),
    (torch.float16, 1, 600, 1300, 2, 2, True, 301, 50.0, "h"),  # softcap 50 + window + ALiBi (h,)
    # packed varlen batches: empty sequences, lengths off the tiles, seqlen_q != seqlen_k
    (torch.bfloat16, ([300, 0, 1, 129, 700], [300, 0, 1, 129, 700]), None, None, 4, 2, True, -1, 30.0, None),
    (torch.bfloat16, ([64, 500, 257, 3], [100, 77, 1000, 0]), None, None, 2, 2, False, 201, 0.0, "bh"),
]


def option_grads(q, k, v, dout, c, path, varlen_args=None):
    dtype, _, _, _, h, hk, causal, left, softcap, alibi = c
    set_path(path, options=True)
    configs.last_compiled.clear()
    qi, ki, vi = (t.detach().clone().requires_grad_() for t in (q, k, v))
    kw = dict(causal=causal, window_size=(left, 0 if causal else -1), softcap=softcap, alibi_slopes=alibi)
    if varlen_args is None:
        out = ioattn.flash_attn_func(qi, ki, vi, **kw)
    else:
        out = ioattn.flash_attn_varlen_func(qi, ki, vi, *varlen_args, **kw)
    g = torch.autograd.grad(out, (qi, ki, vi), dout)
    torch.cuda.synchronize()
    return (out.detach(), *g), ran_d256()


def option_reference(q, k, v, dout, c, cu=None):
    _, _, _, _, _, _, causal, left, softcap, alibi = c
    qf, kf, vf = (t.detach().double().requires_grad_() for t in (q, k, v))
    kw = dict(causal=causal, window_size=(left, 0 if causal else -1), softcap=softcap, alibi_slopes=alibi)
    if cu is None:
        out, _ = attention_ref(qf, kf, vf, **kw)
    else:  # each sequence alone (an empty one: no rows, or out = 0 and no keys)
        out, _ = attention_varlen_ref(qf, kf, vf, cu[0], cu[1], **kw)
    return (out.detach(), *torch.autograd.grad(out, (qf, kf, vf), dout.double(), allow_unused=True))


def check_options(rows, modes):
    configs.poison_outputs = True
    n_fail = 0
    for c in OPTION_CASES:
        dtype, b, sq, sk, h, hk, causal, left, softcap, alibi_kind = c
        torch.manual_seed(len(rows))
        dev = dict(device="cuda", dtype=dtype)
        if isinstance(b, tuple):  # packed varlen batch
            lens_q, lens_k = b
            q = torch.randn(sum(lens_q), h, 256, **dev)
            k, v = (torch.randn(sum(lens_k), hk, 256, **dev) for _ in range(2))
            dout = torch.randn(sum(lens_q), h, 256, **dev)
            cu = [torch.tensor([0] + x, device="cuda").cumsum(0).to(torch.int32) for x in (lens_q, lens_k)]
            varlen_args = (*cu, max(lens_q), max(lens_k))
            nb = len(lens_q)
            shape = f"varlen q{lens_q} k{lens_k}"
        else:
            q = torch.randn(b, sq, h, 256, **dev)
            k, v = (torch.randn(b, sk, hk, 256, **dev) for _ in range(2))
            dout = torch.randn(b, sq, h, 256, **dev)
            cu, varlen_args, nb = None, None, b
            shape = f"b{b} sq{sq} sk{sk}"
        slopes = None
        if alibi_kind is not None:  # ALiBi slopes as in the paper's geometric series, per batch row if "bh"
            base = torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)], device="cuda")
            slopes = base if alibi_kind == "h" else base * torch.rand(nb, 1, device="cuda").add(0.5)
        c = (*c[:9], slopes)
        shape = (f"{str(dtype)[6:]} {shape} h{h}/{hk} causal={causal} window=({left}, {0 if causal else -1}) "
                 f"softcap={softcap} alibi={alibi_kind}")
        errs, ran = {}, {}
        try:
            ref = option_reference(q, k, v, dout, c, cu)
            for path in ("triton", ) + modes:
                g, ran[path] = option_grads(q, k, v, dout, c, path, varlen_args)
                errs[path] = [rel(x, r) for x, r in zip(g, ref)]
                print(f"  {shape} {path:6s} ran_d256={ran[path]} err out/dq/dk/dv " +
                      " ".join(f"{e:.2e}" for e in errs[path]), flush=True)
            good = all(ran[m] for m in modes) and not ran["triton"] and all(
                math.isfinite(eg) and eg <= 2 * et + 1e-3 for m in modes for eg, et in zip(errs[m], errs["triton"]))
        except Exception as exc:  # noqa: BLE001
            good = False
            print("ERROR", shape, repr(exc)[:400], flush=True)
        n_fail += not good
        row = dict(kind="check_options", case=shape, ran_d256=ran, err_out_dq_dk_dv=errs, ok=good)
        rows.append(row)
        print("PASS" if good else "FAIL", row, flush=True)
    configs.poison_outputs = False
    set_path("split")
    print(f"gluon hdim256 backward options check: {len(OPTION_CASES) - n_fail}/{len(OPTION_CASES)} passed",
          flush=True)
    return n_fail


def bench_options(rows, modes, n=4096):
    """Backward time (ms) at hdim 256, n tokens, causal: softcap 50, and a window of 1024 keys."""
    d, h, b = 256, 8, 16384 // n
    for name, kw in (("softcap50", dict(softcap=50.0)), ("window1024", dict(window_size=(1024, 0)))):
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)
        out = ioattn.flash_attn_func(q, k, v, causal=True, **kw)
        res = {}
        for path in ("triton", ) + modes:
            set_path(path, options=True)
            try:
                res[path] = triton.testing.do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout,
                                                                                retain_graph=True),
                                                    warmup=25, rep=100, return_mode="median")
            except Exception as exc:  # noqa: BLE001
                print(path, "failed", repr(exc)[:200], flush=True)
                res[path] = float("nan")
            rows.append(dict(kind="bench_options", case=name, provider=path, hdim=d, seqlen=n, batch=b, nheads=h,
                             causal=True, ms=res[path]))
        set_path("split")
        print(f"bwd hdim 256 n {n} causal {name:10s}: " + "  ".join(f"{p} {t:.3f} ms" for p, t in res.items())
              + "  " + "  ".join(f"triton/{m} {res['triton'] / res[m]:.2f}x" for m in modes), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--seqlens", default="1024,4096,16384")
    ap.add_argument("--options", action="store_true", help="the window / softcap / ALiBi / varlen coverage")
    ap.add_argument("--modes", default=",".join(MODES), help="Gluon modes checked (--options)")
    args = ap.parse_args(argv)
    rows = []
    t0 = time.time()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
          "IOATTN_GLUON_BWD256", os.environ.get("IOATTN_GLUON_BWD256"), "IOATTN_GLUON_BWD256_OPTIONS",
          os.environ.get("IOATTN_GLUON_BWD256_OPTIONS"), flush=True)
    n_fail = 0
    try:
        if args.options:
            modes = tuple(args.modes.split(","))
            n_fail = check_options(rows, modes)
            print(f"options check took {time.time() - t0:.0f}s", flush=True)
            if not args.skip_bench:
                bench_options(rows, modes)
            return 1 if n_fail else 0
        n_fail = check(rows)
        print(f"check took {time.time() - t0:.0f}s", flush=True)
        if not args.skip_bench:
            bench(rows, [int(x) for x in args.seqlens.split(",")])
    finally:
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                               triton=triton.__version__, rows=rows, failed=n_fail), fh, indent=1)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
