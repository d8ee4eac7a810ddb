"""GPU check of the padded head dims (forward_sm90.PAD_DIMS: 40, 80, 96, 160, ... on the Gluon kernels'
tiles of 64/128/256) through the public API, packed varlen batches (their stores drop the padded
columns by a mask) and dense ones next to them, forward and backward against the fp64 reference of
each sequence: the error at most 2x plain PyTorch's in the same dtype plus a floor (gpu_check's rule).
Also records which kernels ran (configs.last_compiled), so that a pass on the Triton path is not
taken for one of the Gluon kernels.

    python benchmarks/pad_dims_check.py [--dims 96,40,80,160] [--out results.json]
"""
import argparse
import json

import torch

import ioattn
from ioattn.kernels import configs
from ioattn.reference import attention_ref


def rel_err(x, ref):
    floor = 1e-3 * max(ref.numel(), 1) ** 0.5
    return ((x.double() - ref).norm() / max(ref.norm().item(), floor)).item()


def check(d, lens, hq, hk, causal, dtype, varlen):
    dev = "cuda"
    total = sum(lens)
    q = torch.randn(total, hq, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(total, hk, d, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(total, hk, d, device=dev, dtype=dtype, requires_grad=True)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device=dev, dtype=torch.int32)
    configs.last_compiled.clear()
    if varlen:
        out = ioattn.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=causal)
    else:  # one dense batch of equal lengths
        n = lens[0]
        out = ioattn.flash_attn_func(*(t.view(len(lens), n, -1, d) for t in (q, k, v)), causal=causal).view_as(q)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ran = configs.kernels_ran()
    res, ok = {}, True
    floor = 1e-4
    for name, x, idx in [("out", out, None), ("dq", grads[0], 0), ("dk", grads[1], 1), ("dv", grads[2], 2)]:
        refs, lows, xs = [], [], []
        for b in range(len(lens)):
            s, e = cu[b].item(), cu[b + 1].item()
            if e == s:
                continue
            sl = [t[s:e].unsqueeze(0) for t in (q, k, v)]
            r, _ = attention_ref(*sl, causal=causal)
            lo, _ = attention_ref(*sl, causal=causal, upcast=False)
            do = dout[s:e].unsqueeze(0)
            if idx is None:
                refs.append(r[0]), lows.append(lo[0].double())
            else:
                refs.append(torch.autograd.grad(r, sl[idx], do.double())[0][0])
                lows.append(torch.autograd.grad(lo, sl[idx], do)[0][0].double())
            xs.append(x[s:e])
        ref, low, got = torch.cat(refs), torch.cat(lows), torch.cat(xs)
        e, el = rel_err(got, ref), rel_err(low, ref)
        good = bool(torch.isfinite(got).all()) and e <= 2 * el + floor
        ok &= good
        res[name] = (e, el)
    return ok, res, ran


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--dims", default="96,40,80,160", help="head dims, comma-separated")
    args = ap.parse_args()
    torch.manual_seed(0)
    cases = []
    for d in (int(x) for x in args.dims.split(",")):
        for causal in (False, True):
            cases.append((d, [300, 0, 1000, 17, 513], 4, 2, causal, torch.bfloat16, True))
        cases.append((d, [700, 700], 4, 1, True, torch.float16, True))
        cases.append((d, [640, 640, 640], 6, 2, True, torch.bfloat16, False))
    rows, n_ok = [], 0
    for i, c in enumerate(cases):
        try:
            ok, res, ran = check(*c)
        except Exception as exc:  # report, keep going
            ok, res, ran = False, {"error": repr(exc)[:300]}, []
        n_ok += ok
        d, lens, hq, hk, causal, dtype, varlen = c
        rows.append(dict(head_dim=d, lens=lens, hq=hq, hk=hk, causal=causal, dtype=str(dtype), varlen=varlen, ok=ok,
                         errors=res, kernels=ran))
        errs = " ".join(f"{k}={v[0]:.1e}/{v[1]:.1e}" for k, v in res.items() if k != "error")
        print(f"[{i + 1}/{len(cases)}] {'PASS' if ok else 'FAIL'} d={d} lens={lens} h={hq}/{hk} causal={causal} "
              f"{dtype} varlen={varlen} {errs} {res.get('error', '')} {ran}", flush=True)
    print(f"pad dims check: {n_ok}/{len(cases)} passed")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows, passed=n_ok,
                           total=len(cases)), f, indent=1)


if __name__ == "__main__":
    main()
