"""FlashAttention in plain PyTorch, block by block: the CPU path.

This module runs the same algorithm as the Triton kernels, written so that it
can be read top to bottom:

* **Forward** (:func:`attention_forward`): for each block of ``BLOCK_M`` query
  rows, stream blocks of ``BLOCK_N`` keys/values and keep an *online softmax*:
  a running row maximum ``m`` and running sum ``l``.  When a new block raises
  the maximum, the accumulator and ``l`` are rescaled by ``exp(m_old - m_new)``;
  the division by ``l`` happens once, at the end (FlashAttention-2).  Only the
  log-sum-exp ``lse = m + log(l)`` is kept for the backward pass.
* **Backward** (:func:`attention_backward`): *recomputation*.  For each tile the
  scores and probabilities are recomputed from Q, K and ``lse``
  (``P = exp(S - lse)``), so the ``(seqlen_q, seqlen_k)`` matrices never exist.

Tiles are vectorized over batch and heads: a score tile has shape
``[b, h, BM, BN]``, so memory is O(BLOCK_M * BLOCK_N) per (batch, head) and
O(N) overall.  Everything is computed in float32 (float64 for float64 inputs).

Masks are aligned to the bottom-right corner: query ``i`` sees key ``j`` when
``i + sk - sq - window_left <= j <= i + sk - sq + window_right`` (a negative
bound is unlimited; causal is ``window_right = 0``).  A query row that sees no
key gets output 0, ``lse = -inf`` and zero gradients.

Dropout draws one boolean keep-mask per tile ``(batch, q-block, k-block)``
(all heads at once) from a ``torch.Generator`` seeded from
``(seed, offset, batch, q-block, k-block)``, so the backward pass, and
:func:`dropout_keep_mask` for the reference, regenerate exactly the same mask.

The signatures are the internal contract of ``docs/ARCHITECTURE.md``, shared
with ``kernels/forward.py`` and ``kernels/backward.py``.
"""

from __future__ import annotations


import torch

from .reference import gather_pages

# Tile sizes.  Read at call time, so tests may shrink them to exercise many tiles;
# dropout_keep_mask uses the same values as the forward/backward passes.
BLOCK_M = 128  # query rows per tile
BLOCK_N = 128  # key columns per tile

_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------
# Tile helpers shared by the forward and backward passes
# ----------------------------------------------------------------------------

def _key_range(m_start: int, m_end: int, seqlen_q: int, seqlen_k: int,
               window_left: int, window_right: int) -> tuple[int, int]:
    """Keys ``[lo, hi)`` that at least one query row of ``[m_start, m_end)`` may see."""
    shift = seqlen_k - seqlen_q  # bottom-right alignment: row i's diagonal is key i + shift
    lo, hi = 0, seqlen_k
    if window_left >= 0:
        lo = max(lo, m_start + shift - window_left)
    if window_right >= 0:
        hi = min(hi, m_end - 1 + shift + window_right + 1)
    return lo, hi


def _key_blocks(m_start, m_end, seqlen_q, seqlen_k, window_left, window_right, block_n):
    """Yield ``(n_block, n_start, n_end)`` for key blocks that intersect the window.

    Blocks stay aligned to multiples of ``block_n`` (the dropout mask is drawn
    per aligned tile); blocks entirely outside the window are skipped.
    """
    lo, hi = _key_range(m_start, m_end, seqlen_q, seqlen_k, window_left, window_right)
    if hi <= lo:
        return  # no row of this block sees any key
    for n_start in range(lo - lo % block_n, hi, block_n):
        yield n_start // block_n, n_start, min(n_start + block_n, seqlen_k)


