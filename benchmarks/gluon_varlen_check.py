"""Packed variable-length batches in the Gluon Hopper kernels on the GPU: forward and backward
through the public API (flash_attn_varlen_func), each sequence's out, dq, dk, dv against the
fp32 reference of that sequence alone, next to the Triton kernels on the same inputs (outputs
NaN-prefilled). Empty sequences, lengths that are not multiples of the tiles, seqlen_q !=
seqlen_k (rows that see no key under the causal mask), GQA, sliding windows, the
deterministic (split) backward. A case passes when each Gluon error is finite and at most 2x
the Triton path's + 1e-3.

    python benchmarks/gluon_varlen_check.py [--out f.json]
"""

import argparse
import json
import math
import sys

import torch

import ioattn
from ioattn.kernels import backward_sm90, configs, forward_sm90
from gluon_bwd_check import reference_grads  # (benchmarks/ is the script's folder)


def run(q, k, v, dout, cu_q, cu_k, lens_q, lens_k, causal, left, deterministic, gluon):
    forward_sm90.VARLEN = backward_sm90.VARLEN = gluon
    try:
        qi, ki, vi = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = ioattn.flash_attn_varlen_func(qi, ki, vi, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                            window_size=(left, 0 if causal else -1), deterministic=deterministic)
        return (out.detach(), *torch.autograd.grad(out, (qi, ki, vi), dout))
    finally:
        forward_sm90.VARLEN = backward_sm90.VARLEN = True


def per_sequence_errors(got, ref_fn, cu_q, cu_k):
    """Relative L2 errors of out, dq, dk, dv over the packed batch, each sequence's reference
    computed alone."""
    num = [0.0] * 4
    den = [0.0] * 4
    for i in range(cu_q.shape[0] - 1):
        a, bq, c, bk = cu_q[i].item(), cu_q[i + 1].item(), cu_k[i].item(), cu_k[i + 1].item()
        ref = ref_fn(a, bq, c, bk)
        if ref is None:
            continue
        for j, (x, r) in enumerate(zip((got[0][a:bq], got[1][a:bq], got[2][c:bk], got[3][c:bk]), ref)):
            num[j] += (x.float() - r[0]).norm().item() ** 2
            den[j] += r[0].norm().item() ** 2
    return [math.sqrt(n) / max(math.sqrt(d), 1e-6) for n, d in zip(num, den)]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    configs.poison_outputs = True
    rows, n_fail = [], 0
    shapes = ((([300, 0, 1, 129, 700], [300, 0, 1, 129, 700]), 4, 2),
              (([64, 500, 257, 3], [100, 77, 1000, 0]), 2, 2),
              (([1024, 2600, 77], [1024, 2600, 77]), 2, 1))  # (> 2k keys: hdim 64 causal on Gluon)
    cases = [(d, lens, h, hk, causal, left, det)
             for d in (128, 64) for (lens, h, hk) in shapes
             for (causal, left, det) in ((True, -1, False), (False, -1, False))]
    cases += [(128, shapes[0][0], 4, 2, True, 100, False), (128, shapes[2][0], 2, 1, True, -1, True),
              (64, shapes[1][0], 2, 2, True, 300, False)]
    for d, (lens_q, lens_k), h, hk, causal, left, det in cases:
        torch.manual_seed(len(rows))
        cu_q = torch.tensor([0] + lens_q, device="cuda").cumsum(0).to(torch.int32)
        cu_k = torch.tensor([0] + lens_k, device="cuda").cumsum(0).to(torch.int32)
        q = torch.randn(sum(lens_q), h, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=torch.bfloat16)
        dout = torch.randn(sum(lens_q), h, d, device="cuda", dtype=torch.bfloat16)
        wr = 0 if causal else -1
        path = backward_sm90.supported(q, k, v, dout, varlen=True, window_left=left, window_right=wr, softcap=0.0,
                                       alibi_slopes=None, dropout_p=0.0, deterministic=det,
                                       capability=torch.cuda.get_device_capability(), max_seqlen_k=max(lens_k))

        def ref_fn(a, bq, c, bk):
            if bq == a:
                return None
            if bk == c:  # no keys: out and dq are zero, no dk/dv rows
                z, zk = torch.zeros(1, bq - a, h, d, device="cuda"), torch.zeros(1, 0, hk, d, device="cuda")
                return z, z, zk, zk
            return reference_grads(q[None, a:bq], k[None, c:bk], v[None, c:bk], dout[None, a:bq], causal, left,
                                   with_out=True)
        try:
            eg = per_sequence_errors(run(q, k, v, dout, cu_q, cu_k, lens_q, lens_k, causal, left, det, True),
                                     ref_fn, cu_q, cu_k)
            et = per_sequence_errors(run(q, k, v, dout, cu_q, cu_k, lens_q, lens_k, causal, left, det, False),
                                     ref_fn, cu_q, cu_k)
            good = all(math.isfinite(a) and a <= 2 * t + 1e-3 for a, t in zip(eg, et))
        except Exception as exc:  # noqa: BLE001
            good, eg, et = False, [], []
            print("ERROR", repr(exc)[:300], flush=True)
        n_fail += not good
        row = dict(hdim=d, lens_q=lens_q, lens_k=lens_k, nheads=h, nheads_k=hk, causal=causal, left=left,
                   deterministic=det, bwd_path=path, err_out_dq_dk_dv_gluon=eg, err_triton=et, ok=good)
        rows.append(row)
        print("PASS" if good else "FAIL", row, flush=True)
    configs.poison_outputs = False
    print(f"gluon varlen check: {len(cases) - n_fail}/{len(cases)} passed", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), fh, indent=1)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
