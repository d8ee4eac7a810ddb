"""Time other tile configurations of ioattn's kernels (bf16, 16k tokens) on the GPU.

The candidates compile in parallel worker processes first (Triton caches the
binaries on disk), then the main process times them one by one with
triton.testing.do_bench; SDPA cuDNN and flash are timed in the same run.

    python benchmarks/sweep_configs.py [--hdim 64,128,256] [--out sweep.json]
"""

import argparse
import json
import multiprocessing as mp
import os

import torch

FWD = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 4, 3), (128, 64, 4, 4), (64, 64, 4, 3), (128, 64, 8, 3)],
    128: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3), (128, 64, 8, 4)],
    256: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 128, 8, 2), (64, 64, 4, 3), (128, 64, 8, 3)],
}
DKDV = {
    64: [(64, 128, 4, 3), (32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4)],
    128: [(64, 128, 8, 2), (32, 128, 4, 3), (32, 128, 8, 3), (64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 3)],
    256: [(32, 64, 8, 1), (32, 64, 4, 2), (16, 64, 4, 2), (64, 64, 8, 1), (32, 128, 8, 1)],
}
DQ = {
    64: [(128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)],
    128: [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 2), (128, 32, 8, 3)],
    256: [(64, 32, 8, 1), (64, 32, 4, 2), (64, 16, 4, 2), (128, 32, 8, 1), (64, 64, 8, 1)],
}
SEQLEN = int(os.environ.get("IOATTN_SWEEP_SEQLEN", "4096"))  # read in the workers too


# round 2: variants that change code paths (a 5th element holds extra constexpr flags).
# The warp_specialize (round 2) and PIPELINE (round 3) variants were removed from the
# kernels after measuring slower; their results stay in benchmarks/results/h100-sweep2, -sweep3.
ROUND2 = []
for _causal in (False, True):
    ROUND2 += [
        ("fwd", 128, _causal, (128, 128, 8, 3), DKDV[128][0], DQ[128][0]),
        ("fwd", 64, _causal, (64, 64, 4, 3), DKDV[64][0], DQ[64][0]),
        ("bwd", 128, _causal, FWD[128][0], (64, 128, 8, 3), (128, 64, 8, 3)),
        ("bwd", 128, _causal, FWD[128][0], (64, 128, 8, 3, {"RELOAD_KV": True}), (128, 64, 8, 3)),
        ("bwd", 64, _causal, FWD[64][0], (32, 128, 4, 3), (64, 64, 4, 3)),
        ("bwd", 256, _causal, FWD[256][0], (32, 64, 8, 1), (64, 32, 4, 2)),
        ("bwd", 256, _causal, FWD[256][0], (32, 64, 8, 1, {"RELOAD_KV": True}), (64, 32, 4, 2)),
        ("bwd", 256, _causal, FWD[256][0], (64, 64, 8, 1, {"RELOAD_KV": True}), (64, 32, 4, 2)),
        ("bwd", 256, _causal, FWD[256][0], (64, 64, 8, 2, {"RELOAD_KV": True}), (64, 32, 4, 2)),
        ("bwd", 256, _causal, FWD[256][0], (32, 64, 4, 2, {"RELOAD_KV": True}), (64, 32, 4, 2)),
        ("bwd", 256, _causal, FWD[256][0], (64, 128, 8, 1, {"RELOAD_KV": True}), (64, 32, 4, 2)),
    ]


