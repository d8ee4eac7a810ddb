"""Calls with more (batch, head) pairs than one launch grid holds (CUDA: 65,535 on the grid's y
axis, where the kernels put them) run over groups of sequences (interface._run_in_groups). Here the
limit is lowered to 8 pairs, so that small calls take that path on the CPU and under the
interpreter: the grouped results must equal the single call's, gradients included."""

import pytest
import torch

import ioattn
from ioattn import interface

from helpers import randn


@pytest.fixture
def small_grid(monkeypatch):
    def run(fn):
        ref = fn()
        monkeypatch.setattr(interface, "MAX_GRID_PAIRS", 8)  # 2 sequences of 4 heads a group
        got = fn()
        monkeypatch.setattr(interface, "MAX_GRID_PAIRS", 65535)
        return ref, got
    return run


def _same(ref, got):
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert a.shape == b.shape and torch.equal(a, b)


def test_dense_groups(small_grid, device):
    q, k, v = randn(5, 13, 4, 16, device=device), randn(5, 17, 2, 16, device=device), randn(5, 17, 2, 16, device=device)
    slopes = torch.rand(5, 4, device=device)

    def call():
        out, lse = ioattn.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes, return_lse=True)
        return (out, lse, *torch.autograd.grad(out.sum() + lse.sum(), (q, k, v)))
    _same(*small_grid(call))


def test_varlen_groups(small_grid, device):
    lq, lk = [3, 0, 7, 5, 9], [4, 2, 7, 6, 9]
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q, k, v = randn(sum(lq), 4, 16, device=device), randn(sum(lk), 2, 16, device=device), randn(sum(lk), 2, 16, device=device)

    def call():
        out, lse, probs = ioattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 9, causal=True, window_size=(3, 0),
                                                        return_attn_probs=True)
        return (out, lse, probs, *torch.autograd.grad(out.sum() + lse.sum(), (q, k, v)))
    _same(*small_grid(call))


def test_paged_groups(small_grid, device):
    lq, lk, page = [2, 5, 1, 4, 3], [9, 5, 12, 4, 7], 4
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32, device=device)
    table = torch.randperm(20, device=device).to(torch.int32).reshape(5, 4)
    q = randn(sum(lq), 4, 16, device=device, requires_grad=False)
    k_pages, v_pages = (randn(20, page, 2, 16, device=device, requires_grad=False) for _ in range(2))

    def call():
        return (ioattn.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 5, 12, causal=True, block_table=table), )
    _same(*small_grid(call))


def test_dropout_groups_draw_their_own_masks(monkeypatch, device):
    """Each group draws its own seed: sequences 0 and 2 (index 0 in their groups) get different
    masks, and the kept fraction stays 1 - p."""
    monkeypatch.setattr(interface, "MAX_GRID_PAIRS", 8)
    q, k, v = (randn(4, 32, 4, 16, device=device, requires_grad=False) for _ in range(3))
    _, _, probs = ioattn.flash_attn_func(q, k, v, dropout_p=0.5, return_attn_probs=True)
    keep = probs >= 0
    assert not torch.equal(keep[0], keep[2])
    assert abs(keep.float().mean().item() - 0.5) < 0.05


@pytest.mark.skipif(torch.cuda.is_available(), reason="fake CUDA tensors need a machine without CUDA")
def test_real_limit_with_fake_cuda_tensors():
    """At the real limit, with FakeTensorMode's CUDA tensors (shapes only, no memory): 20,000
    sequences x 4 heads run as two groups and give the full shapes; flash_attn_with_kvcache, which
    does not group, says what is over the limit."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    calls = []
    real = interface._attention

    def counted(*args):
        calls.append(args[0].shape[0])
        return real(*args)
    with FakeTensorMode():
        q, k = torch.empty(20000, 8, 4, 16, device="cuda"), torch.empty(20000, 8, 2, 16, device="cuda")
        interface._attention = counted
        try:
            out, lse = ioattn.flash_attn_func(q, k, k, causal=True, return_lse=True)
        finally:
            interface._attention = real
        assert out.shape == q.shape and lse.shape == (20000, 4, 8)
        assert calls == [16383, 3617]  # 65535 // 4 sequences, then the rest
        cache = torch.empty(20000, 32, 4, 16, device="cuda")
        with pytest.raises(ValueError, match="at most 65535"):
            ioattn.flash_attn_with_kvcache(torch.empty(20000, 1, 4, 16, device="cuda"), cache, cache)
