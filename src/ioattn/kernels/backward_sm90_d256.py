"""Hopper (sm_90) backward at head dim 256 in Gluon: dK and dV (mode "split") or dK, dV and dQ
in one pass (mode "atomic"). On by default on sm_90 for dense and packed varlen batches, with
sliding windows, softcap and ALiBi (backward_sm90.D256, D256_OPTIONS; checked on an H200 in
session 9: benchmarks/gluon_bwd256_check.py, --options); dropout keeps the Triton backward.

Why a kernel of its own: backward_sm90 lets each consumer warpgroup own 64 keys and keep their
dK, dV (64 x hdim fp32) in registers: at hdim 256 that is 256 registers a thread for the two.
Here the two consumer warpgroups split the HEAD DIM of dK/dV instead of the keys:

- a CTA owns 64 keys of one (batch, KV head); warpgroup w keeps dK[:, 128w:128w+128] and
  dV[:, 128w:128w+128] (64 + 64 fp32 registers a thread) while the query blocks (64 rows, of
  every query head of the GQA group) stream through a ring of 2 shared-memory stages that a
  producer warp fills by TMA. K, V, Q and dO travel as column halves (64 x 128 tiles), so
  every operand below is a whole tile or a row slice of one;
- per query block, warpgroup w computes the scores of ITS 32 keys over the full head dim,
  queries as rows: S_w = Q K_w^T and dP_w = dO V_w^T (64 x 32, two chained wgmmas each, one
  per column half: 16 fp32 registers each), P_w = exp2(S_w log2e - lse), dS_w = P_w (dP_w -
  delta), and writes P_w^T and dS_w^T (bf16/fp16) into rows 32w.. of two shared 64-key x
  64-query tiles (double-buffered; an mbarrier with one arrival per warpgroup says both
  halves are there);
- then dV_w += P^T dO[:, half w] and dK_w += dS^T Q[:, half w], all 64 keys, A and B from
  shared memory;
- with WITH_DQ ("atomic"): dQ[:, half w] = dS K[:, half w] (64 x 128, A the dS^T tile read
  transposed), scaled, and added to an fp32 accumulator by one bulk TMA reduction. Its fp32
  tile (32 KB) lives in the stage's Q[:, half w] and dO[:, half w] tiles, which after the
  warpgroups' barrier only this warpgroup reads (its dK and dV products): the stage goes back
  to the producer once the reduction has read it (tma.store_wait at the next block, behind
  that block's score products). No shared memory beyond the split mode's.

Shared memory (bf16/fp16, 2 stages): K, V 64 KB + Q, dO 2 x 64 KB + P^T, dS^T 2 x 16 KB + lse /
delta 1 KB = 230,400 B + barriers (limit 232,448).
Scope: bf16/fp16 dense (batch, seqlen, heads, 256) tensors, causal (bottom-right) or not,
GQA/MQA, seqlen_q != seqlen_k, any lengths (the TMA zero-fills rows past the ends: such query
rows have Q = dO = 0 and lse = delta = 0, so they add nothing to dK/dV; keys past the end have
K = V = 0 and their rows of dK/dV are dropped by the TMA store). Options (the hdim-64/128
kernel's helpers, with the scores' orientation turned: queries as rows here):
- sliding windows (left, 0) / (left, -1): the CTA's query blocks end at the last query that sees
  its last key; backward_sm90._bwd_mask (KEY_AXIS 1) masks the blocks that need it;
- softcap / ALiBi: forward_sm90._scores on S_w (query index along the rows, key along the
  columns; then qk_scale is 1), dS_w times 1 - t^2 under softcap; slopes per query head;
- packed varlen: per-sequence bounds from cu_seqlens, tiles that run into the next sequence's
  rows/keys masked (_bwd_mask), lse/delta from backward_sm90.sequence_bounds, dK/dV by a masked
  store (backward_sm90._store_rows) instead of the TMA store, dQ reductions at the packed rows
  (rows past the sequence add zeros). One CTA per 64 keys of the longest sequence.
Dropout at hdim 256 keeps the Triton backward (backward_sm90.supported).

V's own head dim (backward_sm90.VALUE_DIMS, opt-in: VALUE_PAIRS, Q/K 256 or 192 with V 128, MLA's
shapes): dO and V come in 64-wide column halves (of V's head dim) in a ring of their own, dV is
KEYS x 64 a warpgroup, dP_w runs over V's two halves; Q/K 192 uses the same 128-wide halves, the
TMA zero-filling the columns past 192 (adding nothing to S) and dropping them from the dK store
(varlen: a column mask). The split mode only (its dQ tile would not fit a stage's halves).
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from . import forward_sm90
from .backward_sm90 import (VALUE_PAIRS, _STATS_LAYOUT, _bwd_mask, _stats_descriptor, _store_rows, _tma_reduce_add,
                            pads_to_256, sequence_bounds)
from .configs import cdiv
from .forward_sm90 import _wgmma_layout
from .launch import align, launch

HEAD_DIM = 256
HALF_D = 128  # the columns of dK/dV (and dQ) of one consumer warpgroup
BLOCK_M = 64  # query rows per streamed block
BLOCK_N = 64  # keys per CTA (32 per warpgroup in the score products)


@gluon.jit
def _producer(q_desc, do_desc, k_desc, v_desc, st_desc, qd_smem, do_smem, k_smem, v_smem, st_smem, kv_bar, q_ready,
              q_empty, b, hk, group, n0, m_first, n_mblocks, q_off, k_off, st_off):
    # (varlen: b = 0 and the sequence's rows start at q_off / k_off of the packed tensors, its
    # lse/delta at st_off of the stats buffer)
    STAGES: gl.constexpr = st_smem.shape[0] // 2
    ROWS: gl.constexpr = qd_smem.shape[2]
    HALF: gl.constexpr = qd_smem.shape[4]
    VHALF: gl.constexpr = v_smem.shape[4]  # (V's own head dim: half of it; then dO has a ring of its own)
    COMBINED: gl.constexpr = qd_smem.shape[0] == 4 * STAGES
    # K and V (column halves), once per CTA
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
    for w in gl.static_range(2):
        tma.async_copy_global_to_shared(k_desc, [b, k_off + n0, hk, w * HALF], kv_bar, k_smem.index(w))
        tma.async_copy_global_to_shared(v_desc, [b, k_off + n0, hk, w * VHALF], kv_bar, v_smem.index(w))
    for t in range(group * n_mblocks):
        s = t % STAGES
        h = hk * group + t // n_mblocks
        m0 = (m_first + t % n_mblocks) * ROWS
        mbarrier.wait(q_empty.index(s), ((t // STAGES) & 1) ^ 1)
        mbarrier.expect(q_ready.index(s), 2 * q_desc.block_type.nbytes + 2 * do_desc.block_type.nbytes
                        + 2 * st_desc.block_type.nbytes)
        # stage s holds Q[:, half 0], dO[:, half 0], Q[:, half 1], dO[:, half 1] in this order:
        # half w's two tiles are one contiguous 32 KB (warpgroup w's fp32 dQ tile in "atomic");
        # with V's own head dim, Q's halves are 2 s + w of qd_smem and dO's those of do_smem
        for w in gl.static_range(2):
            if COMBINED:
                tma.async_copy_global_to_shared(q_desc, [b, q_off + m0, h, w * HALF], q_ready.index(s),
                                                qd_smem.index(4 * s + 2 * w))
                tma.async_copy_global_to_shared(do_desc, [b, q_off + m0, h, w * HALF], q_ready.index(s),
                                                qd_smem.index(4 * s + 2 * w + 1))
            else:
                tma.async_copy_global_to_shared(q_desc, [b, q_off + m0, h, w * HALF], q_ready.index(s),
                                                qd_smem.index(2 * s + w))
                tma.async_copy_global_to_shared(do_desc, [b, q_off + m0, h, w * VHALF], q_ready.index(s),
                                                do_smem.index(2 * s + w))
        tma.async_copy_global_to_shared(st_desc, [b, h, 0, st_off + m0], q_ready.index(s), st_smem.index(2 * s))
        tma.async_copy_global_to_shared(st_desc, [b, h, 1, st_off + m0], q_ready.index(s),
                                        st_smem.index(2 * s + 1))


@gluon.jit
def _consumer(dk_desc, dv_desc, dq_desc, qd_smem, do_smem, k_smem, v_smem, pt_smem, dst_smem, st_smem, flags_smem, kv_bar,
              q_ready, q_empty, ds_ready, b, hk, group, n0, m_first, n_mblocks, seqlen_q, seqlen_k, qk_scale, sm_scale,
              causal, left, q_off, DK, DV, stride_ks, stride_kh, ALIBI, ab_off, sc_in, sc_out, WG: gl.constexpr,
              WITH_DQ: gl.constexpr):
    dtype: gl.constexpr = dk_desc.dtype
    STAGES: gl.constexpr = st_smem.shape[0] // 2
    ROWS: gl.constexpr = qd_smem.shape[2]  # queries per block
    HALF: gl.constexpr = qd_smem.shape[4]  # head-dim columns of this warpgroup's dK, dQ (and dV)
    VHALF: gl.constexpr = v_smem.shape[4]  # of its dV (V's own head dim: half of it)
    COMBINED: gl.constexpr = qd_smem.shape[0] == 4 * STAGES  # Q and dO in one ring (equal head dims)
    KEYS: gl.constexpr = k_smem.shape[2]  # keys of the CTA
    KW: gl.constexpr = KEYS // 2  # keys of this warpgroup's scores
    s_layout: gl.constexpr = _wgmma_layout(KW)  # S_w, dP_w: ROWS x KW, queries as rows
    acc_layout: gl.constexpr = _wgmma_layout(HALF)  # dK: KEYS x HALF; dQ: ROWS x HALF
    dv_layout: gl.constexpr = _wgmma_layout(VHALF)  # dV: KEYS x VHALF
    tile2: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    # compile-time options carried by the shape of a placeholder allocation (gl.warp_specialize
    # would turn constexpr arguments into run-time values), as backward_sm90's consumers do:
    # 1 + HAS_WINDOW + 2 IS_VARLEN + 4 HAS_SOFTCAP + 8 HAS_ALIBI
    HAS_WINDOW: gl.constexpr = (flags_smem.shape[0] - 1) % 2 == 1
    IS_VARLEN: gl.constexpr = (flags_smem.shape[0] - 1) // 2 % 2 == 1
    HAS_SOFTCAP: gl.constexpr = (flags_smem.shape[0] - 1) // 4 % 2 == 1
    HAS_ALIBI: gl.constexpr = (flags_smem.shape[0] - 1) // 8 == 1

    k_lo = k_smem.index(0)._reinterpret(dtype, [KEYS, HALF], tile2)
    k_hi = k_smem.index(1)._reinterpret(dtype, [KEYS, HALF], tile2)
    v_lo = v_smem.index(0)._reinterpret(dtype, [KEYS, VHALF], tile2)
    v_hi = v_smem.index(1)._reinterpret(dtype, [KEYS, VHALF], tile2)
    # this warpgroup's keys in both column halves (B operands of S_w, dP_w)
    kw_lo = k_lo.slice(WG * KW, KW, dim=0).permute((1, 0))
    kw_hi = k_hi.slice(WG * KW, KW, dim=0).permute((1, 0))
    vw_lo = v_lo.slice(WG * KW, KW, dim=0).permute((1, 0))
    vw_hi = v_hi.slice(WG * KW, KW, dim=0).permute((1, 0))
    k_own = k_smem.index(WG)._reinterpret(dtype, [KEYS, HALF], tile2)  # K[:, half WG] (dQ's B)
    v_own = v_smem.index(WG)._reinterpret(dtype, [KEYS, VHALF], tile2)
    if WITH_DQ:
        # the stages as fp32 tiles: index 2 s + w is stage s's (Q, dO)[:, half w]
        dq_all = qd_smem._reinterpret(gl.float32, [2 * STAGES] + dq_desc.block_type.shape, dq_desc.layout)
        dq2_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HALF], gl.float32)

    k0 = n0 + WG * KW
    diag = seqlen_k - seqlen_q
    offs_k = k0 + gl.arange(0, KW, layout=gl.SliceLayout(0, s_layout))
    offs_q = gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    dk = gl.zeros([KEYS, HALF], gl.float32, acc_layout)
    dv = gl.zeros([KEYS, VHALF], gl.float32, dv_layout)
    s_init = gl.zeros([ROWS, KW], gl.float32, s_layout)
    dq_init = gl.zeros([ROWS, HALF], gl.float32, acc_layout)
    mbarrier.wait(kv_bar, 0)

    n_iter = group * n_mblocks
    for t in range(n_iter):
        s = t % STAGES
        h = hk * group + t // n_mblocks
        m0 = (m_first + t % n_mblocks) * ROWS
        mbarrier.wait(q_ready.index(s), (t // STAGES) & 1)
        if COMBINED:
            q_lo = qd_smem.index(4 * s)._reinterpret(dtype, [ROWS, HALF], tile2)
            do_lo = qd_smem.index(4 * s + 1)._reinterpret(dtype, [ROWS, HALF], tile2)
            q_hi = qd_smem.index(4 * s + 2)._reinterpret(dtype, [ROWS, HALF], tile2)
            do_hi = qd_smem.index(4 * s + 3)._reinterpret(dtype, [ROWS, HALF], tile2)
            q_own = qd_smem.index(4 * s + 2 * WG)._reinterpret(dtype, [ROWS, HALF], tile2)
            do_own = qd_smem.index(4 * s + 2 * WG + 1)._reinterpret(dtype, [ROWS, HALF], tile2)
        else:
            q_lo = qd_smem.index(2 * s)._reinterpret(dtype, [ROWS, HALF], tile2)
            q_hi = qd_smem.index(2 * s + 1)._reinterpret(dtype, [ROWS, HALF], tile2)
            do_lo = do_smem.index(2 * s)._reinterpret(dtype, [ROWS, VHALF], tile2)
            do_hi = do_smem.index(2 * s + 1)._reinterpret(dtype, [ROWS, VHALF], tile2)
            q_own = qd_smem.index(2 * s + WG)._reinterpret(dtype, [ROWS, HALF], tile2)
            do_own = do_smem.index(2 * s + WG)._reinterpret(dtype, [ROWS, VHALF], tile2)
        # S_w = Q K_w^T and dP_w = dO V_w^T over the full head dim (two column halves each)
        s_tok = warpgroup_mma(q_lo, kw_lo, s_init, use_acc=False, is_async=True)
        s_tok = warpgroup_mma(q_hi, kw_hi, s_tok, is_async=True)
        dp_tok = warpgroup_mma(do_lo, vw_lo, s_init, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(do_hi, vw_hi, dp_tok, is_async=True)
        if WITH_DQ:
            if t > 0:
                # the previous block's dQ reduction has read its tile out of that stage: give the
                # stage back to the producer (behind this block's score products)
                tma.store_wait(0)
                mbarrier.arrive(q_empty.index((t - 1) % STAGES))
        sc = warpgroup_mma_wait(2, deps=(s_tok, ))
        # lse and delta straight from the stage into the rows' layout
        lse = st_smem.index(2 * s)._reinterpret(gl.float32, [ROWS], flat).load(gl.SliceLayout(1, s_layout))
        if HAS_SOFTCAP or HAS_ALIBI:  # (qk_scale is 1: _scores gives log2 units; queries as rows)
            slope2 = 0.0
            if HAS_ALIBI:
                slope2 = gl.load(ALIBI + ab_off + h).to(gl.float32) * 1.4426950408889634
            sc, tt = forward_sm90._scores(sc, gl.expand_dims(m0 + offs_q, 1), gl.expand_dims(offs_k, 0), diag, sc_in,
                                          sc_out, slope2, HAS_SOFTCAP, HAS_ALIBI)
        p = gl.exp2(sc * qk_scale - gl.expand_dims(lse, 1))
        # causal / window / varlen masks (keys along the columns), where the block needs them
        p = _bwd_mask(p, offs_k, offs_q, k0, m0, seqlen_q, seqlen_k, diag, causal, left, HAS_WINDOW, IS_VARLEN, 1)
        dp = warpgroup_mma_wait(0, deps=(dp_tok, ))
        delta = st_smem.index(2 * s + 1)._reinterpret(gl.float32, [ROWS], flat).load(gl.SliceLayout(1, s_layout))
        ds = p * (dp - gl.expand_dims(delta, 1))
        if HAS_SOFTCAP:  # d tanh: the scores' gradient through the cap
            ds = ds * (1.0 - tt * tt)
        # P_w^T, dS_w^T into rows WG * KW.. of the shared key x query tiles (double-buffered: the
        # products of block t - 2 that read buffer t % 2 were waited for before either warpgroup
        # arrived on block t - 1's barrier, which this one has passed)
        ptb = pt_smem.index(t % 2)
        dstb = dst_smem.index(t % 2)
        ptb.slice(WG * KW, KW, dim=0).permute((1, 0)).store(p.to(dtype))
        dstb.slice(WG * KW, KW, dim=0).permute((1, 0)).store(ds.to(dtype))
        fence_async_shared()
        mbarrier.arrive(ds_ready.index(t % 2))
        mbarrier.wait(ds_ready.index(t % 2), (t // 2) & 1)
        # dV_w += P^T dO[:, half w], dK_w += dS^T Q[:, half w] (all 64 keys)
        dv_tok = warpgroup_mma(ptb, do_own, dv, is_async=True)
        dk_tok = warpgroup_mma(dstb, q_own, dk, is_async=True)
        if WITH_DQ:
            dq_tok = warpgroup_mma(dstb.permute((1, 0)), k_own, dq_init, use_acc=False, is_async=True)
            dv, dk = warpgroup_mma_wait(1, deps=(dv_tok, dk_tok))
            dq = warpgroup_mma_wait(0, deps=(dq_tok, ))
            # Q[:, half w] and dO[:, half w] of this stage are read by nobody now: dQ's fp32 tile
            # goes there, then one bulk reduction into the accumulator (rows past seqlen_q dropped;
            # varlen: rows past the sequence add zeros to the next one's, their dS being 0)
            dq_buf = dq_all.index(2 * s + WG)
            dq_buf._reinterpret(gl.float32, [ROWS, HALF], dq2_layout).store(dq * sm_scale)
            fence_async_shared()
            _tma_reduce_add(dq_desc, [b, q_off + m0, h, WG * HALF], dq_buf)
        else:
            dv, dk = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok))
            mbarrier.arrive(q_empty.index(s))
    if WITH_DQ:
        tma.store_wait(0)
        if n_iter > 0:
            mbarrier.arrive(q_empty.index((n_iter - 1) % STAGES))

    # epilogue: dK (scaled), dV through this warpgroup's column halves of the K/V tiles: past the
    # last block's barrier, both warpgroups' score products (the other readers) are done
    k_own.store((dk * sm_scale).to(dtype))
    v_own.store(dv.to(dtype))
    if IS_VARLEN:  # a TMA store would write into the next sequence's keys: a masked store
        if COMBINED:
            # (dk_desc.shape[3]: the tensors' own head dim, less than 256 when padded, forward_sm90.PAD_DIMS:
            # this half's columns from it on are dropped)
            n_cols = dk_desc.shape[3] - WG * HALF
            _store_rows(k_own, DK + WG * HALF, n0, seqlen_k, hk, stride_ks, stride_kh, n_cols)
            _store_rows(v_own, DV + WG * VHALF, n0, seqlen_k, hk, stride_ks, stride_kh, n_cols)
        else:
            # V's own head dim: dK and dV contiguous (the launcher checks), so K's head dim is
            # stride_kh (192 or 256: dK's columns from it on are dropped) and dV's strides follow
            # from V's (2 VHALF) and the KV heads (stride_ks // stride_kh)
            _store_rows(k_own, DK + WG * HALF, n0, seqlen_k, hk, stride_ks, stride_kh, stride_kh - WG * HALF)
            _store_rows(v_own, DV + WG * VHALF, n0, seqlen_k, hk, stride_ks // stride_kh * (2 * VHALF), 2 * VHALF)
    else:
        fence_async_shared()
        tma.async_copy_shared_to_global(dk_desc, [b, n0, hk, WG * HALF], k_smem.index(WG))
        tma.async_copy_shared_to_global(dv_desc, [b, n0, hk, WG * VHALF], v_smem.index(WG))
        tma.store_wait(0)


# one wrapper per (warpgroup, mode): gl.warp_specialize turns constexpr arguments into values
@gluon.jit
def _consumer_wg0_split(dk_desc, dv_desc, dq_desc, qd_smem, do_smem, k_smem, v_smem, pt_smem, dst_smem, st_smem, flags_smem,
                        kv_bar, q_ready, q_empty, ds_ready, b, hk, group, n0, m_first, n_mblocks, seqlen_q, seqlen_k,
                        qk_scale, sm_scale, causal, left, q_off, DK, DV, stride_ks, stride_kh, ALIBI, ab_off, sc_in,
                        sc_out):
    _consumer(dk_desc, dv_desc, dq_desc, qd_smem, do_smem, k_smem, v_smem, pt_smem, dst_smem, st_smem, flags_smem, kv_bar,
              q_ready, q_empty, ds_ready, b, hk, group, n0, m_first, n_mblocks, seqlen_q, seqlen_k, qk_scale, sm_scale,
              causal, left, q_off, DK, DV, stride_ks, stride_kh, ALIBI, ab_off, sc_in, sc_out, 0, False)


@gluon.jit
def _consumer_wg1_split(dk_desc, dv_desc, dq_desc, qd_smem, do_smem, k_smem, v_smem, pt_smem, dst_smem, st_smem, flags_smem,
                        kv_bar, q_ready, q_empty, ds_ready, b, hk, group, n0, m_first, n_mblocks, seqlen_q, seqlen_k,
                        qk_scale, sm_scale, causal, left, q_off, DK, DV, stride_ks, stride_kh, ALIBI, ab_off, sc_in,
                        sc_out):
    _consumer(dk_desc, dv_desc, dq_desc, qd_smem, do_smem, k_smem, v_smem, pt_smem, dst_smem, st_smem, flags_smem, kv_bar,
              q_ready, q_empty, ds_ready, b, hk, group, n0, m_first, n_mblocks, seqlen_q, seqlen_k, qk_scale, sm_scale,
              causal, left, q_off, DK, DV, stride_ks, stride_kh, ALIBI, ab_off, sc_in, sc_out, 1, False)


@gluon.jit
def _consumer_wg0_dq(dk_desc, dv_desc, dq_desc, qd_smem, do_smem, k_smem, v_smem, pt_smem, dst_smem, st_smem, flags_smem, kv_bar,
                     q_ready, q_empty, ds_ready, b, hk, group, n0, m_first, n_mblocks, seqlen_q, seqlen_k, qk_scale,
                     sm_scale, causal, left, q_off, DK, DV, stride_ks, stride_kh, ALIBI, ab_off, sc_in, sc_out):
    _consumer(dk_desc, dv_desc, dq_desc, qd_smem, do_smem, k_smem, v_smem, pt_smem, dst_smem, st_smem, flags_smem, kv_bar,
              q_ready, q_empty, ds_ready, b, hk, group, n0, m_first, n_mblocks, seqlen_q, seqlen_k, qk_scale, sm_scale,
              causal, left, q_off, DK, DV, stride_ks, stride_kh, ALIBI, ab_off, sc_in, sc_out, 0, True)


@gluon.jit
def _consumer_wg1_dq(dk_desc, dv_desc, dq_desc, qd_smem, do_smem, k_smem, v_smem, pt_smem, dst_smem, st_smem, flags_smem, kv_bar,
                     q_ready, q_empty, ds_ready, b, hk, group, n0, m_first, n_mblocks, seqlen_q, seqlen_k, qk_scale,
                     sm_scale, causal, left, q_off, DK, DV, stride_ks, stride_kh, ALIBI, ab_off, sc_in, sc_out):
    _consumer(dk_desc, dv_desc, dq_desc, qd_smem, do_smem, k_smem, v_smem, pt_smem, dst_smem, st_smem, flags_smem, kv_bar,
              q_ready, q_empty, ds_ready, b, hk, group, n0, m_first, n_mblocks, seqlen_q, seqlen_k, qk_scale, sm_scale,
              causal, left, q_off, DK, DV, stride_ks, stride_kh, ALIBI, ab_off, sc_in, sc_out, 1, True)


@gluon.jit
def _attn_bwd_d256(q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc, dq_desc, st_desc, seqlen_q, seqlen_k, nheads_k,
                   group, qk_scale, sm_scale, left, CU_Q, CU_K, DK, DV, stride_ks, stride_kh, ALIBI, stride_ab, sc_in,
                   sc_out, CAUSAL: gl.constexpr, STAGES: gl.constexpr, WITH_DQ: gl.constexpr,
                   CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, HAS_WINDOW: gl.constexpr,
                   IS_VARLEN: gl.constexpr, HAS_SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr):
    ROWS: gl.constexpr = q_desc.block_type.shape[1]
    KEYS: gl.constexpr = k_desc.block_type.shape[1]
    # (causal: the first key blocks have the most query blocks; they come first)
    n0 = gl.program_id(0) * KEYS
    bh = gl.program_id(1)
    b = bh // nheads_k
    hk = bh % nheads_k
    ab_off = b * stride_ab  # (ALiBi slopes of this batch element: (batch, nheads) or (nheads,))
    q_off = 0
    k_off = 0
    st_off = 0
    if IS_VARLEN:
        # packed (1, total, heads, 256) tensors: sequence b's rows from cu_seqlens; DK and DV (the
        # masked epilogue's pointers) move to its first key; its lse/delta from stats_offset
        q_off, seqlen_q, k_off, seqlen_k, st_off = sequence_bounds(CU_Q, CU_K, b)
        DK += k_off.to(gl.int64) * stride_ks
        if v_desc.block_type.shape[3] == q_desc.block_type.shape[3]:
            DV += k_off.to(gl.int64) * stride_ks
        else:  # (V's own head dim: dV contiguous, its rows stride_ks // stride_kh heads of V's dim)
            DV += k_off.to(gl.int64) * (stride_ks // stride_kh * (2 * v_desc.block_type.shape[3]))
        b = 0
        if n0 >= seqlen_k:  # (one CTA per 64 keys of the longest sequence)
            return
    m_first = 0
    if CAUSAL:  # query i sees key j when j <= i + seqlen_k - seqlen_q
        m_first = gl.maximum(n0 - (seqlen_k - seqlen_q), 0) // ROWS
    m_end = seqlen_q
    if HAS_WINDOW:  # a sliding window of `left` keys: the last query that sees the CTA's last key
        m_end = gl.maximum(gl.minimum(m_end, n0 + KEYS - (seqlen_k - seqlen_q) + left), 0)
    n_mblocks = gl.maximum((m_end + ROWS - 1) // ROWS - m_first, 0)
    causal = 1 if CAUSAL else 0

    dtype: gl.constexpr = q_desc.dtype
    # per stage: Q and dO in column halves (Q lo, dO lo, Q hi, dO hi), each a (1, ROWS, 1, 128) TMA tile;
    # with V's own head dim (dO's halves narrower) Q's halves in qd_smem, dO's in do_smem
    if v_desc.block_type.shape[3] == q_desc.block_type.shape[3]:
        qd_smem = gl.allocate_shared_memory(dtype, [4 * STAGES] + q_desc.block_type.shape, q_desc.layout)
        do_smem = qd_smem
    else:
        qd_smem = gl.allocate_shared_memory(dtype, [2 * STAGES] + q_desc.block_type.shape, q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [2 * STAGES] + do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [2] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2] + v_desc.block_type.shape, v_desc.layout)
    pds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([KEYS, ROWS], dtype)
    pt_smem = gl.allocate_shared_memory(dtype, [2, KEYS, ROWS], pds_layout)
    dst_smem = gl.allocate_shared_memory(dtype, [2, KEYS, ROWS], pds_layout)
    st_smem = gl.allocate_shared_memory(gl.float32, [2 * STAGES] + st_desc.block_type.shape, st_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    # (unused, at most 128 bytes: its shape tells the consumers the options, see _consumer)
    flags_smem = gl.allocate_shared_memory(gl.int64, [1 + HAS_WINDOW + 2 * IS_VARLEN + 4 * HAS_SOFTCAP
                                                      + 8 * HAS_ALIBI], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # one arrival per consumer warpgroup
    for i in gl.static_range(2):
        mbarrier.init(ds_ready.index(i), count=2)

    consumer_args = (dk_desc, dv_desc, dq_desc, qd_smem, do_smem, k_smem, v_smem, pt_smem, dst_smem, st_smem, flags_smem,
                     kv_bar, q_ready, q_empty, ds_ready, b, hk, group, n0, m_first, n_mblocks, seqlen_q, seqlen_k,
                     qk_scale, sm_scale, causal, left, q_off, DK, DV, stride_ks, stride_kh, ALIBI, ab_off, sc_in,
                     sc_out)
    producer_args = (q_desc, do_desc, k_desc, v_desc, st_desc, qd_smem, do_smem, k_smem, v_smem, st_smem, kv_bar, q_ready,
                     q_empty, b, hk, group, n0, m_first, n_mblocks, q_off, k_off, st_off)
    if WITH_DQ:
        gl.warp_specialize([(_consumer_wg0_dq, consumer_args), (_consumer_wg1_dq, consumer_args),
                            (_producer, producer_args)], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([(_consumer_wg0_split, consumer_args), (_consumer_wg1_split, consumer_args),
                            (_producer, producer_args)], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])

    mbarrier.invalidate(kv_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(q_ready.index(i))
        mbarrier.invalidate(q_empty.index(i))
    for i in gl.static_range(2):
        mbarrier.invalidate(ds_ready.index(i))


def config(with_dq=False, options=False):
    """Tiles and register split. ``options`` (a window, softcap, ALiBi or varlen) in the split mode:
    40 producer / 232 consumer registers (at 24 / 240 ptxas spilled 4 bytes: in the producer's
    loop under varlen, once per CTA in the consumers' epilogue under ALiBi; at 232 the split
    consumers do not spill, the one pass's do, so it keeps 24 / 240)."""
    regs = (232, 40) if options and not with_dq else (240, 24)
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=2, CONSUMER_REGS=regs[0], PRODUCER_REGS=regs[1], num_warps=4)