# round 4 (session 3): the dK/dV program with S computed queries-as-rows (QROWS) and the
# transposed tiles that layout favours, against the defaults (first row of each head dim)
ROUND4 = []
for _causal in (False, True):
    ROUND4 += [
        ("bwd", 128, _causal, FWD[128][0], (64, 128, 8, 3), (128, 64, 8, 3)),
        ("bwd", 128, _causal, FWD[128][0], (128, 64, 8, 2, {"QROWS": True}), (128, 64, 8, 3)),
        ("bwd", 128, _causal, FWD[128][0], (128, 64, 8, 3, {"QROWS": True}), (128, 64, 8, 3)),
        ("bwd", 128, _causal, FWD[128][0], (64, 64, 4, 3, {"QROWS": True}), (128, 64, 8, 3)),
        ("bwd", 64, _causal, FWD[64][0], (32, 128, 4, 3), (64, 64, 4, 3)),
        ("bwd", 64, _causal, FWD[64][0], (128, 64, 8, 3, {"QROWS": True}), (64, 64, 4, 3)),
        ("bwd", 64, _causal, FWD[64][0], (128, 64, 8, 2, {"QROWS": True}), (64, 64, 4, 3)),
        ("bwd", 64, _causal, FWD[64][0], (64, 64, 4, 3, {"QROWS": True}), (64, 64, 4, 3)),
        ("bwd", 256, _causal, FWD[256][0], (64, 64, 8, 2, {"RELOAD_KV": True}), (64, 32, 4, 2)),
        ("bwd", 256, _causal, FWD[256][0], (64, 64, 8, 2, {"RELOAD_KV": True, "QROWS": True}), (64, 32, 4, 2)),
        ("bwd", 256, _causal, FWD[256][0], (128, 64, 8, 1, {"RELOAD_KV": True, "QROWS": True}), (64, 32, 4, 2)),
    ]


# round 5 (session 3): the dK/dV program under dropout 0.1 ("dropout_p" rides in the dK/dV
# config): queries as rows with transposed tiles (the default) against keys as rows
ROUND5 = []
for _causal in (False, True):
    for _d, _dq in ((128, (128, 64, 8, 3)), (64, (64, 64, 4, 3))):
        ROUND5 += [
            ("bwd", _d, _causal, FWD[_d][0], (128, 64, 8, 2 if _d == 128 else 3, {"QROWS": True, "dropout_p": 0.1}), _dq),
            ("bwd", _d, _causal, FWD[_d][0], (64, 64, 4, 3, {"QROWS": True, "dropout_p": 0.1}), _dq),
            ("bwd", _d, _causal, FWD[_d][0], (64, 128, 8, 2, {"QROWS": False, "dropout_p": 0.1}), _dq),
            ("bwd", _d, _causal, FWD[_d][0], (32, 128, 8, 3, {"QROWS": False, "dropout_p": 0.1}), _dq),
            ("bwd", _d, _causal, FWD[_d][0], (64, 128, 8, 3) if _d == 128 else (32, 128, 4, 3), _dq),
        ]


# round 6 (session 3): hdim 256 backward around the queries-as-rows dK/dV default
_Q256 = (128, 64, 8, 1, {"RELOAD_KV": True, "QROWS": True})
ROUND6 = []
for _causal in (False, True):
    ROUND6 += [
        ("bwd", 256, _causal, FWD[256][0], _Q256, (64, 32, 4, 2)),
        ("bwd", 256, _causal, FWD[256][0], (128, 64, 8, 1, {"QROWS": True}), (64, 32, 4, 2)),
        ("bwd", 256, _causal, FWD[256][0], _Q256, (64, 64, 8, 1)),
        ("bwd", 256, _causal, FWD[256][0], _Q256, (128, 32, 8, 1)),
        ("bwd", 256, _causal, FWD[256][0], _Q256, (64, 32, 4, 3)),
    ]
# round 7: the two winners of round 6 together
ROUND7 = []
for _causal in (False, True):
    ROUND7 += [
        ("bwd", 256, _causal, FWD[256][0], _Q256, (64, 32, 4, 3)),
        ("bwd", 256, _causal, FWD[256][0], (128, 64, 8, 1, {"QROWS": True}), (64, 32, 4, 3)),
    ]


# round 8 (session 3): dQ tiles under dropout 0.1, with the dropout dK/dV defaults
ROUND8 = []
for _causal in (False, True):
    _k128 = (128, 64, 8, 2, {"QROWS": True, "dropout_p": 0.1})
    _k64 = (64, 64, 4, 3, {"QROWS": True, "dropout_p": 0.1})
    ROUND8 += [("bwd", 128, _causal, FWD[128][0], _k128, t)
               for t in ((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2))]
    ROUND8 += [("bwd", 64, _causal, FWD[64][0], _k64, t) for t in ((64, 64, 4, 3), (128, 64, 4, 3), (64, 32, 4, 3))]


