"""Paged varlen attention and the differentiable lse, on a GPU.

* flash_attn_varlen_func over a paged KV cache (block_table, pages scattered at random)
  against the same keys packed contiguously: agreement and forward TFLOP/s, per page size.
* The backward with a gradient on lse (return_lse, a loss on out and lse) against the
  plain backward: agreement of the plain part and time.

    python benchmarks/bench_paged.py [--out paged.json]
"""

import argparse
import json

import torch
import triton

import ioattn


def _paged(k, cu_k, page_size, gen):
    """k packed (total_k, h, d) -> a paged cache with pages in random order and its table."""
    lens = torch.diff(cu_k).tolist()
    pages_per = [-(-n // page_size) for n in lens]
    num_pages = sum(pages_per)
    perm = torch.randperm(num_pages, generator=gen).to(k.device)
    cache = torch.zeros(num_pages, page_size, *k.shape[1:], dtype=k.dtype, device=k.device)
    table = torch.zeros(len(lens), max(pages_per), dtype=torch.int32, device=k.device)
    start, used = 0, 0
    for b, (n, np_) in enumerate(zip(lens, pages_per)):
        ids = perm[used:used + np_]
        table[b, :np_] = ids.to(torch.int32)
        pos = torch.arange(n, device=k.device)
        cache[ids[pos // page_size], pos % page_size] = k[start:start + n]
        start, used = start + n, used + np_
    return cache, table


def bench_paged(rows, batch=8, seqlen=4096, nheads=16, nheads_k=16, d=128, causal=True):
    dt = torch.bfloat16
    q = torch.randn(batch * seqlen, nheads, d, device="cuda", dtype=dt)
    k = torch.randn(batch * seqlen, nheads_k, d, device="cuda", dtype=dt)
    v = torch.randn_like(k)
    cu = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * seqlen
    flops = 4 * batch * nheads * seqlen * seqlen * d / (2 if causal else 1)
    packed = lambda: ioattn.flash_attn_varlen_func(q, k, v, cu, cu, seqlen, seqlen, causal=causal)
    ref = packed()
    ms = triton.testing.do_bench(packed, warmup=25, rep=100, return_mode="median")
    rows.append(dict(case="varlen packed", page_size=0, ms=ms, tflops=flops / ms * 1e-9, max_diff=0.0))
    print(f"packed varlen          {ms:8.3f} ms {flops / ms * 1e-9:7.1f} TFLOP/s", flush=True)
    for page_size in (16, 64, 256):
        kc, table = _paged(k, cu, page_size, torch.Generator().manual_seed(page_size))
        vc, _ = _paged(v, cu, page_size, torch.Generator().manual_seed(page_size))  # same pages
        fn = lambda: ioattn.flash_attn_varlen_func(q, kc, vc, cu, cu, seqlen, seqlen, causal=causal,
                                                   block_table=table)
        diff = (fn().float() - ref.float()).abs().max().item()
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        rows.append(dict(case="varlen paged", page_size=page_size, ms=ms, tflops=flops / ms * 1e-9,
                         max_diff=diff))
        print(f"paged, page {page_size:4d}      {ms:8.3f} ms {flops / ms * 1e-9:7.1f} TFLOP/s "
              f"max |paged - packed| {diff:.2e}", flush=True)


def bench_lse_grad(rows, batch=4, seqlen=4096, nheads=16, d=128, causal=True):
    dt = torch.bfloat16
    q, k, v = (torch.randn(batch, seqlen, nheads, d, device="cuda", dtype=dt, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    out, lse = ioattn.flash_attn_func(q, k, v, causal=causal, return_lse=True)
    dlse = torch.randn_like(lse)
    flops = 2.5 * 4 * batch * nheads * seqlen * seqlen * d / (2 if causal else 1)
    plain = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    with_lse = lambda: torch.autograd.grad((out, lse), (q, k, v), (dout, dlse), retain_graph=True)
    zero = lambda: torch.autograd.grad((out, lse), (q, k, v), (dout, torch.zeros_like(lse)),
                                       retain_graph=True)
    same = all(torch.equal(a, b) for a, b in zip(plain(), zero()))
    for name, fn in (("bwd", plain), ("bwd with dlse", with_lse)):
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        rows.append(dict(case=name, ms=ms, tflops=flops / ms * 1e-9, dlse_zero_bit_identical=same))
        print(f"{name:22} {ms:8.3f} ms {flops / ms * 1e-9:7.1f} TFLOP/s (dlse = 0 bit-identical: {same})",
              flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    bench_paged(rows)
    bench_lse_grad(rows)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