def _blocks(cfg, head_dim_v=HEAD_DIM):
    """TMA tiles: column halves of Q, K (dK), dQ, and of dO, V (dV) with V's head dim."""
    vh = head_dim_v // 2
    return dict(q=(1, cfg["BLOCK_M"], 1, HALF_D), kv=(1, cfg["BLOCK_N"], 1, HALF_D), dq=(1, cfg["BLOCK_M"], 1, HALF_D),
                do=(1, cfg["BLOCK_M"], 1, vh), v=(1, cfg["BLOCK_N"], 1, vh))


# (Q/K head dim, V head dim) pairs: 256 with 256 (every mode and option), and V's own head dim of
# 128 under Q/K 256 or 192 (MLA; 192 in the 256-wide tiles, the TMA zero-filling the columns past
# the tensor's and dropping them from the dK store): the split mode only (its dO and V halves are
# narrower than Q's, so the one pass's dQ tile has no stage slot to live in); dense or varlen (the
# varlen epilogue's masked stores take dV's strides from contiguous dK and dV): backward_sm90.VALUE_PAIRS


def head_dims_ok(head_dim, head_dim_v, with_dq=False):
    """Whether this kernel takes these head dims in that mode."""
    if head_dim == head_dim_v:  # (a padded one on the 256-wide tiles, 136-248: backward_sm90.PAD_BWD256)
        return head_dim == HEAD_DIM or pads_to_256(head_dim)
    return (head_dim, head_dim_v) in VALUE_PAIRS and not with_dq


