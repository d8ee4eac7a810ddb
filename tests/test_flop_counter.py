"""ioattn under torch.utils.flop_counter.FlopCounterMode and on the meta device.

The counts follow torch's for SDPA on the same shapes (integrations/flop_counter.py); meta
tensors give the outputs' and gradients' shapes without computing anything, which is how tools
such as Lightning's ``measure_flops`` count a model's FLOPs."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import ioattn


def _count(fn):
    mode = FlopCounterMode(display=False)
    with mode:
        fn()
    return mode.get_total_flops()


def _torch_counts(b, h, hk, sq, sk, d, dv):
    """torch's SDPA forward and backward counts for the same shapes ((b, h, s, d) layout)."""
    q, k, v, dout = (b, h, sq, d), (b, hk, sk, d), (b, hk, sk, dv), (b, h, sq, dv)
    return sdpa_flop_count(q, k, v), sdpa_backward_flop_count(dout, q, k, v)


@pytest.mark.parametrize("device,dv", [("cpu", 24), ("meta", 24), ("meta", 40)])  # (dv: V's head dim)
@pytest.mark.parametrize("causal", [False, True])
def test_dense_counts_as_torch_counts_sdpa(device, dv, causal):
    b, sq, sk, h, hk, d = 2, 33, 20, 6, 2, 24
    q = torch.randn(b, sq, h, d, device=device, requires_grad=True)
    k = torch.randn(b, sk, hk, d, device=device, requires_grad=True)
    v = torch.randn(b, sk, hk, dv, device=device, requires_grad=True)
    fwd, bwd = _torch_counts(b, h, hk, sq, sk, d, dv)
    assert fwd == 2 * b * h * sq * sk * (d + dv) and bwd == 2 * b * h * sq * sk * (3 * d + 2 * dv)
    assert _count(lambda: ioattn.flash_attn_func(q, k, v, causal=causal)) == fwd
    assert _count(lambda: ioattn.flash_attn_func(q, k, v, causal=causal).sum().backward()) == fwd + bwd
    assert _count(lambda: ioattn.flash_attn_func(q, k, v, return_lse=True)[1].sum().backward()) == fwd + bwd


def test_varlen_counts_each_sequence():
    lens_q, lens_k = [5, 0, 11], [7, 3, 11]
    cq = torch.tensor([0, 5, 5, 16], dtype=torch.int32)
    ck = torch.tensor([0, 7, 10, 21], dtype=torch.int32)
    h, d = 4, 16
    q = torch.randn(16, h, d, requires_grad=True)
    k = torch.randn(21, h, d, requires_grad=True)
    pairs = sum(a * b for a, b in zip(lens_q, lens_k))
    run = lambda: ioattn.flash_attn_varlen_func(q, k, k, cq, ck, 11, 11, causal=True)  # noqa: E731
    assert _count(run) == 4 * h * d * pairs
    assert _count(lambda: run().sum().backward()) == 14 * h * d * pairs
    # on the meta device the lengths are unknown: every sequence counts at max_seqlen
    qm, km = (t.detach().to("meta").requires_grad_() for t in (q, k))
    run = lambda: ioattn.flash_attn_varlen_func(qm, km, km, cq.to("meta"), ck.to("meta"), 11, 11)  # noqa: E731
    assert _count(lambda: run().sum().backward()) == 14 * h * d * 3 * 11 * 11


def test_kvcache_counts_attended_keys():
    q = torch.randn(2, 3, 4, 16)
    cache = torch.zeros(2, 20, 2, 16)
    new = torch.randn(2, 3, 2, 16)
    lens = torch.tensor([5, 9], dtype=torch.int32)
    per_key = 4 * 3 * 4 * 16  # 4 * seqlen_q * nheads * headdim
    assert _count(lambda: ioattn.flash_attn_with_kvcache(q, cache, cache, new, new, cache_seqlens=lens)) \
        == per_key * (8 + 12)
    assert _count(lambda: ioattn.flash_attn_with_kvcache(
        q, cache, cache, cache_seqlens=lens, cache_leftpad=torch.tensor([2, 0], dtype=torch.int32))) \
        == per_key * (3 + 9)
    assert _count(lambda: ioattn.flash_attn_with_kvcache(q, cache, cache)) == per_key * 40
    pages, table = torch.zeros(6, 16, 2, 16), torch.arange(6, dtype=torch.int32).view(2, 3)
    assert _count(lambda: ioattn.flash_attn_with_kvcache(q, pages, pages, block_table=table)) == per_key * 96


def test_meta_device_shapes():
    """Meta tensors run through the ops' fake kernels: shapes of every output and gradient."""
    q = torch.randn(2, 7, 4, 16, device="meta", requires_grad=True)
    k = torch.randn(2, 9, 2, 16, device="meta", requires_grad=True)
    out, lse, probs = ioattn.flash_attn_func(q, k, k, dropout_p=0.1, causal=True, return_attn_probs=True)
    assert (out.shape, lse.shape, probs.shape) == ((2, 7, 4, 16), (2, 4, 7), (2, 4, 7, 9))
    assert out.is_meta and lse.dtype == torch.float32
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and q.grad.is_meta
    qp = torch.randn(7, 4, 16, device="meta")
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device="meta")
    out, lse, _ = ioattn.flash_attn_varlen_func(qp, qp[:, :2], qp[:, :2], cu, cu, 4, 4, return_attn_probs=True)
    assert (out.shape, lse.shape) == ((7, 4, 16), (4, 7))
    cache = torch.zeros(2, 20, 2, 16, device="meta")
    out, lse = ioattn.flash_attn_with_kvcache(q.detach(), cache, cache, k.detach()[:, :7], k.detach()[:, :7],
                                              cache_seqlens=torch.zeros(2, dtype=torch.int32, device="meta"),
                                              return_softmax_lse=True)
    assert (out.shape, lse.shape) == ((2, 7, 4, 16), (2, 4, 7))
