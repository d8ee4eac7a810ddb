"""Decoding benchmark: one query token over a long KV cache, KV-read bandwidth.

bf16, 32 query heads over 8 KV heads, head dim 128. For each cache size
(batch 1 x 128k, 8 x 16k, 64 x 4k tokens) it times, in one run:

* ioattn ``flash_attn_with_kvcache``, contiguous cache and paged (page 64);
* SDPA's flash and cuDNN backends (``torch.nn.attention.sdpa_kernel``; GQA via
  ``enable_gqa`` where the backend takes it, else K/V repeated to 32 heads
  beforehand, outside the timing);
* standard attention (``ioattn.reference.standard_attention``).

Each provider's output is checked against an fp32 reference before it is
timed. Time is the ``triton.testing.do_bench`` median of single calls (which
includes each call's host-side launch cost when it exceeds do_bench's cache
flush, and about 10 us of event/launch latency), and also the median per call
of a CUDA graph replaying 10 calls (the GPU time, how a serving engine runs a
decoding step). Bandwidth is the bytes of the K and V cache (bf16, 8 KV heads)
over that time, the same bytes for every provider. Prints a table and writes
JSON (``--out``).

    python benchmarks/bench_decode.py [--out PATH] [--cases 1x131072,8x16384]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from ioattn.kvcache import flash_attn_with_kvcache  # noqa: E402
from ioattn.reference import standard_attention  # noqa: E402

NHEADS, NHEADS_K, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 64
CASES = [(1, 131072), (8, 16384), (64, 4096)]
DTYPE = torch.bfloat16


def reference_fp32(q, k, v):
    """fp32 attention of q (b, 1, hq, d) over k/v (b, s, hk, d), grouped heads (no repeat)."""
    b, sq, hq, d = q.shape
    hk = k.shape[2]
    qg = q.float().view(b, sq, hk, hq // hk, d)
    scores = torch.einsum("bqhgd,bshd->bhgqs", qg, k.float()) / math.sqrt(d)
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhgqs,bshd->bqhgd", probs, v.float()).reshape(b, sq, hq, d)


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def make_case(batch, seqlen, device):
    q = torch.randn(batch, 1, NHEADS, HEAD_DIM, device=device, dtype=DTYPE)
    k = torch.randn(batch, seqlen, NHEADS_K, HEAD_DIM, device=device, dtype=DTYPE)
    v = torch.randn(batch, seqlen, NHEADS_K, HEAD_DIM, device=device, dtype=DTYPE)
    return q, k, v


def paged_copy(k, v, page_size):
    """The same cache as pages in a shuffled pool, and its block table."""
    batch, seqlen, hk, d = k.shape
    pages_per_seq = seqlen // page_size
    num_blocks = batch * pages_per_seq
    perm = torch.randperm(num_blocks, device=k.device)
    block_table = perm.view(batch, pages_per_seq).to(torch.int32)
    k_pages = torch.empty(num_blocks, page_size, hk, d, device=k.device, dtype=k.dtype)
    v_pages = torch.empty_like(k_pages)
    k_pages[perm] = k.view(num_blocks, page_size, hk, d)
    v_pages[perm] = v.view(num_blocks, page_size, hk, d)
    return k_pages, v_pages, block_table


def providers(q, k, v):
    """name -> zero-argument callable returning out (b, 1, hq, d), each on its native layout."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    batch, seqlen = k.shape[:2]
    seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=q.device)
    k_pages, v_pages, block_table = paged_copy(k, v, PAGE_SIZE)
    result = {
        "ioattn": lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens),
        "ioattn paged": lambda: flash_attn_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens,
                                                        block_table=block_table),
    }
    qt = q.transpose(1, 2).contiguous()                      # (b, hq, 1, d)
    kt = k.transpose(1, 2).contiguous()                      # (b, hk, s, d)
    vt = v.transpose(1, 2).contiguous()
    group = NHEADS // NHEADS_K
    repeated = {}

    def sdpa(backend):
        def run_gqa():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

        def run_repeated():
            if "k" not in repeated:
                repeated["k"] = kt.repeat_interleave(group, dim=1)
                repeated["v"] = vt.repeat_interleave(group, dim=1)
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qt, repeated["k"], repeated["v"])

        def pick():
            try:
                run_gqa()
                return run_gqa, "enable_gqa"
            except RuntimeError:
                run_repeated()
                return run_repeated, "repeated kv"
        return pick

    result["sdpa flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
    result["sdpa cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
    result["standard"] = lambda: standard_attention(q, k, v)
    return result


def graph_ms(fn, calls=10, warmup=25, rep=200):
    """Median time per call of a CUDA graph that replays ``calls`` calls of ``fn`` (do_bench's
    ``warmup`` and ``rep`` in ms)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    return triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median") / calls


def bench_case(batch, seqlen, device):
    q, k, v = make_case(batch, seqlen, device)
    ref = reference_fp32(q, k, v)
    kv_bytes = 2 * k.numel() * k.element_size()
    rows = []
    fns = providers(q, k, v)
    # untimed first pass: compiles, and brings an idle GPU's clocks up before the first timing
    fns["ioattn"]()
    triton.testing.do_bench(fns["ioattn"], warmup=100, rep=300)
    for name, fn in fns.items():
        note = ""
        try:
            if name.startswith("sdpa"):
                run, note = fn()
                fn = (lambda run=run: run().transpose(1, 2))
            out = fn()
            err = rel_err(out, ref)
            if not err < 2e-2:
                rows.append(dict(provider=name, ms=None, tbps=None, rel_err=err, graph_ms=None,
                                 graph_tbps=None, note="WRONG: " + note))
                continue
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            try:
                g_ms = graph_ms(fn)
            except RuntimeError:                             # a provider that cannot be captured
                g_ms = None
            rows.append(dict(provider=name, ms=ms, tbps=kv_bytes / (ms * 1e-3) / 1e12, rel_err=err,
                             graph_ms=g_ms, graph_tbps=kv_bytes / (g_ms * 1e-3) / 1e12 if g_ms else None,
                             note=note))
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            rows.append(dict(provider=name, ms=None, tbps=None, rel_err=None, graph_ms=None,
                             graph_tbps=None, note=f"unsupported: {str(exc).splitlines()[0][:80]}"))
        torch.cuda.empty_cache()
    return dict(batch=batch, seqlen=seqlen, kv_bytes=kv_bytes, results=rows)


SWEEP_CONFIGS = [  # (BLOCK_N, num_warps, num_stages) of the decode kernel
    (64, 4, 2), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 3), (32, 4, 4),
]


def sweep_case(batch, seqlen, device):
    """Time the decode kernel over tile configs and split counts (tuning aid)."""
    from ioattn.kernels import decode
    q, k, v = make_case(batch, seqlen, device)
    kv_bytes = 2 * k.numel() * k.element_size()
    ref = reference_fp32(q, k, v)
    seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=device)
    k_pages, v_pages, block_table = paged_copy(k, v, PAGE_SIZE)
    rows = []
    for block_n, warps, stages in SWEEP_CONFIGS:
        cfg = dict(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        default = decode.num_splits_heuristic(batch, NHEADS_K, 1, seqlen, block_n, device)
        for splits in sorted({default, max(1, default // 2), default * 2}):
            for paged in (False, True):
                kc, vc, bt = (k_pages, v_pages, block_table) if paged else (k, v, None)

                def fn():
                    return decode.decode_attention(q, kc, vc, cache_seqlens=seqlens, block_table=bt,
                                                   softmax_scale=HEAD_DIM ** -0.5, num_splits=splits,
                                                   config=cfg)[0]
                try:
                    err = rel_err(fn(), ref)
                    ms = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
                except Exception as exc:  # noqa: BLE001  (a config that does not compile)
                    print(f"  {cfg} splits={splits} paged={paged}: {str(exc).splitlines()[0][:80]}")
                    continue
                tbps = kv_bytes / (ms * 1e-3) / 1e12
                rows.append(dict(**cfg, splits=splits, default_splits=default, paged=paged, ms=ms,
                                 tbps=tbps, rel_err=err))
                print(f"{batch:>3}x{seqlen:<6} BN={block_n:<3} w={warps} st={stages} splits={splits:<3}"
                      f"{' paged' if paged else '      '} {ms:.4f} ms {tbps:.2f} TB/s err {err:.1e}",
                      flush=True)
    return dict(batch=batch, seqlen=seqlen, sweep=rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode_<device>.json)")
    parser.add_argument("--cases", default=None, help="comma-separated BATCHxSEQLEN, e.g. 1x131072,64x4096")
    parser.add_argument("--sweep", action="store_true", help="time ioattn tile configs / splits instead")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode needs a CUDA GPU")
    device = torch.device("cuda")
    torch.manual_seed(0)
    cases = CASES if args.cases is None else [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    name = torch.cuda.get_device_name(device)
    if args.sweep:
        results = [sweep_case(b, s, device) for b, s in cases]
        out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                       f"decode_sweep_{name.replace(' ', '_')}.json")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(dict(device=name, cases=results), f, indent=2)
        for case in results:
            for paged in (False, True):
                best = max((r for r in case["sweep"] if r["paged"] == paged), key=lambda r: r["tbps"])
                print(f"best {case['batch']}x{case['seqlen']} paged={paged}: {best}")
        return
    results = [bench_case(b, s, device) for b, s in cases]

    print(f"\n{name}: decoding, bf16, {NHEADS} q heads / {NHEADS_K} kv heads, d={HEAD_DIM}, "
          f"1 query token; TB/s = K+V bytes / median time (do_bench call | CUDA graph)")
    print(f"{'cache':>10} {'provider':<14} {'ms':>8} {'TB/s':>5} | {'graph ms':>8} {'TB/s':>5} "
          f"{'rel err':>8}  note")

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)
    for case in results:
        for row in case["results"]:
            print(f"{case['batch']:>3}x{case['seqlen']:<6} {row['provider']:<14} {fmt(row['ms'], '.4f'):>8} "
                  f"{fmt(row['tbps'], '.2f'):>5} | {fmt(row['graph_ms'], '.4f'):>8} "
                  f"{fmt(row['graph_tbps'], '.2f'):>5} {fmt(row['rel_err'], '.1e'):>8}  {row['note']}")
        by = {r["provider"]: r for r in case["results"]}
        if by["ioattn"]["ms"] and by["ioattn paged"]["ms"]:
            print(f"{'':>10} paged / contiguous speed: {by['ioattn']['ms'] / by['ioattn paged']['ms']:.2f}x "
                  f"(graph {fmt(by['ioattn']['graph_ms'] / by['ioattn paged']['graph_ms'], '.2f')}x)")

    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"decode_{name.replace(' ', '_')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(device=name, torch=torch.__version__, triton=triton.__version__,
                       date=datetime.datetime.now().isoformat(timespec="seconds"),
                       dtype="bfloat16", nheads=NHEADS, nheads_k=NHEADS_K, head_dim=HEAD_DIM,
                       page_size=PAGE_SIZE,
                       timing="triton.testing.do_bench median of single calls (ms) and of a CUDA "
                              "graph of 10 calls, per call (graph_ms)",
                       cases=results), f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
