"""The Gluon dropout masks (kernels/dropout_sm90.py) on the GPU: bit-identical to the Triton ones?

Each case writes the (batch * nheads, seqlen_q, seqlen_k) int8 keep mask tile by tile with one
Gluon layout -- forward (keep_rows: [64, 128] or [64, 64] query x key tiles in the wgmma
accumulator layout), the forward's packed path ("fwdpacked": which entries of a bf16 tile of
ones dropout_sm90.drop_packed_rows leaves nonzero: the mul.wide Philox, the SIMD byte compare,
the prmt lane masks) or backward (keep_cols: [64, 64] or [64, 128] key x query tiles, stored
transposed) -- from queries m_base.., keys n_base.., salts salt_base.., and compares it element
for element with

- a Triton kernel calling masks.dropout_keep on 32 x 32 tiles (so the tile shapes differ too),
- for m_base = n_base = salt_base = 0, forward.dropout_keep_mask (the public replay helper),
- for the first salt, dropout_sm90.keep_mask_reference (the docstring's spec in NumPy).

Outputs are prefilled with 2 (a value no kernel writes), seeds come from rng_state tensors
like interface._rng_state's (including high bits and a negative sum), p in {0.1, 0.5, 0.17, 0.75,
0.999} (thresholds 26, 128, 44, 192, 256: both halves of the byte range for the SIMD compare).
Prints PASS/FAIL per case and "gluon dropout check: X/Y passed"; exits 1 on any failure.

    python benchmarks/gluon_dropout_check.py [--bench]

--bench: time per element of the mask (a loop of tiles with dropout_rows / dropout_cols
applied to a register tile) against the same loop without it.
"""

import argparse
import sys
import time

import numpy as np
import torch
import triton
import triton.language as tl

from ioattn.kernels import dropout_sm90
from ioattn.kernels.forward import dropout_keep_mask
from ioattn.kernels.masks import dropout_keep

REF_BM, REF_BN = 32, 32


@triton.jit
def _ref_kernel(MASK, RNG, seqlen_q, seqlen_k, dropout_p, m_base, n_base, salt_base,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    seed = tl.load(RNG) + tl.load(RNG + 1)
    keep = dropout_keep(seed, salt_base + bh, m_base + tl.program_id(0) * BLOCK_M,
                        n_base + tl.program_id(1) * BLOCK_N, dropout_p, BLOCK_M, BLOCK_N)
    ptrs = MASK + bh.to(tl.int64) * seqlen_q * seqlen_k + offs_m[:, None] * seqlen_k + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8))


