"""Hopper (sm_90) dQ kernel in Gluon, for the backward's "split" mode (the Gluon dK/dV kernel of
backward_sm90 / backward_sm90_d256, then this instead of the Triton dQ kernel). On by default
(IOATTN_GLUON_DQ=0 keeps the Triton dQ kernel).

Why: in the split mode the Triton dQ kernel was about half of the backward's time at MLA's
192/128 (session 20's numbers: ~3.1 of 5.95 ms at 4k, estimated from the Triton and Gluon
backwards' times), and the split mode is the default at hdim 256 and what ``deterministic=True``
runs at head dims 64/128. The Triton kernel pads Q/K 192 to 256.

Measured (H100, session 21, results/h100-session21b/dq; the backward alone, bf16, 16k tokens,
TFLOP/s, Triton dQ -> this kernel, cuDNN): 192/128 4k 300 -> 377 (268), causal 271 -> 339 (385),
16k causal 316 -> 357 (470); 256/256 4k 371 -> 414 (377), causal 338 -> 370 (342); 128/128
deterministic 4k 450 -> 471, causal 393 -> 410 (the one pass: 507 / 445). At 64/64 it measured
0.96x the Triton kernel (355 vs 368): not taken there (PAIRS).

The kernel is the forward's shape with one more product:

- a CTA owns 128 query rows of one (batch, query head); its two consumer warpgroups own 64 rows
  each and keep their fp32 dQ in registers. Q and dO of the 128 rows come once (a barrier per
  warpgroup); K and V blocks of BLOCK_N keys stream through a ring that a producer warp fills by
  TMA, from the first key any of the rows sees (sliding window) to the last (causal);
- per key block, warpgroup w: S = Q_w K^T and dP = dO_w V^T (asynchronous wgmma, queries as rows),
  P = exp2(S log2e - lse), dS = P (dP - delta), then dQ_w += dS K with dS as the register
  operand, and the stage goes back to the producer;
- Q/K head dims above 128 (192, 256) come as a 128-wide part and a second part of the rest (64 or
  128): S takes two chained products, dQ two accumulators, so 192 is not padded to 256;
- epilogue: dQ times the scale, in the input dtype, through the warpgroup's own Q tiles (no
  product reads them any more) to global memory by a TMA store (rows past seqlen_q dropped).

The additions into dQ run in a fixed order (the key blocks in sequence, no atomics), so the split
mode stays bit-reproducible: ``deterministic=True`` can take it.

Scope: bf16/fp16 dense (batch, seqlen, heads, dim) tensors, (Q/K, V) head dims in PAIRS, causal
(bottom-right) or not, sliding windows (left, 0) / (left, -1), softcap, ALiBi, GQA/MQA,
seqlen_q != seqlen_k, any lengths (the TMA zero-fills K/V rows past seqlen_k: K = 0 there, so
those keys add nothing to dQ; query rows past seqlen_q have Q = dO = 0, lse = delta = 0, dS = 0,
and the store drops them). Not: packed varlen batches, dropout (the Triton dQ kernel runs).
"""

import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from . import forward_sm90
from .backward_sm90 import _bwd_mask, pads_to_256
from .configs import cdiv
from .forward_sm90 import _wgmma_layout
from .launch import align, launch

# (H100, session 21: 15/15 vs fp64 through the public API, errors within 2x the Triton dQ kernel's,
# dq bit-identical over repeated calls; benchmarks/gluon_dq_check.py)
ENABLED = os.environ.get("IOATTN_GLUON_DQ", "1") == "1"
ROWS = 64  # query rows per consumer warpgroup (the CTA holds two)
LO = 128  # the first part of the Q/K head dim: its columns up to 128
# (Q/K head dim, V head dim) pairs this kernel takes
# (64 / 64 compiles and is correct, but measured 0.96x the Triton dQ kernel: COMPILED_PAIRS only)
PAIRS = ((128, 128), (192, 128), (256, 128), (256, 256))
COMPILED_PAIRS = ((64, 64), ) + PAIRS


