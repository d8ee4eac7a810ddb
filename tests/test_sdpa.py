"""ioattn.scaled_dot_product_attention against torch's SDPA (its math, in fp64): layouts, the
top-left causal mask for any lengths, GQA, scale, unbatched inputs, gradients, errors."""

import pytest
import torch
import torch.nn.functional as F

import ioattn

from helpers import assert_close

# (batch, heads, heads_kv, seqlen_q, seqlen_k, headdim)
SHAPES = [(2, 4, 4, 19, 19, 16), (2, 4, 2, 5, 33, 32), (1, 6, 1, 40, 7, 24), (2, 2, 2, 1, 9, 8)]


def _sdpa_ref(q, k, v, **kw):
    """torch's SDPA in fp64 (its math backend on the CPU); rows that see no key (NaN there) are 0."""
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True, **kw)
    return torch.nan_to_num(out)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_sdpa(shape, is_causal, device):
    b, h, hk, sq, sk, d = shape
    q = torch.randn(b, h, sq, d, device=device, requires_grad=True)
    k = torch.randn(b, hk, sk, d, device=device, requires_grad=True)
    v = torch.randn(b, hk, sk, d, device=device, requires_grad=True)
    out = ioattn.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=0.3, enable_gqa=True)
    ref = _sdpa_ref(q, k, v, is_causal=is_causal, scale=0.3)
    low = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=0.3, enable_gqa=True)
    assert_close("out", out, ref, torch.nan_to_num(low), torch.float32)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    refs = torch.autograd.grad(ref, (q, k, v), dout.double())
    lows = torch.autograd.grad(low, (q, k, v), dout)
    for name, g, r, lo in zip(("dq", "dk", "dv"), grads, refs, lows):
        assert_close(name, g, r, torch.nan_to_num(lo), torch.float32)


def test_unbatched_and_default_scale(device):
    q, k, v = (torch.randn(3, 11, 16, device=device) for _ in range(3))
    out = ioattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = _sdpa_ref(q, k, v, is_causal=True)
    assert out.shape == (3, 11, 16)
    assert_close("out", out, ref, F.scaled_dot_product_attention(q, k, v, is_causal=True), torch.float32)


def test_dropout_follows_the_seed(device):
    q, k, v = (torch.randn(1, 2, 16, 8, device=device) for _ in range(3))
    torch.manual_seed(3)
    a = ioattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    b = ioattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, ioattn.scaled_dot_product_attention(q, k, v))


def test_errors():
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="attn_mask is not supported"):
        ioattn.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="enable_gqa=True"):
        ioattn.scaled_dot_product_attention(q, k, k)
    with pytest.raises(ValueError, match="4 dims"):
        ioattn.scaled_dot_product_attention(q, k[0], k[0], enable_gqa=True)
    with pytest.raises(TypeError, match="must be tensors"):
        ioattn.scaled_dot_product_attention(q, None, q)
