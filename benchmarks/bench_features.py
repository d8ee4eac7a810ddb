"""Costs of the FlashAttention-2 feature set on the GPU (issue 4 targets), one run.

- varlen: 64 sequences of random length summing to 64k tokens, causal, hdim 128,
  vs dense causal with the same tokens (batch 64 x 1k): TFLOP/s ratio (target >= 0.9).
- sliding window (1024, 0) vs full causal at 16k tokens (batch 1): speedup (target >= 5x).
- dropout 0.1 vs none, forward + backward, 4k, hdim 128: overhead (target <= 25%).
Also softcap and ALiBi overheads. bf16, 16 heads, triton.testing.do_bench medians.

    python benchmarks/bench_features.py [--out features.json] [--hdim 64] [--parts options]
(--parts: any of varlen,window,options; the summary keeps the ratios whose rows ran)
"""

import argparse
import json

import torch
import triton

import ioattn


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def fwd_bwd(call, inputs):
    def run():
        out = call()
        torch.autograd.grad(out, inputs, torch.ones_like(out))
    return run


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--hdim", type=int, default=128)
    ap.add_argument("--parts", default="varlen,window,options")
    ap.add_argument("--options", default="plain,dropout,softcap,alibi,sdpa",
                    help="the options part's cases (sdpa: SDPA flash plain and with dropout)")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    dev, dt, d = "cuda", torch.bfloat16, args.hdim
    h = 16 * 128 // d  # 2048 channels whatever the head dim
    gen = torch.Generator().manual_seed(0)
    rows = []

    def add(name, ms, flops=None, **extra):
        row = dict(case=name, ms=ms, tflops=flops / ms * 1e-9 if flops else None, **extra)
        rows.append(row)
        tf = f"{row['tflops']:7.1f} TFLOP/s" if flops else ""
        print(f"{name:45s} {ms:8.3f} ms {tf}", flush=True)

    if "varlen" in parts:
        varlen_part(add, gen, dev, dt, h, d)
    if "window" in parts:
        window_part(add, dev, dt, h, d)
    if "options" in parts:
        options_part(add, dev, dt, h, d, set(args.options.split(",")))
    summary = summarize({r["case"]: r for r in rows})
    print()
    for key, val in summary.items():
        print(f"{key:40s} {val:6.3f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           hdim=d, nheads=h, rows=rows, summary=summary), fh, indent=1)


def varlen_part(add, gen, dev, dt, h, d):
    """Varlen vs dense, same tokens."""
    total, nseq = 65536, 64
    cuts = torch.sort(torch.randperm(total - 1, generator=gen)[:nseq - 1] + 1).values
    lens = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([total])])).tolist()
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(total, h, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    fl = sum(4 * h * n * n * d / 2 for n in lens)
    call = lambda: ioattn.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)  # noqa: E731
    add("varlen fwd (64 seqs, 64k tokens, causal)", bench(call), fl, lens_max=max(lens), lens_min=min(lens))
    add("varlen fwd+bwd", bench(fwd_bwd(call, (q, k, v))), 3.5 * fl)
    qd, kd, vd = (x.detach().view(64, 1024, h, d).requires_grad_() for x in (q, k, v))
    fl_d = 64 * 4 * h * 1024 * 1024 * d / 2
    call = lambda: ioattn.flash_attn_func(qd, kd, vd, causal=True)  # noqa: E731
    add("dense fwd (64 x 1k, causal)", bench(call), fl_d)
    add("dense fwd+bwd", bench(fwd_bwd(call, (qd, kd, vd))), 3.5 * fl_d)
    # equal-length varlen: isolates the cost of the varlen indexing itself
    cu_eq = torch.arange(0, total + 1, 1024, dtype=torch.int32, device=dev)
    call = lambda: ioattn.flash_attn_varlen_func(q, k, v, cu_eq, cu_eq, 1024, 1024, causal=True)  # noqa: E731
    add("varlen fwd (64 x 1k equal lengths, causal)", bench(call), fl_d)


