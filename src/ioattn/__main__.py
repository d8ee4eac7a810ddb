"""Command line: ``python -m ioattn demo | bench``.

demo   ioattn against the seed's standard attention (S and P materialized), forward +
       backward: agreement, time and memory for a few sequence lengths. On a GPU it
       runs the real kernels at realistic sizes; on a CPU it runs the same Triton
       kernels through Triton's interpreter at small sizes.
bench  the benchmark against the peers (benchmarks/bench_attention.py, in a source checkout).
"""

import argparse
import os
import sys
import time
from pathlib import Path


def _time(fn, device, reps):
    import torch
    fn()  # warm-up: compilation stays out of the numbers
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def _peak_mib(fn, device):
    import torch
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def demo(argv):
    ap = argparse.ArgumentParser(prog="python -m ioattn demo")
    ap.add_argument("--seqlens", default=None, help="comma-separated sequence lengths")
    args = ap.parse_args(argv)
    import torch
    import ioattn
    from ioattn.reference import standard_attention

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        dtype, batch, heads, dim = torch.bfloat16, 1, 16, 128
        seqlens = [1024, 2048, 4096, 8192, 16384]
        reps = 5
        where = f"GPU: {torch.cuda.get_device_name()} (Triton kernels)"
    else:
        dtype, batch, heads, dim = torch.float32, 1, 2, 32
        seqlens = [64, 128, 256]
        reps = 1
        mode = "Triton kernels under the interpreter" if os.environ.get("TRITON_INTERPRET") == "1" \
            else "plain-PyTorch blockwise path"
        where = f"CPU ({mode}; times are not GPU times)"
    if args.seqlens:
        seqlens = [int(s) for s in args.seqlens.split(",")]
    print(f"ioattn demo on {where}")
    print(f"batch={batch} heads={heads} headdim={dim} dtype={str(dtype).replace('torch.', '')} causal=True, "
          "forward + backward\n")
    print(f"{'seqlen':>7} | {'max |ioattn - standard|':>23} | {'ioattn ms':>9} | {'standard ms':>11} | "
          f"{'ioattn MiB':>10} | {'standard MiB':>12}")
    for n in seqlens:
        q, k, v = (torch.randn(batch, n, heads, dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn_like(q)

        def step(attn):
            def run():
                out = attn(q, k, v)
                torch.autograd.grad(out, (q, k, v), dout)
                return out
            return run

        flash = step(lambda q, k, v: ioattn.flash_attn_func(q, k, v, causal=True))
        std = step(lambda q, k, v: standard_attention(q, k, v, causal=True))
        out = flash()
        t_flash = _time(flash, device, reps)
        m_flash = _peak_mib(flash, device)
        try:
            ref = std()
            err = f"{(out.float() - ref.float()).abs().max().item():23.2e}"
            t_std = f"{_time(std, device, reps):11.2f}"
            m_std = _peak_mib(std, device)
            m_std = "" if m_std is None else f"{m_std:12.0f}"
        except torch.OutOfMemoryError:
            err, t_std, m_std = f"{'(standard: OOM)':>23}", f"{'OOM':>11}", f"{'OOM':>12}"
            torch.cuda.empty_cache()
        m_flash = "" if m_flash is None else f"{m_flash:10.0f}"
        print(f"{n:7d} | {err} | {t_flash:9.2f} | {t_std} | {m_flash:>10} | {m_std:>12}", flush=True)
        del q, k, v, dout
    if cuda:
        print("\nMemory: extra bytes held at peak during forward+backward, beyond q, k, v and dout.")
        print("ioattn grows linearly with the sequence length; standard attention quadratically.")
    else:
        s = seqlens[-1]
        print(f"\nNo GPU: memory is not measured here. At seqlen {s} standard attention materializes "
              f"S and P, {2 * batch * heads * s * s * 4 / 2 ** 20:.1f} MiB; ioattn keeps "
              f"{batch * heads * s * 4 / 2 ** 10:.1f} KiB of log-sum-exp beside its output.")


def bench(argv):
    root = Path(__file__).resolve().parents[2] / "benchmarks"
    script = root / "bench_attention.py"
    if not script.exists():
        sys.exit("python -m ioattn bench needs a source checkout (benchmarks/bench_attention.py)")
    sys.path.insert(0, str(root))
    import bench_attention
    return bench_attention.main(argv)


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "bench"):
        print(__doc__)
        sys.exit(2)
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "demo":
        import torch
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" \
                and os.environ.get("IOATTN_DEMO_NO_INTERPRET") != "1":
            # run the real Triton kernels on the CPU: the interpreter must be on before triton loads
            os.execve(sys.executable, [sys.executable, "-m", "ioattn", *sys.argv[1:]],
                      {**os.environ, "TRITON_INTERPRET": "1"})
        demo(rest)
    else:
        bench(rest)


if __name__ == "__main__":
    main()
