"""The Gluon Hopper backward (kernels/backward_sm90.py) on the GPU: numbers, then speed.

1. Correctness through the public API (ioattn.flash_attn_func, autograd): dq, dk, dv of each
   Hopper backward (backward_sm90.MODE "split": Gluon dK/dV + Triton dQ; "atomic": one Gluon
   pass; "0": the Triton backward) against an fp32 reference (SDPA math on fp32 copies), over odd
   lengths, seqlen_q != seqlen_k (incl. rows with no key under the causal mask), GQA/MQA,
   bf16/fp16, hdim 64/128. Outputs are NaN-prefilled (configs.poison_outputs). A case
   passes when each Gluon mode's relative L2 error is at most 2x the Triton path's + 1e-3.
2. Backward timing (16k tokens, bf16): ioattn in each mode, SDPA cuDNN, SDPA flash.

    python benchmarks/gluon_bwd_check.py [--out f.json] [--skip-bench]
"""

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import ioattn
from ioattn.kernels import backward_sm90, configs


def rel(x, ref):
    return ((x.float() - ref).norm() / ref.norm().clamp_min(1e-6)).item()


def reference_grads(q, k, v, dout, causal, left=-1, with_out=False):
    """fp32 dq, dk, dv (and out first, with_out) of attention, causal and/or with a sliding
    window of ``left`` keys (left < 0: none), bottom-right aligned."""
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    g = q.shape[2] // k.shape[2]
    sq, sk = q.shape[1], k.shape[1]
    qt = qf.transpose(1, 2)
    kt = kf.transpose(1, 2).repeat_interleave(g, 1)
    vt = vf.transpose(1, 2).repeat_interleave(g, 1)
    s = qt @ kt.transpose(-1, -2) / math.sqrt(q.shape[-1])
    d = torch.arange(sk, device=q.device)[None, :] - torch.arange(sq, device=q.device)[:, None] - (sk - sq)
    keep = torch.ones_like(d, dtype=torch.bool)
    if causal:
        keep &= d <= 0
    if left >= 0:
        keep &= d >= -left
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    out = (p @ vt).transpose(1, 2)
    grads = torch.autograd.grad(out, (qf, kf, vf), dout.float())
    return (out.detach(), *grads) if with_out else grads


# modes checked and timed: "atomic" is the one-pass kernel (dQ by TMA reductions since session 7;
# by scalar atomics in session 6c, results/h200-session6c)
MODES = ("atomic", "split", "0")
SEQLENS = (1024, 4096, 16384)
N_CASES = 4  # per head dim


def set_mode(mode):
    """MODE, or MODE@BLOCK_M: the query rows per block at head dim 64 (an A/B knob)."""
    mode, _, bm = mode.partition("@")
    backward_sm90.MODE = mode
    backward_sm90.BLOCK_M_OVERRIDE.clear()
    if bm:
        backward_sm90.BLOCK_M_OVERRIDE[64] = int(bm)


def ioattn_grads(q, k, v, dout, causal, mode):
    set_mode(mode)
    qi, ki, vi = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = ioattn.flash_attn_func(qi, ki, vi, causal=causal)
    return torch.autograd.grad(out, (qi, ki, vi), dout)


def check(rows):
    configs.poison_outputs = True
    cases = []
    for d in backward_sm90.HEAD_DIMS:
        # (session 6c checked the one-pass kernel on 43 shapes; each case here compiles three
        # backwards, so the grid is small: odd lengths with GQA, seqlen_q > seqlen_k with rows
        # that see no key, several key blocks per CTA)
        cases += [(d, torch.bfloat16, 1, 257, 300, 4, 2, False), (d, torch.bfloat16, 1, 300, 70, 4, 4, True),
                  (d, torch.bfloat16, 3, 2048, 2048, 2, 2, True), (d, torch.float16, 2, 1000, 1000, 2, 1, False)
                  ][:N_CASES]
    n_fail = 0
    for d, dtype, b, sq, sk, h, hk, causal in cases:
        torch.manual_seed(len(rows))
        q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
        k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
        v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
        dout = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
        set_mode("split")
        sup = backward_sm90.supported(q, k, v, dout, varlen=False, window_left=-1, window_right=0 if causal else -1,
                                      softcap=0.0, alibi_slopes=None, dropout_p=0.0, deterministic=False,
                                      capability=torch.cuda.get_device_capability())
        try:
            ref = reference_grads(q, k, v, dout, causal)
            errs = {}
            for mode in MODES:
                g = ioattn_grads(q, k, v, dout, causal, mode)
                torch.cuda.synchronize()
                errs[mode] = [rel(x, r) for x, r in zip(g, ref)]
            good = all(math.isfinite(eg) and eg <= 2 * et + 1e-3
                       for mode in MODES if mode != "0" for eg, et in zip(errs[mode], errs["0"]))
        except Exception as exc:  # noqa: BLE001
            good, errs = False, {}
            print("ERROR", repr(exc)[:400], flush=True)
        n_fail += not good
        row = dict(kind="check", hdim=d, dtype=str(dtype), batch=b, seqlen_q=sq, seqlen_k=sk, nheads=h,
                   nheads_k=hk, causal=causal, gluon_path=sup, err_dq_dk_dv=errs, ok=good)
        rows.append(row)
        print(("PASS" if good else "FAIL"), row, flush=True)
    configs.poison_outputs = False
    print(f"gluon backward check: {len(cases) - n_fail}/{len(cases)} passed", flush=True)
    return n_fail