def _scores(q_blk, k_blk, m_start, n_start, seqlen_q, seqlen_k, *, scale, softcap,
            slopes, window_left, window_right):
    """Scores of one tile, after softcap, ALiBi and masking.

    q_blk ``[b, h, BM, d]``, k_blk ``[b, h, BN, d]`` (already expanded to the
    query heads), slopes ``[b, h]`` or None.

    Returns ``(s, tanh_s)``: s ``[b, h, BM, BN]`` with ``-inf`` where masked;
    tanh_s is ``tanh(scale * q k^T / softcap)`` (for the softcap gradient) or None.
    """
    block_m, block_n = q_blk.shape[2], k_blk.shape[2]
    s = torch.matmul(q_blk, k_blk.transpose(-1, -2)) * scale  # [b, h, BM, BN]
    tanh_s = None
    if softcap > 0:
        # s = softcap * tanh(s / softcap): bounded scores (Gemma-2, Grok)
        tanh_s = torch.tanh(s / softcap)
        s = softcap * tanh_s

    shift = seqlen_k - seqlen_q
    rows = torch.arange(m_start, m_start + block_m, device=s.device).view(-1, 1)  # [BM, 1]
    cols = torch.arange(n_start, n_start + block_n, device=s.device).view(1, -1)  # [1, BN]
    diag = rows + shift  # the key on each row's (bottom-right aligned) diagonal
    if slopes is not None:
        # ALiBi: -slope * |i + sk - sq - j|, added after the softcap
        dist = (diag - cols).abs().to(s.dtype)  # [BM, BN]
        s = s - slopes.to(s.dtype)[:, :, None, None] * dist

    # Only tiles that cross a window edge need a mask.
    last_row, last_col = m_start + block_m - 1, n_start + block_n - 1
    inside_right = window_right < 0 or last_col <= m_start + shift + window_right
    inside_left = window_left < 0 or n_start >= last_row + shift - window_left
    if not (inside_right and inside_left):
        visible = torch.ones(block_m, block_n, dtype=torch.bool, device=s.device)  # [BM, BN]
        if window_right >= 0:
            visible &= cols <= diag + window_right
        if window_left >= 0:
            visible &= cols >= diag - window_left
        s = s.masked_fill(~visible, float("-inf"))
    return s, tanh_s


