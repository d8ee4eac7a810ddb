"""Hopper (sm_90) backward written in Gluon: dK and dV, and optionally dQ, in one kernel.

The Triton backward (backward.py) runs two programs, one keeping K/V on chip (dK, dV) and
one keeping Q on chip (dQ), and so computes the scores and dP twice: 7 matrix products
where 5 suffice. This kernel:

- a CTA owns 128 keys of one (batch, KV head); its two consumer warpgroups own 64 keys
  each and keep their dK, dV in registers while the query blocks (64 rows, of every query
  head of the GQA group) stream through a ring of shared-memory stages that a producer warp
  fills by TMA (Q and dO per block; K, V once);
- per query block each warpgroup computes, keys as rows: S^T = K Q^T and dP^T = V dO^T
  (asynchronous wgmma), P^T = exp2(S^T log2e - lse), dS^T = P^T (dP^T - delta), then
  dV += P^T dO and dK += dS^T Q with P^T and dS^T as register operands;
- with ``WITH_DQ`` (mode "atomic", FlashAttention-3's one pass): dQ = dS K needs all 128
  keys, so both warpgroups write their dS^T halves to a shared tile (double-buffered, an
  mbarrier with one arrival per warpgroup says both halves are there), and each computes
  the dQ of one half of the head dim (64 x 64 x 128 keys) and adds it to an fp32 dQ
  accumulator in global memory by a bulk TMA reduction of the tile (converted to the output
  dtype afterwards). The additions come in no fixed order, so this mode is not
  bit-reproducible: the default when ``deterministic=False`` (as FlashAttention's atomic dQ);
- without (mode "split", what ``deterministic=True`` runs): dK and dV only, and a dQ kernel (the
  Gluon one of backward_sm90_dq at head dim 128, dense, no dropout; else the Triton one) runs
  after; no atomics, no barrier between the warpgroups.

Scope: what forward_sm90 covers (bf16/fp16, dense or packed varlen, causal or not, sliding
windows (left, 0) / (left, -1), GQA/MQA, dropout) at head dims 64 and 128 (at 256, dK and dV
alone would take all of a warpgroup's registers: backward_sm90_d256 splits the head dim instead,
dense or varlen, windows / softcap / ALiBi, no dropout; this launcher hands it those calls). Varlen: the
tiles run past a sequence's end into the next one's rows and keys, which the mask zeroes; dK/dV
go out by a masked store; each sequence's lse/delta start 16-byte aligned in the stats buffer (stats_offset). delta (the
rowsum of dO * O, with dlse folded in) comes from backward.py's preprocess kernel.
"""

import math
import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton._C.libtriton import ir
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from . import dropout_sm90, forward_sm90
from .configs import cdiv, tma_ok
from .launch import align, launch
from .forward_sm90 import _wgmma_layout

# query rows per streamed block, by head dim (BLOCK_M_OVERRIDE: benchmarks' A/B runs)
BLOCK_M = {64: 128, 128: 64}  # hdim 64: 128 rows measured 1.02-1.16x 64 rows (results/h200-session7b)
BLOCK_M_OVERRIDE = {}
# (hdim 64 under softcap, ALiBi or dropout: forward_sm90.option_rows_64 query rows a block)
HALF_N = 64  # keys per consumer warpgroup (the CTA holds two)
LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)


@builtin
def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """Add the shared-memory tile src into global memory at coord (a bulk TMA reduction,
    cp.reduce.async.bulk.tensor; rows and columns out of the tensor's bounds are dropped).
    Gluon 3.6 builds the op but does not export a function for it. Asynchronous like a TMA
    store: tma.store_wait before src is written again."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@gluon.jit
def _bwd_producer(q_desc, do_desc, k_desc, v_desc, kc_desc, st_desc, q_smem, do_smem, k_smem, v_smem, kc_smem,
                  st_smem, kv_bar, q_ready, q_empty, b, hk, group, n0, m_first, n_mblocks, q_off, k_off, st_off,
                  WITH_DQ: gl.constexpr):
    # (varlen: b = 0 and the sequence's rows start at q_off / k_off of the packed tensors, its
    # lse/delta at st_off of the stats buffer)
    STAGES: gl.constexpr = q_smem.shape[0]
    ROWS: gl.constexpr = q_smem.shape[2]
    HALF_D: gl.constexpr = kc_smem.shape[4]
    # K and V of both warpgroups, and (for dQ) K in two column halves: once per CTA
    if WITH_DQ:
        mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes
                        + 2 * kc_desc.block_type.nbytes)
    else:
        mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
    for w in gl.static_range(2):
        tma.async_copy_global_to_shared(k_desc, [b, k_off + n0 + w * k_desc.block_type.shape[1], hk, 0], kv_bar,
                                        k_smem.index(w))
        tma.async_copy_global_to_shared(v_desc, [b, k_off + n0 + w * v_desc.block_type.shape[1], hk, 0], kv_bar,
                                        v_smem.index(w))
        if WITH_DQ:
            tma.async_copy_global_to_shared(kc_desc, [b, k_off + n0, hk, w * HALF_D], kv_bar, kc_smem.index(w))
    n_iter = group * n_mblocks
    for t in range(n_iter):
        s = t % STAGES
        h = hk * group + t // n_mblocks
        m0 = (m_first + t % n_mblocks) * ROWS
        mbarrier.wait(q_empty.index(s), ((t // STAGES) & 1) ^ 1)
        mbarrier.expect(q_ready.index(s), q_desc.block_type.nbytes + do_desc.block_type.nbytes
                        + 2 * st_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, q_off + m0, h, 0], q_ready.index(s), q_smem.index(s))
        tma.async_copy_global_to_shared(do_desc, [b, q_off + m0, h, 0], q_ready.index(s), do_smem.index(s))
        # the block's lse (log2 units) and delta rows (dense: zero past seqlen_q, where Q and dO
        # are too; varlen: the next sequence's or zeros, masked by the consumers)
        tma.async_copy_global_to_shared(st_desc, [b, h, 0, st_off + m0], q_ready.index(s), st_smem.index(2 * s))
        tma.async_copy_global_to_shared(st_desc, [b, h, 1, st_off + m0], q_ready.index(s), st_smem.index(2 * s + 1))


@gluon.jit
def _dq_out(dq_desc, dqw, dq_buf, dq, b, h, m0, c0):
    """Add a warpgroup's fp32 dQ tile into the accumulator by one bulk TMA reduction. The
    buffer's previous reduction was issued a block earlier: the wait finds it done."""
    tma.store_wait(0)
    dqw.store(dq)
    fence_async_shared()
    _tma_reduce_add(dq_desc, [b, m0, h, c0], dq_buf)


