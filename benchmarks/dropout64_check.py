"""Dropout at head dim 64 through the public API on Hopper with the session-19 defaults: the Gluon
backward on 64-row query blocks with each Philox call once (forward_sm90.option_rows_64,
dropout_sm90.COLS_SHARED), dense and packed varlen, against an fp32 reference that replays the
keep mask (return_attn_probs), next to the Triton kernels on the same seed (outputs NaN-prefilled).
A case passes when each error is finite and at most 2x the Triton path's + 1e-3.

    python benchmarks/dropout64_check.py [--out f.json]
"""

import argparse
import json
import math
import sys

import torch

import ioattn
from ioattn.kernels import backward_sm90, configs, forward_sm90

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from gluon_dropout_attn_check import keep_mask, reference, rel  # noqa: E402


def _grads(fn, q, k, v, dout, seed):
    qi, ki, vi = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(seed)
    out = fn(qi, ki, vi)
    return (out.detach(), *torch.autograd.grad(out, (qi, ki, vi), dout))


def _paths(fn, q, k, v, dout, seed):
    """(Gluon defaults, Triton) results of fn on the same seed."""
    gluon = _grads(fn, q, k, v, dout, seed)
    forward_sm90.DROPOUT = "0"  # both directions on the Triton kernels
    try:
        triton_ = _grads(fn, q, k, v, dout, seed)
    finally:
        forward_sm90.DROPOUT = "auto"
    return gluon, triton_


def dense_case(b, sq, sk, h, hk, causal, p, seed):
    d = 64
    q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16)
    common = dict(window_left=-1, window_right=0 if causal else -1, softcap=0.0, alibi_slopes=None, dropout_p=p,
                  capability=torch.cuda.get_device_capability())
    path = backward_sm90.supported(q, k, v, dout, varlen=False, deterministic=False, **common)
    keep = keep_mask(q, k, p, causal, -1, seed)
    ref = reference(q, k, v, dout, p, keep, causal, -1)
    fn = lambda q, k, v: ioattn.flash_attn_func(q, k, v, dropout_p=p, causal=causal)  # noqa: E731
    g, t = _paths(fn, q, k, v, dout, seed)
    return path, [rel(x, r) for x, r in zip(g, ref)], [rel(x, r) for x, r in zip(t, ref)]


def varlen_case(lens, h, hk, causal, p, seed):
    d = 64
    n = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device="cuda", dtype=torch.int32)
    q = torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, hk, d, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16)
    mx = max(lens)
    common = dict(window_left=-1, window_right=0 if causal else -1, softcap=0.0, alibi_slopes=None, dropout_p=p,
                  capability=torch.cuda.get_device_capability())
    path = backward_sm90.supported(q, k, v, dout, varlen=True, deterministic=False, max_seqlen_k=mx, **common)
    torch.manual_seed(seed)
    _, _, probs = ioattn.flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, dropout_p=p, causal=causal,
                                                return_attn_probs=True)
    refs = []
    for i, m in enumerate(lens):
        s = slice(int(cu[i]), int(cu[i + 1]))
        keep = probs[i:i + 1, :, :m, :m] >= 0
        refs.append(reference(q[None, s], k[None, s], v[None, s], dout[None, s], p, keep, causal, -1))
    ref = [torch.cat([r[j][0] for r in refs]) for j in range(4)]
    fn = lambda q, k, v: ioattn.flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, dropout_p=p,  # noqa: E731
                                                       causal=causal)
    g, t = _paths(fn, q, k, v, dout, seed)
    return path, [rel(x, r) for x, r in zip(g, ref)], [rel(x, r) for x, r in zip(t, ref)]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    configs.poison_outputs = True
    cases = [("dense", (2, 3000, 3000, 4, 2, True, 0.1)), ("dense", (1, 700, 1500, 4, 4, False, 0.2)),
             ("dense", (1, 2500, 2500, 2, 1, False, 0.5)), ("varlen", ([2500, 1, 777, 3100], 4, 2, True, 0.1)),
             ("varlen", ([300, 2049, 64], 2, 2, False, 0.3))]
    rows, n_fail = [], 0
    for i, (kind, args_) in enumerate(cases):
        torch.manual_seed(i)
        try:
            path, eg, et = (dense_case if kind == "dense" else varlen_case)(*args_, seed=100 + i)
            good = all(math.isfinite(a) and a <= 2 * b + 1e-3 for a, b in zip(eg, et))
        except Exception as exc:  # noqa: BLE001
            path, eg, et, good = None, [], [], False
            print("ERROR", repr(exc)[:300], flush=True)
        n_fail += not good
        row = dict(kind=kind, case=repr(args_), backward=path, err_out_dq_dk_dv=eg, err_triton=et, ok=good)
        rows.append(row)
        print("PASS" if good else "FAIL", row, flush=True)
    print(f"dropout hdim-64 check: {len(cases) - n_fail}/{len(cases)} passed", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
