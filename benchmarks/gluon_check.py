"""The Gluon Hopper forward (kernels/forward_sm90.py) on the GPU: numbers, then speed.

1. Correctness: out and lse against an fp32 SDPA-math reference (outputs pre-filled with
   NaN), over odd lengths, seqlen_q != seqlen_k, GQA/MQA, causal or not, bf16/fp16, hdim 64/128.
2. Timing in one process (forward only, 16k tokens, bf16): the Gluon kernel, the Triton
   kernel (forward.attention_forward with the Gluon path off), SDPA cuDNN and SDPA flash.

    python benchmarks/gluon_check.py [--out f.json] [--skip-bench]
"""

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from ioattn.kernels import forward, forward_sm90


def reference(q, k, v, causal, scale):
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    g = qf.shape[1] // kf.shape[1]
    kf, vf = kf.repeat_interleave(g, 1), vf.repeat_interleave(g, 1)
    s = qf @ kf.transpose(-1, -2) * scale
    sq, sk = s.shape[-2:]
    if causal:
        keep = torch.arange(sk, device=q.device)[None, :] <= torch.arange(sq, device=q.device)[:, None] + sk - sq
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ vf).transpose(1, 2), lse


def run_gluon(q, k, v, causal, scale, cfg=None):
    b, sq, h, d = q.shape
    out = torch.full_like(q, float("nan"))
    lse = torch.full((b, h, sq), float("nan"), device=q.device, dtype=torch.float32)
    forward_sm90.attention_forward_sm90(q, k, v, out, lse, softmax_scale=scale, causal=causal, cfg=cfg)
    return out, lse


def variants(d):
    """The Gluon configurations checked and timed at head dim d: the default and, at d <= 128
    (where its double-buffered Q fits in shared memory) or with forward_sm90.PERSISTENT_256 at 256 (one
    Q buffer), the persistent kernel."""
    cfg = forward_sm90.config(d)
    v = {"gluon": None}
    if d <= 128 or (d == 256 and forward_sm90.PERSISTENT_256):
        v["gluon_persistent"] = dict(cfg, PERSISTENT=True)
    return v


def triton_forward(q, k, v, sq, sk, scale, causal):
    """The Triton kernel (forward.py) on the same call, with the Gluon path switched off."""
    prev, forward_sm90.ENABLED = forward_sm90.ENABLED, False
    try:
        return forward.attention_forward(q, k, v, max_seqlen_q=sq, max_seqlen_k=sk, softmax_scale=scale,
                                         window_left=-1, window_right=0 if causal else -1)
    finally:
        forward_sm90.ENABLED = prev


def check(rows):
    cases = []
    for d in HDIMS:
        for dtype in (torch.bfloat16, torch.float16):
            for (b, sq, sk, h, hk) in ((4, 1100, 1100, 9, 3), (1, 257, 300, 4, 2), (1, 513, 129, 2, 2), (3, 2048, 2048, 2, 2), (2, 128, 128, 4, 4),
                                       (2, 1000, 1000, 2, 1), (1, 64, 777, 4, 4), (1, 1, 200, 4, 1))[:N_SHAPES]:
                for causal in (False, True):
                    cases.append((d, dtype, b, sq, sk, h, hk, causal))
    n_fail = 0
    for d, dtype, b, sq, sk, h, hk, causal in cases:
        torch.manual_seed(len(rows))
        q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
        k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
        v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
        scale = 1 / math.sqrt(d)
        ok_sup = forward_sm90.supported(q, k, v, varlen=False, window_left=-1, window_right=0 if causal else -1,
                                        softcap=0.0, alibi_slopes=None, dropout_p=0.0, block_table=None,
                                        capability=torch.cuda.get_device_capability())
        try:
            ro, rl = reference(q, k, v, causal, scale)
            finite = torch.isfinite(rl)
            # tolerance: a few ulps of the output dtype relative to |out| <= max|v|
            tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
            good, errs = True, {}
            for name, cfg in variants(d).items():
                out, lse = run_gluon(q, k, v, causal, scale, cfg)
                torch.cuda.synchronize()
                e_o = (out.float() - ro).abs().max().item()
                e_l = (lse - rl)[finite].abs().max().item() if finite.any() else 0.0
                lse_inf_ok = bool(torch.equal(torch.isinf(lse), ~finite))
                good = good and (not math.isnan(e_o)) and e_o <= tol and e_l <= 1e-3 and lse_inf_ok
                errs[name] = (e_o, e_l)
            err_o, err_l = errs["gluon"]
            # the Triton kernel's error on the same case, for scale
            t_out, _ = triton_forward(q, k, v, sq, sk, scale, causal)
            err_t = (t_out.float() - ro).abs().max().item()
        except Exception as exc:  # noqa: BLE001
            good, err_o, err_l, err_t, errs = False, float("nan"), float("nan"), float("nan"), {}
            print("ERROR", repr(exc)[:300])
        n_fail += not good
        row = dict(kind="check", hdim=d, dtype=str(dtype), batch=b, seqlen_q=sq, seqlen_k=sk, nheads=h,
                   nheads_k=hk, causal=causal, supported=ok_sup, err_out=err_o, err_lse=err_l, err_triton=err_t,
                   err_variants=errs if good or errs else None, ok=good)
        rows.append(row)
        print(("PASS" if good else "FAIL"), row, flush=True)
    print(f"gluon check: {len(cases) - n_fail}/{len(cases)} passed", flush=True)
    return n_fail