@gluon.jit
def _bwd_mask(p, offs_k, offs_q, k0, m0, seqlen_q, seqlen_k, diag, causal, left, HAS_WINDOW: gl.constexpr,
              IS_VARLEN: gl.constexpr, KEY_AXIS: gl.constexpr):
    """Zero the probabilities p of the (key, query) pairs that do not attend: keys k0 + .. =
    offs_k (absolute, along axis KEY_AXIS of p: 0 for P^T, 1 for P), queries m0 + offs_q (offs_q
    from 0, along the other axis). A block needs the causal mask when its first query does not
    see the block's last key or, under a sliding window of ``left`` keys, when its last query
    does not see the first key (bottom-right aligned: diag = seqlen_k - seqlen_q); varlen: the
    tiles run into the next sequence's rows and keys at its end, masked here too. Blocks that
    need no mask skip it at run time."""
    KEYS: gl.constexpr = offs_k.shape[0]
    ROWS: gl.constexpr = offs_q.shape[0]
    KX: gl.constexpr = 1 - KEY_AXIS  # (expand the keys along the queries' axis, and back)
    if HAS_WINDOW or IS_VARLEN:
        need = (causal != 0) & (m0 + diag < k0 + KEYS - 1)
        if HAS_WINDOW:
            need = need | (m0 + ROWS - 1 + diag - left > k0)
        if IS_VARLEN:
            need = need | (m0 + ROWS > seqlen_q) | (k0 + KEYS > seqlen_k)
        if need:
            d_kq = gl.expand_dims(offs_k, KX) - gl.expand_dims(m0 + offs_q, KEY_AXIS) - diag  # key - query - diag
            ok = (d_kq <= 0) | (causal == 0)
            if HAS_WINDOW:
                ok = ok & (d_kq >= -left)
            if IS_VARLEN:
                ok = ok & (gl.expand_dims(offs_k < seqlen_k, KX) & gl.expand_dims(m0 + offs_q < seqlen_q, KEY_AXIS))
            p = gl.where(ok, p, 0.0)
    elif causal != 0:
        if m0 + diag < k0 + KEYS - 1:
            ok = gl.expand_dims(offs_k, KX) <= gl.expand_dims(m0 + offs_q, KEY_AXIS) + diag
            p = gl.where(ok, p, 0.0)
    return p