def _expand_kv(x_blk: torch.Tensor, nheads_q: int) -> torch.Tensor:
    """``[b, hk, BN, d]`` -> ``[b, hq, BN, d]``: GQA/MQA, each KV head serves hq // hk query heads."""
    hk = x_blk.shape[1]
    return x_blk if hk == nheads_q else x_blk.repeat_interleave(nheads_q // hk, dim=1)


def _sum_groups(x_blk: torch.Tensor, nheads_k: int) -> torch.Tensor:
    """``[b, hq, BN, d]`` -> ``[b, hk, BN, d]``: sum a KV head's gradient over its query heads."""
    b, hq, n, d = x_blk.shape
    return x_blk if hq == nheads_k else x_blk.view(b, nheads_k, hq // nheads_k, n, d).sum(2)


# ----------------------------------------------------------------------------
# Dropout: one reproducible mask per tile
# ----------------------------------------------------------------------------

def _splitmix64(x: int) -> int:
    """A 64-bit integer mixer (splitmix64 finalizer): nearby inputs -> unrelated outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _tile_seed(seed: int, offset: int, batch_idx: int, m_block: int, n_block: int) -> int:
    x = 0
    for value in (seed, offset, batch_idx, m_block, n_block):
        x = _splitmix64(x ^ (value & _MASK64))
    return x >> 1  # 63 bits: a valid torch.Generator seed


def _dropout_tile(seed, offset, batch_idx, m_block, n_block, nheads, dropout_p):
    """Keep-mask of one full ``(nheads, BLOCK_M, BLOCK_N)`` tile (CPU), True with prob ``1 - p``.

    The tile is always drawn at full size and cropped by the caller, so a tile's
    mask does not depend on the sequence lengths.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_tile_seed(seed, offset, batch_idx, m_block, n_block))
    return torch.rand(nheads, BLOCK_M, BLOCK_N, generator=gen) >= dropout_p


def _dropout_tiles(rng, batch_ids, m_block, n_block, nheads, block_m, block_n, dropout_p, device):
    """Keep-mask ``[b, h, BM, BN]`` of one tile for every batch element in ``batch_ids``."""
    seed, offset = rng
    keep = torch.stack([_dropout_tile(seed, offset, bi, m_block, n_block, nheads, dropout_p)
                        for bi in batch_ids])
    return keep[:, :, :block_m, :block_n].to(device)


def dropout_keep_mask(batch_idx: int, nheads: int, seqlen_q: int, seqlen_k: int,
                      rng_state: torch.Tensor, dropout_p: float, device=None) -> torch.Tensor:
    """The boolean keep-mask ``(1, nheads, seqlen_q, seqlen_k)`` used for batch element ``batch_idx``.

    For the reference to replay (``attention_ref(..., dropout_mask=...)``); for
    varlen, ``batch_idx`` is the sequence index.  Materializes the full matrix:
    testing only.
    """
    rng = tuple(int(x) for x in rng_state.tolist())
    mask = torch.zeros(1, nheads, seqlen_q, seqlen_k, dtype=torch.bool)
    for m_start in range(0, seqlen_q, BLOCK_M):
        m_end = min(m_start + BLOCK_M, seqlen_q)
        for n_start in range(0, seqlen_k, BLOCK_N):
            n_end = min(n_start + BLOCK_N, seqlen_k)
            tile = _dropout_tile(*rng, batch_idx, m_start // BLOCK_M, n_start // BLOCK_N,
                                 nheads, dropout_p)
            mask[0, :, m_start:m_end, n_start:n_end] = tile[:, :m_end - m_start, :n_end - n_start]
    return mask.to(device)


# ----------------------------------------------------------------------------
# Dense (batch, seqlen, heads, dim) passes
# ----------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_dense(q, k, v, *, scale, window_left, window_right, softcap, slopes,
                   dropout_p, rng, batch_ids):
    """q ``(b, sq, hq, d)``, k ``(b, sk, hk, d)``, v ``(b, sk, hk, dv)``, slopes ``(b, hq)`` or None.

    Returns out ``(b, sq, hq, dv)`` in q's dtype and lse ``(b, hq, sq)`` float32.
    """
    b, seqlen_q, nheads, _ = q.shape
    seqlen_k, dim_v = k.shape[1], v.shape[-1]
    acc_dtype = _compute_dtype(q.dtype)
    block_m, block_n = BLOCK_M, BLOCK_N
    q_t = q.transpose(1, 2)  # [b, hq, sq, d]
    k_t = k.transpose(1, 2)  # [b, hk, sk, d]
    v_t = v.transpose(1, 2)  # [b, hk, sk, dv]
    out = torch.empty(b, seqlen_q, nheads, dim_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, nheads, seqlen_q, dtype=torch.float32, device=q.device)
    neg_inf = float("-inf")

    for m_start in range(0, seqlen_q, block_m):
        m_end = min(m_start + block_m, seqlen_q)
        q_blk = q_t[:, :, m_start:m_end].to(acc_dtype)  # [b, h, BM, d]
        rows = m_end - m_start
        m_i = torch.full((b, nheads, rows), neg_inf, dtype=acc_dtype, device=q.device)  # running max
        l_i = torch.zeros(b, nheads, rows, dtype=acc_dtype, device=q.device)  # running sum
        acc = torch.zeros(b, nheads, rows, dim_v, dtype=acc_dtype, device=q.device)  # [b, h, BM, dv]

        for n_block, n_start, n_end in _key_blocks(m_start, m_end, seqlen_q, seqlen_k,
                                                   window_left, window_right, block_n):
            k_blk = _expand_kv(k_t[:, :, n_start:n_end].to(acc_dtype), nheads)  # [b, h, BN, d]
            v_blk = _expand_kv(v_t[:, :, n_start:n_end].to(acc_dtype), nheads)  # [b, h, BN, dv]
            s, _ = _scores(q_blk, k_blk, m_start, n_start, seqlen_q, seqlen_k, scale=scale,
                           softcap=softcap, slopes=slopes, window_left=window_left,
                           window_right=window_right)  # [b, h, BM, BN]

            # Online softmax: new running max; rows that have seen nothing yet keep -inf,
            # and use 0 as the exponent base so that exp(-inf - base) = 0, never NaN.
            m_new = torch.maximum(m_i, s.amax(dim=-1))  # [b, h, BM]
            m_base = m_new.masked_fill(m_new == neg_inf, 0.0)
            alpha = torch.exp(m_i - m_base)  # rescales what was accumulated under the old max
            p = torch.exp(s - m_base[..., None])  # [b, h, BM, BN], un-normalized probabilities
            l_i = l_i * alpha + p.sum(dim=-1)  # the normalizer ignores dropout (as FA2)
            if dropout_p > 0:
                keep = _dropout_tiles(rng, batch_ids, m_start // block_m, n_block, nheads,
                                      rows, n_end - n_start, dropout_p, q.device)
                p = p * keep / (1.0 - dropout_p)  # [b, h, BM, BN]
            acc = acc * alpha[..., None] + torch.matmul(p, v_blk)  # [b, h, BM, dv]
            m_i = m_new

        # Deferred normalization: divide by l once.  l >= 1 for any row that saw a key
        # (its max contributes exp(0)); l == 0 marks a row with no visible key.
        seen = l_i > 0  # [b, h, BM]
        out_blk = acc / torch.where(seen, l_i, 1.0)[..., None]  # [b, h, BM, dv]
        out[:, m_start:m_end] = out_blk.transpose(1, 2).to(q.dtype)
        lse[:, :, m_start:m_end] = torch.where(seen, m_i + torch.log(l_i), neg_inf).float()

    return out, lse


