"""The Gluon Hopper forward with V's own head dim (DeepSeek's MLA: q/k 192, v 128) on the GPU.

forward_sm90.VALUE_DIMS is switched on here (IOATTN_GLUON_VALUE_DIMS=1, before ioattn is
imported), and off again for the Triton forward's rows of the same run.

1. The kernel itself (outputs NaN-prefilled): (d, dv) in PAIRS, bf16 (and fp16 at 192/128), odd lengths,
   seqlen_q != seqlen_k, GQA/MQA, causal or not, the per-tile kernel and (d <= 128) the
   persistent one: out and lse against an fp64 reference.
2. The public API with the Gluon forward (and the Triton backward): flash_attn_func forward +
   backward, a sliding window, softcap + ALiBi, dropout with the mask replayed from
   return_attn_probs, and a packed varlen batch; each error next to the Triton forward's on the
   same call (flag off), a case passing when the Gluon one is finite and <= 2x Triton's + 1e-3.
3. Timing (bf16, 16k tokens; forward and forward + backward): ioattn with the Gluon forward,
   with the Gluon forward and the Gluon backward (backward_sm90.VALUE_DIMS, opt-in), with the
   Triton ones, SDPA cuDNN / flash / memory-efficient where they take dv != d.

    python benchmarks/gluon_value_dim_check.py [--out f.json] [--skip-bench] [--skip-check]
"""

import argparse
import json
import math
import os
import signal
import sys