@gluon.jit
def _bwd_consumer(dk_desc, dv_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, kc_smem, ds_smem, st_smem, win_smem, kv_bar,
                  q_ready, q_empty, ds_ready, dq_smem, b, hk, group, n0, m_first, n_mblocks, seqlen_q, seqlen_k,
                  qk_scale, sm_scale, causal, left, q_off, DK, DV, stride_ks, stride_kh, seed, salt0, dropout_p,
                  lse_fold, delta_fold, ALIBI, ab_off, sc_in, sc_out, WG: gl.constexpr, WITH_DQ: gl.constexpr):
    dtype: gl.constexpr = dk_desc.dtype
    STAGES: gl.constexpr = q_smem.shape[0]
    ROWS: gl.constexpr = q_smem.shape[2]  # queries per block
    KEYS: gl.constexpr = k_smem.shape[2]  # keys of this warpgroup
    HEAD_DIM: gl.constexpr = k_smem.shape[4]
    HALF_D: gl.constexpr = kc_smem.shape[4]
    s_layout: gl.constexpr = _wgmma_layout(ROWS)  # S^T, dP^T: KEYS x ROWS
    acc_layout: gl.constexpr = _wgmma_layout(HEAD_DIM)  # dK, dV: KEYS x HEAD_DIM
    dq_layout: gl.constexpr = _wgmma_layout(HALF_D)  # dQ half: ROWS x HALF_D
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    tile2: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    half2: gl.constexpr = gl.NVMMASharedLayout.get_default_for([KEYS * 2, HALF_D], dtype)

    k0 = n0 + WG * KEYS
    diag = seqlen_k - seqlen_q
    offs_k = k0 + gl.arange(0, KEYS, layout=gl.SliceLayout(1, s_layout))
    offs_q = gl.arange(0, ROWS, layout=gl.SliceLayout(0, s_layout))
    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    # whether a sliding window applies and whether the batch is packed (varlen), compile-time
    # facts that gl.warp_specialize would turn into run-time values as arguments: carried by the
    # shape of a placeholder allocation, 1 + HAS_WINDOW + 2 IS_VARLEN + 4 HAS_DROPOUT + 8 HAS_SOFTCAP
    # + 16 HAS_ALIBI (a run-time window test spills 150-300 bytes more at hdim 64)
    HAS_WINDOW: gl.constexpr = (win_smem.shape[0] - 1) % 2 == 1
    IS_VARLEN: gl.constexpr = (win_smem.shape[0] - 1) // 2 % 2 == 1
    HAS_DROPOUT: gl.constexpr = (win_smem.shape[0] - 1) // 4 % 2 == 1
    HAS_SOFTCAP: gl.constexpr = (win_smem.shape[0] - 1) // 8 % 2 == 1
    HAS_ALIBI: gl.constexpr = (win_smem.shape[0] - 1) // 16 == 1
    # the dropout draws by draws_cols_shared (IOATTN_GLUON_DROPOUT_COLS=shared) where the shared
    # memory has room for its exchange: head dim 64
    SHARED_DRAWS: gl.constexpr = SHARED_DROPOUT_DRAWS and HEAD_DIM == 64

    kw = k_smem.index(WG)._reinterpret(dtype, [KEYS, HEAD_DIM], tile2)
    vw = v_smem.index(WG)._reinterpret(dtype, [KEYS, HEAD_DIM], tile2)
    kc = kc_smem.index(WG)._reinterpret(dtype, [KEYS * 2, HALF_D], half2)
    if WITH_DQ:
        dqw = dq_smem.index(WG)._reinterpret(gl.float32, [ROWS, HALF_D],
                                             gl.NVMMASharedLayout.get_default_for([ROWS, HALF_D], gl.float32))
    dk = gl.zeros([KEYS, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([KEYS, HEAD_DIM], gl.float32, acc_layout)
    s_init = gl.zeros([KEYS, ROWS], gl.float32, s_layout)
    dq_init = gl.zeros([ROWS, HALF_D], gl.float32, dq_layout)
    mbarrier.wait(kv_bar, 0)

    n_iter = group * n_mblocks
    for t in range(n_iter):
        s = t % STAGES
        h = hk * group + t // n_mblocks
        m0 = (m_first + t % n_mblocks) * ROWS
        mbarrier.wait(q_ready.index(s), (t // STAGES) & 1)
        qs = q_smem.index(s)._reinterpret(dtype, [ROWS, HEAD_DIM], tile2)
        dos = do_smem.index(s)._reinterpret(dtype, [ROWS, HEAD_DIM], tile2)
        st_tok = warpgroup_mma(kw, qs.permute((1, 0)), s_init, use_acc=False, is_async=True)
        dpt_tok = warpgroup_mma(vw, dos.permute((1, 0)), s_init, use_acc=False, is_async=True)
        st = warpgroup_mma_wait(1, deps=(st_tok, ))
        # lse and delta straight from the stage into the scores' column layout, where they are
        # used (held in that layout across the products they would cost 32 registers)
        lse = st_smem.index(2 * s)._reinterpret(gl.float32, [ROWS], flat).load(gl.SliceLayout(0, s_layout))
        if HAS_DROPOUT:  # lse + log2(1 - p): P^T comes scaled by 1 / (1 - p) (backward._fold_dropout_scale)
            lse = lse + lse_fold
        if HAS_SOFTCAP or HAS_ALIBI:  # (qk_scale is 1: _scores gives log2 units)
            slope2 = 0.0
            if HAS_ALIBI:
                slope2 = gl.load(ALIBI + ab_off + h).to(gl.float32) * 1.4426950408889634
            st, tt = forward_sm90._scores(st, gl.expand_dims(m0 + offs_q, 0), gl.expand_dims(offs_k, 1), diag,
                                          sc_in, sc_out, slope2, HAS_SOFTCAP, HAS_ALIBI)
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse, 0))
        # causal / window / varlen masks (keys as rows), where the block needs them
        pt = _bwd_mask(pt, offs_k, offs_q, k0, m0, seqlen_q, seqlen_k, diag, causal, left, HAS_WINDOW, IS_VARLEN, 0)
        dpt = warpgroup_mma_wait(0, deps=(dpt_tok, ))
        delta = st_smem.index(2 * s + 1)._reinterpret(gl.float32, [ROWS], flat).load(gl.SliceLayout(0, s_layout))
        if HAS_DROPOUT:
            # with delta (1 - p) and the scaled P^T: dS^T = P^T (keep(dP^T) - delta), dV += keep(P^T) dO
            # (the forward's masks, of query head h: salt = batch * nheads + h)
            keep = dropout_sm90.keep_cols(seed, salt0 + h, m0, k0, dropout_p, KEYS, ROWS, SHARED_DRAWS)
            dst = pt * (gl.where(keep, dpt, 0.0) - gl.expand_dims(delta * delta_fold, 0))
            pt = gl.where(keep, pt, 0.0)
        else:
            dst = pt * (dpt - gl.expand_dims(delta, 0))
        if HAS_SOFTCAP:
            dst = dst * (1.0 - tt * tt)
        pt_a = gl.convert_layout(pt.to(dtype), a_layout)
        dv_tok = warpgroup_mma(pt_a, dos, dv, is_async=True)
        dst16 = dst.to(dtype)
        if WITH_DQ:
            # dS^T halves of both warpgroups into the shared tile, for dQ = dS K (double-buffered:
            # the dQ products of block t - 2 that read this buffer were waited for before either
            # warpgroup arrived on block t - 1's barrier, which this one has passed)
            dsb = ds_smem.index(t % 2)
            dsb.slice(WG * KEYS, KEYS, dim=0).store(dst16)
            fence_async_shared()
            mbarrier.arrive(ds_ready.index(t % 2))
            dst_a = gl.convert_layout(dst16, a_layout)
            dk_tok = warpgroup_mma(dst_a, qs, dk, is_async=True)
            mbarrier.wait(ds_ready.index(t % 2), (t // 2) & 1)
            dq_tok = warpgroup_mma(dsb.permute((1, 0)), kc, dq_init, use_acc=False, is_async=True)
            dv, dk = warpgroup_mma_wait(1, deps=(dv_tok, dk_tok))
            mbarrier.arrive(q_empty.index(s))
            # (waiting for this product at the next block's start instead, behind its S^T and
            # dP^T, spills 600 bytes at hdim 128: the dQ tile would be live next to both)
            dq = warpgroup_mma_wait(0, deps=(dq_tok, ))
            # (varlen: rows past the sequence add zeros to the next one's, their dS being 0)
            _dq_out(dq_desc, dqw, dq_smem.index(WG), dq * sm_scale, b, h, q_off + m0, WG * HALF_D)
        else:  # dK and dV only (a dQ kernel runs after)
            dst_a = gl.convert_layout(dst16, a_layout)
            dk_tok = warpgroup_mma(dst_a, qs, dk, is_async=True)
            dv, dk = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok))
            mbarrier.arrive(q_empty.index(s))

    # epilogue: dK (scaled) and dV through the K/V tiles, which no product reads any more
    kw.store((dk * sm_scale).to(dtype))
    vw.store(dv.to(dtype))
    if IS_VARLEN:  # a TMA store would write into the next sequence's rows: a masked store
        # (dk_desc.shape[3]: the tensors' own head dim, less than the tile's when padded, forward_sm90.PAD_DIMS)
        _store_rows(kw, DK, k0, seqlen_k, hk, stride_ks, stride_kh, dk_desc.shape[3])
        _store_rows(vw, DV, k0, seqlen_k, hk, stride_ks, stride_kh, dk_desc.shape[3])
        tma.store_wait(0)  # the last dQ reduction reads its shared-memory tile until done
    else:
        fence_async_shared()
        tma.async_copy_shared_to_global(dk_desc, [b, k0, hk, 0], k_smem.index(WG))
        tma.async_copy_shared_to_global(dv_desc, [b, k0, hk, 0], v_smem.index(WG))
        tma.store_wait(0)


@gluon.jit
def _store_rows(tile, PTR, r0, n_rows, h, stride_s, stride_h, n_cols=None):
    """Store a (rows, dim) shared-memory tile (this warpgroup wrote it) at rows r0.. of head h
    of PTR, which points at the sequence's first row; rows from n_rows on are dropped, and with
    n_cols (a multiple of 8) the columns from it on (backward_sm90_d256: dK of Q/K head dim 192 in
    128-wide halves; a padded head dim, forward_sm90.PAD_DIMS). The column test is on groups of 8
    columns, so that the mask is constant over each thread's 8 contiguous columns."""
    ROWS: gl.constexpr = tile.shape[0]
    HEAD_DIM: gl.constexpr = tile.shape[1]
    rows_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // HEAD_DIM, HEAD_DIM // 8], [4, 1], [1, 0])
    x = tile.load(rows_layout)
    rows = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, rows_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, rows_layout))
    ptrs = PTR + gl.expand_dims(rows.to(gl.int64) * stride_s, 1) + h * stride_h + gl.expand_dims(cols, 0)
    mask = gl.expand_dims(rows < n_rows, 1)
    if n_cols is not None:
        mask = mask & gl.expand_dims(cols // 8 < n_cols // 8, 0)
    gl.store(ptrs, x, mask=mask)


# One wrapper per (warpgroup, mode): gl.warp_specialize passes its arguments as run-time
# values, so the constexprs WG and WITH_DQ must be spelled in a function of their own.
@gluon.jit
def _bwd_consumer_wg0(dk_desc, dv_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, kc_smem, ds_smem, st_smem,
                      win_smem, kv_bar, q_ready, q_empty, ds_ready, dq_smem, b, hk, group, n0, m_first, n_mblocks,
                      seqlen_q, seqlen_k, qk_scale, sm_scale, causal, left, q_off, DK, DV, stride_ks, stride_kh,
                      seed, salt0, dropout_p, lse_fold, delta_fold, ALIBI, ab_off, sc_in, sc_out):
    _bwd_consumer(dk_desc, dv_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, kc_smem, ds_smem, st_smem, win_smem,
                  kv_bar,
                  q_ready, q_empty, ds_ready, dq_smem, b, hk, group, n0, m_first, n_mblocks, seqlen_q, seqlen_k,
                  qk_scale, sm_scale, causal, left, q_off, DK, DV, stride_ks, stride_kh, seed, salt0, dropout_p,
                  lse_fold, delta_fold, ALIBI, ab_off, sc_in, sc_out, 0, True)


@gluon.jit
def _bwd_consumer_wg1(dk_desc, dv_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, kc_smem, ds_smem, st_smem,
                      win_smem, kv_bar, q_ready, q_empty, ds_ready, dq_smem, b, hk, group, n0, m_first, n_mblocks,
                      seqlen_q, seqlen_k, qk_scale, sm_scale, causal, left, q_off, DK, DV, stride_ks, stride_kh,
                      seed, salt0, dropout_p, lse_fold, delta_fold, ALIBI, ab_off, sc_in, sc_out):
    _bwd_consumer(dk_desc, dv_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, kc_smem, ds_smem, st_smem, win_smem,
                  kv_bar,
                  q_ready, q_empty, ds_ready, dq_smem, b, hk, group, n0, m_first, n_mblocks, seqlen_q, seqlen_k,
                  qk_scale, sm_scale, causal, left, q_off, DK, DV, stride_ks, stride_kh, seed, salt0, dropout_p,
                  lse_fold, delta_fold, ALIBI, ab_off, sc_in, sc_out, 1, True)


@gluon.jit
def _bwd_consumer_wg0_dkdv(dk_desc, dv_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, kc_smem, ds_smem,
                           st_smem, win_smem, kv_bar, q_ready, q_empty, ds_ready, dq_smem, b, hk, group, n0, m_first,
                           n_mblocks, seqlen_q, seqlen_k, qk_scale, sm_scale, causal, left, q_off, DK, DV, stride_ks,
                           stride_kh, seed, salt0, dropout_p, lse_fold, delta_fold, ALIBI, ab_off, sc_in, sc_out):
    _bwd_consumer(dk_desc, dv_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, kc_smem, ds_smem, st_smem, win_smem,
                  kv_bar,
                  q_ready, q_empty, ds_ready, dq_smem, b, hk, group, n0, m_first, n_mblocks, seqlen_q, seqlen_k,
                  qk_scale, sm_scale, causal, left, q_off, DK, DV, stride_ks, stride_kh, seed, salt0, dropout_p,
                  lse_fold, delta_fold, ALIBI, ab_off, sc_in, sc_out, 0, False)


@gluon.jit
def _bwd_consumer_wg1_dkdv(dk_desc, dv_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, kc_smem, ds_smem,
                           st_smem, win_smem, kv_bar, q_ready, q_empty, ds_ready, dq_smem, b, hk, group, n0, m_first,
                           n_mblocks, seqlen_q, seqlen_k, qk_scale, sm_scale, causal, left, q_off, DK, DV, stride_ks,
                           stride_kh, seed, salt0, dropout_p, lse_fold, delta_fold, ALIBI, ab_off, sc_in, sc_out):
    _bwd_consumer(dk_desc, dv_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, kc_smem, ds_smem, st_smem, win_smem,
                  kv_bar,
                  q_ready, q_empty, ds_ready, dq_smem, b, hk, group, n0, m_first, n_mblocks, seqlen_q, seqlen_k,
                  qk_scale, sm_scale, causal, left, q_off, DK, DV, stride_ks, stride_kh, seed, salt0, dropout_p,
                  lse_fold, delta_fold, ALIBI, ab_off, sc_in, sc_out, 1, False)


@gluon.jit
def _bwd_producer_dq(q_desc, do_desc, k_desc, v_desc, kc_desc, st_desc, q_smem, do_smem, k_smem, v_smem,
                     kc_smem, st_smem, kv_bar, q_ready, q_empty, b, hk, group, n0, m_first, n_mblocks, q_off, k_off,
                     st_off):
    _bwd_producer(q_desc, do_desc, k_desc, v_desc, kc_desc, st_desc, q_smem, do_smem, k_smem, v_smem, kc_smem,
                  st_smem, kv_bar, q_ready, q_empty, b, hk, group, n0, m_first, n_mblocks, q_off, k_off, st_off, True)


@gluon.jit
def _bwd_producer_dkdv(q_desc, do_desc, k_desc, v_desc, kc_desc, st_desc, q_smem, do_smem, k_smem, v_smem,
                       kc_smem, st_smem, kv_bar, q_ready, q_empty, b, hk, group, n0, m_first, n_mblocks, q_off,
                       k_off, st_off):
    _bwd_producer(q_desc, do_desc, k_desc, v_desc, kc_desc, st_desc, q_smem, do_smem, k_smem, v_smem, kc_smem,
                  st_smem, kv_bar, q_ready, q_empty, b, hk, group, n0, m_first, n_mblocks, q_off, k_off, st_off, False)


@gluon.jit
def _attn_bwd_sm90(q_desc, do_desc, k_desc, v_desc, kc_desc, dk_desc, dv_desc, dq_desc, st_desc,
                   seqlen_q, seqlen_k, nheads_k, group, qk_scale, sm_scale, left, CU_Q, CU_K, DK, DV, stride_ks,
                   stride_kh, RNG, dropout_p, lse_fold, delta_fold, ALIBI, stride_ab, sc_in, sc_out,
                   CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, WITH_DQ: gl.constexpr,
                   CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, HAS_WINDOW: gl.constexpr,
                   IS_VARLEN: gl.constexpr, HAS_DROPOUT: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
                   HAS_ALIBI: gl.constexpr):
    ROWS: gl.constexpr = q_desc.block_type.shape[1]
    KEYS: gl.constexpr = k_desc.block_type.shape[1]
    n0 = gl.program_id(0) * (2 * KEYS)
    bh = gl.program_id(1)
    b = bh // nheads_k
    hk = bh % nheads_k
    salt0 = b * nheads_k * group  # the forward's dropout salt, less the query head
    ab_off = b * stride_ab  # (ALiBi slopes of this batch element: (batch, nheads) or (nheads,))
    seed = 0
    if HAS_DROPOUT:  # rng_state = (seed, offset), as the Triton kernels read it
        seed = gl.load(RNG) + gl.load(RNG + 1)
    q_off = 0
    k_off = 0
    st_off = 0
    if IS_VARLEN:
        # packed (1, total, heads, dim) tensors: sequence b's rows from cu_seqlens; DK and DV
        # (the masked epilogue's pointers) move to its first key
        q_off, seqlen_q, k_off, seqlen_k, st_off = sequence_bounds(CU_Q, CU_K, b)
        DK += k_off.to(gl.int64) * stride_ks
        DV += k_off.to(gl.int64) * stride_ks
        b = 0
        if n0 >= seqlen_k:
            return
    m_first = 0
    if CAUSAL:  # query i sees key j when j <= i + seqlen_k - seqlen_q
        m_first = gl.maximum(n0 - (seqlen_k - seqlen_q), 0) // ROWS
    m_end = seqlen_q
    if left >= 0:  # a sliding window of `left` keys: the last query that sees the last key
        m_end = gl.minimum(m_end, n0 + 2 * KEYS - (seqlen_k - seqlen_q) + left)
    n_mblocks = gl.maximum((gl.maximum(m_end, 0) + ROWS - 1) // ROWS - m_first, 0)
    causal = 1 if CAUSAL else 0

    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [2] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2] + v_desc.block_type.shape, v_desc.layout)
    kc_smem = gl.allocate_shared_memory(dtype, [2] + kc_desc.block_type.shape, kc_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([2 * KEYS, ROWS], dtype)
    ds_smem = gl.allocate_shared_memory(dtype, [2, 2 * KEYS, ROWS], ds_layout)
    st_smem = gl.allocate_shared_memory(gl.float32, [2 * STAGES] + st_desc.block_type.shape, st_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    # (unused: its shape tells the consumers HAS_WINDOW, IS_VARLEN and HAS_DROPOUT)
    win_smem = gl.allocate_shared_memory(
        gl.int64, [1 + HAS_WINDOW + 2 * IS_VARLEN + 4 * HAS_DROPOUT + 8 * HAS_SOFTCAP + 16 * HAS_ALIBI],
        mbarrier.MBarrierLayout())
    if WITH_DQ:  # each warpgroup's fp32 dQ tile on its way to the bulk reduction
        dq_smem = gl.allocate_shared_memory(gl.float32, [2] + dq_desc.block_type.shape, dq_desc.layout)
    else:
        dq_smem = kv_bar  # not used
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # one arrival per consumer warpgroup
    for i in gl.static_range(2):
        mbarrier.init(ds_ready.index(i), count=2)

    consumer_args = (dk_desc, dv_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, kc_smem, ds_smem, st_smem, win_smem,
                     kv_bar,
                     q_ready, q_empty, ds_ready, dq_smem, b, hk, group, n0, m_first, n_mblocks, seqlen_q, seqlen_k,
                     qk_scale, sm_scale, causal, left, q_off, DK, DV, stride_ks, stride_kh, seed, salt0, dropout_p,
                     lse_fold, delta_fold, ALIBI, ab_off, sc_in, sc_out)
    producer_args = (q_desc, do_desc, k_desc, v_desc, kc_desc, st_desc, q_smem, do_smem, k_smem, v_smem, kc_smem,
                     st_smem, kv_bar, q_ready, q_empty, b, hk, group, n0, m_first, n_mblocks, q_off, k_off, st_off)
    if WITH_DQ:
        gl.warp_specialize([(_bwd_consumer_wg0, consumer_args), (_bwd_consumer_wg1, consumer_args),
                            (_bwd_producer_dq, producer_args)], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([(_bwd_consumer_wg0_dkdv, consumer_args), (_bwd_consumer_wg1_dkdv, consumer_args),
                            (_bwd_producer_dkdv, producer_args)], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])

    mbarrier.invalidate(kv_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(q_ready.index(i))
        mbarrier.invalidate(q_empty.index(i))
    for i in gl.static_range(2):
        mbarrier.invalidate(ds_ready.index(i))


def config(head_dim, softcap=False, alibi=False, dropout=False):
    """Tiles of the backward at a head dim, under these options (at head dim 64 the query rows a
    block from forward_sm90.option_rows_64)."""
    rows = forward_sm90.option_rows_64(softcap, alibi, dropout) if head_dim == 64 else BLOCK_M[head_dim]
    return dict(BLOCK_M=BLOCK_M_OVERRIDE.get(head_dim, rows), STAGES=2, CONSUMER_REGS=240,
                PRODUCER_REGS=24, num_warps=4)


# dropout_sm90.COLS_SHARED as a constexpr of this module (so that Triton's compile cache keys on it)
SHARED_DROPOUT_DRAWS = gl.constexpr(dropout_sm90.COLS_SHARED)

# Which backward runs on Hopper for the calls this kernel supports (IOATTN_GLUON_BWD):
#   "auto"   (default) what measured fastest on the H200 (benchmarks/results/h200-session7a, 7b):
#            the one pass ("atomic"; hdim 128 0.90-0.95x cuDNN, hdim 64 with 128-row query blocks
#            0.90-0.98x without a mask) unless deterministic=True, then "split" (+0..+4% over
#            the Triton backward); hdim 64 causal with <= 2k keys keeps the Triton backward
#   "atomic" this kernel for dK, dV and dQ in one pass (dQ by bulk TMA reductions: the order of
#            the additions varies, so not bit-reproducible; deterministic=True takes "split")
#   "split"  this kernel for dK/dV only, then a dQ kernel (backward_sm90_dq's, else Triton's): deterministic
#   "0"      the Triton backward (two Triton kernels)
MODE = os.environ.get("IOATTN_GLUON_BWD", "auto")
# IOATTN_GLUON_BWD_VARLEN=0 keeps the Triton backward for packed variable-length batches (A/B)
VARLEN = os.environ.get("IOATTN_GLUON_BWD_VARLEN", "1") != "0"
# head dim 256 (dense; causal or not, GQA) on the Gluon backward of backward_sm90_d256 (the
# warpgroups split the head dim; IOATTN_GLUON_BWD256=0 keeps the Triton backward). H200, session 9
# (results/h200-session9d): 6/6 vs fp64 with the Triton kernels' errors; dK/dV by this kernel and dQ
# by the Triton kernel ("split") 1.19-1.38x the Triton backward, 0.91-1.07x cuDNN; the one pass
# ("atomic", dQ by TMA reductions) was slower (1.04-1.33x Triton), so "split" is the default here
# (deterministic as well) and "atomic" only with IOATTN_GLUON_BWD=atomic
D256 = os.environ.get("IOATTN_GLUON_BWD256", "1") == "1"
# the hdim-256 Gluon backward with sliding windows ((left, 0), (left, -1)), softcap, ALiBi and packed
# varlen batches (IOATTN_GLUON_BWD256_OPTIONS=0 keeps the Triton backward for those): H200, session 9
# (results/h200-session9f): 6/6 vs fp64 with the Triton kernels' errors (windows, softcap 30/50,
# ALiBi (h,)/(b, h), varlen with empty sequences); 4k causal split mode 1.24x the Triton backward
# with softcap 50 and with a window of 1024. Dropout at hdim 256 keeps the Triton backward.
D256_OPTIONS = os.environ.get("IOATTN_GLUON_BWD256_OPTIONS", "1") == "1"
# V's own head dim (MLA: Q/K 192, V 128; also 256 / 128) on backward_sm90_d256's kernel, dK/dV only
# ("split": the Triton dQ kernel after it), dense or varlen, no dropout: its dO and V tiles are column halves
# of V's head dim, Q/K 192 runs in its 128-wide halves (the TMA zero-fills the columns past 192 and
# drops them from the dK store). Shared memory 177 KB, no spills on sm_90a. H100, session 20
# (results/h100-session20a): 10/10 vs fp64 (dense, varlen) with the Triton backward's errors; 192/128
# forward+backward TFLOP/s 4k 303 -> 340, causal 272 -> 305, 16k 298 -> 361, causal 305 -> 346 (cuDNN
# 325, 406, 339, 491). IOATTN_GLUON_BWD_VALUE_DIMS=0 keeps the Triton backward for such calls
VALUE_DIMS = os.environ.get("IOATTN_GLUON_BWD_VALUE_DIMS", "1") == "1"
# padded head dims of 136-248 (V's the same; forward_sm90.PAD_DIMS) on backward_sm90_d256's 256-wide tiles
# (128-wide halves, the TMA zero-filling the columns past the tensors' and clipping its stores; varlen:
# a column mask), then the Gluon dQ kernel as 256 / 256. Opt-in (IOATTN_GLUON_PAD_BWD256=1) until a GPU
# run checks it (gpu_suite s24a; compiled and dispatch-tested only): by default they keep the Triton
# backward (H100 s22c, hdim 160: 0.68-0.76x cuDNN)
PAD_BWD256 = os.environ.get("IOATTN_GLUON_PAD_BWD256", "0") == "1"


def pads_to_256(head_dim):
    """Whether a padded head dim runs on backward_sm90_d256's tiles (PAD_BWD256, forward_sm90.PAD_DIMS)."""
    return bool(PAD_BWD256 and forward_sm90.PAD_DIMS and forward_sm90.padded_dim(head_dim) == 256)
# (Q/K, V) head dims that backward_sm90_d256 takes with V's own head dim
VALUE_PAIRS = ((256, 128), (192, 128))


def supported(q, k, v, dout, *, varlen, window_left, window_right, softcap, alibi_slopes, dropout_p,
              deterministic, capability, max_seqlen_k=None):
    """Which Gluon backward a call takes: "atomic" (one pass), "split" (Gluon dK/dV, then dQ),
    or None (the Triton backward). varlen: packed (total, heads, dim) tensors, ``max_seqlen_k``
    given."""
    if MODE not in ("auto", "split", "atomic"):
        return None
    causal = window_right == 0
    if MODE == "auto" and forward_sm90._kernel_dim(q.shape[-1]) == 64 and causal and (max_seqlen_k if varlen else k.shape[1]) <= 2048:
        # the Triton backward: at 1k keys 251 vs 219 TFLOP/s (h200-session7b, before lse and
        # delta came by the TMA); at 4k the one pass is ahead (401 vs 329, h200-session7c)
        return None
    if (varlen and not VARLEN) or ((softcap > 0 or alibi_slopes is not None) and not forward_sm90.SCORES):
        return None
    if (dropout_p > 0 and not forward_sm90.dropout_ok(q.shape[-1], backward=True)) or window_right > 0 or (
            capability[0] != 9):
        return None  # (sliding windows (left, 0) and (left, -1) run here; a right window does not)
    if window_left >= 0 and not forward_sm90.WINDOW:
        return None
    d, dv = q.shape[-1], v.shape[-1]
    if dv != d:
        # backward_sm90_d256 with V's own head dim (VALUE_DIMS): no dropout, dK/dV only
        if not (VALUE_DIMS and D256 and (d, dv) in VALUE_PAIRS) or dropout_p > 0 or (
                (varlen or window_left >= 0 or softcap > 0 or alibi_slopes is not None) and not D256_OPTIONS):
            return None
    elif (d == 256 or pads_to_256(d)) and D256:
        # backward_sm90_d256 (padded head dims 136-248 on its 256-wide tiles, PAD_BWD256): no
        # dropout; windows, softcap, ALiBi and varlen with D256_OPTIONS only
        if dropout_p > 0 or ((varlen or window_left >= 0 or softcap > 0 or alibi_slopes is not None)
                             and not D256_OPTIONS):
            return None
    elif d not in HEAD_DIMS and forward_sm90._kernel_dim(d) not in HEAD_DIMS:
        # (a padded head dim, forward_sm90.PAD_DIMS, runs on the tiles of the next head dim)
        return None
    if q.dtype not in (torch.bfloat16, torch.float16):
        return None
    if not (tma_ok(q, d) and tma_ok(k, d) and tma_ok(v, dv) and tma_ok(dout, dv)):
        return None
    if dv != d:
        return "split"
    if forward_sm90._kernel_dim(d) == 256:
        return "atomic" if MODE == "atomic" and not deterministic else "split"
    return "split" if deterministic or MODE == "split" else "atomic"


def _blocks(head_dim, block_m):
    return dict(q=(1, block_m, 1, head_dim), kv=(1, HALF_N, 1, head_dim), kc=(1, 2 * HALF_N, 1, head_dim // 2),
                dq=(1, block_m, 1, head_dim // 2))


_STATS_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=4)


@gluon.jit
def stats_offset(q_off, b):
    """Where sequence b (starting at packed row q_off) keeps its lse/delta in the varlen stats
    buffer: a multiple of 4 (the TMA wants the innermost coordinate 16-byte aligned: an
    unaligned one is an illegal instruction), 4 * b more than q_off rounded up, so sequences
    never overlap. (The preprocess computes the same in Triton.)"""
    return (q_off + 3) // 4 * 4 + 4 * b


@gluon.jit
def sequence_bounds(CU_Q, CU_K, b):
    """Sequence b of a packed varlen batch: (q_off, seqlen_q, k_off, seqlen_k, st_off), its first
    packed query and key rows, its lengths, and where its lse/delta start in the stats buffer."""
    q_off = gl.load(CU_Q + b)
    seqlen_q = gl.load(CU_Q + b + 1) - q_off
    k_off = gl.load(CU_K + b)
    seqlen_k = gl.load(CU_K + b + 1) - k_off
    return q_off, seqlen_q, k_off, seqlen_k, stats_offset(q_off, b)


def new_stats(batch, nheads, seqlen_q, device):
    """The (batch, nheads, 2, seqlen_q) fp32 buffer the preprocess fills with lse (log2 units) and
    delta for this kernel (rows padded to 16 bytes for the TMA)."""
    return torch.empty(batch, nheads, 2, cdiv(seqlen_q, 4) * 4, dtype=torch.float32, device=device)[..., :seqlen_q]


def new_stats_varlen(nheads, total_q, batch, device):
    """The varlen stats buffer (1, nheads, 2, n): sequence b's rows from stats_offset(cu_seqlens_q[b],
    b) on. Zeroed: a query tile that runs past its sequence reads the gap rows (its products are
    masked, but a NaN delta would survive the mask)."""
    return torch.zeros(1, nheads, 2, cdiv(total_q + 4 * batch, 4) * 4, dtype=torch.float32, device=device)


def _stats_descriptor(stats, rows):
    d = object.__new__(TensorDescriptor)
    d.base, d.shape, d.strides, d.block_shape = stats, list(stats.shape), list(stats.stride()), [1, 1, 1, rows]
    d.layout, d.padding = _STATS_LAYOUT, "zero"
    return d


def attention_backward_sm90(dout, q, k, v, stats, dq_accum, dk, dv, *, softmax_scale, causal, cfg=None,
                            window_left=-1, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_k=None, dropout_p=0.0,
                            rng_state=None, softcap=0.0, alibi_slopes=None):
    """dK, dV into dk, dv and, if dq_accum is not None, dQ (times the scale) added into that
    zeroed fp32 tensor of q's shape. ``stats``: new_stats's buffer, filled.
    varlen (cu_seqlens_q given): packed (total, heads, dim) tensors, ``stats`` from
    new_stats_varlen (each sequence's rows from stats_offset); one CTA per 128 keys of the
    longest sequence (the others return at once). dropout_p, rng_state, softcap, alibi_slopes:
    as the forward's (the same masks, scores and slopes)."""
    if forward_sm90._kernel_dim(q.shape[-1]) == 256:
        # the kernel that splits the head dim (supported(): no dropout; 192 with V 128, padded dims 136-248)
        from . import backward_sm90_d256
        assert dropout_p == 0
        return backward_sm90_d256.attention_backward_d256(
            dout, q, k, v, stats, dq_accum, dk, dv, softmax_scale=softmax_scale, causal=causal, window_left=window_left,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k, softcap=softcap,
            alibi_slopes=alibi_slopes)
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
    head_dim = forward_sm90._kernel_dim(head_dim)  # (a padded one: the TMA zero-fills and clips the columns past it)
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    cfg = cfg or config(head_dim, softcap > 0, alibi_slopes is not None, dropout_p > 0)
    blk = _blocks(head_dim, cfg["BLOCK_M"])
    d = forward_sm90._descriptor
    descs = [d(q, blk["q"], q.dtype), d(dout, blk["q"], q.dtype), d(k, blk["kv"], q.dtype), d(v, blk["kv"], q.dtype),
             d(k, blk["kc"], q.dtype), d(dk4, blk["kv"], q.dtype), d(dv4, blk["kv"], q.dtype)]
    descs.append(d(dq_accum, blk["dq"], torch.float32) if with_dq else descs[-1])  # (not read without dQ)
    descs.append(_stats_descriptor(stats, cfg["BLOCK_M"]))
    assert dk.stride() == dv.stride()
    grid = (cdiv(seqlen_k_grid, 2 * HALF_N), batch * nheads_k)
    cu_q = cu_seqlens_q if varlen else stats  # (not read when dense)
    cu_k = cu_seqlens_k if varlen else stats
    rng = rng_state if dropout_p > 0 else stats
    qk_scale, score_args, has_softcap, has_alibi = forward_sm90._score_args(softmax_scale, softcap, alibi_slopes,
                                                                            stats)
    key = (varlen, q.shape, k.shape, dk4.stride(), window_left, q.dtype, causal, with_dq, dropout_p > 0,
           has_softcap, has_alibi, score_args[1], tuple(cfg.values()), align(cu_q, cu_k, dk, dv, rng, score_args[0]))
    return launch(_attn_bwd_sm90, grid,
        *descs,
        seqlen_q, seqlen_k, nheads_k, nheads // nheads_k, qk_scale, softmax_scale, window_left,
        cu_q, cu_k, dk, dv, dk4.stride(1), dk4.stride(2),
        *((rng, dropout_p, math.log2(1.0 - dropout_p), 1.0 - dropout_p) if dropout_p > 0 else (rng, 0.0, 0.0, 1.0)),
        *score_args, HAS_SOFTCAP=has_softcap, HAS_ALIBI=has_alibi, HAS_DROPOUT=dropout_p > 0, HAS_WINDOW=window_left >= 0, CAUSAL=causal, HEAD_DIM=head_dim, STAGES=cfg["STAGES"], WITH_DQ=with_dq,
        CONSUMER_REGS=cfg["CONSUMER_REGS"], PRODUCER_REGS=cfg["PRODUCER_REGS"], IS_VARLEN=varlen,
        num_warps=cfg["num_warps"], key=key)


def compile_for(head_dim, dtype="bf16", causal=True, capability=(9, 0), with_dq=True, block_m=None, window=False,
                varlen=False, dropout=False, softcap=False, alibi=False):
    """Compile the kernel for a target without a GPU (tests, the compiler's view)."""
    from . import aot
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    cfg = config(head_dim, softcap=softcap, alibi=alibi, dropout=dropout)  # the rows the launcher takes
    blk = _blocks(head_dim, block_m or cfg["BLOCK_M"])

    def desc(block, dt=dtype, tdt=tdtype):
        return f"tensordesc<{dt}[{','.join(map(str, block))}],{forward_sm90._layout(block, tdt)!r}>"

    fn = _attn_bwd_sm90
    sig = dict(q_desc=desc(blk["q"]), do_desc=desc(blk["q"]), k_desc=desc(blk["kv"]), v_desc=desc(blk["kv"]),
               kc_desc=desc(blk["kc"]), dk_desc=desc(blk["kv"]), dv_desc=desc(blk["kv"]),
               dq_desc=desc(blk["dq"], "fp32", torch.float32) if with_dq else desc(blk["kv"]),
               st_desc=f"tensordesc<fp32[1,1,1,{blk['q'][1]}],{_STATS_LAYOUT!r}>", seqlen_q="i32", seqlen_k="i32", nheads_k="i32", group="i32",
               qk_scale="fp32", sm_scale="fp32", left="i32", CU_Q="*i32", CU_K="*i32", DK=f"*{dtype}",
               DV=f"*{dtype}", stride_ks="i32", stride_kh="i32", RNG="*i64", dropout_p="fp32", lse_fold="fp32",
               delta_fold="fp32", ALIBI="*fp32", stride_ab="i32", sc_in="fp32", sc_out="fp32")
    constexprs = dict(CAUSAL=causal, HEAD_DIM=head_dim, STAGES=cfg["STAGES"], WITH_DQ=with_dq, HAS_WINDOW=window,
                      IS_VARLEN=varlen, HAS_DROPOUT=dropout, HAS_SOFTCAP=softcap, HAS_ALIBI=alibi,
                      CONSUMER_REGS=cfg["CONSUMER_REGS"],
                      PRODUCER_REGS=cfg["PRODUCER_REGS"])
    return aot.compile_gluon(fn, sig, constexprs, cfg["num_warps"], capability)
