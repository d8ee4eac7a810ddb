"""Merge attention outputs computed over disjoint key sets, by their log-sum-exps.

If ``out_i`` and ``lse_i`` are attention over key set ``K_i`` (the sets disjoint),
attention over their union is::

    lse = log(sum_i exp(lse_i))
    out = sum_i exp(lse_i - lse) * out_i

This is how split-KV decoding, ring / context-parallel attention and
prefix-caching combine partial results. A part whose ``lse`` is ``-inf`` saw no
key and contributes nothing; if every part is ``-inf`` the result is out 0,
lse ``-inf`` (no NaN, zero gradients).
"""

from __future__ import annotations

import torch

__all__ = ["merge_attention_states"]


def _weights(lses: torch.Tensor):
    """Normalized weights ``exp(lse_i - lse)`` and the merged ``lse``; lses ``(n, ...)`` fp32."""
    lse_max = lses.amax(dim=0)
    lse_max = torch.where(torch.isneginf(lse_max), torch.zeros_like(lse_max), lse_max)
    w = torch.exp(lses - lse_max)                            # 0 for parts with lse = -inf
    denom = w.sum(dim=0)
    empty = denom == 0
    lse = torch.where(empty, torch.full_like(denom, float("-inf")),
                      lse_max + torch.log(torch.where(empty, torch.ones_like(denom), denom)))
    w = w / torch.where(empty, torch.ones_like(denom), denom)
    return w, lse


def _to_out_layout(x: torch.Tensor) -> torch.Tensor:
    """(n, ..., nheads, seqlen) -> (n, ..., seqlen, nheads, 1), to broadcast against outs."""
    return x.transpose(-1, -2).unsqueeze(-1)


class _MergeAttentionStates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, outs, lses):
        ctype = torch.promote_types(torch.promote_types(outs.dtype, lses.dtype), torch.float32)
        w, lse = _weights(lses.to(ctype))
        w_o = _to_out_layout(w)                              # (n, ..., seqlen, nheads, 1)
        contrib = torch.where(w_o > 0, w_o * outs.to(ctype), torch.zeros((), dtype=ctype,
                                                                          device=outs.device))
        out = contrib.sum(dim=0)
        ctx.save_for_backward(outs, w, out)
        ctx.lses_dtype = lses.dtype
        return out.to(outs.dtype), lse.to(lses.dtype)

    @staticmethod
    def backward(ctx, dout, dlse):
        # out = sum_i w_i o_i with w_i = exp(lse_i - lse):
        #   d o_i   = w_i * dout
        #   d lse_i = w_i * (dlse + <dout, o_i - out>)        (<,> over the head dim)
        outs, w, out = ctx.saved_tensors
        lses_dtype = ctx.lses_dtype
        w_o = _to_out_layout(w)
        douts = dlses = None
        dout = torch.zeros_like(out) if dout is None else dout.to(out.dtype)
        if ctx.needs_input_grad[0]:
            douts = (w_o * dout).to(outs.dtype)
        if ctx.needs_input_grad[1]:
            diff = torch.where(w_o > 0, outs.to(out.dtype) - out,
                               torch.zeros((), dtype=out.dtype, device=outs.device))
            dot = (dout * diff).sum(-1).transpose(-1, -2)    # (n, ..., nheads, seqlen)
            dlse = torch.zeros_like(w) if dlse is None else dlse.to(w.dtype)
            dlses = (w * (dlse + dot)).to(lses_dtype)
        return douts, dlses


def merge_attention_states(outs, lses):
    """Merge partial attention outputs over disjoint key sets.

    Args:
        outs: a list of ``(..., seqlen, nheads, headdim)`` tensors, or one stacked
            ``(n, ..., seqlen, nheads, headdim)`` tensor.
        lses: a list of ``(..., nheads, seqlen)`` log-sum-exps (natural log, as
            returned by ``return_softmax_lse`` / ``return_attn_probs``), or one
            stacked ``(n, ..., nheads, seqlen)`` tensor.

    Returns:
        ``(out, lse)``: out ``(..., seqlen, nheads, headdim)`` in the outs' dtype,
        lse ``(..., nheads, seqlen)`` in the lses' dtype. Differentiable with
        respect to every ``out_i`` and ``lse_i``; computed in fp32 (fp64 for fp64 inputs).
    """
    if isinstance(outs, (list, tuple)):
        if len(outs) == 0:
            raise ValueError("merge_attention_states: expected at least one partial output, got none")
        outs = torch.stack(list(outs))
    if isinstance(lses, (list, tuple)):
        if len(lses) == 0:
            raise ValueError("merge_attention_states: expected at least one lse, got none")
        lses = torch.stack(list(lses))
    if not (isinstance(outs, torch.Tensor) and isinstance(lses, torch.Tensor)):
        raise TypeError(f"merge_attention_states: expected tensors or lists of tensors, "
                        f"got {type(outs).__name__} and {type(lses).__name__}")
    if outs.dim() < 4:
        raise ValueError(f"merge_attention_states: expected outs of shape (n, ..., seqlen, nheads, "
                         f"headdim), got {tuple(outs.shape)}")
    expected = (*outs.shape[:-3], outs.shape[-2], outs.shape[-3])
    if tuple(lses.shape) != expected:
        raise ValueError(f"merge_attention_states: expected lses of shape {expected} "
                         f"(n, ..., nheads, seqlen) for outs of shape {tuple(outs.shape)}, "
                         f"got {tuple(lses.shape)}")
    if not outs.is_floating_point() or not lses.is_floating_point():
        raise TypeError(f"merge_attention_states: expected floating-point tensors, "
                        f"got {outs.dtype} and {lses.dtype}")
    if outs.device != lses.device:
        raise ValueError(f"merge_attention_states: outs on {outs.device} but lses on {lses.device}")
    return _MergeAttentionStates.apply(outs, lses)
