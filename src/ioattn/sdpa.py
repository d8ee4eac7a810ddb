"""``torch.nn.functional.scaled_dot_product_attention``'s signature and semantics on ioattn's kernels.

For code written against SDPA: ``(batch, heads, seqlen, headdim)`` tensors, ``is_causal`` aligned
to the top-left corner (query ``i`` sees keys ``0..i``, whatever the lengths), ``scale``,
``enable_gqa``. The tensors go to :func:`ioattn.flash_attn_func` as ``(batch, seqlen, heads,
headdim)`` views (no copies), and the output comes back as a view in SDPA's layout.

What SDPA takes and this does not: ``attn_mask`` (an arbitrary mask or bias cannot be expressed by
the kernels, which support causal and sliding-window masks and packed sequences:
:func:`ioattn.flash_attn_varlen_func` is the way to leave out padding), and a value head dim
different from the query's. Both raise ``ValueError``; nothing falls back silently.
"""

from __future__ import annotations

import torch

from .interface import flash_attn_func


def _fail(msg):
    raise ValueError(f"ioattn.scaled_dot_product_attention: {msg}")


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """Exact attention with SDPA's arguments.

    Args:
        query: ``(batch, heads, seqlen_q, headdim)`` (or ``(heads, seqlen_q, headdim)``).
        key, value: ``(batch, heads_kv, seqlen_k, headdim)``; ``heads_kv != heads`` needs
            ``enable_gqa=True``, as in SDPA.
        attn_mask: must be None (see the module docstring).
        dropout_p: dropout on the attention probabilities, applied whenever > 0 (as SDPA: pass 0
            at evaluation).
        is_causal: causal mask aligned to the top-left corner, as SDPA's.
        scale: softmax scale, default ``headdim ** -0.5``.
        enable_gqa: allow fewer key/value heads than query heads (a divisor of them).

    Returns:
        ``(batch, heads, seqlen_q, headdim)``, a transposed view of a contiguous
        ``(batch, seqlen_q, heads, headdim)`` tensor.
    """
    if attn_mask is not None:
        _fail("attn_mask is not supported (the kernels express causal and sliding-window masks "
              "only; for padding, pack the sequences and call ioattn.flash_attn_varlen_func)")
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError("query, key and value must be tensors, got "
                        f"{', '.join(type(t).__name__ for t in tensors)}")
    dims = {t.dim() for t in tensors}
    if dims not in ({3}, {4}):
        _fail("query, key, value must all have 4 dims (batch, heads, seqlen, headdim) or all 3 "
              f"(heads, seqlen, headdim), got shapes {[tuple(t.shape) for t in tensors]}")
    unbatched = dims == {3}
    if unbatched:
        query, key, value = (t.unsqueeze(0) for t in tensors)
    heads, heads_kv = query.shape[1], key.shape[1]
    if heads != heads_kv and not enable_gqa:
        _fail(f"query has {heads} heads and key/value {heads_kv}: pass enable_gqa=True for grouped "
              "(GQA/MQA) attention, as SDPA requires")
    seqlen_q, seqlen_k = query.shape[2], key.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    window, causal = (-1, -1), False
    if is_causal:
        if seqlen_q <= seqlen_k:
            # keys past seqlen_q are seen by no query: the top-left corner is the bottom-right one
            # of the first seqlen_q keys
            k, v, causal = k[:, :seqlen_q], v[:, :seqlen_q], True
        else:  # query i sees keys 0..i: a window reaching seqlen_q - seqlen_k past the diagonal
            window = (-1, seqlen_q - seqlen_k)
    out = flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal,
                          window_size=window)
    out = out.transpose(1, 2)
    return out.squeeze(0) if unbatched else out