def attention_backward_d256(dout, q, k, v, stats, dq_accum, dk, dv, *, softmax_scale, causal, cfg=None,
                            window_left=-1, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_k=None, softcap=0.0,
                            alibi_slopes=None):
    """dK, dV into dk, dv and, if dq_accum is not None, dQ (times the scale) added into that
    zeroed fp32 tensor of q's shape; dense (batch, seqlen, heads, 256) bf16/fp16 tensors, or
    packed varlen ones (cu_seqlens_q given: (total, heads, 256), one CTA per 64 keys of the
    longest sequence). ``stats``: backward_sm90.new_stats's buffer (varlen: new_stats_varlen's),
    filled by the preprocess. window_left (with causal: (left, 0); without: (left, -1)),
    softcap, alibi_slopes: as the forward's."""
    with_dq = dq_accum is not None
    varlen = cu_seqlens_q is not None
    if varlen:  # descriptors on (1, total, heads, dim) views
        q, k, v, dout, dk4, dv4 = (t.unsqueeze(0) for t in (q, k, v, dout, dk, dv))
        dq_accum = dq_accum.unsqueeze(0) if with_dq else None
        batch = cu_seqlens_q.shape[0] - 1
        seqlen_k_grid = max_seqlen_k
    else:
        dk4, dv4 = dk, dv
        batch = q.shape[0]
        seqlen_k_grid = k.shape[1]
    _, seqlen_q, nheads, head_dim = q.shape
    head_dim_v = v.shape[-1]
    assert head_dims_ok(head_dim, head_dim_v, with_dq), (head_dim, head_dim_v, with_dq)
    # (varlen with V's own head dim: the masked stores derive dV's strides from contiguous dK, dV)
    assert dk.stride() == dv.stride() if head_dim_v == head_dim else (
        not varlen or (dk.is_contiguous() and dv.is_contiguous()))
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    cfg = cfg or config(with_dq, varlen or window_left >= 0 or softcap > 0 or alibi_slopes is not None)
    # (a padded head dim: tiles of 256 over the tensors' own shapes; the TMA zero-fills and clips the columns past them)
    blk = _blocks(cfg, HEAD_DIM if head_dim_v == head_dim else head_dim_v)
    d = forward_sm90._descriptor
    descs = [d(q, blk["q"], q.dtype), d(dout, blk["do"], q.dtype), d(k, blk["kv"], q.dtype), d(v, blk["v"], q.dtype),
             d(dk4, blk["kv"], q.dtype), d(dv4, blk["v"], q.dtype)]
    descs.append(d(dq_accum, blk["dq"], torch.float32) if with_dq else descs[-1])  # (not read without dQ)
    descs.append(_stats_descriptor(stats, cfg["BLOCK_M"]))
    grid = (cdiv(seqlen_k_grid, cfg["BLOCK_N"]), batch * nheads_k)
    cu_q = cu_seqlens_q if varlen else stats  # (not read when dense)
    cu_k = cu_seqlens_k if varlen else stats
    qk_scale, score_args, has_softcap, has_alibi = forward_sm90._score_args(softmax_scale, softcap, alibi_slopes,
                                                                            stats)
    # (every argument is a descriptor, fixed by the dtype and cfg, an int fixed by the shapes,
    # strides and window_left, a float, or a pointer of the align() bits)
    key = (varlen, q.shape, k.shape, v.shape[-1], dk4.stride(), dv4.stride(), window_left, q.dtype, causal, with_dq, has_softcap, has_alibi,
           score_args[1], tuple(cfg.values()), align(cu_q, cu_k, dk, dv, score_args[0]))
    return launch(_attn_bwd_d256, grid, *descs, seqlen_q, seqlen_k, nheads_k, nheads // nheads_k, qk_scale,
                  softmax_scale, window_left, cu_q, cu_k, dk, dv, dk4.stride(1), dk4.stride(2), *score_args,
                  CAUSAL=causal, STAGES=cfg["STAGES"], WITH_DQ=with_dq, CONSUMER_REGS=cfg["CONSUMER_REGS"],
                  PRODUCER_REGS=cfg["PRODUCER_REGS"], HAS_WINDOW=window_left >= 0, IS_VARLEN=varlen,
                  HAS_SOFTCAP=has_softcap, HAS_ALIBI=has_alibi, num_warps=cfg["num_warps"], key=key)


