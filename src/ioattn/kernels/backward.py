"""Backward kernels: recompute the scores block by block instead of storing them.

Three launches, no atomics (so the gradients are bit-identical run to run):

1. ``_attn_bwd_preprocess``: delta_i = sum_d dO_id * O_id  (the rowsum that the
   softmax gradient needs: dS = P ∘ (dP − delta)), minus dlse_i when the log-sum-exp
   has a gradient of its own (d lse_i / d S_ij = P_ij, so dS = P ∘ (dP − delta + dlse)).
2. ``_attn_bwd_dkdv``: one program owns BLOCK_N keys of one KV head, keeps
   K, V, dK, dV on chip and streams the query blocks (of every query head of
   the GQA group) that can see them.
3. ``_attn_bwd_dq``: one program owns BLOCK_M queries, streams the key blocks.

P is recomputed from Q, K and the saved log-sum-exp: P = exp2(S·log2e − lse·log2e).
"""

import os

import torch
import triton
import triton.language as tl

from . import configs
from .forward import _dense_or_varlen_strides, dot_precision, softcap_mode, upcast_dot
from .masks import mma, dropout_keep, key_range, query_range, scores_log2, sequence_bounds, visible

# The Gluon Hopper backward (backward_sm90.py): the dense calls it supports on sm_90
_sm90 = _launch = None
if not configs.interpreting():
    try:
        from . import backward_sm90 as _sm90
        from . import backward_sm90_dq as _sm90_dq
        from .launch import launch as _launch
    except ImportError:  # an older triton without Gluon
        _sm90 = _launch = None