# round 9 (session 4): the dK/dV program under dropout 0.1 after the generator's words became
# 2 x 2 blocks (one word per call per thread with keys as rows): keys as rows at the plain
# tiles against the queries-as-rows default; the plain backward for the ratio
ROUND9 = []
for _causal in (False, True):
    for _d, _dq in ((128, (128, 64, 8, 3)), (64, (64, 64, 4, 3))):
        _drop = {"dropout_p": 0.1}
        _q = (128, 64, 8, 2, {"QROWS": True, **_drop}) if _d == 128 else (64, 64, 4, 3, {"QROWS": True, **_drop})
        ROUND9 += [
            ("bwd", _d, _causal, FWD[_d][0], _q, _dq),
            ("bwd", _d, _causal, FWD[_d][0], (64, 128, 8, 3, {"QROWS": False, **_drop}), _dq),
            ("bwd", _d, _causal, FWD[_d][0], (64, 128, 8, 2, {"QROWS": False, **_drop}), _dq),
            ("bwd", _d, _causal, FWD[_d][0], (32, 128, 4 if _d == 64 else 8, 3, {"QROWS": False, **_drop}), _dq),
            ("bwd", _d, _causal, FWD[_d][0], (64, 128, 8, 3) if _d == 128 else (32, 128, 4, 3), _dq),
        ]


# round 10 (session 4): forward tiles for short sequences (512, 1k: IOATTN_SWEEP_SEQLEN), where
# a CTA runs 4-8 key blocks and its prologue/epilogue do not overlap another CTA's loop at
# 128x128 tiles (one CTA per SM by registers and shared memory); 64-row tiles fit two
ROUND10 = []
for _causal in (False, True):
    ROUND10 += [("fwd", 128, _causal, t, DKDV[128][0], DQ[128][0])
                for t in ((128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 4, 2), (128, 64, 8, 2))]
# round 11: the winner of round 10 against the default at 512..4k, and hdim 64's candidates
# (2-stage forwards crashed ptxas with the TMA loads: error -11)
ROUND11 = []
for _causal in (False, True):
    ROUND11 += [("fwd", 128, _causal, t, DKDV[128][0], DQ[128][0]) for t in ((128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3))]
    ROUND11 += [("fwd", 64, _causal, t, DKDV[64][0], DQ[64][0]) for t in ((128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4))]


# round 12 (session 4): backward tiles for short sequences (IOATTN_SWEEP_SEQLEN 512..2k),
# hdim 128: dK/dV candidates with the default dQ, then dQ candidates with the default dK/dV
ROUND12 = []
for _causal in (False, True):
    _f, _k, _q = (64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3)
    ROUND12 += [("bwd", 128, _causal, _f, t, _q) for t in (_k, (64, 64, 4, 3), (32, 128, 4, 3), (32, 64, 4, 3))]
    ROUND12 += [("bwd", 128, _causal, _f, _k, t) for t in ((64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 3))]


def as_cfg(t):
    cfg = dict(BLOCK_M=t[0], BLOCK_N=t[1], num_warps=t[2], num_stages=t[3])
    if len(t) > 4:
        cfg.update(t[4])
    return cfg


