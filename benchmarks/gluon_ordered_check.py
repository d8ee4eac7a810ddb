"""The Gluon Hopper backward's mode "ordered" (kernels/backward_sm90.py, opt-in by
IOATTN_GLUON_BWD_ORDERED=1): the one pass with its dQ reductions in a fixed order, i.e. a
deterministic=True backward without the split mode's second (Triton dQ) pass.

1. Correctness through the public API (flash_attn_func / flash_attn_varlen_func, deterministic=True,
   autograd): dq, dk, dv against the fp64 reference (ioattn.reference), next to the split mode's
   errors on the same inputs; outputs NaN-prefilled (configs.poison_outputs). Odd lengths, GQA/MQA,
   causal or not, seqlen_q != seqlen_k, sliding windows, fp16, one packed varlen batch. A case passes
   when: the ordered path ran (backward_sm90.last_semaphores was replaced), no wait gave up (bit 30
   of a semaphore) and every semaphore ends at 4 x the number of CTAs that added into its tile
   (cta_row_blocks, dense cases), each error is finite and <= 2x split's + 1e-3, and 5 repeated
   calls give BIT-IDENTICAL dq, dk, dv. (The unordered one pass is run 5 times too, for the record:
   whether its dq differs between calls.)
2. Backward timing (16k tokens, bf16, hdim 64/128, 4k/16k, causal or not): ordered / atomic / split
   / SDPA cuDNN in TFLOP/s (2.5 x 4 b h n^2 d, halved when causal).

--model (no GPU): the schedule model behind the choice of order (increasing key blocks with a
causal mask vs the kernel's decreasing order): blocks of equal length, 132 SMs with a CTA each,
CTAs dispatched in grid order, a reduction waits for its predecessor's release, which comes about
half a block after that reduction was issued (--lag).

    IOATTN_GLUON_BWD_ORDERED=1 python benchmarks/gluon_ordered_check.py [--out f.json] [--skip-bench]
    python benchmarks/gluon_ordered_check.py --model
"""

import argparse
import heapq
import json
import math
import os
import sys
import time

import torch

REPEATS = 5
# (hdim, dtype, batch, seqlen_q, seqlen_k, heads, kv heads, causal, window left); varlen below
CASES = [
    (128, torch.bfloat16, 1, 257, 300, 4, 2, False, -1),
    (128, torch.bfloat16, 2, 1000, 1000, 2, 1, True, -1),  # MQA
    (64, torch.bfloat16, 1, 300, 700, 4, 4, True, -1),  # seqlen_q < seqlen_k (hdim 64: 128-row blocks)
    (128, torch.float16, 1, 777, 1300, 2, 2, True, 255),  # causal sliding window
    (64, torch.bfloat16, 1, 1500, 1100, 4, 2, False, 127),  # window (127, -1), rows that see no key
]
VARLEN = (128, torch.bfloat16, [0, 300, 301, 1200, 1777], 4, 2, True)  # (hdim, dtype, cu_seqlens, h, hk, causal)


# ---------------------------------------------------------------------------------------------
# the schedule model (--model)

