"""Forward kernel: tiles of Q stay on chip while tiles of K and V stream through.

One program computes BLOCK_M query rows of one (batch, head): it walks the key
blocks the rows can see, keeps a running row maximum ``m_i`` and sum ``l_i``
(online softmax, FlashAttention-2 style: the output is rescaled lazily and
divided by ``l_i`` once at the end), and writes only O and the log-sum-exp.
The N×N scores never leave registers.
"""

import os

import torch
import triton
import triton.language as tl

from . import configs
from .configs import NO_SPECIALIZE
from .masks import mma, drop_packed, dropout_keep, dropout_pairs, key_range, scores_log2, sequence_bounds, visible

# The Gluon Hopper forward (forward_sm90.py) takes the dense calls it supports on sm_90; it
# needs triton.experimental.gluon (triton >= 3.5) and a GPU, never the interpreter, so it is
# not even imported there.
_sm90 = None
if not configs.interpreting():
    try:
        from . import forward_sm90 as _sm90
    except ImportError:  # an older triton: the Triton kernel runs everywhere
        _sm90 = None


@triton.jit
def _load_rows(base, offs_n, offs_d, stride_s, seqlen, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASKED: tl.constexpr, TRANSPOSED: tl.constexpr):
    """A [BN, D] tile of K or V (or its [D, BN] transpose); masks only where needed."""
    if TRANSPOSED:
        ptrs = base + offs_n[None, :] * stride_s + offs_d[:, None]  # [D, BN]
        row_ok = offs_n[None, :] < seqlen
        col_ok = offs_d[:, None] < HEAD_DIM
    else:
        ptrs = base + offs_n[:, None] * stride_s + offs_d[None, :]  # [BN, D]
        row_ok = offs_n[:, None] < seqlen
        col_ok = offs_d[None, :] < HEAD_DIM
    if MASKED:
        return tl.load(ptrs, mask=row_ok & col_ok, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        return tl.load(ptrs, mask=col_ok, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _tile_pages(bt_row, n0, offs_n0, seqlen, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pages of the key tile [n0, n0 + BLOCK_N) of a paged cache (key j: page bt_row[j //
    PAGE_SIZE], row j % PAGE_SIZE): one scalar when BLOCK_N divides the page size (the tile
    lies in one page), else one per key (any page size). The loop loads the next tile's pages
    one iteration ahead: a K/V address that waits on a load in the same iteration costs a
    pipeline stage (sm_90a, hdim 128: 164864 B of shared memory instead of 229376)."""
    if PAGE_SIZE % BLOCK_N == 0:
        pages = tl.load(bt_row + n0 // PAGE_SIZE, mask=n0 < seqlen, other=0)
    else:
        pages = tl.load(bt_row + (n0 + offs_n0) // PAGE_SIZE, mask=n0 + offs_n0 < seqlen, other=0)
    return pages.to(tl.int64)


@triton.jit
def _load_paged(base, rows, offs_n, offs_d, seqlen, HEAD_DIM: tl.constexpr,
                TRANSPOSED: tl.constexpr):
    """_load_rows for row offsets of a paged cache (always masked: cheap next to the gather)."""
    if TRANSPOSED:
        ptrs = base + rows[None, :] + offs_d[:, None]  # [D, BN]
        ok = (offs_n[None, :] < seqlen) & (offs_d[:, None] < HEAD_DIM)
    else:
        ptrs = base + rows[:, None] + offs_d[None, :]  # [BN, D]
        ok = (offs_n[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(ptrs, mask=ok, other=0.0)


@triton.jit
def _softmax_step(acc, l_i, m_i, qk, v, start_m, offs_m, start_n, offs_n, seqlen_q, seqlen_k,
                  sm_scale, softcap, slope, window_left, window_right, seed, salt, dropout_p,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                  HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax: fold one [BM, BN] block of raw scores qk (and its V tile) into acc, l_i, m_i.

    m_i is in log2 units. Without softcap or ALiBi the scale is applied inside exp2's
    argument, qk * scale·log2e - m, one FFMA per score (the row max is taken on the raw
    scores: the scale is positive), instead of a multiply kept for the max and a subtract.
    """
    if MASKED:
        ok = visible(offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k,
                     window_left, window_right, True, HAS_LEFT, HAS_RIGHT)
    if HAS_SOFTCAP or HAS_ALIBI:
        s, _ = scores_log2(qk, offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k,
                           sm_scale, softcap, slope, HAS_SOFTCAP, HAS_ALIBI)
        if MASKED:
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
    else:
        scale = sm_scale * 1.4426950408889634
        if MASKED:
            qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
    if MASKED:  # a row may have seen no key yet: keep exp2 away from (-inf) - (-inf)
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    if HAS_SOFTCAP or HAS_ALIBI:
        p = tl.math.exp2(s - m_new[:, None])  # [BM, BN]
    else:
        p = tl.math.exp2(qk * scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    # dropout: l_i keeps the undropped sum; 1/(1-p) is applied at the end
    if HAS_DROPOUT == 2:  # bf16/fp16 on CUDA: two elements per instruction (masks.drop_packed)
        pairs = dropout_pairs(seed, salt, start_m, start_n, BLOCK_M, BLOCK_N)
        acc = mma(drop_packed(p.to(v.dtype), *pairs, dropout_p), v, acc, DOT_PRECISION, UPCAST)
    else:
        if HAS_DROPOUT:
            keep = dropout_keep(seed, salt, start_m, start_n, dropout_p, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        acc = mma(p.to(v.dtype), v, acc, DOT_PRECISION, UPCAST)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, k_desc, v_desc, b, hk,
                    start, end, start_m, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k,
                    sm_scale, softcap, slope, window_left, window_right,
                    seed, salt, dropout_p, bt_row, stride_kp, stride_vp,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
                    PAGE_SIZE: tl.constexpr):
    """Fold key blocks [start, end) into the running softmax state."""
    offs_n0 = tl.arange(0, BLOCK_N)
    if PAGE_SIZE > 0:
        pages = _tile_pages(bt_row, start, offs_n0, seqlen_k, PAGE_SIZE, BLOCK_N)
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        if PAGE_SIZE > 0:  # paged K/V (block_table): rows gathered page by page
            in_page = offs_n % PAGE_SIZE
            rows_k = pages * stride_kp + in_page * stride_ks
            rows_v = pages * stride_vp + in_page * stride_vs
            pages = _tile_pages(bt_row, start_n + BLOCK_N, offs_n0, seqlen_k, PAGE_SIZE, BLOCK_N)
            kT = _load_paged(k_base, rows_k, offs_n, offs_d, seqlen_k, HEAD_DIM, True)
        elif USE_TMA:  # one bulk copy per tile; rows past the sequence and padded dims read 0
            kT = tl.trans(tl.reshape(k_desc.load([b, start_n, hk, 0]), (BLOCK_N, BLOCK_D)))
        else:
            kT = _load_rows(k_base, offs_n, offs_d, stride_ks, seqlen_k, HEAD_DIM, BLOCK_D, MASKED, True)
        qk = mma(q, kT, None, DOT_PRECISION, UPCAST)  # [BM, BN]
        if PAGE_SIZE > 0:
            v = _load_paged(v_base, rows_v, offs_n, offs_dv, seqlen_k, HEAD_DIM_V, False)
        elif USE_TMA:
            v = tl.reshape(v_desc.load([b, start_n, hk, 0]), (BLOCK_N, BLOCK_DV))
        else:
            v = _load_rows(v_base, offs_n, offs_dv, stride_vs, seqlen_k, HEAD_DIM_V, BLOCK_DV, MASKED, False)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, qk, v, start_m, offs_m, start_n, offs_n, seqlen_q, seqlen_k,
                                      sm_scale, softcap, slope, window_left, window_right,
                                      seed, salt, dropout_p, BLOCK_M, BLOCK_N, MASKED, HAS_LEFT, HAS_RIGHT,
                                      HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, DOT_PRECISION, UPCAST)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _attn_fwd(Q, K, V, O, LSE, CU_SEQLENS_Q, CU_SEQLENS_K, ALIBI, RNG, K_DESC, V_DESC, BLOCK_TABLE,
              stride_qb, stride_qs, stride_qh,
              stride_kb, stride_ks, stride_kh,
              stride_vb, stride_vs, stride_vh,
              stride_ob, stride_os, stride_oh,
              stride_lb, stride_lh, stride_ab, stride_bt,
              seqlen_q_dense, seqlen_k_dense, nheads, group,
              sm_scale, softcap, window_left, window_right, dropout_p,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
              PAGE_SIZE: tl.constexpr = 0):
    # HEAD_DIM: of Q and K; HEAD_DIM_V: of V and O (they differ in e.g. DeepSeek's MLA: 192 and 128)
    # PAGE_SIZE > 0: K, V are paged caches (num_pages, PAGE_SIZE, heads, dim) whose pages for
    # sequence b are BLOCK_TABLE[b, :]; stride_kb / stride_vb are then the page strides
    # the last query blocks have the most keys to visit under a causal mask: start them first
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // nheads
    h = bh % nheads
    q_start, seqlen_q = sequence_bounds(CU_SEQLENS_Q, b, seqlen_q_dense, IS_VARLEN)
    k_start, seqlen_k = sequence_bounds(CU_SEQLENS_K, b, seqlen_k_dense, IS_VARLEN)
    if start_m >= seqlen_q:
        return
    hk = h // group
    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + q_start.to(tl.int64) * stride_qs + h * stride_qh
    if PAGE_SIZE > 0:  # keys are positions in the sequence's pages (_tile_pages)
        k_base = K + hk * stride_kh
        v_base = V + hk * stride_vh
        bt_row = BLOCK_TABLE + b64 * stride_bt
    else:
        k_base = K + b64 * stride_kb + k_start.to(tl.int64) * stride_ks + hk * stride_kh
        v_base = V + b64 * stride_vb + k_start.to(tl.int64) * stride_vs + hk * stride_vh
        bt_row = BLOCK_TABLE  # None
    o_base = O + b64 * stride_ob + q_start.to(tl.int64) * stride_os + h * stride_oh
    lse_base = LSE + b64 * stride_lb + h * stride_lh + q_start

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seqlen_q
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [BM, D]

    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_ab + h).to(tl.float32)
    seed = 0
    salt = bh  # the dropout stream of this (batch, head)
    if HAS_DROPOUT:
        seed = tl.load(RNG) + tl.load(RNG + 1)  # rng_state = (seed, offset)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    lo, full_lo, full_hi, hi = key_range(start_m, seqlen_q, seqlen_k, window_left, window_right,
                                         BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    # 1) masked blocks at the left edge of a window
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                                    K_DESC, V_DESC, b, hk,
                                    lo, full_lo, start_m, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k,
                                    sm_scale, softcap, slope, window_left, window_right,
                                    seed, salt, dropout_p, bt_row, stride_kb, stride_vb,
                                    BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV,
                                    True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
                                    HAS_DROPOUT, DOT_PRECISION, UPCAST, USE_TMA, PAGE_SIZE)
    # 2) blocks every row sees in full: no mask arithmetic
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                                    K_DESC, V_DESC, b, hk,
                                    full_lo, full_hi, start_m, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k,
                                    sm_scale, softcap, slope, window_left, window_right,
                                    seed, salt, dropout_p, bt_row, stride_kb, stride_vb,
                                    BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV,
                                    False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
                                    HAS_DROPOUT, DOT_PRECISION, UPCAST, USE_TMA, PAGE_SIZE)
    # 3) masked blocks on the causal diagonal / right window edge / ragged end
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                                    K_DESC, V_DESC, b, hk,
                                    full_hi, hi, start_m, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k,
                                    sm_scale, softcap, slope, window_left, window_right,
                                    seed, salt, dropout_p, bt_row, stride_kb, stride_vb,
                                    BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV,
                                    True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
                                    HAS_DROPOUT, DOT_PRECISION, UPCAST, USE_TMA, PAGE_SIZE)

    # epilogue: rows that saw no key get out = 0 and lse = -inf
    empty = l_i == 0.0
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    acc = acc * inv_l[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(lse_base + offs_m, lse, mask=row_ok)
    tl.store(o_base + offs_m[:, None] * stride_os + offs_dv[None, :], acc.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


def _dense_or_varlen_strides(x, varlen):
    """(batch, seq, head) strides; varlen tensors (total, head, dim) have no batch stride."""
    strides = x.stride()
    if varlen:
        return 0, strides[0], strides[1]
    return strides[:3]


def dot_precision(dtype):
    # fp32 inputs get true fp32 products (no silent TF32 rounding)
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dot(dtype):
    return dtype == torch.bfloat16 and configs.interpreting()


def dropout_mode(dropout_p, dtype):
    """HAS_DROPOUT of the forward: 0 off, 1 a select per element (masks.dropout_keep), 2 the
    packed two-per-instruction variant (masks.drop_packed; inline PTX: bf16/fp16 on CUDA)."""
    if dropout_p <= 0:
        return 0
    return 1 if dtype == torch.float32 or configs.interpreting() or PACKED_DROPOUT == "0" else 2


# IOATTN_PACKED_DROPOUT=0 keeps the per-element select on CUDA too (A/B in benchmarks)
PACKED_DROPOUT = os.environ.get("IOATTN_PACKED_DROPOUT", "1")


def softcap_mode(softcap, dtype):
    """HAS_SOFTCAP of the kernels (masks.scores_log2): 0 off, 1 exact tanh, 2 the GPU's
    tanh.approx (bf16/fp16 on CUDA, where its ~2^-11 error is under the dtype's rounding)."""
    if softcap <= 0:
        return 0
    return 1 if dtype == torch.float32 or configs.interpreting() else 2


def attention_forward(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q, max_seqlen_k,
                      softmax_scale, window_left=-1, window_right=-1, softcap=0.0,
                      alibi_slopes=None, dropout_p=0.0, rng_state=None, block_table=None):
    """Launch the forward kernel. See docs/ARCHITECTURE.md for the contract. With
    ``block_table`` (int32 (batch, max_pages); varlen only), k and v are paged caches
    (num_pages, page_size, nheads_k, headdim) and cu_seqlens_k gives each sequence's length.
    v (and out) may have a head dim of their own (the Gluon kernel takes equal ones only)."""
    varlen = cu_seqlens_q is not None
    if varlen:
        batch = cu_seqlens_q.shape[0] - 1
        _, nheads, head_dim = q.shape
        nheads_k = k.shape[1] if block_table is None else k.shape[2]
        lse = configs.new_empty((nheads, q.shape[0]), torch.float32, q.device)
        stride_lb, stride_lh = 0, lse.stride(0)
    else:
        batch, _, nheads, head_dim = q.shape
        nheads_k = k.shape[2]
        lse = configs.new_empty((batch, nheads, max_seqlen_q), torch.float32, q.device)
        stride_lb, stride_lh = lse.stride(0), lse.stride(1)
    out = configs.new_empty(q.shape[:-1] + (v.shape[-1],), q.dtype, q.device)
    if max_seqlen_q <= 0 or batch * nheads == 0:  # no query rows at all
        return out, lse
    if _sm90 is not None and _sm90.supported(  # (None under the interpreter)
            q, k, v, varlen=varlen, window_left=window_left, window_right=window_right, softcap=softcap,
            alibi_slopes=alibi_slopes, dropout_p=dropout_p, block_table=block_table,
            capability=configs._capability(q.device), max_seqlen_k=max_seqlen_k):
        configs.last_compiled["fwd"] = _sm90.attention_forward_sm90(
            q, k, v, out, lse, softmax_scale=softmax_scale, causal=window_right == 0, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, window_left=window_left,
            dropout_p=dropout_p, rng_state=rng_state, softcap=softcap, alibi_slopes=alibi_slopes)
        return out, lse
    head_dim_v = v.shape[-1]
    cfg = configs.forward_config(configs.tile_head_dim(head_dim, head_dim_v), q.dtype, q.device,
                                 dropout=dropout_p > 0, seqlen_k=max_seqlen_k)
    block_d, block_dv = configs.block_d(head_dim), configs.block_d(head_dim_v)
    stride_ab = 0
    if alibi_slopes is not None and alibi_slopes.dim() == 2:
        stride_ab = alibi_slopes.stride(0)
    grid = (configs.cdiv(max_seqlen_q, cfg["BLOCK_M"]), batch * nheads)
    k_desc = v_desc = None
    # (K and V take the same box: a V head dim of its own only where it pads to K's width)
    use_tma = (block_dv == block_d and configs.tma_tiles(block_d, q.element_size(), varlen)
               and configs.use_tma(q.device) and _tma_ok(k, head_dim) and _tma_ok(v, head_dim_v))
    if use_tma:
        k_desc, v_desc = _kv_descriptors(k, v, [1, cfg["BLOCK_N"], 1, block_d])
    paged = dict(PAGE_SIZE=k.shape[1]) if block_table is not None else {}
    strides_k, strides_v = (k.stride()[:3], v.stride()[:3]) if paged else (
        _dense_or_varlen_strides(k, varlen), _dense_or_varlen_strides(v, varlen))
    configs.last_compiled["fwd"] = _attn_fwd[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state, k_desc, v_desc,
        block_table, *_dense_or_varlen_strides(q, varlen), *strides_k, *strides_v,
        *_dense_or_varlen_strides(out, varlen),
        stride_lb, stride_lh, stride_ab, block_table.stride(0) if paged else 0,
        max_seqlen_q, max_seqlen_k, nheads, nheads // nheads_k,
        softmax_scale, softcap, window_left, window_right, dropout_p,
        HEAD_DIM=head_dim, BLOCK_D=block_d, HEAD_DIM_V=head_dim_v, BLOCK_DV=block_dv,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        IS_VARLEN=varlen, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
        HAS_SOFTCAP=softcap_mode(softcap, q.dtype), HAS_ALIBI=alibi_slopes is not None,
        HAS_DROPOUT=dropout_mode(dropout_p, q.dtype),
        DOT_PRECISION=dot_precision(q.dtype), UPCAST=upcast_dot(q.dtype), USE_TMA=use_tma,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **paged,
    )
    return out, lse


def _kv_descriptors(k, v, box):
    """TMA descriptors of K and V, (batch, seqlen, heads, dim) boxes of 1 x BLOCK_N x 1 x BLOCK_D:
    rows past a sequence's end and columns past the head dim read as zeros."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    return (TensorDescriptor(k, list(k.shape), list(k.stride()), box),
            TensorDescriptor(v, list(v.shape), list(v.stride()), box))


_tma_ok = configs.tma_ok


@triton.jit
def _dropout_mask_kernel(MASK, RNG, nheads, seqlen_q, seqlen_k, dropout_p,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # writes the keep mask that _attn_fwd / the backward draw for (batch, head) = program_id(2)
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    seed = tl.load(RNG) + tl.load(RNG + 1)
    keep = dropout_keep(seed, bh, tl.program_id(0) * BLOCK_M, tl.program_id(1) * BLOCK_N, dropout_p, BLOCK_M, BLOCK_N)
    ptrs = MASK + bh.to(tl.int64) * seqlen_q * seqlen_k + offs_m[:, None] * seqlen_k + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))


def dropout_keep_mask(batch, nheads, seqlen_q, seqlen_k, dropout_p, rng_state):
    """Boolean (batch, nheads, seqlen_q, seqlen_k): True where the kernels keep a probability."""
    mask = torch.empty(batch, nheads, seqlen_q, seqlen_k, dtype=torch.int8, device=rng_state.device)
    grid = (configs.cdiv(seqlen_q, 32), configs.cdiv(seqlen_k, 32), batch * nheads)
    _dropout_mask_kernel[grid](mask, rng_state, nheads, seqlen_q, seqlen_k, dropout_p,
                               BLOCK_M=32, BLOCK_N=32)
    return mask.bool()
