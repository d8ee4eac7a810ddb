"""Dropout in the Gluon Hopper kernels on the GPU: forward and backward through the public API
(dropout_p > 0) against an fp32 reference that replays the keep mask (return_attn_probs),
next to the Triton kernels on the same rng_state (torch.manual_seed before each call; outputs
NaN-prefilled). The masks are the same bits in both paths (dropout_sm90 mirrors
masks.dropout_keep), so a case passes when each Gluon error is finite and at most 2x the
Triton path's + 1e-3 (each row lists the kernels that ran: configs.kernels_ran). Then the cost of
dropout 0.1 per path (hdim 128 and 64, 4k, causal, bf16).
The Gluon forward runs once per way of applying the mask (--modes, forward_sm90.DROPOUT_APPLY:
select, packed, early; the same kept entries, so the same errors).

    python benchmarks/gluon_dropout_attn_check.py [--out f.json] [--skip-bench | --skip-check]
                                                  [--modes select,packed,early]
"""

import argparse
import json
import math
import sys

import torch
import triton

import ioattn
from ioattn.kernels import backward_sm90, configs, forward_sm90


def keep_mask(q, k, p, causal, left, seed):
    torch.manual_seed(seed)
    _, _, probs = ioattn.flash_attn_func(q, k, k, dropout_p=p, causal=causal, window_size=(left, 0 if causal else -1),
                                         return_attn_probs=True)
    return probs >= 0  # (batch, heads, sq, sk)


def reference(q, k, v, dout, p, keep, causal, left):
    """fp32 out, dq, dk, dv with the given keep mask (kept entries scaled by 1 / (1 - p))."""
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    g = q.shape[2] // k.shape[2]
    sq, sk = q.shape[1], k.shape[1]
    kt = kf.transpose(1, 2).repeat_interleave(g, 1)
    vt = vf.transpose(1, 2).repeat_interleave(g, 1)
    s = qf.transpose(1, 2) @ kt.transpose(-1, -2) / math.sqrt(q.shape[-1])
    d = torch.arange(sk, device=q.device)[None, :] - torch.arange(sq, device=q.device)[:, None] - (sk - sq)
    vis = torch.ones_like(d, dtype=torch.bool)
    if causal:
        vis &= d <= 0
    if left >= 0:
        vis &= d >= -left
    pr = torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
    pr = torch.where(keep, pr / (1 - p), 0.0)
    out = (pr @ vt).transpose(1, 2)
    return (out.detach(), *torch.autograd.grad(out, (qf, kf, vf), dout.float()))


def run(q, k, v, dout, p, causal, left, seed, mode):
    """mode: None for the Triton kernels, else forward_sm90.DROPOUT_APPLY for the Gluon ones."""
    forward_sm90.DROPOUT = "all" if mode else "0"
    forward_sm90.DROPOUT_APPLY = mode or "select"
    try:
        qi, ki, vi = (t.detach().clone().requires_grad_() for t in (q, k, v))
        torch.manual_seed(seed)
        out = ioattn.flash_attn_func(qi, ki, vi, dropout_p=p, causal=causal, window_size=(left, 0 if causal else -1))
        return (out.detach(), *torch.autograd.grad(out, (qi, ki, vi), dout))
    finally:
        forward_sm90.DROPOUT = "auto"
        forward_sm90.DROPOUT_APPLY = DEFAULT_APPLY


DEFAULT_APPLY = forward_sm90.DROPOUT_APPLY
HDIMS = None  # --hdims


def rel(x, ref):
    return ((x.float() - ref).norm() / ref.norm().clamp_min(1e-6)).item()