def _launch_pre(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``; on a GPU through kernels/launch.py's cached launch."""
    if _launch is None:  # (the interpreter, or a triton without Gluon)
        return kernel[grid](*args, **kwargs)
    return _launch(kernel, grid, *args, **kwargs)


@triton.jit(do_not_specialize=["seqlen_q_dense", "stride_lb", "stride_lh", "stride_sb", "stride_sh"])
def _attn_bwd_preprocess(O, DO, DELTA, DLSE, LSE, STATS,
                         stride_ob, stride_os, stride_oh,
                         stride_db, stride_ds, stride_dh,
                         stride_lb, stride_lh, stride_sb, stride_sh, stride_sr,
                         CU_SEQLENS_Q, seqlen_q_dense, nheads,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         IS_VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr, HAS_STATS: tl.constexpr):
    """delta (and, with HAS_STATS, for the Gluon backward: STATS[b, h, 0, i] = lse_i in log2
    units, +inf for a row that saw no key, and STATS[b, h, 1, i] = delta_i, rows 16-byte aligned
    so that the TMA can load them). HEAD_DIM is O's and dO's: V's head dim."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // nheads
    h = bh % nheads
    q_start, seqlen_q = sequence_bounds(CU_SEQLENS_Q, b, seqlen_q_dense, IS_VARLEN)
    if start_m >= seqlen_q:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    b64 = b.to(tl.int64)
    rows = q_start.to(tl.int64) + offs_m
    o = tl.load(O + b64 * stride_ob + rows[:, None] * stride_os + h * stride_oh + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * stride_db + rows[:, None] * stride_ds + h * stride_dh + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row_offs = b64 * stride_lb + h * stride_lh + rows  # DLSE is laid out as DELTA (and LSE)
    if HAS_DLSE:
        delta -= tl.load(DLSE + row_offs, mask=offs_m < seqlen_q, other=0.0)
    tl.store(DELTA + row_offs, delta, mask=offs_m < seqlen_q)
    if HAS_STATS:
        lse = tl.load(LSE + row_offs, mask=offs_m < seqlen_q, other=0.0)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        if IS_VARLEN:  # (backward_sm90.stats_offset: 16-byte aligned per sequence, as the TMA needs)
            stat_offs = h * stride_sh + ((q_start + 3) // 4 * 4 + 4 * b + offs_m).to(tl.int64)
        else:
            stat_offs = b64 * stride_sb + h * stride_sh + rows
        tl.store(STATS + stat_offs, lse2, mask=offs_m < seqlen_q)
        tl.store(STATS + stride_sr + stat_offs, delta, mask=offs_m < seqlen_q)


@triton.jit
def _load_lse_log2(LSE_ROW, offs, seqlen_q):
    """Saved lse in log2 units; a row that saw no key (lse = -inf) gets +inf so P = 0."""
    lse = tl.load(LSE_ROW + offs, mask=offs < seqlen_q, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse * 1.4426950408889634


@triton.jit
def _fold_dropout_scale(lse, delta, dropout_p, HAS_DROPOUT: tl.constexpr):
    """Under dropout the kept probabilities are scaled by 1/(1-p). Folding that into the
    row statistics (lse - log2(1/(1-p)), delta * (1-p)) makes P' = exp2(S - lse') the scaled
    probability, so that dV += keep(P') dO and dS = P' (keep(dP) - delta') = P (keep(dP)/(1-p)
    - delta) need no multiply per score."""
    if HAS_DROPOUT:
        lse = lse + tl.math.log2(1.0 - dropout_p)
        delta = delta * (1.0 - dropout_p)
    return lse, delta


@triton.jit
def _probs_rows(q, kT, do, vT, lse, start_m, offs_m, offs_n, start_n, seqlen_q, seqlen_k, sm_scale, softcap,
                slope, window_left, window_right, seed, salt, dropout_p,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                UPCAST: tl.constexpr):
    """Recompute a [BM, BN] block with queries as rows: P (undropped; scaled by 1/(1-p) under
    dropout, with lse from _fold_dropout_scale), dP (dropped entries zeroed), tanh of the
    softcap, and the keep mask (0 without dropout)."""
    qk = mma(q, kT, None, DOT_PRECISION, UPCAST)  # [BM, BN]
    s, t = scores_log2(qk, offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k,
                       sm_scale, softcap, slope, HAS_SOFTCAP, HAS_ALIBI)
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        ok = visible(offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k,
                     window_left, window_right, True, HAS_LEFT, HAS_RIGHT)
        p = tl.where(ok, p, 0.0)
    dp = mma(do, vT, None, DOT_PRECISION, UPCAST)  # [BM, BN]
    keep = 0
    if HAS_DROPOUT:
        keep = dropout_keep(seed, salt, start_m, start_n, dropout_p, BLOCK_M, BLOCK_N)
        dp = tl.where(keep, dp, 0.0)
    return p, dp, t, keep


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, k_ptrs, v_ptrs, k_mask, v_mask, q_base, do_base, lse_row, delta_row,
                         stride_qs, stride_dos, start, end, start_n, offs_n, offs_d, offs_dv,
                         seqlen_q, seqlen_k, sm_scale, softcap, slope,
                         window_left, window_right, seed, salt, dropout_p,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                         MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                         HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                         RELOAD_KV: tl.constexpr, QROWS: tl.constexpr):
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in tl.range(start, end, BLOCK_M):
        offs_m = start_m + offs_m0
        if RELOAD_KV:  # large head dims: re-read K, V (L2 hits) instead of holding them in registers
            k = tl.load(k_ptrs, mask=k_mask, other=0.0)
            v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        q_ptrs = q_base + offs_m[:, None] * stride_qs + offs_d[None, :]  # [BM, D]
        do_ptrs = do_base + offs_m[:, None] * stride_dos + offs_dv[None, :]  # [BM, DV]
        if MASKED:
            row_ok = offs_m[:, None] < seqlen_q
            q = tl.load(q_ptrs, mask=row_ok & (offs_d[None, :] < HEAD_DIM), other=0.0)
            do = tl.load(do_ptrs, mask=row_ok & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        elif BLOCK_D != HEAD_DIM or BLOCK_DV != HEAD_DIM_V:
            q = tl.load(q_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            do = tl.load(do_ptrs, mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
        lse = _load_lse_log2(lse_row, offs_m, seqlen_q)  # [BM]
        delta = tl.load(delta_row + offs_m, mask=offs_m < seqlen_q, other=0.0)  # [BM]
        lse, delta = _fold_dropout_scale(lse, delta, dropout_p, HAS_DROPOUT)
        if QROWS:
            # queries as rows, as in the forward: the mask's layout then matches the one its
            # generator is grouped for (masks.dropout_keep); P and dS are transposed on their
            # way to the dV, dK products instead
            p, dp, t, keep = _probs_rows(q, tl.trans(k), do, tl.trans(v), lse, start_m, offs_m, offs_n, start_n,
                                         seqlen_q, seqlen_k, sm_scale, softcap, slope, window_left,
                                         window_right, seed, salt, dropout_p, BLOCK_M, BLOCK_N, MASKED,
                                         HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
                                         DOT_PRECISION, UPCAST)
            p_kept = p
            if HAS_DROPOUT:
                p_kept = tl.where(keep, p, 0.0)
            dv = mma(tl.trans(p_kept.to(do.dtype)), do, dv, DOT_PRECISION, UPCAST)  # [BN, DV]
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * (1.0 - t * t)
            dk = mma(tl.trans(ds.to(q.dtype)), q, dk, DOT_PRECISION, UPCAST)  # [BN, D]
        else:
            qkT = mma(k, tl.trans(q), None, DOT_PRECISION, UPCAST)  # [BN, BM]
            sT, tT = scores_log2(qkT, offs_m[None, :], offs_n[:, None], seqlen_q, seqlen_k,
                                 sm_scale, softcap, slope, HAS_SOFTCAP, HAS_ALIBI)
            pT = tl.math.exp2(sT - lse[None, :])
            if MASKED:
                ok = visible(offs_m[None, :], offs_n[:, None], seqlen_q, seqlen_k,
                             window_left, window_right, True, HAS_LEFT, HAS_RIGHT)
                pT = tl.where(ok, pT, 0.0)
            dpT = mma(v, tl.trans(do), None, DOT_PRECISION, UPCAST)  # [BN, BM]
            if HAS_DROPOUT:
                keepT = tl.trans(dropout_keep(seed, salt, start_m, start_n, dropout_p, BLOCK_M, BLOCK_N))
                dpT = tl.where(keepT, dpT, 0.0)  # pT, delta carry 1/(1-p) (_fold_dropout_scale)
                dv = mma(tl.where(keepT, pT, 0.0).to(do.dtype), do, dv, DOT_PRECISION, UPCAST)
            else:
                dv = mma(pT.to(do.dtype), do, dv, DOT_PRECISION, UPCAST)  # [BN, DV]
            dsT = pT * (dpT - delta[None, :])
            if HAS_SOFTCAP:
                dsT = dsT * (1.0 - tT * tT)
            dk = mma(dsT.to(q.dtype), q, dk, DOT_PRECISION, UPCAST)  # [BN, D]
    return dk, dv


@triton.jit  # specialized on lengths/strides: 4-7% faster (configs.NO_SPECIALIZE)
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS_Q, CU_SEQLENS_K, ALIBI, RNG,
                   stride_qb, stride_qs, stride_qh,
                   stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh,
                   stride_dob, stride_dos, stride_doh,
                   stride_dkb, stride_dks, stride_dkh,
                   stride_dvb, stride_dvs, stride_dvh,
                   stride_lb, stride_lh, stride_ab,
                   seqlen_q_dense, seqlen_k_dense, nheads, nheads_k, group,
                   sm_scale, softcap, window_left, window_right, dropout_p,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, RELOAD_KV: tl.constexpr,
                   QROWS: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = bhk // nheads_k
    hk = bhk % nheads_k
    q_start, seqlen_q = sequence_bounds(CU_SEQLENS_Q, b, seqlen_q_dense, IS_VARLEN)
    k_start, seqlen_k = sequence_bounds(CU_SEQLENS_K, b, seqlen_k_dense, IS_VARLEN)
    if start_n >= seqlen_k:
        return
    b64 = b.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    v_mask = (offs_n[:, None] < seqlen_k) & (offs_dv[None, :] < HEAD_DIM_V)
    k_rows = k_start.to(tl.int64) + offs_n
    k_ptrs = K + b64 * stride_kb + k_rows[:, None] * stride_ks + hk * stride_kh + offs_d[None, :]
    v_ptrs = V + b64 * stride_vb + k_rows[:, None] * stride_vs + hk * stride_vh + offs_dv[None, :]
    k = tl.load(k_ptrs, mask=k_mask, other=0.0)  # [BN, D]
    v = tl.load(v_ptrs, mask=v_mask, other=0.0)  # [BN, DV]
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(RNG) + tl.load(RNG + 1)

    lo, full_lo, full_hi, hi = query_range(start_n, seqlen_q, seqlen_k, window_left, window_right,
                                           BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    # dK, dV of a KV head sum over the query heads of its GQA group
    for g in range(0, group):
        h = hk * group + g
        q_base = Q + b64 * stride_qb + q_start.to(tl.int64) * stride_qs + h * stride_qh
        do_base = DO + b64 * stride_dob + q_start.to(tl.int64) * stride_dos + h * stride_doh
        lse_row = LSE + b64 * stride_lb + h * stride_lh + q_start
        delta_row = DELTA + b64 * stride_lb + h * stride_lh + q_start
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(ALIBI + b * stride_ab + h).to(tl.float32)
        salt = b * nheads + h
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, k_ptrs, v_ptrs, k_mask, v_mask, q_base, do_base,
                                      lse_row, delta_row, stride_qs, stride_dos, lo, full_lo, start_n,
                                      offs_n, offs_d, offs_dv, seqlen_q, seqlen_k, sm_scale, softcap, slope,
                                      window_left, window_right, seed, salt, dropout_p,
                                      BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, True,
                                      HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, DOT_PRECISION,
                                      UPCAST, RELOAD_KV, QROWS)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, k_ptrs, v_ptrs, k_mask, v_mask, q_base, do_base,
                                      lse_row, delta_row, stride_qs, stride_dos, full_lo, full_hi, start_n,
                                      offs_n, offs_d, offs_dv, seqlen_q, seqlen_k, sm_scale, softcap, slope,
                                      window_left, window_right, seed, salt, dropout_p,
                                      BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, False,
                                      HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, DOT_PRECISION,
                                      UPCAST, RELOAD_KV, QROWS)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, k_ptrs, v_ptrs, k_mask, v_mask, q_base, do_base,
                                      lse_row, delta_row, stride_qs, stride_dos, full_hi, hi, start_n,
                                      offs_n, offs_d, offs_dv, seqlen_q, seqlen_k, sm_scale, softcap, slope,
                                      window_left, window_right, seed, salt, dropout_p,
                                      BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, True,
                                      HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, DOT_PRECISION,
                                      UPCAST, RELOAD_KV, QROWS)
    dk = dk * sm_scale  # d(q·k·scale)/dk
    tl.store(DK + b64 * stride_dkb + k_rows[:, None] * stride_dks + hk * stride_dkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=k_mask)
    tl.store(DV + b64 * stride_dvb + k_rows[:, None] * stride_dvs + hk * stride_dvh + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=v_mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs,
                       start, end, start_m, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k, sm_scale, softcap,
                       slope, window_left, window_right, seed, salt, dropout_p,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                       MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                       HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        kT_ptrs = k_base + offs_n[None, :] * stride_ks + offs_d[:, None]  # [D, BN]
        vT_ptrs = v_base + offs_n[None, :] * stride_vs + offs_dv[:, None]  # [DV, BN]
        if MASKED:
            col_ok = offs_n[None, :] < seqlen_k
            kT = tl.load(kT_ptrs, mask=col_ok & (offs_d[:, None] < HEAD_DIM), other=0.0)
            vT = tl.load(vT_ptrs, mask=col_ok & (offs_dv[:, None] < HEAD_DIM_V), other=0.0)
        elif BLOCK_D != HEAD_DIM or BLOCK_DV != HEAD_DIM_V:
            kT = tl.load(kT_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            vT = tl.load(vT_ptrs, mask=offs_dv[:, None] < HEAD_DIM_V, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            vT = tl.load(vT_ptrs)
        p, dp, t, _ = _probs_rows(q, kT, do, vT, lse, start_m, offs_m, offs_n, start_n, seqlen_q, seqlen_k,
                                  sm_scale, softcap, slope, window_left, window_right, seed, salt,
                                  dropout_p, BLOCK_M, BLOCK_N, MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                                  HAS_ALIBI, HAS_DROPOUT, DOT_PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = mma(ds.to(kT.dtype), tl.trans(kT), dq, DOT_PRECISION, UPCAST)  # [BM, D]
    return dq


@triton.jit  # specialized on lengths/strides: 4-7% faster (configs.NO_SPECIALIZE)
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS_Q, CU_SEQLENS_K, ALIBI, RNG,
                 stride_qb, stride_qs, stride_qh,
                 stride_kb, stride_ks, stride_kh,
                 stride_vb, stride_vs, stride_vh,
                 stride_dob, stride_dos, stride_doh,
                 stride_dqb, stride_dqs, stride_dqh,
                 stride_lb, stride_lh, stride_ab,
                 seqlen_q_dense, seqlen_k_dense, nheads, group,
                 sm_scale, softcap, window_left, window_right, dropout_p,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # longest rows first
    bh = tl.program_id(1)
    b = bh // nheads
    h = bh % nheads
    q_start, seqlen_q = sequence_bounds(CU_SEQLENS_Q, b, seqlen_q_dense, IS_VARLEN)
    k_start, seqlen_k = sequence_bounds(CU_SEQLENS_K, b, seqlen_k_dense, IS_VARLEN)
    if start_m >= seqlen_q:
        return
    hk = h // group
    b64 = b.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    io_mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    q_rows = q_start.to(tl.int64) + offs_m
    q = tl.load(Q + b64 * stride_qb + q_rows[:, None] * stride_qs + h * stride_qh + offs_d[None, :],
                mask=io_mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + q_rows[:, None] * stride_dos + h * stride_doh + offs_dv[None, :],
                 mask=(offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    lse = _load_lse_log2(LSE + b64 * stride_lb + h * stride_lh + q_start, offs_m, seqlen_q)
    delta = tl.load(DELTA + b64 * stride_lb + h * stride_lh + q_start + offs_m, mask=offs_m < seqlen_q, other=0.0)
    lse, delta = _fold_dropout_scale(lse, delta, dropout_p, HAS_DROPOUT)
    k_base = K + b64 * stride_kb + k_start.to(tl.int64) * stride_ks + hk * stride_kh
    v_base = V + b64 * stride_vb + k_start.to(tl.int64) * stride_vs + hk * stride_vh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_ab + h).to(tl.float32)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(RNG) + tl.load(RNG + 1)
    salt = bh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, full_lo, full_hi, hi = key_range(start_m, seqlen_q, seqlen_k, window_left, window_right,
                                         BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs,
                            lo, full_lo, start_m, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k,
                            sm_scale, softcap, slope, window_left, window_right, seed, salt, dropout_p,
                            BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, True, HAS_LEFT,
                            HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, DOT_PRECISION, UPCAST)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs,
                            full_lo, full_hi, start_m, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k,
                            sm_scale, softcap, slope, window_left, window_right, seed, salt, dropout_p,
                            BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, False, HAS_LEFT,
                            HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, DOT_PRECISION, UPCAST)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs,
                            full_hi, hi, start_m, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k,
                            sm_scale, softcap, slope, window_left, window_right, seed, salt, dropout_p,
                            BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, True, HAS_LEFT,
                            HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, DOT_PRECISION, UPCAST)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + q_rows[:, None] * stride_dqs + h * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=io_mask)


# the one-pass Gluon backward adds dQ into an fp32 accumulator, twice the size of dQ in bf16/fp16;
# above this size it runs over groups of KV heads, one launch each, with an accumulator for that
# group only, so that the accumulator is no larger than dQ itself (16k tokens x 2048: peak memory of
# one forward+backward 388 -> 324 MiB, results/h200-session9c). Dense and packed varlen batches (the
# varlen stats buffer is (1, nheads, 2, rows): sliced by head the same way). IOATTN_DQ_ACCUM_CHUNK_MIB=0
# splits whenever it can (checks). Only from DQ_ACCUM_CHUNK_MIN_KEYS keys: each extra launch adds
# host time (~100 us with its slicing, zero fill and copy), which short sequences do not hide: at
# 1k tokens x 16 sequences the hdim-128 backward fell from 420 to 281 TFLOP/s (causal 319 -> 147)
# on the H200 of results/h200-session12e, host-bound. At 4k keys (16k tokens, two groups) it still
# cost 3-10% (hdim 128 505 / 504 vs 520 / 545 TFLOP/s without it, causal 408 / 440 vs 489 / 463;
# hdim 64 causal 374 / 373 vs 390 / 393), at 16k 0-2% (results/h200-session13d, two interleaved
# rounds): hence from 8k keys, where the memory rows (8k, 16k) keep it
DQ_ACCUM_CHUNK_BYTES = int(os.environ.get("IOATTN_DQ_ACCUM_CHUNK_MIB", "64")) << 20
DQ_ACCUM_CHUNK_MIN_KEYS = 8192


def _dq_accum_chunks(q, nheads_k, dropout_p, seqlen_k=None):
    """How many launches the one-pass backward takes (1: no chunking). Not under dropout: its masks
    are salted by the head index, which a launch over a slice of the heads would renumber. Not
    below DQ_ACCUM_CHUNK_MIN_KEYS keys (``seqlen_k``: the longest sequence's) unless forced."""
    accum = q.numel() * 4
    if dropout_p > 0 or accum <= DQ_ACCUM_CHUNK_BYTES:
        return 1
    if DQ_ACCUM_CHUNK_BYTES > 0 and seqlen_k is not None and seqlen_k < DQ_ACCUM_CHUNK_MIN_KEYS:
        return 1
    want = -(-accum // max(q.numel() * q.element_size(), DQ_ACCUM_CHUNK_BYTES, 1))
    for n in range(want, nheads_k + 1):  # the smallest split of the KV heads into equal groups
        if nheads_k % n == 0:
            return n
    return 1


def attention_backward(dout, q, k, v, out, lse, *, cu_seqlens_q=None, cu_seqlens_k=None,
                       max_seqlen_q, max_seqlen_k, softmax_scale, window_left=-1, window_right=-1,
                       softcap=0.0, alibi_slopes=None, dropout_p=0.0, rng_state=None, dlse=None,
                       deterministic=False):
    """Launch the backward kernels. Returns (dq, dk, dv) in the inputs' dtype.
    ``dlse``: the gradient of the returned lse (its shape), or None. On sm_90 the calls that
    backward_sm90 supports take one of its modes (backward_sm90.supported: the one pass, or,
    with ``deterministic``, its dK/dV kernel and then a dQ kernel: backward_sm90_dq's Gluon one
    where it applies, else the Triton one). v, out and dout
    may have a head dim of their own (the Gluon kernels take equal ones only)."""
    varlen = cu_seqlens_q is not None
    if varlen:
        batch = cu_seqlens_q.shape[0] - 1
        _, nheads, head_dim = q.shape
        nheads_k = k.shape[1]
        stride_lb, stride_lh = 0, lse.stride(0)
    else:
        batch, _, nheads, head_dim = q.shape
        nheads_k = k.shape[2]
        stride_lb, stride_lh = lse.stride(0), lse.stride(1)
    assert lse.stride(-1) == 1
    delta = configs.new_empty(lse.shape, torch.float32, q.device)
    if dlse is not None and (dlse.dtype != torch.float32 or dlse.stride() != delta.stride()):
        dlse = torch.empty_like(delta).copy_(dlse)  # the preprocess reads it with delta's strides
    dq = configs.new_empty(q.shape, q.dtype, q.device)
    dk = configs.new_empty(k.shape, k.dtype, k.device)
    dv = configs.new_empty(v.shape, v.dtype, v.device)
    head_dim_v = v.shape[-1]  # (of dout and out too)
    block_d, block_dv = configs.block_d(head_dim), configs.block_d(head_dim_v)
    if q.numel() == 0 or max_seqlen_q == 0:  # no query rows: no gradient flows anywhere
        return dq.zero_(), dk.zero_(), dv.zero_()
    if k.numel() == 0 or max_seqlen_k == 0:  # no keys: every row is empty
        return dq.zero_(), dk, dv
    strides_do = _dense_or_varlen_strides(dout, varlen)
    use_sm90 = None if _sm90 is None else _sm90.supported(  # (None under the interpreter)
        q, k, v, dout, varlen=varlen, window_left=window_left, window_right=window_right, softcap=softcap,
        alibi_slopes=alibi_slopes, dropout_p=dropout_p, deterministic=deterministic,
        capability=configs._capability(q.device), max_seqlen_k=max_seqlen_k)
    stats = None
    if use_sm90:  # (varlen: over the packed rows, each sequence's from a 16-byte aligned start)
        stats = _sm90.new_stats_varlen(nheads, q.shape[0], batch, q.device) if varlen else _sm90.new_stats(
            batch, nheads, max_seqlen_q, q.device)
    stats_strides = (0, 0, 0) if stats is None else ((0, ) if varlen else stats.stride()[:1]) + stats.stride()[1:3]
    pre_block = 64
    # (on a GPU through launch's cached path: JITFunction.run's binding costs more host time than this
    # kernel takes at short lengths)
    _launch_pre(_attn_bwd_preprocess, (configs.cdiv(max_seqlen_q, pre_block), batch * nheads),
        out, dout, delta, dlse, lse, stats if stats is not None else delta,
        *_dense_or_varlen_strides(out, varlen), *strides_do,
        stride_lb, stride_lh, *stats_strides,
        cu_seqlens_q, max_seqlen_q, nheads,
        HEAD_DIM=head_dim_v, BLOCK_D=block_dv, BLOCK_M=pre_block, IS_VARLEN=varlen,
        HAS_DLSE=dlse is not None, HAS_STATS=stats is not None,
    )
    sm90_kw = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k) if varlen else {}
    sm90_kw.update(dropout_p=dropout_p, rng_state=rng_state, softcap=softcap, alibi_slopes=alibi_slopes)
    if use_sm90 == "atomic":  # one Gluon pass, dQ summed by bulk TMA reductions
        head_dim_ax = 1 if varlen else 2
        chunks = _dq_accum_chunks(q, nheads_k, dropout_p, max_seqlen_k)

        def one_pass(qc, doc, kc, vc, st, dqc, dkc, dvc, kw):
            dq_accum = torch.zeros(qc.shape, dtype=torch.float32, device=q.device)
            configs.last_compiled["bwd_sm90"] = _sm90.attention_backward_sm90(
                doc, qc, kc, vc, st, dq_accum, dkc, dvc, softmax_scale=softmax_scale, causal=window_right == 0,
                window_left=window_left, **kw)
            dqc.copy_(dq_accum)

        if chunks == 1:  # (no head slices: each narrow costs host time, which short sequences see)
            one_pass(q, dout, k, v, stats, dq, dk, dv, sm90_kw)
            return dq, dk, dv
        per = nheads_k // chunks  # KV heads per launch (a GQA group never splits)
        for c in range(chunks):
            hq, hk = slice(c * per * (nheads // nheads_k), (c + 1) * per * (nheads // nheads_k)), slice(c * per, (c + 1) * per)
            qc, doc, dqc = (t.narrow(head_dim_ax, hq.start, hq.stop - hq.start) for t in (q, dout, dq))
            kc, vc, dkc, dvc = (t.narrow(head_dim_ax, hk.start, hk.stop - hk.start) for t in (k, v, dk, dv))
            kw = dict(sm90_kw)
            if alibi_slopes is not None:
                kw["alibi_slopes"] = alibi_slopes[..., hq]
            one_pass(qc, doc, kc, vc, stats[:, hq], dqc, dkc, dvc, kw)  # (its accumulator freed before the next)
        return dq, dk, dv
    cfg = configs.backward_config(configs.tile_head_dim(head_dim, head_dim_v), q.dtype, q.device,
                                  dropout=dropout_p > 0, gqa=nheads != nheads_k)
    stride_ab = 0
    if alibi_slopes is not None and alibi_slopes.dim() == 2:
        stride_ab = alibi_slopes.stride(0)
    flags = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, HEAD_DIM_V=head_dim_v, BLOCK_DV=block_dv, IS_VARLEN=varlen,
                 HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
                 HAS_SOFTCAP=softcap_mode(softcap, q.dtype), HAS_ALIBI=alibi_slopes is not None,
                 HAS_DROPOUT=dropout_p > 0, DOT_PRECISION=dot_precision(q.dtype),
                 UPCAST=upcast_dot(q.dtype))
    strides_in = (*_dense_or_varlen_strides(q, varlen), *_dense_or_varlen_strides(k, varlen),
                  *_dense_or_varlen_strides(v, varlen), *strides_do)
    if use_sm90 == "split":  # dK, dV by the Gluon kernel; dQ below
        configs.last_compiled["dkdv"] = _sm90.attention_backward_sm90(
            dout, q, k, v, stats, None, dk, dv, softmax_scale=softmax_scale, causal=window_right == 0,
            window_left=window_left, **sm90_kw)
        if _sm90_dq.supported(q, k, v, dout, varlen=varlen, window_right=window_right, dropout_p=dropout_p):
            # dQ by the Gluon kernel too (IOATTN_GLUON_DQ=0: the Triton one below): the additions in a fixed order
            configs.last_compiled["dq"] = _sm90_dq.attention_backward_dq(
                dout, q, k, v, stats, dq, softmax_scale=softmax_scale, causal=window_right == 0,
                window_left=window_left, softcap=softcap, alibi_slopes=alibi_slopes)
            return dq, dk, dv
    else:
        c = cfg["dkdv"]
        configs.last_compiled["dkdv"] = _attn_bwd_dkdv[(configs.cdiv(max_seqlen_k, c["BLOCK_N"]), batch * nheads_k)](
            q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state,
            *strides_in, *_dense_or_varlen_strides(dk, varlen), *_dense_or_varlen_strides(dv, varlen),
            stride_lb, stride_lh, stride_ab,
            max_seqlen_q, max_seqlen_k, nheads, nheads_k, nheads // nheads_k,
            softmax_scale, softcap, window_left, window_right, dropout_p,
            BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], RELOAD_KV=c.get("RELOAD_KV", False),
            QROWS=c.get("QROWS", False), **flags,
            num_warps=c["num_warps"], num_stages=c["num_stages"],
        )
    c = cfg["dq"]
    configs.last_compiled["dq"] = _attn_bwd_dq[(configs.cdiv(max_seqlen_q, c["BLOCK_M"]), batch * nheads)](
        q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state,
        *strides_in, *_dense_or_varlen_strides(dq, varlen),
        stride_lb, stride_lh, stride_ab,
        max_seqlen_q, max_seqlen_k, nheads, nheads // nheads_k,
        softmax_scale, softcap, window_left, window_right, dropout_p,
        BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], **flags,
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    return dq, dk, dv
