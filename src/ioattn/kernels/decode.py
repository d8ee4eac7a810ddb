"""Split-KV decoding (Flash-Decoding) over a contiguous or paged KV cache.

Three kernels, launched in this order by :func:`decode_attention`:

* ``_append_kv``: writes the new keys/values into the cache at ``cache_seqlens``
  (rotary applied to the keys on the way), in place.
* ``_decode_fwd``: one program per (M block, batch, KV head, split). The query
  heads of one KV group and the query positions are packed together as the
  rows of the M tile (row ``r`` = query position ``r // GROUP``, head
  ``r % GROUP`` of the group), so every K/V tile read from memory serves the
  whole group. Each split walks its share of the keys with the online softmax
  and writes a partial output (fp32) and its log-sum-exp; with one split it
  writes the final output directly.
* ``_decode_combine``: merges the splits' partial outputs by their LSEs.

Nothing here reads a device value on the host, so a decoding step can be
captured in a CUDA graph: the number of splits depends on shapes only.

Positions are cache positions: key ``j`` lives at cache position ``j`` (paged:
page ``block_table[b, j // PAGE_SIZE]``, row ``j % PAGE_SIZE``). Batch ``b``
sees the keys ``leftpad[b] <= j < cache_seqlens[b] + seqlen_new``; causal masks
and windows are bottom-right aligned on that range, so query ``i`` sits on the
diagonal ``i + kv_end - seqlen_q`` (see ``reference.visible_mask``).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from .configs import block_d as block_d_of, cdiv, next_pow2

LOG2E = tl.constexpr(1.4426950408889634)  # 1/ln(2): scores go to base 2 so the kernels use exp2
LN2 = tl.constexpr(0.6931471805599453)

# The most splits one call uses (FA2 uses the same bound).
MAX_SPLITS = 128
# SM count assumed off CUDA (CPU, interpreter): the heuristic stays shape-only.
FALLBACK_SM_COUNT = 16


def _new_buffer(shape, dtype, device):
    """Allocate a kernel output. Tests monkeypatch this to fill buffers with NaN."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------


@triton.jit
def _rotary_partner(offs_d, ROTARY_DIM_HALF, INTERLEAVED: tl.constexpr):
    """Index of the element each dim is rotated with, its cos/sin column, and its sign.

    GPT-J (interleaved) pairs (0, 1), (2, 3), ...; GPT-NeoX pairs d with d + r/2.
    rotated[d] = x[d] * cos + sign[d] * x[partner[d]] * sin, sign -1 on the pair's first element.
    """
    if INTERLEAVED:
        partner = offs_d ^ 1
        col = offs_d // 2
        first = (offs_d % 2) == 0
    else:
        first = offs_d < ROTARY_DIM_HALF
        partner = tl.where(first, offs_d + ROTARY_DIM_HALF, offs_d - ROTARY_DIM_HALF)
        col = tl.where(first, offs_d, offs_d - ROTARY_DIM_HALF)
    sign = tl.where(first, -1.0, 1.0)
    return partner, col, sign