def check(rows, modes):
    configs.poison_outputs = True
    n_fail = 0
    cases = [(128, 2, 1000, 1000, 4, 2, True, -1, 0.1), (128, 1, 777, 1300, 2, 2, False, -1, 0.3),
             (128, 1, 2048, 2048, 2, 1, True, 300, 0.1), (64, 2, 3000, 3000, 2, 2, True, -1, 0.2),
             (64, 1, 700, 500, 4, 4, False, -1, 0.1), (256, 1, 600, 600, 2, 2, True, -1, 0.1)]
    cases = [c for c in cases if HDIMS is None or c[0] in HDIMS]
    for d, b, sq, sk, h, hk, causal, left, p in cases:
        seed = 1000 + len(rows)
        torch.manual_seed(len(rows))
        q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16)
        dout = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16)
        wr = 0 if causal else -1
        common = dict(window_left=left, window_right=wr, softcap=0.0, alibi_slopes=None, dropout_p=p)
        forward_sm90.DROPOUT = "all"
        paths = dict(fwd=forward_sm90.supported(q, k, v, varlen=False, block_table=None, **common,
                                                capability=torch.cuda.get_device_capability()),
                     bwd=backward_sm90.supported(q, k, v, dout, varlen=False, deterministic=False, **common,
                                                 capability=torch.cuda.get_device_capability()))
        forward_sm90.DROPOUT = "auto"
        try:
            keep = keep_mask(q, k, p, causal, left, seed)
            ref = reference(q, k, v, dout, p, keep, causal, left)
            et = [rel(x, r) for x, r in zip(run(q, k, v, dout, p, causal, left, seed, None), ref)]
            eg, kernels = {}, {}
            for m in modes:
                configs.last_compiled.clear()
                eg[m] = [rel(x, r) for x, r in zip(run(q, k, v, dout, p, causal, left, seed, m), ref)]
                kernels[m] = configs.kernels_ran()
            good = all(math.isfinite(a) and a <= 2 * t + 1e-3 for e in eg.values() for a, t in zip(e, et))
        except Exception as exc:  # noqa: BLE001
            good, eg, et, kernels = False, {}, [], {}
            print("ERROR", repr(exc)[:300], flush=True)
        n_fail += not good
        row = dict(kind="check", hdim=d, batch=b, seqlen_q=sq, seqlen_k=sk, nheads=h, nheads_k=hk, causal=causal,
                   left=left, dropout_p=p, paths=paths, err_out_dq_dk_dv_gluon=eg, err_triton=et, kernels=kernels,
                   ok=good)
        rows.append(row)
        print("PASS" if good else "FAIL", row, flush=True)
    configs.poison_outputs = False
    print(f"gluon dropout attention check: {len(cases) - n_fail}/{len(cases)} passed", flush=True)
    return n_fail


def bench(rows, modes):
    for d in (128, 64):
        h, n, b = 2048 // d, 4096, 4
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)
        fl = 4 * b * h * n * n * d / 2
        res = {}
        paths = [("plain", 0.0, "select")] + [(f"dropout gluon {m}", 0.1, m) for m in modes] + [
            ("dropout triton", 0.1, None)]
        for name, p, mode in paths:
            forward_sm90.DROPOUT = "all" if mode else "0"
            forward_sm90.DROPOUT_APPLY = mode or "select"
            fwd = lambda p=p: ioattn.flash_attn_func(q, k, v, dropout_p=p, causal=True)  # noqa: E731

            def fb(p=p):
                torch.autograd.grad(fwd(p), (q, k, v), dout)
            res[name] = (triton.testing.do_bench(fwd), triton.testing.do_bench(fb))
        forward_sm90.DROPOUT = "auto"
        forward_sm90.DROPOUT_APPLY = DEFAULT_APPLY
        for name, (tf, tfb) in res.items():
            row = dict(kind="bench", hdim=d, seqlen=n, batch=b, nheads=h, case=name, fwd_ms=tf, fwd_bwd_ms=tfb,
                       fwd_tflops=fl / tf * 1e-9, fwd_bwd_tflops=3.5 * fl / tfb * 1e-9,
                       fwd_overhead=tf / res["plain"][0] - 1, fwd_bwd_overhead=tfb / res["plain"][1] - 1)
            rows.append(row)
            print(f"hdim {d} 4k causal {name:22s} fwd {tf:.3f} ms ({row['fwd_overhead']:+.1%})  "
                  f"fwd+bwd {tfb:.3f} ms ({row['fwd_bwd_overhead']:+.1%})", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--hdims", default=None, help="comma list: check only these head dims")
    ap.add_argument("--modes", default="select,packed,early", help="forward_sm90.DROPOUT_APPLY values to run")
    args = ap.parse_args(argv)
    global HDIMS
    HDIMS = None if args.hdims is None else {int(x) for x in args.hdims.split(",")}
    modes = args.modes.split(",")
    rows = []
    n_fail = 0 if args.skip_check else check(rows, modes)
    if not args.skip_bench:
        bench(rows, modes)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           rows=rows), fh, indent=1)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