def _backward_dense(dout, q, k, v, out, lse, *, scale, window_left, window_right, softcap,
                    slopes, dropout_p, rng, batch_ids, dlse=None):
    """Gradients by recomputation; shapes as in :func:`_forward_dense`. ``dlse`` (lse's
    shape, or None): the gradient of the log-sum-exp, which d lse / d s = P folds into delta.

    Returns dq ``(b, sq, hq, d)``, dk ``(b, sk, hk, d)``, dv ``(b, sk, hk, dv)`` in the inputs' dtypes.
    """
    b, seqlen_q, nheads, _ = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    acc_dtype = _compute_dtype(q.dtype)
    block_m, block_n = BLOCK_M, BLOCK_N
    q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, h, s, d]
    do_t, o_t = dout.transpose(1, 2), out.transpose(1, 2)  # [b, hq, sq, dv]
    dq = torch.zeros(q_t.shape, dtype=acc_dtype, device=q.device)  # [b, hq, sq, d]
    dk = torch.zeros(k_t.shape, dtype=acc_dtype, device=q.device)  # [b, hk, sk, d]
    dv = torch.zeros(v_t.shape, dtype=acc_dtype, device=q.device)  # [b, hk, sk, dv]

    for m_start in range(0, seqlen_q, block_m):
        m_end = min(m_start + block_m, seqlen_q)
        rows = m_end - m_start
        q_blk = q_t[:, :, m_start:m_end].to(acc_dtype)  # [b, h, BM, d]
        do_blk = do_t[:, :, m_start:m_end].to(acc_dtype)  # [b, h, BM, dv]
        # delta = rowsum(dO * O) = rowsum(P * dP): the softmax Jacobian's correction term
        delta = (do_blk * o_t[:, :, m_start:m_end].to(acc_dtype)).sum(dim=-1)  # [b, h, BM]
        if dlse is not None:  # lse's own gradient: dS += P * dlse, i.e. delta -= dlse
            delta = delta - dlse[:, :, m_start:m_end].to(acc_dtype)
        lse_blk = lse[:, :, m_start:m_end].to(acc_dtype)  # [b, h, BM]
        # Rows with no visible key (lse = -inf) have s = -inf everywhere: base 0 gives p = 0.
        lse_blk = lse_blk.masked_fill(lse_blk == float("-inf"), 0.0)
        dq_blk = torch.zeros_like(q_blk)  # [b, h, BM, d]

        for n_block, n_start, n_end in _key_blocks(m_start, m_end, seqlen_q, seqlen_k,
                                                   window_left, window_right, block_n):
            k_blk = _expand_kv(k_t[:, :, n_start:n_end].to(acc_dtype), nheads)  # [b, h, BN, d]
            v_blk = _expand_kv(v_t[:, :, n_start:n_end].to(acc_dtype), nheads)  # [b, h, BN, dv]
            # Recompute the probabilities from the saved log-sum-exp.
            s, tanh_s = _scores(q_blk, k_blk, m_start, n_start, seqlen_q, seqlen_k, scale=scale,
                                softcap=softcap, slopes=slopes, window_left=window_left,
                                window_right=window_right)  # [b, h, BM, BN]
            p = torch.exp(s - lse_blk[..., None])  # [b, h, BM, BN], normalized

            dp = torch.matmul(do_blk, v_blk.transpose(-1, -2))  # dP = dO V^T  [b, h, BM, BN]
            if dropout_p > 0:
                keep = _dropout_tiles(rng, batch_ids, m_start // block_m, n_block, nheads,
                                      rows, n_end - n_start, dropout_p, q.device)
                p_drop = p * keep / (1.0 - dropout_p)
                dp = dp * keep / (1.0 - dropout_p)  # gradient flows only through kept entries
            else:
                p_drop = p
            dv_blk = torch.matmul(p_drop.transpose(-1, -2), do_blk)  # dV += Pdrop^T dO  [b, h, BN, dv]

            ds = p * (dp - delta[..., None])  # softmax backward  [b, h, BM, BN]
            if softcap > 0:
                ds = ds * (1.0 - tanh_s * tanh_s)  # d/dx softcap * tanh(x / softcap)
            dq_blk += scale * torch.matmul(ds, k_blk)  # dQ += scale * dS K  [b, h, BM, d]
            dk_blk = scale * torch.matmul(ds.transpose(-1, -2), q_blk)  # [b, h, BN, d]
            dk[:, :, n_start:n_end] += _sum_groups(dk_blk, nheads_k)
            dv[:, :, n_start:n_end] += _sum_groups(dv_blk, nheads_k)

        dq[:, :, m_start:m_end] = dq_blk

    # back to the (batch, seqlen, heads, dim) layout, contiguous, in the inputs' dtypes
    return tuple(g.transpose(1, 2).to(x.dtype).contiguous()
                 for g, x in ((dq, q), (dk, k), (dv, v)))