def _model(bh, n, causal, rows, order, lag, n_sm=132, kb=128):
    """Makespan in blocks. order: 'none' (atomic), 'inc' (increasing key blocks, grid order),
    'dec' (decreasing key blocks, the grid reversed: the kernel's causal order)."""
    from ioattn.kernels.backward_sm90 import cta_row_blocks
    nbs = list(range((n + kb - 1) // kb))
    if order == "dec":
        nbs = nbs[::-1]
    sms = [0.0] * n_sm
    last, end_all = {}, 0.0
    for b in range(bh):
        for nb in nbs:
            t = heapq.heappop(sms)
            ms = list(cta_row_blocks(nb, n, n, causal, -1, rows, kb))
            for j, m in enumerate(ms):
                t += 1
                if order != "none":  # the reduction waits for the predecessor's release
                    t = max(t, last.get((b, m), 0.0))
                    last[(b, m)] = t + (lag if j + 1 < len(ms) else 0.3 * lag)
            heapq.heappush(sms, t)
            end_all = max(end_all, t)
    return end_all


def model(lag):
    print(f"schedule model, 16k tokens, release {lag} block after the reduction: throughput / unordered")
    for d, rows in ((128, 64), (64, 128)):
        for n in (1024, 4096, 16384):
            for causal in (False, True):
                bh = 16384 // n * (2048 // d)
                base = _model(bh, n, causal, rows, "none", lag)
                inc = base / _model(bh, n, causal, rows, "inc", lag)
                dec = base / _model(bh, n, causal, rows, "dec", lag)
                used = dec if causal else inc
                print(f"  hdim {d:3d} n {n:5d} causal={causal!s:5}: increasing {inc:.2f}  decreasing {dec:.2f}"
                      f"  (kernel: {used:.2f})", flush=True)


# ---------------------------------------------------------------------------------------------
# the GPU check

def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def expected_semaphores(b, sq, sk, h, hk, causal, left, rows):
    """4 x the number of CTAs that add into each (row block, query head, column half) (dense)."""
    from ioattn.kernels.backward_sm90 import cta_row_blocks
    nrow = (sq + rows - 1) // rows
    e = torch.zeros(b * nrow, h, 2, dtype=torch.int32)
    for nb in range((sk + 127) // 128):
        for m in cta_row_blocks(nb, sq, sk, causal, left, rows):
            e[torch.arange(b) * nrow + m] += 4
    return e.flatten()


def run(fn, mode, ordered, repeats=1):
    """[(dq, dk, dv)] of `repeats` backward calls in a mode: 'ordered' / 'split' (deterministic=True,
    ORDERED on / off) or 'atomic'; and whether mode 'ordered' ran (new semaphores)."""
    from ioattn.kernels import backward_sm90
    backward_sm90.ORDERED = ordered
    backward_sm90.MODE = "auto"
    backward_sm90.last_semaphores = None
    outs = []
    for _ in range(repeats):
        outs.append(fn(mode != "atomic"))
        torch.cuda.synchronize()
    return outs, backward_sm90.last_semaphores


def check(rows):
    import ioattn
    from ioattn.kernels import backward_sm90, configs
    from ioattn.reference import attention_ref, attention_varlen_ref
    configs.poison_outputs = True
    n_fail = 0
    cases = [("dense", c) for c in CASES] + [("varlen", VARLEN)]
    for kind, case in cases:
        torch.manual_seed(len(rows))
        if kind == "dense":
            d, dtype, b, sq, sk, h, hk, causal, left = case
            q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
            k, v = (torch.randn(b, sk, hk, d, device="cuda", dtype=dtype) for _ in range(2))
            dout = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
            win = (left, 0 if causal else -1)

            def fn(det, q=q, k=k, v=v, dout=dout, causal=causal, win=win):
                qi, ki, vi = (t.detach().clone().requires_grad_() for t in (q, k, v))
                out = ioattn.flash_attn_func(qi, ki, vi, causal=causal, window_size=win, deterministic=det)
                return torch.autograd.grad(out, (qi, ki, vi), dout)

            qf, kf, vf = (t.detach().double().requires_grad_() for t in (q, k, v))
            out, _ = attention_ref(qf, kf, vf, causal=causal, window_size=win)
            shape = f"hdim{d} {str(dtype)[6:]} b{b} sq{sq} sk{sk} h{h}/{hk} causal={causal} left={left}"
        else:
            d, dtype, cu, h, hk, causal = case
            left, win = -1, (-1, 0 if causal else -1)
            cu_t = torch.tensor(cu, dtype=torch.int32, device="cuda")
            lens = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
            q = torch.randn(cu[-1], h, d, device="cuda", dtype=dtype)
            k, v = (torch.randn(cu[-1], hk, d, device="cuda", dtype=dtype) for _ in range(2))
            dout = torch.randn(cu[-1], h, d, device="cuda", dtype=dtype)

            def fn(det, q=q, k=k, v=v, dout=dout, cu_t=cu_t, mx=max(lens), causal=causal):
                qi, ki, vi = (t.detach().clone().requires_grad_() for t in (q, k, v))
                out = ioattn.flash_attn_varlen_func(qi, ki, vi, cu_t, cu_t, mx, mx, causal=causal, deterministic=det)
                return torch.autograd.grad(out, (qi, ki, vi), dout)

            qf, kf, vf = (t.detach().double().requires_grad_() for t in (q, k, v))
            out, _ = attention_varlen_ref(qf, kf, vf, cu_t, cu_t, causal=causal)
            shape = f"varlen hdim{d} {str(dtype)[6:]} lens {lens} h{h}/{hk} causal={causal}"
        ref = torch.autograd.grad(out, (qf, kf, vf), dout.double())
        res = dict(kind="check", shape=shape)
        try:
            split, _ = run(fn, "split", False)
            ordered, sem = run(fn, "ordered", True, REPEATS)
            atomic, _ = run(fn, "atomic", True, REPEATS)
            err_s = [rel(x, r) for x, r in zip(split[0], ref)]
            err_o = [rel(x, r) for x, r in zip(ordered[0], ref)]
            same = all(torch.equal(a, b) for o in ordered[1:] for a, b in zip(ordered[0], o))
            atomic_dq_varies = any(not torch.equal(atomic[0][0], o[0]) for o in atomic[1:])
            ran = sem is not None
            gave_up = ran and bool(((sem >> 30) & 1).any().item())
            counts_ok = None
            if ran and kind == "dense":
                rows_q = backward_sm90.config(d)["BLOCK_M"]
                counts_ok = torch.equal(sem.cpu(), expected_semaphores(b, sq, sk, h, hk, causal, left, rows_q))
            good = (ran and not gave_up and counts_ok is not False and same
                    and all(math.isfinite(eo) and eo <= 2 * es + 1e-3 for eo, es in zip(err_o, err_s)))
            res.update(ran_ordered=ran, gave_up=gave_up, semaphore_counts_ok=counts_ok, bit_identical=same,
                       atomic_dq_varies=atomic_dq_varies, err_split_dq_dk_dv=err_s, err_ordered_dq_dk_dv=err_o)
        except Exception as exc:  # noqa: BLE001
            good = False
            res["error"] = repr(exc)[:400]
        res["ok"] = good
        n_fail += not good
        rows.append(res)
        print("PASS" if good else "FAIL", res, flush=True)
    configs.poison_outputs = False
    print(f"gluon ordered backward check: {len(cases) - n_fail}/{len(cases)} passed", flush=True)
    return n_fail


def bench(rows, seqlens):
    import triton
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import ioattn
    from ioattn.kernels import backward_sm90
    for d in (128, 64):
        h = 2048 // d
        for n in seqlens:
            b = 16384 // n
            for causal in (False, True):
                q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                dout = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)
                res = {}
                for name, det, ordered in (("ordered", True, True), ("atomic", False, False),
                                           ("split", True, False)):
                    backward_sm90.ORDERED = ordered
                    out = ioattn.flash_attn_func(q, k, v, causal=causal, deterministic=det)
                    try:
                        res[name] = triton.testing.do_bench(
                            lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                            warmup=25, rep=100, return_mode="median")
                    except Exception as exc:  # noqa: BLE001
                        print("ERROR", name, repr(exc)[:300], flush=True)
                qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                    try:
                        res["sdpa_cudnn"] = triton.testing.do_bench(
                            lambda: torch.autograd.grad(out, (qt, kt, vt), dout.transpose(1, 2), retain_graph=True),
                            warmup=25, rep=100, return_mode="median")
                    except Exception as exc:  # noqa: BLE001
                        print("ERROR cudnn", repr(exc)[:300], flush=True)
                fl = 2.5 * 4 * b * h * n * n * d / (2 if causal else 1)
                tf = {k_: fl / ms * 1e-9 for k_, ms in res.items()}
                row = dict(kind="bench", hdim=d, seqlen=n, batch=b, nheads=h, causal=causal, ms=res, tflops=tf)
                rows.append(row)
                print(f"bwd hdim {d} n {n:5d} causal={causal!s:5} " + "  ".join(
                    f"{k_} {v_:.0f}" for k_, v_ in tf.items()) + (
                    f"  ordered/atomic {res['atomic'] / res['ordered']:.3f} ordered/split "
                    f"{res['split'] / res['ordered']:.3f}" if {"atomic", "ordered", "split"} <= res.keys() else ""),
                    flush=True)
                del q, k, v, dout, out, qt, kt, vt
    backward_sm90.ORDERED = False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--seqlens", default="4096,16384")
    ap.add_argument("--model", action="store_true", help="the schedule model only (no GPU)")
    ap.add_argument("--lag", type=float, default=0.55, help="--model: blocks from a reduction to its release")
    args = ap.parse_args()
    if args.model:
        model(args.lag)
        return 0
    if os.environ.get("IOATTN_GLUON_BWD_ORDERED") != "1":
        print("note: IOATTN_GLUON_BWD_ORDERED is not 1; the script sets backward_sm90.ORDERED itself", flush=True)
    print(torch.cuda.get_device_name(), flush=True)
    rows, t0, n_fail = [], time.time(), 0
    try:
        if not args.skip_check:
            n_fail = check(rows)
        if not args.skip_bench:
            bench(rows, [int(x) for x in args.seqlens.split(",")])
    finally:
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(rows, fh, indent=1)
        print(f"done in {time.time() - t0:.0f} s", flush=True)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
