"""merge_attention_states: forward against whole-key attention, gradients, -inf handling."""

from __future__ import annotations

import pytest
import torch

from ioattn.merge import merge_attention_states
from ioattn.reference import attention_ref


def _split_attention(q, k, v, bounds, **kwargs):
    """Attention of q over each key chunk [bounds[i], bounds[i+1]) (fp64 reference)."""
    outs, lses = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        b, _, h, d = q.shape
        if hi == lo:                                   # an empty key set: out 0, lse -inf
            outs.append(torch.zeros(b, q.shape[1], h, d, dtype=torch.float64))
            lses.append(torch.full((b, h, q.shape[1]), float("-inf"), dtype=torch.float64))
            continue
        o, lse = attention_ref(q, k[:, lo:hi], v[:, lo:hi], **kwargs)
        outs.append(o)
        lses.append(lse)
    return outs, lses


@pytest.mark.parametrize("stacked", [False, True])
def test_merge_matches_whole_attention(stacked):
    torch.manual_seed(1)
    q = torch.randn(2, 5, 4, 16)
    k = torch.randn(2, 37, 2, 16)
    v = torch.randn(2, 37, 2, 16)
    outs, lses = _split_attention(q, k, v, [0, 10, 10, 30, 37])      # one part is empty
    out_ref, lse_ref = attention_ref(q, k, v)
    if stacked:
        outs, lses = torch.stack(outs), torch.stack(lses)
    out, lse = merge_attention_states(outs, lses)
    torch.testing.assert_close(out, out_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, lse_ref, atol=1e-12, rtol=1e-12)


def test_merge_low_precision_outs():
    """bf16 partial outputs with fp32 lses: out keeps the outs' dtype, lse the lses'."""
    torch.manual_seed(2)
    outs = torch.randn(3, 2, 4, 3, 8).bfloat16()
    lses = torch.randn(3, 2, 3, 4)
    out, lse = merge_attention_states(outs, lses)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    w = torch.softmax(lses, dim=0).transpose(-1, -2).unsqueeze(-1)
    torch.testing.assert_close(out.float(), (w * outs.float()).sum(0), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse, torch.logsumexp(lses, 0))


def test_merge_gradcheck():
    torch.manual_seed(3)
    outs = torch.randn(3, 2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    lses = torch.randn(3, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(merge_attention_states, (outs, lses))


def test_merge_grad_matches_autograd_of_formula():
    """Gradients, including through the merged lse, equal autograd of the direct formula."""
    torch.manual_seed(4)
    outs = torch.randn(4, 2, 6, 3, 8, dtype=torch.float64, requires_grad=True)
    lses = torch.randn(4, 2, 3, 6, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(2, 6, 3, 8, dtype=torch.float64)
    dlse = torch.randn(2, 3, 6, dtype=torch.float64)
    out, lse = merge_attention_states([outs[i] for i in range(4)], [lses[i] for i in range(4)])
    grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (outs, lses))
    lse_ref = torch.logsumexp(lses, dim=0)
    w = torch.exp(lses - lse_ref).transpose(-1, -2).unsqueeze(-1)
    out_ref = (w * outs).sum(0)
    grads_ref = torch.autograd.grad((out_ref * dout).sum() + (lse_ref * dlse).sum(), (outs, lses))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


def test_merge_neg_inf():
    """Parts with lse -inf contribute nothing; all -inf gives out 0, lse -inf, zero grads."""
    outs = torch.randn(3, 1, 2, 2, 4, requires_grad=True)
    lses = torch.randn(3, 1, 2, 2)
    lses[:, 0, 0, 0] = float("-inf")                  # row (head 0, query 0): no part saw a key
    lses[1, 0, 1, 1] = float("-inf")                  # row (1, 1): part 1 saw no key
    with torch.no_grad():
        outs[1, 0, 1, 1] = float("nan")               # ... and its output must not matter
    lses.requires_grad_(True)
    out, lse = merge_attention_states(outs, lses)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.all(out[0, 0, 0] == 0) and lse[0, 0, 0] == float("-inf")
    keep = [0, 2]
    torch.testing.assert_close(lse[0, 1, 1], torch.logsumexp(lses[keep, 0, 1, 1], 0))
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert not outs.grad.isnan().any() and not lses.grad.isnan().any()
    assert torch.all(outs.grad[:, 0, 0, 0] == 0) and torch.all(lses.grad[:, 0, 0, 0] == 0)
    assert torch.all(lses.grad[1, 0, 1, 1] == 0)


def test_merge_errors():
    with pytest.raises(ValueError, match=r"expected lses of shape \(3, 2, 4, 5\)"):
        merge_attention_states(torch.zeros(3, 2, 5, 4, 8), torch.zeros(3, 2, 5, 4))
    with pytest.raises(ValueError, match="at least one"):
        merge_attention_states([], [])
    with pytest.raises(TypeError, match="floating-point"):
        merge_attention_states(torch.zeros(3, 2, 5, 4, 8), torch.zeros(3, 2, 4, 5, dtype=torch.long))