# ----------------------------------------------------------------------------
# The contract: dense and varlen
# ----------------------------------------------------------------------------

def _options(q, softmax_scale, alibi_slopes, dropout_p, rng_state, batch):
    """Resolve the scale, give ALiBi slopes the shape ``(batch, hq)`` and read the RNG state."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    slopes = None
    if alibi_slopes is not None:
        nheads = q.shape[-2]
        slopes = alibi_slopes.to(torch.float32)
        slopes = slopes.view(1, nheads).expand(batch, nheads) if slopes.dim() == 1 else slopes
    rng = None
    if dropout_p > 0:
        if rng_state is None:
            raise ValueError("dropout_p > 0 needs rng_state (seed, offset)")
        rng = tuple(int(x) for x in rng_state.tolist())
    return scale, slopes, rng


def _varlen_sequences(cu_seqlens_q, cu_seqlens_k):
    """Yield ``(i, q_start, q_end, k_start, k_end)`` for each sequence of a packed batch."""
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cu_q) - 1):
        yield i, cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]


# (inside torch.autocast, this path's own products keep its precision: autocast is for the caller's
# q, k, v, which interface casts; _compute_dtype decides here)
@torch.autocast("cpu", enabled=False)
def attention_forward(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                      max_seqlen_k=None, softmax_scale=None, window_left=-1, window_right=-1,
                      softcap=0.0, alibi_slopes=None, dropout_p=0.0, rng_state=None,
                      block_table=None):
    """Attention forward pass; returns ``(out, lse)``.

    Dense: q ``(b, sq, hq, d)``, k/v ``(b, sk, hk, d)`` (v's head dim ``dv`` may differ: out has
    it); lse ``(b, hq, sq)`` float32.
    Varlen (``cu_seqlens_*`` int32 ``(b + 1,)``): q ``(total_q, hq, d)``,
    k/v ``(total_k, hk, d)``, or paged ``(num_pages, page_size, hk, d)`` with
    ``block_table``; lse ``(hq, total_q)`` float32.
    ``max_seqlen_*`` are accepted for the shared contract and not needed here.
    """
    common = dict(window_left=window_left, window_right=window_right, softcap=softcap,
                  dropout_p=dropout_p)
    if cu_seqlens_q is None:
        scale, slopes, rng = _options(q, softmax_scale, alibi_slopes, dropout_p, rng_state,
                                      q.shape[0])
        return _forward_dense(q, k, v, scale=scale, slopes=slopes, rng=rng,
                              batch_ids=range(q.shape[0]), **common)

    if block_table is not None:  # paged k/v (num_pages, page_size, hk, d): gathered, packed
        k, v = (gather_pages(x, block_table, cu_seqlens_k) for x in (k, v))
    batch = cu_seqlens_q.numel() - 1
    scale, slopes, rng = _options(q, softmax_scale, alibi_slopes, dropout_p, rng_state, batch)
    total_q, nheads = q.shape[0], q.shape[1]
    out = torch.zeros(total_q, nheads, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((nheads, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    for i, q0, q1, k0, k1 in _varlen_sequences(cu_seqlens_q, cu_seqlens_k):
        if q1 == q0:
            continue
        out_i, lse_i = _forward_dense(
            q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], scale=scale,
            slopes=None if slopes is None else slopes[i:i + 1], rng=rng, batch_ids=[i], **common)
        out[q0:q1] = out_i[0]
        lse[:, q0:q1] = lse_i[0]
    return out, lse


@torch.autocast("cpu", enabled=False)
def attention_backward(dout, q, k, v, out, lse, *, cu_seqlens_q=None, cu_seqlens_k=None,
                       max_seqlen_q=None, max_seqlen_k=None, softmax_scale=None, window_left=-1,
                       window_right=-1, softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                       rng_state=None, dlse=None, deterministic=False):
    """Attention backward pass by recomputation; returns ``(dq, dk, dv)`` shaped like q, k, v.

    Same layouts and keyword arguments as :func:`attention_forward`; ``out`` and
    ``lse`` are what it returned, ``dout`` has out's shape, ``dlse`` (lse's shape, or
    None) is the gradient of the returned lse.
    """
    common = dict(window_left=window_left, window_right=window_right, softcap=softcap,
                  dropout_p=dropout_p)
    if cu_seqlens_q is None:
        scale, slopes, rng = _options(q, softmax_scale, alibi_slopes, dropout_p, rng_state,
                                      q.shape[0])
        return _backward_dense(dout, q, k, v, out, lse, scale=scale, slopes=slopes, rng=rng,
                               batch_ids=range(q.shape[0]), dlse=dlse, **common)

    batch = cu_seqlens_q.numel() - 1
    scale, slopes, rng = _options(q, softmax_scale, alibi_slopes, dropout_p, rng_state, batch)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i, q0, q1, k0, k1 in _varlen_sequences(cu_seqlens_q, cu_seqlens_k):
        if q1 == q0 or k1 == k0:
            continue  # nothing attends: gradients stay zero
        dq_i, dk_i, dv_i = _backward_dense(
            dout[None, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], out[None, q0:q1],
            lse[None, :, q0:q1], scale=scale, slopes=None if slopes is None else slopes[i:i + 1],
            rng=rng, batch_ids=[i], dlse=None if dlse is None else dlse[None, :, q0:q1], **common)
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = dq_i[0], dk_i[0], dv_i[0]
    return dq, dk, dv