def triton_mask(bh, sq, sk, p, rng, m_base, n_base, salt_base):
    out = torch.full((bh, sq, sk), 2, dtype=torch.int8, device="cuda")
    _ref_kernel[(sq // REF_BM, sk // REF_BN, bh)](out, rng, sq, sk, p, m_base, n_base, salt_base,
                                                  BLOCK_M=REF_BM, BLOCK_N=REF_BN)
    return out


def gluon_mask(layout, bh, sq, sk, p, rng, m_base, n_base, salt_base):
    kind, tr, tc = layout
    transposed = kind == "bwd"
    packed = kind == "fwdpacked"
    out = torch.full((bh, sq, sk), 2, dtype=torch.int8, device="cuda")
    # forward: rows are queries; backward: rows are keys
    grid = ((sk // tr, sq // tc) if transposed else (sq // tr, sk // tc)) + (bh,)
    dropout_sm90._mask_kernel[grid](out, rng, sq, sk, p, m_base, n_base, salt_base, TR=tr, TC=tc,
                                    TRANSPOSED=transposed, PACKED=packed, SHARED=transposed and dropout_sm90.COLS_SHARED,
                                    num_warps=4)
    return out


LAYOUTS = [("fwd", 64, 128), ("fwd", 64, 64), ("bwd", 64, 64), ("bwd", 64, 128), ("fwdpacked", 64, 128),
           ("fwdpacked", 64, 64)]
BENCH_LAYOUTS = LAYOUTS[:4]
RNGS = [None, (0, 0), (2 ** 32 - 1, 1), (3, 2 ** 62 - 5), (-(2 ** 40) - 17, 11)]  # None: interface-like random
PS = [0.1, 0.5, 0.17, 0.75, 0.999]
BASES = [(0, 0, 0), (16 * 1001, 64 * 777, 1000), (2 ** 20 + 48, 2 ** 21 + 192, 2 ** 31 - 5)]


def check(args):
    torch.manual_seed(0)
    bh, sq, sk = 3, 256, 384
    cases = []
    kinds = args.layouts.split(",") if args.layouts else None
    for layout in LAYOUTS:
        if kinds and layout[0] not in kinds:
            continue
        for ri, rng in enumerate(RNGS):
            for pi, p in enumerate(PS):
                for bi, base in enumerate(BASES):
                    # all layouts x seeds at p = 0.1, 0.5 and base 0; the others on a diagonal
                    if pi >= 2 and ri != 0:
                        continue
                    if bi > 0 and (ri + pi + bi) % 2:
                        continue
                    cases.append((layout, rng, p, base))
    n_fail = 0
    t0 = time.time()
    for layout, rng, p, base in cases:
        m_base, n_base, salt_base = base
        if salt_base + bh > 2 ** 31 - 1:
            salt_base = 2 ** 31 - 1 - bh  # int32 program ids
        info = f"{layout[0]} {layout[1]}x{layout[2]} rng={rng} p={p} base=({m_base},{n_base},{salt_base})"
        try:
            if rng is None:
                state = torch.randint(0, 2 ** 62, (2,), dtype=torch.int64, device="cuda")  # interface._rng_state
            else:
                state = torch.tensor(rng, dtype=torch.int64, device="cuda")
            seed = int(state.sum().item())  # the kernels' int64 sum (no overflow: the inputs are < 2^62)
            g = gluon_mask(layout, bh, sq, sk, p, state, m_base, n_base, salt_base)
            t = triton_mask(bh, sq, sk, p, state, m_base, n_base, salt_base)
            torch.cuda.synchronize()
            msgs = []
            if bool((g == 2).any()):
                msgs.append(f"{int((g == 2).sum())} elements not written")
            bad = int((g != t).sum())
            if bad:
                idx = (g != t).nonzero()[0].tolist()
                msgs.append(f"{bad} mismatches vs masks.dropout_keep (first at bh,q,k={idx})")
            if base == (0, 0, 0):
                pub = dropout_keep_mask(1, bh, sq, sk, p, state).view(bh, sq, sk)
                bad = int((g.bool() != pub).sum())
                if bad:
                    msgs.append(f"{bad} mismatches vs forward.dropout_keep_mask")
            ref = dropout_sm90.keep_mask_reference(seed, salt_base, m_base, n_base, sq, sk, p)
            bad = int((g[0].cpu().numpy().astype(bool) != ref).sum())
            if bad:
                msgs.append(f"{bad} mismatches vs keep_mask_reference (NumPy)")
            kept = g.float().mean().item()
            expect = 1 - np.ceil(np.float32(p) * np.float32(256)) / 256
            if abs(kept - expect) > 0.01:
                msgs.append(f"kept fraction {kept:.4f}, expected {expect:.4f}")
            good = not msgs
            info += f" kept={kept:.4f}"
        except Exception as exc:  # noqa: BLE001
            good, msgs = False, [f"ERROR {exc!r}"[:400]]
        n_fail += not good
        print(("PASS" if good else "FAIL"), info, "; ".join(msgs), flush=True)
    print(f"gluon dropout check: {len(cases) - n_fail}/{len(cases)} passed ({time.time() - t0:.1f} s)", flush=True)
    return n_fail


def bench():
    """ns per tile and per element: the loop with the mask minus the loop without."""
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    state = torch.randint(0, 2 ** 62, (2,), dtype=torch.int64, device="cuda")
    iters = 256
    for kind, tr, tc in BENCH_LAYOUTS:
        transposed = kind == "bwd"
        progs, bh = 4 * n_sm, 2  # ~8 warpgroups per SM
        out = torch.empty(progs * bh * tr * tc, dtype=torch.float32, device="cuda")
        res = {}
        for drop in (False, True):
            def fn():
                dropout_sm90._bench_kernel[(progs, bh)](out, state, 0.1, iters, TR=tr, TC=tc, TRANSPOSED=transposed,
                                                        DROPOUT=drop, SHARED=transposed and dropout_sm90.COLS_SHARED,
                                                        num_warps=4)
            res[drop] = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
        elems = progs * bh * iters * tr * tc
        extra = (res[True] - res[False]) * 1e6  # ns
        print(f"bench {kind} {tr}x{tc}: {res[True] * 1e3:.1f} us with the mask, {res[False] * 1e3:.1f} us without; "
              f"{extra / elems * 1e3:.3f} ps per element GPU-wide ({elems / (res[True] * 1e-3) / 1e12:.2f} Telem/s)",
              flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--layouts", default=None, help="comma-separated kinds to check (fwd, bwd, fwdpacked)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gluon dropout check: no GPU")
        return 2
    n_fail = check(args)
    if args.bench:
        try:
            bench()
        except Exception as exc:  # noqa: BLE001
            print("bench failed", repr(exc)[:400], flush=True)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
