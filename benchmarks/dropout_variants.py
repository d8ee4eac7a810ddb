"""Cost of dropout for variants of its random-number generator (issue 4: <= 25% over none).

Each variant (Philox rounds) runs in its own process, because the generator's parameters
are read from the environment when ioattn.kernels.masks is imported (IOATTN_DROPOUT_ROUNDS).
Earlier sessions also varied the bits per draw, the grouping of keys per call and where
the mask is drawn (benchmarks/results/h100-dropout1, -dropout2, -session3a); only the
winners remain in the kernels. The variants compile in parallel first, then are timed one
after the other. bf16, 16 heads, 16k tokens.

    python benchmarks/dropout_variants.py [--rounds 7] [--out dropout.json]
"""

import argparse
import json
import os
import subprocess
import sys

CASES = [(128, 4096, False), (128, 4096, True), (64, 4096, False)]  # (hdim, seqlen, causal)


def child(compile_only):
    import torch
    import triton

    import ioattn
    rows = []
    for d, n, causal in CASES:
        h, b = 2048 // d, 16384 // n
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        for p in (0.0, 0.1):
            def fwd():
                return ioattn.flash_attn_func(q, k, v, dropout_p=p, causal=causal)

            def fwd_bwd():
                out = fwd()
                torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
            if compile_only:
                fwd_bwd()
                continue
            t_f = triton.testing.do_bench(fwd, warmup=25, rep=100, return_mode="median")
            t_fb = triton.testing.do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median")
            rows.append(dict(hdim=d, seqlen=n, causal=causal, dropout_p=p, fwd_ms=t_f, fwd_bwd_ms=t_fb))
    torch.cuda.synchronize()
    print(json.dumps(rows))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", default="7")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", choices=["compile", "time"], default=None)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child == "compile")
    variants = [int(x) for x in args.rounds.split(",")]

    def env(rounds):
        return dict(os.environ, IOATTN_DROPOUT_ROUNDS=str(rounds))
    procs = [subprocess.Popen([sys.executable, __file__, "--child", "compile"], env=env(v),
                              stdout=subprocess.DEVNULL) for v in variants]
    for pr in procs:
        pr.wait()
    results = []
    for rounds in variants:
        out = subprocess.run([sys.executable, __file__, "--child", "time"], env=env(rounds),
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{rounds} rounds: failed\n{out.stderr[-1500:]}", flush=True)
            continue
        rows = json.loads(out.stdout.strip().splitlines()[-1])
        for r in rows:
            r.update(rounds=rounds)
        results += rows
        for d, n, causal in CASES:
            base = next(r for r in rows if (r["hdim"], r["seqlen"], r["causal"], r["dropout_p"]) == (d, n, causal, 0.0))
            drop = next(r for r in rows if (r["hdim"], r["seqlen"], r["causal"], r["dropout_p"]) == (d, n, causal, 0.1))
            print(f"rounds={rounds:2d} hdim={d} seqlen={n} causal={causal!s:5}: dropout 0.1 costs "
                  f"fwd +{100 * (drop['fwd_ms'] / base['fwd_ms'] - 1):5.1f}%  "
                  f"fwd+bwd +{100 * (drop['fwd_bwd_ms'] / base['fwd_bwd_ms'] - 1):5.1f}%  "
                  f"(no dropout: fwd {base['fwd_ms']:.3f} ms, fwd+bwd {base['fwd_bwd_ms']:.3f} ms)", flush=True)
    if args.out:
        import torch
        import triton
        with open(args.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, rows=results), fh, indent=1)


if __name__ == "__main__":
    main()