def compile_for(dtype="bf16", causal=True, with_dq=False, capability=(9, 0), cfg=None, window=False, varlen=False,
                softcap=False, alibi=False, head_dim_v=HEAD_DIM):
    """Compile the kernel for a target without a GPU (tests, the compiler's view); head_dim_v: V's
    (the kernel is the same for Q/K 192 and 256: the descriptors' tiles are 128 wide either way)."""
    from . import aot
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    cfg = cfg or config(with_dq, window or varlen or softcap or alibi)
    blk = _blocks(cfg, head_dim_v)

    def desc(block, dt=dtype, tdt=tdtype):
        return f"tensordesc<{dt}[{','.join(map(str, block))}],{forward_sm90._layout(block, tdt)!r}>"

    fn = _attn_bwd_d256
    sig = dict(q_desc=desc(blk["q"]), do_desc=desc(blk["do"]), k_desc=desc(blk["kv"]), v_desc=desc(blk["v"]),
               dk_desc=desc(blk["kv"]), dv_desc=desc(blk["v"]),
               dq_desc=desc(blk["dq"], "fp32", torch.float32) if with_dq else desc(blk["kv"]),
               st_desc=f"tensordesc<fp32[1,1,1,{blk['q'][1]}],{_STATS_LAYOUT!r}>", seqlen_q="i32", seqlen_k="i32",
               nheads_k="i32", group="i32", qk_scale="fp32", sm_scale="fp32", left="i32", CU_Q="*i32", CU_K="*i32",
               DK=f"*{dtype}", DV=f"*{dtype}", stride_ks="i32", stride_kh="i32", ALIBI="*fp32", stride_ab="i32",
               sc_in="fp32", sc_out="fp32")
    constexprs = dict(CAUSAL=causal, STAGES=cfg["STAGES"], WITH_DQ=with_dq, CONSUMER_REGS=cfg["CONSUMER_REGS"],
                      PRODUCER_REGS=cfg["PRODUCER_REGS"], HAS_WINDOW=window, IS_VARLEN=varlen, HAS_SOFTCAP=softcap,
                      HAS_ALIBI=alibi)
    return aot.compile_gluon(fn, sig, constexprs, cfg["num_warps"], capability)