os.environ["IOATTN_GLUON_VALUE_DIMS"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import ioattn  # noqa: E402
from ioattn.kernels import backward_sm90, configs, forward_sm90  # noqa: E402
from ioattn.reference import attention_ref  # noqa: E402

PAIRS = ((192, 128), (256, 128), (128, 64), (192, 64), (256, 64))
SHAPES = ((2, 1100, 1100, 8, 2), (1, 257, 300, 4, 4), (1, 513, 129, 2, 1), (2, 128, 128, 4, 4), (1, 64, 777, 4, 2))


BWD_DEFAULT = backward_sm90.VALUE_DIMS


def _gluon(on):
    forward_sm90.VALUE_DIMS = on


def check_kernel(rows):
    n_fail = n = 0
    cap = torch.cuda.get_device_capability()
    for d, dv in PAIRS:
        for dtype in ((torch.bfloat16, torch.float16) if (d, dv) == (192, 128) else (torch.bfloat16, )):
            for b, sq, sk, h, hk in SHAPES:
                for causal in (False, True):
                    torch.manual_seed(n)
                    n += 1
                    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
                    k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
                    v = torch.randn(b, sk, hk, dv, device="cuda", dtype=dtype)
                    scale = d ** -0.5
                    sup = forward_sm90.supported(q, k, v, varlen=False, window_left=-1,
                                                 window_right=0 if causal else -1, softcap=0.0, alibi_slopes=None,
                                                 dropout_p=0.0, block_table=None, capability=cap)
                    ro, rl = attention_ref(q, k, v, softmax_scale=scale, causal=causal)
                    fin = torch.isfinite(rl)
                    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
                    errs, good = {}, sup
                    variants = {"per_tile": dict(forward_sm90.config(d, dv), PERSISTENT=False)}
                    if d <= 128:
                        variants["persistent"] = dict(forward_sm90.config(d, dv), PERSISTENT=True)
                    for name, cfg in variants.items():
                        try:
                            out = torch.full((b, sq, h, dv), float("nan"), device="cuda", dtype=dtype)
                            lse = torch.full((b, h, sq), float("nan"), device="cuda", dtype=torch.float32)
                            forward_sm90.attention_forward_sm90(q, k, v, out, lse, softmax_scale=scale, causal=causal,
                                                                cfg=cfg)
                            torch.cuda.synchronize()
                            e_o = (out.double() - ro).abs().max().item()
                            e_l = (lse.double() - rl)[fin].abs().max().item() if fin.any() else 0.0
                            inf_ok = bool(torch.equal(torch.isinf(lse), ~fin))
                            ok = math.isfinite(e_o) and e_o <= tol and e_l <= 1e-3 and inf_ok
                        except Exception as exc:  # noqa: BLE001
                            print("ERROR", name, repr(exc)[:300])
                            e_o = e_l = float("nan")
                            ok = False
                        errs[name] = (e_o, e_l)
                        good = good and ok
                    n_fail += not good
                    row = dict(kind="check", hdim=d, hdim_v=dv, dtype=str(dtype), batch=b, seqlen_q=sq, seqlen_k=sk,
                               nheads=h, nheads_k=hk, causal=causal, supported=sup, errs=errs, ok=good)
                    rows.append(row)
                    print("PASS" if good else "FAIL", row, flush=True)
    print(f"value-dim kernel check: {n - n_fail}/{n} passed", flush=True)
    return n_fail


def _keep_mask(q, k, p, causal, window, seed):
    torch.manual_seed(seed)
    _, _, probs = ioattn.flash_attn_func(q, k, k, dropout_p=p, causal=causal, window_size=window,
                                         return_attn_probs=True)
    return probs >= 0


def _api_errors(q, k, v, dout, opts, mask, seed, kernel="fwd"):
    """Errors of out, dq, dk, dv against the fp64 reference on the same (bf16) inputs, and the
    name of the kernel that configs.last_compiled records under ``kernel`` for the call."""
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_ref(qr, kr, vr, dropout_mask=mask, **{n: x for n, x in opts.items() if n != "deterministic"})
    ref.backward(dout.double())
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(seed)
    configs.last_compiled.pop(kernel, None)
    out = ioattn.flash_attn_func(qg, kg, vg, **opts)
    out.backward(dout)
    torch.cuda.synchronize()
    name = getattr(configs.last_compiled.get(kernel), "name", "?")
    return [(a.double() - r).abs().max().item() for a, r in ((out, ref), (qg.grad, qr.grad), (kg.grad, kr.grad),
                                                              (vg.grad, vr.grad))], name


def check_api(rows):
    n_fail = n = 0
    dtype = torch.bfloat16
    for d, dv in ((192, 128), (128, 64)):
        h, hk = 8, 2
        cases = [("plain", dict(causal=False)), ("causal", dict(causal=True)),
                 ("window", dict(causal=True, window_size=(200, 0))),
                 ("softcap_alibi", dict(causal=True, softcap=30.0,
                                        alibi_slopes=torch.rand(h, device="cuda", dtype=torch.float32))),
                 ("dropout", dict(causal=True, dropout_p=0.15))]
        for name, opts in cases:
            torch.manual_seed(100 + n)
            n += 1
            b, sq, sk = 2, 700, 900
            q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
            k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
            v = torch.randn(b, sk, hk, dv, device="cuda", dtype=dtype)
            dout = torch.randn(b, sq, h, dv, device="cuda", dtype=dtype)
            seed = 1234 + n
            window = opts.get("window_size", (-1, 0 if opts["causal"] else -1))
            mask = None
            if opts.get("dropout_p", 0) > 0:
                mask = _keep_mask(q, k, opts["dropout_p"], opts["causal"], window, seed)
            # where the dispatch should take the Gluon forward (dropout: at DROPOUT_HEAD_DIMS only)
            expect = forward_sm90.supported(q, k, v, varlen=False, window_left=window[0], window_right=window[1],
                                            softcap=opts.get("softcap", 0.0), alibi_slopes=opts.get("alibi_slopes"),
                                            dropout_p=opts.get("dropout_p", 0.0), block_table=None,
                                            capability=torch.cuda.get_device_capability())
            try:
                _gluon(True)
                e_g, kname = _api_errors(q, k, v, dout, opts, mask, seed)
                _gluon(False)
                e_t, _ = _api_errors(q, k, v, dout, opts, mask, seed)
                good = (all(math.isfinite(a) and a <= 2 * t + 1e-3 for a, t in zip(e_g, e_t))
                        and ("sm90" in kname) == expect)
            except Exception as exc:  # noqa: BLE001
                print("ERROR", name, repr(exc)[:300])
                e_g = e_t = None
                kname, good = "?", False
            finally:
                _gluon(True)
            n_fail += not good
            row = dict(kind="check_api", case=name, hdim=d, hdim_v=dv, kernel=kname, gluon_expected=expect,
                       err_gluon=e_g, err_triton=e_t, ok=good)
            rows.append(row)
            print("PASS" if good else "FAIL", row, flush=True)
    # a packed varlen batch (empty and one-token sequences included) against each sequence alone
    for d, dv in ((192, 128), (256, 128)):
        torch.manual_seed(n)
        n += 1
        lens_q, lens_k = [300, 0, 1, 129, 700], [300, 0, 5, 129, 900]
        cu_q = torch.tensor([0] + lens_q, device="cuda").cumsum(0).to(torch.int32)
        cu_k = torch.tensor([0] + lens_k, device="cuda").cumsum(0).to(torch.int32)
        q = torch.randn(sum(lens_q), 4, d, device="cuda", dtype=dtype)
        k = torch.randn(sum(lens_k), 2, d, device="cuda", dtype=dtype)
        v = torch.randn(sum(lens_k), 2, dv, device="cuda", dtype=dtype)
        configs.poison_outputs = True
        try:
            out, lse = ioattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                                     return_lse=True)
            torch.cuda.synchronize()
            kname = getattr(configs.last_compiled.get("fwd"), "name", "?")
            err_o = err_l = 0.0
            good = "sm90" in kname
            for i in range(len(lens_q)):
                a, bq, c, bk = (int(x) for x in (cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]))
                if bq == a:
                    continue
                ro, rl = attention_ref(q[None, a:bq], k[None, c:bk], v[None, c:bk], causal=True)
                fin = torch.isfinite(rl[0])
                err_o = max(err_o, (out[a:bq].double() - ro[0]).abs().max().item())
                if fin.any():
                    err_l = max(err_l, (lse[:, a:bq].double() - rl[0])[fin].abs().max().item())
                good = good and bool(torch.equal(torch.isinf(lse[:, a:bq]), ~fin))
            good = good and math.isfinite(err_o) and err_o <= 2e-2 and err_l <= 1e-3
        except Exception as exc:  # noqa: BLE001
            print("ERROR varlen", repr(exc)[:300])
            kname, err_o, err_l, good = "?", float("nan"), float("nan"), False
        finally:
            configs.poison_outputs = False
        n_fail += not good
        row = dict(kind="check_varlen", hdim=d, hdim_v=dv, kernel=kname, err_out=err_o, err_lse=err_l, ok=good)
        rows.append(row)
        print("PASS" if good else "FAIL", row, flush=True)
    print(f"value-dim API check: {n - n_fail}/{n} passed", flush=True)
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
            flops_fwd = 2 * b * h * n * n * (d + dv) / (2 if causal else 1)
            flops_bwd = 2 * b * h * n * n * (3 * d + 2 * dv) / (2 if causal else 1)

            def ours(on, bwd=False):
                def f():
                    _gluon(on)
                    backward_sm90.VALUE_DIMS = bwd
                    return ioattn.flash_attn_func(q, k, v, causal=causal)
                return f

            fns = {"ioattn_gluon": ours(True), "ioattn_gluon_bwd": ours(True, True), "ioattn_triton": ours(False)}
            for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                                  ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
                def f(backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                fns[name] = f
            line = []
            for name, fn in fns.items():
                res = {}
                for mode in ("fwd", "fwd_bwd"):
                    try:
                        if mode == "fwd":
                            with torch.no_grad():
                                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                            fl = flops_fwd
                        else:
                            g = dout_t if name.startswith("sdpa") else dout
                            ms = triton.testing.do_bench(lambda: fn().backward(g), warmup=25, rep=100,
                                                         return_mode="median")
                            fl = flops_fwd + flops_bwd
                        res[mode] = (ms, fl / ms / 1e9)
                    except Exception as exc:  # noqa: BLE001
                        print(name, mode, "failed", repr(exc)[:160])
                        res[mode] = (float("nan"), float("nan"))
                    rows.append(dict(kind="bench", provider=name, mode=mode, hdim=d, hdim_v=dv, seqlen=n, batch=b,
                                     nheads=h, causal=causal, dtype="bf16", ms=res[mode][0], tflops=res[mode][1]))
                line.append(f"{name} {res['fwd'][1]:6.1f}/{res['fwd_bwd'][1]:6.1f}")
            _gluon(True)
            backward_sm90.VALUE_DIMS = BWD_DEFAULT
            print(f"192/128 n {n:5d} causal {causal!s:5} TFLOP/s fwd/fwd+bwd: " + "  ".join(line), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--seqlens", default="1024,4096,16384")
    args = ap.parse_args(argv)
    # a `timeout` (SIGTERM) still writes the rows so far (the finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    rows = []
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    n_fail = 0
    try:
        if not args.skip_check:
            n_fail = check_kernel(rows) + check_api(rows)
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