@gluon.jit
def _dq_producer(q_desc, qh_desc, do_desc, k_desc, kh_desc, v_desc, q_smem, qh_smem, do_smem, k_smem, kh_smem, v_smem,
                 flags_smem, q_bars, kv_ready, kv_empty, b, h, hk, m0, n_first, n_blocks):
    HAS_HI: gl.constexpr = (flags_smem.shape[0] - 1) % 2 == 1
    STAGES: gl.constexpr = k_smem.shape[0]
    RW: gl.constexpr = q_smem.shape[2]
    D_LO: gl.constexpr = q_smem.shape[4]  # (the second part's first column)
    BLOCK_N: gl.constexpr = k_smem.shape[2]
    # Q and dO of each warpgroup's rows, once
    for w in gl.static_range(2):
        if HAS_HI:
            mbarrier.expect(q_bars.index(w), q_desc.block_type.nbytes + qh_desc.block_type.nbytes
                            + do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(qh_desc, [b, m0 + w * RW, h, D_LO], q_bars.index(w), qh_smem.index(w))
        else:
            mbarrier.expect(q_bars.index(w), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, m0 + w * RW, h, 0], q_bars.index(w), q_smem.index(w))
        tma.async_copy_global_to_shared(do_desc, [b, m0 + w * RW, h, 0], q_bars.index(w), do_smem.index(w))
    for j in range(n_blocks):
        s = j % STAGES
        row = (n_first + j) * BLOCK_N
        # (a fresh barrier counts as having completed the phase before its first: no wait at first)
        mbarrier.wait(kv_empty.index(s), ((j // STAGES) & 1) ^ 1)
        if HAS_HI:
            mbarrier.expect(kv_ready.index(s), k_desc.block_type.nbytes + kh_desc.block_type.nbytes
                            + v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(kh_desc, [b, row, hk, D_LO], kv_ready.index(s), kh_smem.index(s))
        else:
            mbarrier.expect(kv_ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, row, hk, 0], kv_ready.index(s), k_smem.index(s))
        tma.async_copy_global_to_shared(v_desc, [b, row, hk, 0], kv_ready.index(s), v_smem.index(s))


@gluon.jit
def _dq_consumer(dq_desc, dqh_desc, q_smem, qh_smem, do_smem, k_smem, kh_smem, v_smem, flags_smem, q_bars, kv_ready,
                 kv_empty, STATS, stride_sb, stride_sh, stride_sr, b, h, m0, n_first, n_blocks, seqlen_q, seqlen_k,
                 qk_scale, sm_scale, causal, left, ALIBI, ab_off, sc_in, sc_out, WG: gl.constexpr):
    dtype: gl.constexpr = q_smem.dtype
    STAGES: gl.constexpr = k_smem.shape[0]
    RW: gl.constexpr = q_smem.shape[2]  # query rows of this warpgroup
    D_LO: gl.constexpr = q_smem.shape[4]
    D_HI: gl.constexpr = qh_smem.shape[4]
    DV: gl.constexpr = do_smem.shape[4]
    BLOCK_N: gl.constexpr = k_smem.shape[2]
    # compile-time options carried by the shape of a placeholder allocation (gl.warp_specialize
    # would turn constexpr arguments into run-time values): 1 + HAS_HI + 2 HAS_WINDOW + 4 HAS_SOFTCAP
    # + 8 HAS_ALIBI
    HAS_HI: gl.constexpr = (flags_smem.shape[0] - 1) % 2 == 1
    HAS_WINDOW: gl.constexpr = (flags_smem.shape[0] - 1) // 2 % 2 == 1
    HAS_SOFTCAP: gl.constexpr = (flags_smem.shape[0] - 1) // 4 % 2 == 1
    HAS_ALIBI: gl.constexpr = (flags_smem.shape[0] - 1) // 8 == 1
    s_layout: gl.constexpr = _wgmma_layout(BLOCK_N)  # S, dP: RW x BLOCK_N
    dq_layout: gl.constexpr = _wgmma_layout(D_LO)  # dQ[:, :D_LO]
    dqh_layout: gl.constexpr = _wgmma_layout(D_HI)  # dQ[:, LO:]
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dq_layout, k_width=2)
    ah_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dqh_layout, k_width=2)
    tile2: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

    r0 = m0 + WG * RW
    diag = seqlen_k - seqlen_q
    offs_q = gl.arange(0, RW, layout=gl.SliceLayout(1, s_layout))
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    rows = r0 + offs_q
    # lse (log2 units, +inf for a row that sees no key) and delta of the rows, once
    st = STATS + b.to(gl.int64) * stride_sb + h.to(gl.int64) * stride_sh + rows
    lse = gl.load(st, mask=rows < seqlen_q, other=0.0)
    delta = gl.load(st + stride_sr, mask=rows < seqlen_q, other=0.0)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = gl.load(ALIBI + ab_off + h).to(gl.float32) * 1.4426950408889634

    q2 = q_smem.index(WG)._reinterpret(dtype, [RW, D_LO], tile2)
    qh2 = qh_smem.index(WG)._reinterpret(dtype, [RW, D_HI], tile2)
    do2 = do_smem.index(WG)._reinterpret(dtype, [RW, DV], tile2)
    dq = gl.zeros([RW, D_LO], gl.float32, dq_layout)
    dqh = gl.zeros([RW, D_HI], gl.float32, dqh_layout)
    s_init = gl.zeros([RW, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_bars.index(WG), 0)

    for j in range(n_blocks):
        s = j % STAGES
        k0 = (n_first + j) * BLOCK_N
        mbarrier.wait(kv_ready.index(s), (j // STAGES) & 1)
        kt = k_smem.index(s)._reinterpret(dtype, [BLOCK_N, D_LO], tile2)
        vt = v_smem.index(s)._reinterpret(dtype, [BLOCK_N, DV], tile2)
        s_tok = warpgroup_mma(q2, kt.permute((1, 0)), s_init, use_acc=False, is_async=True)
        if HAS_HI:
            kht = kh_smem.index(s)._reinterpret(dtype, [BLOCK_N, D_HI], tile2)
            s_tok = warpgroup_mma(qh2, kht.permute((1, 0)), s_tok, is_async=True)
        dp_tok = warpgroup_mma(do2, vt.permute((1, 0)), s_init, use_acc=False, is_async=True)
        sc = warpgroup_mma_wait(1, deps=(s_tok, ))
        offs_k = k0 + offs_n
        if HAS_SOFTCAP or HAS_ALIBI:  # (qk_scale is 1: _scores gives log2 units; queries as rows)
            sc, tt = forward_sm90._scores(sc, gl.expand_dims(rows, 1), gl.expand_dims(offs_k, 0), diag, sc_in, sc_out,
                                          slope2, HAS_SOFTCAP, HAS_ALIBI)
        p = gl.exp2(sc * qk_scale - gl.expand_dims(lse, 1))
        # causal / window masks (keys along the columns), where the block needs them
        p = _bwd_mask(p, offs_k, offs_q, k0, r0, seqlen_q, seqlen_k, diag, causal, left, HAS_WINDOW, False, 1)
        dp = warpgroup_mma_wait(0, deps=(dp_tok, ))
        ds = p * (dp - gl.expand_dims(delta, 1))
        if HAS_SOFTCAP:  # d tanh: the scores' gradient through the cap
            ds = ds * (1.0 - tt * tt)
        ds16 = ds.to(dtype)
        # dQ += dS K (dS the register operand; keys past seqlen_k have K = 0)
        dq_tok = warpgroup_mma(gl.convert_layout(ds16, a_layout), kt, dq, is_async=True)
        if HAS_HI:
            dqh_tok = warpgroup_mma(gl.convert_layout(ds16, ah_layout), kht, dqh, is_async=True)
            dq, dqh = warpgroup_mma_wait(0, deps=(dq_tok, dqh_tok))
        else:
            dq = warpgroup_mma_wait(0, deps=(dq_tok, ))
        mbarrier.arrive(kv_empty.index(s))

    # epilogue: dQ (scaled) through this warpgroup's Q tiles, which no product reads any more
    q2.store((dq * sm_scale).to(dtype))
    if HAS_HI:
        qh2.store((dqh * sm_scale).to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dq_desc, [b, r0, h, 0], q_smem.index(WG))
    if HAS_HI:
        tma.async_copy_shared_to_global(dqh_desc, [b, r0, h, D_LO], qh_smem.index(WG))
    tma.store_wait(0)


# one wrapper per warpgroup: gl.warp_specialize turns constexpr arguments into values
@gluon.jit
def _dq_consumer_wg0(dq_desc, dqh_desc, q_smem, qh_smem, do_smem, k_smem, kh_smem, v_smem, flags_smem, q_bars, kv_ready,
                     kv_empty, STATS, stride_sb, stride_sh, stride_sr, b, h, m0, n_first, n_blocks, seqlen_q, seqlen_k,
                     qk_scale, sm_scale, causal, left, ALIBI, ab_off, sc_in, sc_out):
    _dq_consumer(dq_desc, dqh_desc, q_smem, qh_smem, do_smem, k_smem, kh_smem, v_smem, flags_smem, q_bars, kv_ready,
                 kv_empty, STATS, stride_sb, stride_sh, stride_sr, b, h, m0, n_first, n_blocks, seqlen_q, seqlen_k,
                 qk_scale, sm_scale, causal, left, ALIBI, ab_off, sc_in, sc_out, 0)


@gluon.jit
def _dq_consumer_wg1(dq_desc, dqh_desc, q_smem, qh_smem, do_smem, k_smem, kh_smem, v_smem, flags_smem, q_bars, kv_ready,
                     kv_empty, STATS, stride_sb, stride_sh, stride_sr, b, h, m0, n_first, n_blocks, seqlen_q, seqlen_k,
                     qk_scale, sm_scale, causal, left, ALIBI, ab_off, sc_in, sc_out):
    _dq_consumer(dq_desc, dqh_desc, q_smem, qh_smem, do_smem, k_smem, kh_smem, v_smem, flags_smem, q_bars, kv_ready,
                 kv_empty, STATS, stride_sb, stride_sh, stride_sr, b, h, m0, n_first, n_blocks, seqlen_q, seqlen_k,
                 qk_scale, sm_scale, causal, left, ALIBI, ab_off, sc_in, sc_out, 1)


@gluon.jit
def _attn_bwd_dq_sm90(q_desc, qh_desc, do_desc, k_desc, kh_desc, v_desc, dq_desc, dqh_desc, STATS, stride_sb, stride_sh,
                 stride_sr, seqlen_q, seqlen_k, nheads, group, qk_scale, sm_scale, left, ALIBI, stride_ab, sc_in, sc_out,
                 CAUSAL: gl.constexpr, STAGES: gl.constexpr, HAS_HI: gl.constexpr, HAS_WINDOW: gl.constexpr,
                 HAS_SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                 PRODUCER_REGS: gl.constexpr):
    RW: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[1]
    # (causal: the last query blocks see the most keys; they come first)
    m_block = gl.program_id(0)
    if CAUSAL:
        m_block = gl.num_programs(0) - 1 - m_block
    m0 = m_block * (2 * RW)
    bh = gl.program_id(1)
    b = bh // nheads
    h = bh % nheads
    hk = h // group
    ab_off = b * stride_ab  # (ALiBi slopes of this batch element: (batch, nheads) or (nheads,))
    diag = seqlen_k - seqlen_q
    k_end = seqlen_k
    if CAUSAL:  # the CTA's last query row m0 + 2 RW - 1 sees keys up to itself + diag
        k_end = gl.minimum(k_end, m0 + 2 * RW + diag)
    k_start = 0
    if HAS_WINDOW:  # its first row sees `left` keys before its diagonal
        k_start = gl.maximum(m0 + diag - left, 0)
    n_first = k_start // BLOCK_N
    n_blocks = gl.maximum((gl.maximum(k_end, 0) + BLOCK_N - 1) // BLOCK_N - n_first, 0)
    causal = 1 if CAUSAL else 0

    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [2] + do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    if HAS_HI:
        qh_smem = gl.allocate_shared_memory(dtype, [2] + qh_desc.block_type.shape, qh_desc.layout)
        kh_smem = gl.allocate_shared_memory(dtype, [STAGES] + kh_desc.block_type.shape, kh_desc.layout)
    else:  # (not read: the consumers' HAS_HI is off)
        qh_smem = q_smem
        kh_smem = k_smem
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    # (unused, at most 128 bytes: its shape tells the partitions the options, see _dq_consumer)
    flags_smem = gl.allocate_shared_memory(gl.int64, [1 + HAS_HI + 2 * HAS_WINDOW + 4 * HAS_SOFTCAP + 8 * HAS_ALIBI],
                                           mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # one arrival per consumer warpgroup

    consumer_args = (dq_desc, dqh_desc, q_smem, qh_smem, do_smem, k_smem, kh_smem, v_smem, flags_smem, q_bars, kv_ready,
                     kv_empty, STATS, stride_sb, stride_sh, stride_sr, b, h, m0, n_first, n_blocks, seqlen_q, seqlen_k,
                     qk_scale, sm_scale, causal, left, ALIBI, ab_off, sc_in, sc_out)
    producer_args = (q_desc, qh_desc, do_desc, k_desc, kh_desc, v_desc, q_smem, qh_smem, do_smem, k_smem, kh_smem, v_smem,
                     flags_smem, q_bars, kv_ready, kv_empty, b, h, hk, m0, n_first, n_blocks)
    gl.warp_specialize([(_dq_consumer_wg0, consumer_args), (_dq_consumer_wg1, consumer_args),
                        (_dq_producer, producer_args)], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])

    for i in gl.static_range(2):
        mbarrier.invalidate(q_bars.index(i))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(kv_ready.index(i))
        mbarrier.invalidate(kv_empty.index(i))


def config(head_dim, head_dim_v):
    """Keys a block and ring stages: 64 keys (S, dP 32 fp32 registers each a thread), 32 where
    Q, dO and a stage of 64 keys would not fit the shared memory twice (256 / 256); as many
    stages as fit in ~200 KB, at most 3."""
    block_n = 32 if head_dim + head_dim_v > 384 else 64
    fixed = 2 * 2 * ROWS * (head_dim + head_dim_v)  # Q, dO of 128 rows (2-byte elements)
    stage = 2 * block_n * (head_dim + head_dim_v)
    stages = max(2, min(3, (200 * 1024 - fixed) // stage))
    return dict(BLOCK_N=block_n, STAGES=stages, CONSUMER_REGS=240, PRODUCER_REGS=24, num_warps=4)


def _blocks(head_dim, head_dim_v, block_n):
    """TMA tiles: Q/K columns up to LO, the rest (hi), dO/V whole."""
    lo = min(head_dim, LO)
    hi = head_dim - lo if head_dim > LO else lo  # (without a second part: a placeholder)
    return dict(q=(1, ROWS, 1, lo), qh=(1, ROWS, 1, hi), do=(1, ROWS, 1, head_dim_v), k=(1, block_n, 1, lo),
                kh=(1, block_n, 1, hi), v=(1, block_n, 1, head_dim_v))


def supported(q, k, v, dout, *, varlen, window_right, dropout_p):
    """Whether this kernel takes the dQ of a split-mode backward (backward_sm90.supported has
    said "split" for the call: sm_90, bf16/fp16, TMA-ready q, k, v, dout; dq is a fresh
    contiguous tensor of q's shape)."""
    if not ENABLED or varlen or dropout_p > 0 or window_right > 0:
        return False
    return _kernel_dims(q.shape[-1], v.shape[-1]) in PAIRS


def _kernel_dims(head_dim, head_dim_v):
    """The (Q/K, V) head dims of the kernel's tiles: the tensors', or 256 / 256 for a padded head dim of
    136-248 with V's the same (backward_sm90.PAD_BWD256: the TMA zero-fills the columns past the tensors'
    and the dQ store drops them)."""
    if head_dim == head_dim_v and pads_to_256(head_dim):
        return 256, 256
    return head_dim, head_dim_v


def attention_backward_dq(dout, q, k, v, stats, dq, *, softmax_scale, causal, window_left=-1, softcap=0.0,
                          alibi_slopes=None, cfg=None):
    """dQ into dq (q's shape and dtype, TMA-ready), dense (batch, seqlen, heads, dim) tensors.
    ``stats``: backward_sm90.new_stats's buffer, filled by the preprocess (lse in log2 units,
    delta). window_left (with causal: (left, 0); without: (left, -1)), softcap, alibi_slopes: as
    the forward's."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    head_dim, head_dim_v = _kernel_dims(head_dim, v.shape[-1])
    assert (head_dim, head_dim_v) in COMPILED_PAIRS, (head_dim, head_dim_v)
    cfg = cfg or config(head_dim, head_dim_v)
    blk = _blocks(head_dim, head_dim_v, cfg["BLOCK_N"])
    d = forward_sm90._descriptor
    descs = [d(q, blk["q"], q.dtype), d(q, blk["qh"], q.dtype), d(dout, blk["do"], q.dtype), d(k, blk["k"], q.dtype),
             d(k, blk["kh"], q.dtype), d(v, blk["v"], q.dtype), d(dq, blk["q"], q.dtype), d(dq, blk["qh"], q.dtype)]
    grid = (cdiv(seqlen_q, 2 * ROWS), batch * nheads)
    qk_scale, score_args, has_softcap, has_alibi = forward_sm90._score_args(softmax_scale, softcap, alibi_slopes,
                                                                            stats)
    sb, sh, sr = stats.stride()[:3]
    # (every argument is a descriptor, fixed by the dtype, head dims and cfg, an int fixed by the
    # shapes, the stats' strides and window_left, a float, or a pointer of the align() bits)
    key = (q.shape, k.shape, v.shape[-1], stats.stride(), window_left, q.dtype, causal, has_softcap, has_alibi,
           score_args[1], tuple(cfg.values()), align(stats, score_args[0]))
    return launch(_attn_bwd_dq_sm90, grid, *descs, stats, sb, sh, sr, seqlen_q, seqlen_k, nheads, nheads // nheads_k,
                  qk_scale, softmax_scale, window_left, *score_args, CAUSAL=causal, STAGES=cfg["STAGES"],
                  HAS_HI=head_dim > LO, HAS_WINDOW=window_left >= 0, HAS_SOFTCAP=has_softcap, HAS_ALIBI=has_alibi,
                  CONSUMER_REGS=cfg["CONSUMER_REGS"], PRODUCER_REGS=cfg["PRODUCER_REGS"], num_warps=cfg["num_warps"],
                  key=key)


def compile_for(head_dim, head_dim_v=None, dtype="bf16", causal=True, capability=(9, 0), cfg=None, window=False,
                softcap=False, alibi=False):
    """Compile the kernel for a target without a GPU (tests, the compiler's view)."""
    from . import aot
    head_dim_v = head_dim_v or head_dim
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    cfg = cfg or config(head_dim, head_dim_v)
    blk = _blocks(head_dim, head_dim_v, cfg["BLOCK_N"])

    def desc(block):
        return f"tensordesc<{dtype}[{','.join(map(str, block))}],{forward_sm90._layout(block, tdtype)!r}>"

    fn = _attn_bwd_dq_sm90
    sig = dict(q_desc=desc(blk["q"]), qh_desc=desc(blk["qh"]), do_desc=desc(blk["do"]), k_desc=desc(blk["k"]),
               kh_desc=desc(blk["kh"]), v_desc=desc(blk["v"]), dq_desc=desc(blk["q"]), dqh_desc=desc(blk["qh"]),
               STATS="*fp32", stride_sb="i32", stride_sh="i32", stride_sr="i32", seqlen_q="i32", seqlen_k="i32",
               nheads="i32", group="i32", qk_scale="fp32", sm_scale="fp32", left="i32", ALIBI="*fp32",
               stride_ab="i32", sc_in="fp32", sc_out="fp32")
    constexprs = dict(CAUSAL=causal, STAGES=cfg["STAGES"], HAS_HI=head_dim > LO, HAS_WINDOW=window, HAS_SOFTCAP=softcap,
                      HAS_ALIBI=alibi, CONSUMER_REGS=cfg["CONSUMER_REGS"], PRODUCER_REGS=cfg["PRODUCER_REGS"])
    return aot.compile_gluon(fn, sig, constexprs, cfg["num_warps"], capability)