def check_varlen(rows):
    """Packed variable-length batches through the public API (the Gluon forward on sm_90):
    each sequence's out and lse against the fp32 reference of that sequence alone; empty
    sequences, lengths that are not multiples of the tiles, seqlen_q != seqlen_k, GQA."""
    import ioattn
    from ioattn.kernels import configs
    configs.poison_outputs = True
    n_fail = n = 0
    for d in HDIMS:
        for causal in (False, True):
            for lens_q, lens_k, h, hk in (([300, 0, 1, 129, 700], [300, 0, 1, 129, 700], 4, 2),
                                          ([64, 500, 257], [100, 77, 1000], 2, 2)):
                torch.manual_seed(n)
                n += 1
                cu_q = torch.tensor([0] + lens_q, device="cuda").cumsum(0).to(torch.int32)
                cu_k = torch.tensor([0] + lens_k, device="cuda").cumsum(0).to(torch.int32)
                q = torch.randn(sum(lens_q), h, d, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=torch.bfloat16)
                v = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=torch.bfloat16)
                scale = 1 / math.sqrt(d)
                try:
                    out, lse = ioattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                                             causal=causal, return_lse=True)
                    torch.cuda.synchronize()
                    err_o = err_l = 0.0
                    good = True
                    for i in range(len(lens_q)):
                        a, bq, c, bk = cu_q[i].item(), cu_q[i + 1].item(), cu_k[i].item(), cu_k[i + 1].item()
                        if bq == a:
                            continue
                        ro, rl = reference(q[None, a:bq], k[None, c:bk], v[None, c:bk], causal, scale)
                        err_o = max(err_o, (out[a:bq].float() - ro[0]).abs().max().item())
                        fin = torch.isfinite(rl[0])
                        li = lse[:, a:bq]
                        if fin.any():
                            err_l = max(err_l, (li - rl[0])[fin].abs().max().item())
                        good = good and bool(torch.equal(torch.isinf(li), ~fin))
                    good = good and math.isfinite(err_o) and err_o <= 2e-2 and err_l <= 1e-3
                except Exception as exc:  # noqa: BLE001
                    good, err_o, err_l = False, float("nan"), float("nan")
                    print("ERROR", repr(exc)[:300])
                n_fail += not good
                row = dict(kind="check_varlen", hdim=d, causal=causal, lens_q=lens_q, lens_k=lens_k, nheads=h,
                           nheads_k=hk, err_out=err_o, err_lse=err_l, ok=good)
                rows.append(row)
                print(("PASS" if good else "FAIL"), row, flush=True)
    configs.poison_outputs = False
    print(f"gluon varlen check: {n - n_fail}/{n} passed", flush=True)
    return n_fail


def flops(b, h, n, d, causal):
    return 4 * b * h * n * n * d / (2 if causal else 1)


HDIMS = (128, 64, 256)
N_SHAPES = 8  # check shapes per head dim and dtype (--shapes; the first: 36 (batch, head) pairs, 324 tiles)
SEQLENS = (1024, 4096, 16384)


def bench(rows):
    for d in HDIMS:
        h = 2048 // d
        for n in SEQLENS:
            b = 16384 // n
            for causal in (False, True):
                q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                scale = 1 / math.sqrt(d)
                out = torch.empty_like(q)
                lse = torch.empty(b, h, n, device="cuda", dtype=torch.float32)
                qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
                fns = {
                    "gluon": lambda: forward_sm90.attention_forward_sm90(q, k, v, out, lse, softmax_scale=scale,
                                                                         causal=causal),
                    "triton": lambda: triton_forward(q, k, v, n, n, scale, causal),
                    # what ioattn's forward dispatches to (Gluon, or Triton where that is faster)
                    "ioattn": lambda: forward.attention_forward(q, k, v, max_seqlen_q=n, max_seqlen_k=n,
                                                                softmax_scale=scale, window_left=-1,
                                                                window_right=0 if causal else -1),
                }
                for name, cfg in variants(d).items():  # A/B: the persistent kernel
                    if cfg is not None:
                        fns[name] = lambda cfg=cfg: forward_sm90.attention_forward_sm90(
                            q, k, v, out, lse, softmax_scale=scale, causal=causal, cfg=cfg)
                for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
                    def f(backend=backend):
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                    fns[name] = f
                res = {}
                for name, fn in fns.items():
                    try:
                        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                        res[name] = flops(b, h, n, d, causal) / ms / 1e9
                    except Exception as exc:  # noqa: BLE001
                        print(name, "failed", repr(exc)[:200])
                        res[name] = float("nan")
                    rows.append(dict(kind="bench", provider=name, mode="fwd", hdim=d, seqlen=n, batch=b, nheads=h,
                                     causal=causal, tflops=res[name]))
                print(f"fwd hdim {d} n {n:5d} causal {causal!s:5}: " +
                      "  ".join(f"{k} {v:6.1f}" for k, v in res.items()) +
                      "  " + "  ".join(f"{m}/cudnn {res[m] / res['sdpa_cudnn']:.2f}" for m in res
                                       if m.startswith("gluon")), flush=True)


def main(argv=None):
    global HDIMS, SEQLENS, N_SHAPES
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--hdims", default=",".join(map(str, HDIMS)))
    ap.add_argument("--seqlens", default=",".join(map(str, SEQLENS)))
    ap.add_argument("--shapes", type=int, default=N_SHAPES)
    args = ap.parse_args(argv)
    N_SHAPES = args.shapes
    HDIMS = tuple(int(x) for x in args.hdims.split(","))
    SEQLENS = tuple(int(x) for x in args.seqlens.split(","))
    rows = []
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    n_fail = check(rows) + check_varlen(rows)
    if not args.skip_bench:
        bench(rows)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           rows=rows), fh, indent=1)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
