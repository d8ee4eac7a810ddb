"""Reference attention in plain PyTorch.

Two kinds of reference live here:

* :func:`standard_attention` is the algorithm as the seed describes it:
  ``S = Q Kᵀ``, ``P = softmax(S)``, ``O = P V``, each an N×N tensor in memory.
  It runs in the inputs' dtype and is what the demo and the benchmark compare
  against for speed and memory.
* :func:`attention_ref` takes every option of the public API and, by default,
  computes in float64.  Tests compare the kernels against it; with
  ``upcast=False`` it computes in the inputs' dtype, which tells the tests how
  much error plain low-precision PyTorch makes on the same inputs.

All tensors use the FlashAttention layout ``(batch, seqlen, nheads, headdim)``.
A query row that sees no key has output 0 and log-sum-exp ``-inf``.
"""

from __future__ import annotations


import torch


def visible_mask(seqlen_q: int, seqlen_k: int, causal: bool = False, window_size=(-1, -1),
                 device=None) -> torch.Tensor:
    """Boolean ``(seqlen_q, seqlen_k)`` mask of the keys each query may see.

    Causal masks and windows are aligned to the bottom-right corner: query ``i``
    sees key ``j`` when ``i + sk - sq - left <= j <= i + sk - sq + right``, where a
    negative ``left``/``right`` means unlimited and ``causal`` sets ``right = 0``.
    """
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device).view(-1, 1)
    j = torch.arange(seqlen_k, device=device).view(1, -1)
    diag = i + seqlen_k - seqlen_q
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        mask &= j <= diag + right
    if left >= 0:
        mask &= j >= diag - left
    return mask


def alibi_bias(alibi_slopes: torch.Tensor, batch: int, nheads: int, seqlen_q: int, seqlen_k: int,
               dtype=torch.float64) -> torch.Tensor:
    """ALiBi bias ``-slope * |i + sk - sq - j|`` of shape ``(batch, nheads, sq, sk)``."""
    slopes = alibi_slopes.to(dtype)
    if slopes.dim() == 1:
        slopes = slopes.view(1, nheads).expand(batch, nheads)
    i = torch.arange(seqlen_q, device=slopes.device).view(-1, 1)
    j = torch.arange(seqlen_k, device=slopes.device).view(1, -1)
    dist = (i + seqlen_k - seqlen_q - j).abs().to(dtype)
    return -slopes.view(batch, nheads, 1, 1) * dist


def _repeat_kv(x: torch.Tensor, nheads_q: int) -> torch.Tensor:
    """(b, s, hk, d) -> (b, s, hq, d): each KV head serves nheads_q // hk query heads."""
    hk = x.shape[2]
    if hk == nheads_q:
        return x
    return x.repeat_interleave(nheads_q // hk, dim=2)


def attention_ref(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                  alibi_slopes=None, dropout_p=0.0, dropout_mask=None, sinks=None, upcast=True):
    """Attention with every option of :func:`ioattn.flash_attn_func`, materialized.

    Args:
        q: ``(b, sq, hq, d)``; k, v: ``(b, sk, hk, d)`` and ``(b, sk, hk, dv)``, ``hq % hk == 0``.
        dropout_mask: boolean ``(b, hq, sq, sk)``, True where a probability is
            kept; required when ``dropout_p > 0`` (the reference has no RNG of
            its own, it replays the kernel's mask).
        sinks: ``(hq,)`` logits of an extra "sink" key per head that takes part in the
            softmax and contributes no value (GPT-OSS's attention sinks), or None.
        upcast: compute in float64 (True) or in the inputs' dtype (False).

    Returns:
        ``(out, lse)``: out ``(b, sq, hq, dv)`` in float64 (or the inputs' dtype),
        lse ``(b, hq, sq)`` in float64 (or float32), natural log.
    """
    dtype = torch.float64 if upcast else q.dtype
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    qf = q.to(dtype)
    kf = _repeat_kv(k, hq).to(dtype)
    vf = _repeat_kv(v, hq).to(dtype)
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, b, hq, sq, sk, dtype=dtype)
    mask = visible_mask(sq, sk, causal, window_size, device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:  # one more logit per row; its probability multiplies no value
        sink = sinks.to(scores.dtype).view(1, hq, 1, 1).expand(b, hq, sq, 1)
        scores = torch.cat([scores, sink], dim=-1)
    lse = torch.logsumexp(scores.float() if not upcast else scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows that see no key
    if sinks is not None:
        probs = probs[..., :sk]
    if dropout_p > 0.0:
        if dropout_mask is None:
            raise ValueError("attention_ref needs dropout_mask when dropout_p > 0")
        probs = probs.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vf)
    return out, lse


def attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, *, alibi_slopes=None,
                         dropout_masks=None, **kwargs):
    """Varlen reference: :func:`attention_ref` run on each sequence of a packed batch.

    q: ``(total_q, hq, d)``; k, v: ``(total_k, hk, d)`` and ``(total_k, hk, dv)``; cu_seqlens: int32
    prefix sums.
    ``dropout_masks`` is a list with one ``(1, hq, sq_i, sk_i)`` mask per sequence.
    Returns ``(out, lse)`` with out ``(total_q, hq, dv)`` and lse ``(hq, total_q)``.
    """
    cu_q = cu_seqlens_q.tolist()
    cu_k = cu_seqlens_k.tolist()
    outs, lses = [], []
    for i in range(len(cu_q) - 1):
        qi = q[cu_q[i]:cu_q[i + 1]].unsqueeze(0)
        ki = k[cu_k[i]:cu_k[i + 1]].unsqueeze(0)
        vi = v[cu_k[i]:cu_k[i + 1]].unsqueeze(0)
        slopes = alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[i]
        mask = None if dropout_masks is None else dropout_masks[i]
        o, lse = attention_ref(qi, ki, vi, alibi_slopes=slopes, dropout_mask=mask, **kwargs)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, -1)


def gather_pages(cache, block_table, cu_seqlens_k):
    """A paged cache ``(num_pages, page_size, h, d)`` as a packed ``(total_k, h, d)`` tensor:
    key ``j`` of sequence ``b`` is ``cache[block_table[b, j // page_size], j % page_size]``,
    sequence ``b`` having ``cu_seqlens_k[b + 1] - cu_seqlens_k[b]`` keys. Reads the values
    on the host (CPU path, tests, ``return_attn_probs``)."""
    page_size = cache.shape[1]
    lens = torch.diff(cu_seqlens_k).tolist()
    parts = []
    for b, n in enumerate(lens):
        pos = torch.arange(n, device=cache.device)
        pages = block_table[b].to(torch.long)[pos // page_size]
        parts.append(cache[pages, pos % page_size])
    return torch.cat(parts, 0) if parts else cache.new_empty((0,) + cache.shape[2:])


def standard_attention(q, k, v, softmax_scale=None, causal=False):
    """The seed's standard attention: S and P materialized in HBM, inputs' dtype.

    q, k, v: ``(b, s, h, d)`` (k/v may have fewer heads). Differentiable.
    """
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    qt = q.transpose(1, 2)
    kt = _repeat_kv(k, hq).transpose(1, 2)
    vt = _repeat_kv(v, hq).transpose(1, 2)
    s = torch.matmul(qt, kt.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~visible_mask(sq, sk, True, device=q.device), float("-inf"))
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    return torch.matmul(p, vt).transpose(1, 2)
