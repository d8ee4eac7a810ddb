"""Quick side-by-side timing: ioattn vs SDPA flash / cuDNN, bf16, 16k tokens.

Also prints the compiler's view of ioattn's kernels (registers, spills, shared
memory, whether wgmma is used). The full benchmark is bench_attention.py.

    python benchmarks/quick_bench.py [--hdim 128] [--seqlen 1024,4096,16384] [--out f.json]
"""

import argparse
import json

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import ioattn


def flops(b, h, n, d, causal, mode):
    f = 4 * b * h * n * n * d / (2 if causal else 1)
    return {"fwd": f, "bwd": 2.5 * f}[mode]


def bench(fn, mode, inputs, dout):
    if mode == "fwd":
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    out = fn()
    return triton.testing.do_bench(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True),
                                   warmup=25, rep=100, return_mode="median")


def kernel_report():
    from ioattn.kernels import configs
    lines = []
    for name, ck in configs.last_compiled.items():
        try:
            ptx = ck.asm.get("ptx", "")
            lines.append(f"{name}: regs={ck.n_regs} spills={ck.n_spills} smem={ck.metadata.shared} "
                         f"wgmma={'wgmma' in ptx} warps={ck.metadata.num_warps} "
                         f"stages={ck.metadata.num_stages}")
        except Exception as exc:  # noqa: BLE001
            lines.append(f"{name}: report failed {exc!r}")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--hdim", default="128")
    ap.add_argument("--seqlen", default="1024,4096,16384")
    ap.add_argument("--out", default=None)
    ap.add_argument("--providers", default="ioattn,sdpa_flash,sdpa_cudnn")
    args = ap.parse_args(argv)
    wanted = args.providers.split(",")
    rows = []
    for d in [int(x) for x in args.hdim.split(",")]:
        h = 2048 // d
        for n in [int(x) for x in args.seqlen.split(",")]:
            b = max(1, 16384 // n)
            for causal in (False, True):
                q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                dout = torch.randn_like(q)
                qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
                doutt = dout.transpose(1, 2).contiguous()
                providers = {
                    "ioattn": (lambda: ioattn.flash_attn_func(q, k, v, causal=causal), (q, k, v), dout),
                }
                for pname, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                                       ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                    def fn(backend=backend):
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                    providers[pname] = (fn, (qt, kt, vt), doutt)
                for pname, (fn, inputs, do) in providers.items():
                    if pname not in wanted:
                        continue
                    for mode in ("fwd", "bwd"):
                        try:
                            ms = bench(fn, mode, inputs, do)
                            tf = flops(b, h, n, d, causal, mode) / ms * 1e-9
                        except Exception as exc:  # noqa: BLE001
                            ms, tf = float("nan"), float("nan")
                            print(pname, mode, "failed:", repr(exc)[:200])
                        rows.append(dict(provider=pname, mode=mode, seqlen=n, headdim=d, causal=causal,
                                         batch=b, nheads=h, ms=ms, tflops=tf))
                del q, k, v, qt, kt, vt
                torch.cuda.empty_cache()
    for line in kernel_report():
        print(line)
    print(f"\n{'d':>4} {'N':>6} {'causal':>6} {'mode':>4} | " + " | ".join(f"{p:>10}" for p in
                                                                       ("ioattn", "sdpa_flash", "sdpa_cudnn")))
    keys = sorted({(r["headdim"], r["seqlen"], r["causal"], r["mode"]) for r in rows})
    for key in keys:
        vals = {r["provider"]: r["tflops"] for r in rows
                if (r["headdim"], r["seqlen"], r["causal"], r["mode"]) == key}
        print(f"{key[0]:>4} {key[1]:>6} {str(key[2]):>6} {key[3]:>4} | " +
              " | ".join(f"{vals.get(p, float('nan')):10.1f}" for p in ("ioattn", "sdpa_flash", "sdpa_cudnn")))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