def flops(b, h, n, d, causal):
    return 2.5 * 4 * b * h * n * n * d / (2 if causal else 1)


def bench(rows):
    for d in (128, 64):
        h = 2048 // d
        for n in SEQLENS:
            b = 16384 // n
            for causal in (False, True):
                q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                dout = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)
                qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
                out = ioattn.flash_attn_func(q, k, v, causal=causal)
                outs = {f"ioattn_{m if m != '0' else 'triton'}": (out, (q, k, v), dout, m) for m in MODES
                        if "@" not in m or d == 64}  # (the @BLOCK_M knob is for hdim 64)
                for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                                      ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
                    with sdpa_kernel(backend):
                        outs[name] = (F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal), (qt, kt, vt),
                                      dout.transpose(1, 2), None)
                res = {}
                for name, (out, inputs, g, mode) in outs.items():
                    if mode is not None:
                        set_mode(mode)
                    try:
                        ms = triton.testing.do_bench(
                            lambda: torch.autograd.grad(out, inputs, g, retain_graph=True),
                            warmup=25, rep=100, return_mode="median")
                        res[name] = flops(b, h, n, d, causal) / ms / 1e9
                    except Exception as exc:  # noqa: BLE001
                        print(name, "failed", repr(exc)[:200])
                        res[name] = float("nan")
                    rows.append(dict(kind="bench", provider=name, mode="bwd", hdim=d, seqlen=n, batch=b, nheads=h,
                                     causal=causal, tflops=res[name]))
                print(f"bwd hdim {d} n {n:5d} causal {causal!s:5}: " +
                      "  ".join(f"{k} {v:6.1f}" for k, v in res.items()) +
                      "  " + "  ".join(f"{m}/cudnn {res[m] / res['sdpa_cudnn']:.2f}" for m in res
                                       if m.startswith("ioattn")), flush=True)


def profile(rows, d=128, n=4096, causal=False):
    """Where each mode's backward spends its GPU time: kernels and their mean time per call
    (torch.profiler over 10 calls), to tell the Gluon kernel's share from the rest."""
    from torch.profiler import ProfilerActivity, profile as tprofile
    h, b = 2048 // d, 16384 // n
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)
    out = ioattn.flash_attn_func(q, k, v, causal=causal)
    for mode in MODES:
        set_mode(mode)
        for _ in range(3):
            torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        torch.cuda.synchronize()
        with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
            torch.cuda.synchronize()
        kern = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kern[e.name] = kern.get(e.name, 0.0) + e.device_time / 10
        total = sum(kern.values())
        print(f"profile hdim {d} n {n} causal {causal} mode {mode}: {total:.0f} us per backward, "
              f"{flops(b, h, n, d, causal) / total / 1e6:.0f} TFLOP/s by GPU time", flush=True)
        for name, us in sorted(kern.items(), key=lambda kv: -kv[1])[:6]:
            print(f"    {us:8.1f} us  {name[:90]}", flush=True)
        rows.append(dict(kind="profile", mode=mode, hdim=d, seqlen=n, causal=causal, total_us=total, kernels=kern))


def main(argv=None):
    global MODES, SEQLENS, N_CASES
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--profile", action="store_true", help="kernel times per mode (hdim 128, 4k) before timing")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--seqlens", default=",".join(map(str, SEQLENS)))
    ap.add_argument("--cases", type=int, default=N_CASES, help="check cases per head dim (at most 4)")
    args = ap.parse_args(argv)
    MODES = tuple(args.modes.split(","))
    SEQLENS = tuple(int(x) for x in args.seqlens.split(","))
    N_CASES = args.cases
    rows = []
    t0 = time.time()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    n_fail = check(rows)
    print(f"check took {time.time() - t0:.0f}s", flush=True)
    if args.profile:
        profile(rows)
        profile(rows, causal=True)
    if not args.skip_bench:
        bench(rows)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           rows=rows, failed=n_fail), fh, indent=1)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