def window_part(add, dev, dt, h, d):
    """Sliding window vs full causal, 16k."""
    n = 16384
    q, k, v = (torch.randn(1, n, h, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    full = lambda: ioattn.flash_attn_func(q, k, v, causal=True)  # noqa: E731
    win = lambda: ioattn.flash_attn_func(q, k, v, causal=True, window_size=(1024, 0))  # noqa: E731
    add("causal 16k fwd", bench(full), 4 * h * n * n * d / 2)
    add("window (1024,0) 16k fwd", bench(win))
    add("causal 16k fwd+bwd", bench(fwd_bwd(full, (q, k, v))))
    add("window (1024,0) 16k fwd+bwd", bench(fwd_bwd(win, (q, k, v))))


def options_part(add, dev, dt, h, d, which=("plain", "dropout", "softcap", "alibi", "sdpa")):
    """Dropout, softcap, ALiBi at 4k, and SDPA flash's dropout in the same run (``which`` of them)."""
    n, b = 4096, 4
    q, k, v = (torch.randn(b, n, h, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    slopes = torch.rand(h, device=dev) * 0.1
    for name, kw in [("plain", {}), ("dropout 0.1", dict(dropout_p=0.1)), ("softcap 30", dict(softcap=30.0)),
                     ("alibi", dict(alibi_slopes=slopes))]:
        if name.split()[0] not in which:
            continue
        call = lambda kw=kw: ioattn.flash_attn_func(q, k, v, causal=True, **kw)  # noqa: E731
        add(f"4k causal {name} fwd", bench(call), 4 * b * h * n * n * d / 2)
        add(f"4k causal {name} fwd+bwd", bench(fwd_bwd(call, (q, k, v))), 3.5 * 4 * b * h * n * n * d / 2)

    if "sdpa" not in which:
        return
    # the same dropout through SDPA's FlashAttention-2 kernels: its cost in the same run
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    for name, p in (("plain", 0.0), ("dropout 0.1", 0.1)):
        def sdpa(p=p):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, dropout_p=p, is_causal=True)
        add(f"sdpa flash 4k causal {name} fwd", bench(sdpa), 4 * b * h * n * n * d / 2)
        add(f"sdpa flash 4k causal {name} fwd+bwd", bench(fwd_bwd(sdpa, (qt, kt, vt))), 3.5 * 4 * b * h * n * n * d / 2)



def summarize(by):
    """The issue-4 ratios of the rows that ran."""
    pairs = {
        "varlen/dense TFLOP/s fwd": lambda: by["varlen fwd (64 seqs, 64k tokens, causal)"]["tflops"] / by["dense fwd (64 x 1k, causal)"]["tflops"],
        "varlen/dense TFLOP/s fwd+bwd": lambda: by["varlen fwd+bwd"]["tflops"] / by["dense fwd+bwd"]["tflops"],
        "window speedup fwd": lambda: by["causal 16k fwd"]["ms"] / by["window (1024,0) 16k fwd"]["ms"],
        "window speedup fwd+bwd": lambda: by["causal 16k fwd+bwd"]["ms"] / by["window (1024,0) 16k fwd+bwd"]["ms"],
        "dropout overhead fwd+bwd": lambda: by["4k causal dropout 0.1 fwd+bwd"]["ms"] / by["4k causal plain fwd+bwd"]["ms"] - 1,
        "dropout overhead fwd": lambda: by["4k causal dropout 0.1 fwd"]["ms"] / by["4k causal plain fwd"]["ms"] - 1,
        "sdpa flash dropout overhead fwd": lambda: by["sdpa flash 4k causal dropout 0.1 fwd"]["ms"] / by["sdpa flash 4k causal plain fwd"]["ms"] - 1,
        "sdpa flash dropout overhead fwd+bwd": lambda: by["sdpa flash 4k causal dropout 0.1 fwd+bwd"]["ms"] / by["sdpa flash 4k causal plain fwd+bwd"]["ms"] - 1,
        "dropout fwd+bwd ms ioattn/sdpa flash": lambda: by["4k causal dropout 0.1 fwd+bwd"]["ms"] / by["sdpa flash 4k causal dropout 0.1 fwd+bwd"]["ms"],
        "softcap overhead fwd": lambda: by["4k causal softcap 30 fwd"]["ms"] / by["4k causal plain fwd"]["ms"] - 1,
        "softcap overhead fwd+bwd": lambda: by["4k causal softcap 30 fwd+bwd"]["ms"] / by["4k causal plain fwd+bwd"]["ms"] - 1,
        "alibi overhead fwd+bwd": lambda: by["4k causal alibi fwd+bwd"]["ms"] / by["4k causal plain fwd+bwd"]["ms"] - 1,
    }
    out = {}
    for key, fn in pairs.items():
        try:
            out[key] = fn()
        except KeyError:
            pass
    return out


if __name__ == "__main__":
    main()