@triton.jit
def _load_rotated(ptr_rows, pos, row_mask, offs_d, COS, SIN, stride_cos, seqlen_ro, ROTARY_DIM,
                  HEAD_DIM, INTERLEAVED: tl.constexpr):
    """Load rows ``ptr_rows[:, None] + offs_d`` (fp32) with rotary at positions ``pos`` applied
    to the first ``ROTARY_DIM`` dims. Positions past the table use its last row."""
    pos = tl.minimum(pos, seqlen_ro - 1)
    d_mask = offs_d < HEAD_DIM
    x = tl.load(ptr_rows[:, None] + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :],
                other=0.0).to(tl.float32)                                        # [R, BD]
    partner, col, sign = _rotary_partner(offs_d, ROTARY_DIM // 2, INTERLEAVED)
    in_rot = offs_d < ROTARY_DIM
    rot_mask = row_mask[:, None] & in_rot[None, :]
    x_partner = tl.load(ptr_rows[:, None] + partner[None, :], mask=rot_mask, other=0.0).to(tl.float32)
    p_cs = pos[:, None].to(tl.int64) * stride_cos + col[None, :]
    cos = tl.load(COS + p_cs, mask=rot_mask, other=1.0).to(tl.float32)
    sin = tl.load(SIN + p_cs, mask=rot_mask, other=0.0).to(tl.float32)
    return x * cos + sign[None, :] * x_partner * sin


@triton.jit
def _cache_row_offsets(pos, b, cache_b, BLOCK_TABLE, stride_bt, stride_cb, stride_cs, row_mask,
                       PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """int64 offsets of cache rows at positions ``pos`` (without the head offset).

    Paged: the physical page comes from the block table, one lookup per key, so
    any page size works and a tile may straddle pages."""
    pos = pos.to(tl.int64)
    if PAGED:
        page = tl.load(BLOCK_TABLE + b.to(tl.int64) * stride_bt + pos // PAGE_SIZE,
                       mask=row_mask, other=0).to(tl.int64)
        return page * stride_cb + (pos % PAGE_SIZE) * stride_cs
    else:
        return cache_b.to(tl.int64) * stride_cb + pos * stride_cs


@triton.jit
def _tile_pages(BLOCK_TABLE, b, stride_bt, n0, end, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Physical pages of the key tile at ``n0`` (int64): a scalar when a tile lies in one page
    (``PAGE_SIZE % BLOCK_N == 0``, tiles aligned), else one per key.

    The decode loop loads the next tile's pages one iteration ahead, so the K/V
    loads depend on a loop-carried value rather than on a load of their own
    iteration, and the software pipeliner keeps ``num_stages - 1`` K/V tiles in
    flight. Positions are clamped into ``[0, end)``: every entry read is one the
    sequence uses (nothing past the end is dereferenced).
    """
    p_row = BLOCK_TABLE + b.to(tl.int64) * stride_bt
    last = tl.maximum(end - 1, 0)
    if PAGE_SIZE % BLOCK_N == 0:
        return tl.load(p_row + tl.minimum(n0, last) // PAGE_SIZE).to(tl.int64)
    else:
        pos = tl.minimum(n0 + tl.arange(0, BLOCK_N), last)
        return tl.load(p_row + pos // PAGE_SIZE).to(tl.int64)


# ----------------------------------------------------------------------------
# Kernel 1: append the new keys / values (rotary on the keys)
# ----------------------------------------------------------------------------


@triton.jit
def _append_kv(
    K_NEW, V_NEW, K_CACHE, V_CACHE, CACHE_SEQLENS, CACHE_BATCH_IDX, BLOCK_TABLE, COS, SIN,
    stride_knb, stride_kns, stride_knh,
    stride_vnb, stride_vns, stride_vnh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_bt, stride_cos,
    seqlen_new, nheads_k, seqlen_ro, ROTARY_DIM,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
    HAS_ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // nheads_k
    hk = pid_bh % nheads_k
    if HAS_BATCH_IDX:
        cache_b = tl.load(CACHE_BATCH_IDX + b)
    else:
        cache_b = b

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                     # new-token index
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < seqlen_new
    mask = n_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    pos = tl.load(CACHE_SEQLENS + b) + offs_n                             # cache position

    p_k_new = K_NEW + b.to(tl.int64) * stride_knb + offs_n.to(tl.int64) * stride_kns + hk * stride_knh
    p_v_new = V_NEW + b.to(tl.int64) * stride_vnb + offs_n.to(tl.int64) * stride_vns + hk * stride_vnh
    if HAS_ROTARY:
        k = _load_rotated(p_k_new, pos, n_mask, offs_d, COS, SIN, stride_cos, seqlen_ro, ROTARY_DIM,
                          HEAD_DIM, INTERLEAVED)
    else:
        k = tl.load(p_k_new[:, None] + offs_d[None, :], mask=mask)
    v = tl.load(p_v_new[:, None] + offs_d[None, :], mask=mask)

    o_k = _cache_row_offsets(pos, b, cache_b, BLOCK_TABLE, stride_bt, stride_kcb, stride_kcs, n_mask,
                             PAGED, PAGE_SIZE) + hk * stride_kch
    o_v = _cache_row_offsets(pos, b, cache_b, BLOCK_TABLE, stride_bt, stride_vcb, stride_vcs, n_mask,
                             PAGED, PAGE_SIZE) + hk * stride_vch
    tl.store(K_CACHE + o_k[:, None] + offs_d[None, :], k.to(K_CACHE.dtype.element_ty), mask=mask)
    tl.store(V_CACHE + o_v[:, None] + offs_d[None, :], v.to(V_CACHE.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# Kernel 2: attention of the packed query rows over one split of the keys
# ----------------------------------------------------------------------------


@triton.jit
def _decode_fwd(
    Q, K, V, OUT, LSE, OUT_PART, LSE_PART,
    CACHE_SEQLENS, CACHE_BATCH_IDX, CACHE_LEFTPAD, BLOCK_TABLE, ALIBI, COS, SIN,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_bt, stride_alibi_b, stride_cos,
    batch, nheads_k, seqlen_q, seqlen_new, seqlen_cache,
    sm_scale, softcap, window_left, window_right, seqlen_ro, ROTARY_DIM, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr, ROTARY_PER_ROW: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // nheads_k
    hk = pid_bh % nheads_k
    nheads = nheads_k * GROUP

    # -- the keys this batch row may see: [kv_start, kv_end) in cache positions
    if HAS_SEQLENS:
        cache_len = tl.load(CACHE_SEQLENS + b)
        kv_end = cache_len + seqlen_new
    else:
        cache_len = seqlen_cache
        kv_end = seqlen_cache
    if HAS_LEFTPAD:
        kv_start = tl.load(CACHE_LEFTPAD + b)
    else:
        kv_start = 0
    if HAS_BATCH_IDX:
        cache_b = tl.load(CACHE_BATCH_IDX + b)
    else:
        cache_b = b

    # -- packed rows: row r = query position r // GROUP, head hk * GROUP + r % GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_m < GROUP * seqlen_q
    q_idx = offs_m // GROUP
    head = hk * GROUP + offs_m % GROUP
    d_mask = offs_d < HEAD_DIM
    diag = q_idx + kv_end - seqlen_q                                           # [BM] bottom-right

    p_q_rows = Q + b.to(tl.int64) * stride_qb + q_idx * stride_qs + head * stride_qh
    if HAS_ROTARY:
        if ROTARY_PER_ROW:
            q_pos = cache_len + q_idx
        else:
            q_pos = cache_len + q_idx * 0
        q = _load_rotated(p_q_rows, q_pos, row_valid, offs_d, COS, SIN, stride_cos, seqlen_ro,
                          ROTARY_DIM, HEAD_DIM, INTERLEAVED).to(Q.dtype.element_ty)
    else:
        q = tl.load(p_q_rows[:, None] + offs_d[None, :],
                    mask=row_valid[:, None] & d_mask[None, :], other=0.0)      # [BM, BD]
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    # -- the key range the M block can see, split evenly into num_splits runs of whole tiles
    lo = kv_start
    hi = kv_end
    if HAS_WINDOW_RIGHT:
        last_q = tl.minimum(pid_m * BLOCK_M + BLOCK_M, GROUP * seqlen_q) - 1
        hi = tl.minimum(hi, last_q // GROUP + kv_end - seqlen_q + window_right + 1)
    if HAS_WINDOW_LEFT:
        first_q = (pid_m * BLOCK_M) // GROUP
        lo = tl.maximum(lo, first_q + kv_end - seqlen_q - window_left)
    # tiles start at multiples of BLOCK_N: with PAGE_SIZE % BLOCK_N == 0 each lies in one page
    lo_tile = (lo // BLOCK_N) * BLOCK_N
    n_tiles = tl.maximum(tl.cdiv(hi - lo_tile, BLOCK_N), 0)
    tiles_per_split = tl.cdiv(n_tiles, num_splits)
    start = lo_tile + split * tiles_per_split * BLOCK_N
    end = tl.minimum(hi, start + tiles_per_split * BLOCK_N)
    MASK_LO: tl.constexpr = HAS_LEFTPAD or HAS_WINDOW_LEFT                   # lo may not be aligned

    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_alibi_b + head, mask=row_valid, other=0.0).to(tl.float32)
        slope = slope * LOG2E                                                  # [BM]
    qk_scale = sm_scale * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)                 # running max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                                # running sum
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if PAGED:
        pages = _tile_pages(BLOCK_TABLE, b, stride_bt, start, end, BLOCK_N, PAGE_SIZE)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)                                    # cache positions
        n_mask = offs_n < end
        if MASK_LO:
            n_mask = n_mask & (offs_n >= lo)
        if PAGED:
            row = (offs_n % PAGE_SIZE).to(tl.int64)
            o_k = pages * stride_kb + row * stride_ks + hk * stride_kh
            o_v = pages * stride_vb + row * stride_vs + hk * stride_vh
            pages = _tile_pages(BLOCK_TABLE, b, stride_bt, n0 + BLOCK_N, end, BLOCK_N, PAGE_SIZE)
        else:
            row = offs_n.to(tl.int64)
            o_k = cache_b.to(tl.int64) * stride_kb + row * stride_ks + hk * stride_kh
            o_v = cache_b.to(tl.int64) * stride_vb + row * stride_vs + hk * stride_vh
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + o_k[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)   # [BN, BD]
        v = tl.load(V + o_v[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)   # [BN, BD]

        if DOT_IN_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)             # [BM, BN] fp32
        if HAS_SOFTCAP:
            # softcap * tanh(s / softcap), tanh(x) = 1 - 2 / (exp(2x) + 1)
            s = qk * (sm_scale / softcap)
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s) + 1.0))
            s = s * LOG2E
        else:
            s = qk * qk_scale
        if HAS_ALIBI:
            dist = tl.abs(diag[:, None] - offs_n[None, :]).to(tl.float32)
            s = s - slope[:, None] * dist
        visible = n_mask[None, :]
        if HAS_WINDOW_RIGHT:
            visible = visible & (offs_n[None, :] <= diag[:, None] + window_right)
        if HAS_WINDOW_LEFT:
            visible = visible & (offs_n[None, :] >= diag[:, None] - window_left)
        s = tl.where(visible, s, float("-inf"))

        # online softmax; a row that has seen no key yet keeps m = -inf, so shift by 0 instead
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # P is rounded to the cache dtype as the tensor cores take it (a no-op for fp32)
        acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty).to(v.dtype), v,
                                            input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0                                                         # saw no key
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)

    out_mask = row_valid[:, None] & d_mask[None, :]
    if not SPLIT:
        p_out = OUT + b.to(tl.int64) * stride_ob + q_idx * stride_os + head * stride_oh
        tl.store(p_out[:, None] + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=out_mask)
        tl.store(LSE + (b * nheads + head).to(tl.int64) * seqlen_q + q_idx, lse, mask=row_valid)
    else:
        # partials: (num_splits, batch, nheads, seqlen_q) rows of HEAD_DIM fp32, contiguous
        row = ((split * batch + b) * nheads + head).to(tl.int64) * seqlen_q + q_idx
        tl.store(OUT_PART + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=out_mask)
        tl.store(LSE_PART + row, lse, mask=row_valid)


# ----------------------------------------------------------------------------
# Kernel 3: merge the splits by their log-sum-exps
# ----------------------------------------------------------------------------


@triton.jit
def _decode_combine(
    OUT_PART, LSE_PART, OUT, LSE,
    stride_ob, stride_os, stride_oh,
    n_rows, nheads, seqlen_q,
    NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)                                   # over (batch, nheads, seqlen_q)
    b = row // (nheads * seqlen_q)
    head = (row // seqlen_q) % nheads
    q_idx = row % seqlen_q
    offs_s = tl.arange(0, SPLITS_POW2)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    part_rows = offs_s.to(tl.int64) * n_rows + row

    lse_s = tl.load(LSE_PART + part_rows, mask=s_mask, other=float("-inf"))     # [S]
    m = tl.max(lse_s, 0)
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_shift)                                                  # [S]
    denom = tl.sum(w, 0)
    empty = denom == 0.0
    w = w / tl.where(empty, 1.0, denom)

    o_s = tl.load(OUT_PART + part_rows[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=s_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)  # [S, BD]
    out = tl.sum(w[:, None] * o_s, 0)
    lse = tl.where(empty, float("-inf"), m_shift + tl.log(tl.where(empty, 1.0, denom)))

    p_out = OUT + b.to(tl.int64) * stride_ob + q_idx * stride_os + head * stride_oh
    tl.store(p_out + offs_d, out.to(OUT.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(LSE + row, lse)


# ----------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return FALLBACK_SM_COUNT


def decode_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes and launch parameters of ``_decode_fwd``.

    Decoding is bound by reading K and V: a K+V tile of about 32 KB per
    iteration (BLOCK_N = 64 keys at d = 128 in bf16) and num_stages - 1 tiles in
    flight keep the memory system busy while leaving room for two programs per
    SM. The M tile holds the packed query rows (mostly padding at seqlen_q = 1).
    """
    block_d = block_d_of(head_dim)
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=1)
    elem = torch.finfo(dtype).bits // 8
    block_n = max(16, min(128, 32768 // (2 * block_d * elem)))
    return dict(BLOCK_M=16, BLOCK_N=block_n, num_warps=4, num_stages=4)


@functools.lru_cache(maxsize=1024)
def num_splits_heuristic(batch: int, nheads_k: int, num_m_blocks: int, seqlen_cache: int,
                         block_n: int, device: torch.device, ctas_per_sm: int = 2) -> int:
    """How many splits of the keys to run, from shapes only (no device values).

    Without splits there are ``batch * nheads_k * num_m_blocks`` programs; when
    they do not fill ``ctas_per_sm`` waves of the SMs, split the keys so that
    they do, choosing the fewest splits within 95% of the best wave efficiency
    (FA2's rule, stricter), with at least 4 key tiles per split. Cached: it
    runs on every decoding step. ``seqlen_cache`` is the
    cache capacity, not the filled length, so the choice is graph-safe.
    """
    slots = _sm_count(device) * ctas_per_sm
    base = batch * nheads_k * num_m_blocks
    n_tiles = cdiv(max(seqlen_cache, 1), block_n)
    max_splits = max(1, min(MAX_SPLITS, n_tiles // 4))
    if base >= 0.8 * slots or max_splits == 1:
        return 1
    effs = []
    for s in range(1, max_splits + 1):
        n_waves = math.ceil(base * s / slots)
        effs.append(base * s / (n_waves * slots))
    best = max(effs)
    for s, eff in enumerate(effs, start=1):
        if eff >= 0.95 * best:
            return s
    return 1


def decode_attention(q, k_cache, v_cache, *, k_new=None, v_new=None, cache_seqlens=None,
                     cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale,
                     window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
                     rotary_cos=None, rotary_sin=None, rotary_interleaved=True,
                     rotary_per_row=False, num_splits=0, config=None):
    """Append ``k_new``/``v_new`` into the cache, then attend; returns ``(out, lse)``.

    Arguments are already checked and normalized by :mod:`ioattn.kvcache`:
    q ``(b, sq, hq, d)``; caches ``(batch_cache, seqlen_cache, hk, d)`` or, with
    ``block_table`` ``(b, max_blocks)`` int32, ``(num_blocks, page_size, hk, d)``;
    ``cache_seqlens`` int32 ``(b,)`` or None (the whole cache is valid);
    ``cache_batch_idx``/``cache_leftpad`` int32 ``(b,)`` or None; ``alibi_slopes``
    fp32 ``(b, hq)`` or None; rotary cos/sin ``(seqlen_ro, rotary_dim / 2)``.
    ``rotary_per_row``: q's rotary position is ``cache_seqlens + i`` (causal /
    local) rather than ``cache_seqlens`` for every query (FA2's convention).
    Returns out ``(b, sq, hq, d)`` in q's dtype and lse ``(b, hq, sq)`` fp32.
    """
    batch, seqlen_q, nheads, head_dim = q.shape
    nheads_k = k_cache.shape[2]
    group = nheads // nheads_k
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 1
    seqlen_cache = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    device = q.device
    block_d = block_d_of(head_dim)
    cfg = dict(decode_config(head_dim, q.dtype, device))
    if config:
        cfg.update(config)
    dummy = q  # stands in for absent optional pointers; never read
    has_rotary = rotary_cos is not None
    rotary_dim = 2 * rotary_cos.shape[1] if has_rotary else 0
    stride_cos = rotary_cos.stride(0) if has_rotary else 0
    seqlen_ro = rotary_cos.shape[0] if has_rotary else 1
    seqlen_new = 0

    if k_new is not None:
        seqlen_new = k_new.shape[1]
        block_n_append = 16
        grid = (cdiv(seqlen_new, block_n_append), batch * nheads_k)
        _append_kv[grid](
            k_new, v_new, k_cache, v_cache, cache_seqlens,
            cache_batch_idx if cache_batch_idx is not None else dummy,
            block_table if paged else dummy,
            rotary_cos if has_rotary else dummy, rotary_sin if has_rotary else dummy,
            *k_new.stride()[:3], *v_new.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
            block_table.stride(0) if paged else 0, stride_cos,
            seqlen_new, nheads_k, seqlen_ro, rotary_dim,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n_append,
            PAGED=paged, PAGE_SIZE=page_size, HAS_BATCH_IDX=cache_batch_idx is not None,
            HAS_ROTARY=has_rotary, INTERLEAVED=rotary_interleaved,
        )

    block_m = min(64, max(cfg["BLOCK_M"], next_pow2(group * seqlen_q)))
    num_m_blocks = cdiv(group * seqlen_q, block_m)
    if num_splits <= 0:
        num_splits = num_splits_heuristic(batch, nheads_k, num_m_blocks, seqlen_cache, cfg["BLOCK_N"],
                                          device)
    num_splits = max(1, min(num_splits, MAX_SPLITS))

    out = _new_buffer((batch, seqlen_q, nheads, head_dim), q.dtype, device)
    # one fp32 allocation for lse and the splits' partials (fewer host-side calls per step)
    n_rows = batch * nheads * seqlen_q
    n_part = n_rows * num_splits if num_splits > 1 else 0
    workspace = _new_buffer((n_rows + n_part * (1 + head_dim),), torch.float32, device)
    lse = workspace[:n_rows].view(batch, nheads, seqlen_q)
    if num_splits > 1:
        lse_part = workspace[n_rows:n_rows + n_part]
        out_part = workspace[n_rows + n_part:]
    else:
        out_part, lse_part = out, lse
    grid = (num_m_blocks, batch * nheads_k, num_splits)
    _decode_fwd[grid](
        q, k_cache, v_cache, out, lse, out_part, lse_part,
        cache_seqlens if cache_seqlens is not None else dummy,
        cache_batch_idx if cache_batch_idx is not None else dummy,
        cache_leftpad if cache_leftpad is not None else dummy,
        block_table if paged else dummy,
        alibi_slopes if alibi_slopes is not None else dummy,
        rotary_cos if has_rotary else dummy, rotary_sin if has_rotary else dummy,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *out.stride()[:3],
        block_table.stride(0) if paged else 0,
        alibi_slopes.stride(0) if alibi_slopes is not None else 0, stride_cos,
        batch, nheads_k, seqlen_q, seqlen_new, seqlen_cache,
        softmax_scale, softcap, window_left, window_right, seqlen_ro, rotary_dim, num_splits,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], SPLIT=num_splits > 1,
        PAGED=paged, PAGE_SIZE=page_size,
        HAS_SEQLENS=cache_seqlens is not None, HAS_BATCH_IDX=cache_batch_idx is not None,
        HAS_LEFTPAD=cache_leftpad is not None,
        HAS_WINDOW_LEFT=window_left >= 0, HAS_WINDOW_RIGHT=window_right >= 0,
        HAS_SOFTCAP=softcap > 0.0, HAS_ALIBI=alibi_slopes is not None,
        HAS_ROTARY=has_rotary, INTERLEAVED=rotary_interleaved, ROTARY_PER_ROW=rotary_per_row,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # Triton 3.6's interpreter multiplies bf16 as raw uint16 bits: upcast the operands there
        # (exact: bf16 values are fp32 values, and products accumulate in fp32 either way).
        DOT_IN_FP32=q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if num_splits > 1:
        _decode_combine[(n_rows,)](
            out_part, lse_part, out, lse, *out.stride()[:3], n_rows, nheads, seqlen_q,
            NUM_SPLITS=num_splits, SPLITS_POW2=max(2, next_pow2(num_splits)),
            HEAD_DIM=head_dim, BLOCK_D=block_d, num_warps=4,
        )
    return out, lse