def inputs(d, causal):
    h = 2048 // d
    b = 16384 // SEQLEN
    q, k, v = (torch.randn(b, SEQLEN, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    return q, k, v, torch.randn_like(q), b, h


def run_one(job):
    """Compile (and run once) one configuration; returns its error string or None."""
    kind, d, causal, fwd_t, dkdv_t, dq_t = job
    import ioattn
    from ioattn.kernels import configs
    configs.forward_override = as_cfg(fwd_t)
    configs.backward_override = dict(dkdv=as_cfg(dkdv_t), dq=as_cfg(dq_t))
    try:
        q, k, v, dout, _, _ = inputs(d, causal)
        out = ioattn.flash_attn_func(q, k, v, causal=causal, dropout_p=as_cfg(dkdv_t).get("dropout_p", 0.0))
        if kind == "bwd":
            torch.autograd.grad(out, (q, k, v), dout)
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # noqa: BLE001
        return repr(exc)[:200]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--hdim", default="64,128,256")
    ap.add_argument("--out", default=None)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--plan", default="round1", choices=["round1", "round2", "round4", "round5", "round6", "round7", "round8", "round9", "round10", "round11", "round12"])
    args = ap.parse_args(argv)
    dims = [int(x) for x in args.hdim.split(",")]
    jobs = []
    if args.plan != "round1":
        jobs = [j for j in dict(round2=ROUND2, round4=ROUND4, round5=ROUND5, round6=ROUND6, round7=ROUND7, round8=ROUND8, round9=ROUND9, round10=ROUND10, round11=ROUND11, round12=ROUND12)[args.plan] if j[1] in dims]
    for d in dims if args.plan == "round1" else []:
        for causal in (False, True):
            for f in FWD[d]:
                jobs.append(("fwd", d, causal, f, DKDV[d][0], DQ[d][0]))
            for t in DKDV[d][1:]:
                jobs.append(("bwd", d, causal, FWD[d][0], t, DQ[d][0]))
            for t in DQ[d][1:]:
                jobs.append(("bwd", d, causal, FWD[d][0], DKDV[d][0], t))
            jobs.append(("bwd", d, causal, FWD[d][0], DKDV[d][0], DQ[d][0]))
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers) as pool:
        errors = pool.map(run_one, jobs)

    import triton
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import ioattn
    from ioattn.kernels import configs
    rows = []
    for job, err in zip(jobs, errors):
        kind, d, causal, fwd_t, dkdv_t, dq_t = job
        q, k, v, dout, b, h = inputs(d, causal)
        fl = 4 * b * h * SEQLEN ** 2 * d / (2 if causal else 1) * (2.5 if kind == "bwd" else 1)
        ms = float("nan")
        if err is None:
            configs.forward_override = as_cfg(fwd_t)
            configs.backward_override = dict(dkdv=as_cfg(dkdv_t), dq=as_cfg(dq_t))
            try:
                if kind == "fwd":
                    ms = triton.testing.do_bench(lambda: ioattn.flash_attn_func(q, k, v, causal=causal),
                                                 warmup=10, rep=40, return_mode="median")
                else:
                    out = ioattn.flash_attn_func(q, k, v, causal=causal,
                                                 dropout_p=as_cfg(dkdv_t).get("dropout_p", 0.0))
                    ms = triton.testing.do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                                                 warmup=10, rep=40, return_mode="median")
            except Exception as exc:  # noqa: BLE001
                err = repr(exc)[:200]
        rows.append(dict(kind=kind, d=d, causal=causal, fwd=fwd_t, dkdv=dkdv_t, dq=dq_t, ms=ms,
                         tflops=fl / ms * 1e-9, error=err))
        regs = {n: (c.n_regs, c.n_spills) for n, c in configs.last_compiled.items()}
        print(f"{kind} d={d} causal={causal} fwd={fwd_t} dkdv={dkdv_t} dq={dq_t}: "
              f"{fl / ms * 1e-9:6.1f} TFLOP/s {err or ''} regs/spills={regs}", flush=True)
    configs.forward_override = configs.backward_override = None
    for d in dims if args.plan == "round1" else []:
        for causal in (False, True):
            q, k, v, dout, b, h = inputs(d, causal)
            qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
            for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                fl = 4 * b * h * SEQLEN ** 2 * d / (2 if causal else 1)
                try:
                    with sdpa_kernel(be):
                        ms_f = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                                                       warmup=10, rep=40, return_mode="median")
                        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                        ms_b = triton.testing.do_bench(lambda: torch.autograd.grad(out, (qt, kt, vt), dout.transpose(1, 2), retain_graph=True),
                                                       warmup=10, rep=40, return_mode="median")
                    print(f"sdpa_{name} d={d} causal={causal}: fwd {fl / ms_f * 1e-9:6.1f} bwd {2.5 * fl / ms_b * 1e-9:6.1f}")
                    rows.append(dict(kind="peer", provider=name, d=d, causal=causal, fwd_tflops=fl / ms_f * 1e-9,
                                     bwd_tflops=2.5 * fl / ms_b * 1e-9))
                except Exception as exc:  # noqa: BLE001
                    print(f"sdpa_{name} d={d}: {exc!r}"[:200])
    print("\nbest per (kind, d, causal):")
    for d in dims:
        for causal in (False, True):
            for kind in ("fwd", "bwd"):
                cands = [r for r in rows if r["kind"] == kind and r["d"] == d and r["causal"] == causal and r["error"] is None]
                if cands:
                    best = max(cands, key=lambda r: r["tflops"])
                    print(f"{kind} d={d} causal={causal}: {best['tflops']:.1f} fwd={best['fwd']} dkdv={best['dkdv']} dq={best['dq']}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, seqlen=SEQLEN, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
