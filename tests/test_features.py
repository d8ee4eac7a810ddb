"""The FlashAttention-2 feature set in the same kernels (issue 4): varlen, sliding
window, softcap, ALiBi, dropout, deterministic backward, and their combinations."""

import math

import pytest
import torch

import ioattn
from ioattn.reference import attention_ref, attention_varlen_ref

from helpers import assert_close, check_fwd_bwd, compare_grads, randn

OPTIONS = {
    "window": dict(window_size=(7, 3)),
    "window_left_causal": dict(window_size=(12, -1), causal=True),
    "window_right_only": dict(window_size=(-1, 5)),
    "softcap": dict(softcap=2.0),
    "alibi": dict(alibi="heads"),
    "alibi_batch": dict(alibi="batch"),
    "all": dict(window_size=(9, 0), softcap=3.0, alibi="heads", causal=True),
}


def _kwargs(opt, b, h, device):
    kw = dict(opt)
    which = kw.pop("alibi", None)
    if which == "heads":
        kw["alibi_slopes"] = torch.rand(h, device=device) * 0.5
    elif which == "batch":
        kw["alibi_slopes"] = torch.rand(b, h, device=device) * 0.5
    return kw


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("shape", [(2, 40, 40, 4, 2, 32), (1, 29, 53, 2, 1, 40), (1, 61, 23, 2, 2, 24)], ids=str)
def test_option_fp32(name, shape, device):
    b, sq, sk, hq, hk, d = shape
    kw = _kwargs(OPTIONS[name], b, hq, device)
    q, k, v = randn(b, sq, hq, d, device=device), randn(b, sk, hk, d, device=device), randn(b, sk, hk, d, device=device)
    check_fwd_bwd(lambda q, k, v: ioattn.flash_attn_func(q, k, v, **kw), q, k, v, kw)


@pytest.mark.skipif(not ioattn.kernels.configs.interpreting() and not torch.cuda.is_available(),
                    reason="tile overrides apply to the Triton kernels only")
@pytest.mark.parametrize("qrows", [True, False], ids=["queries_as_rows", "keys_as_rows"])
@pytest.mark.parametrize("name", ["all", "window", "alibi_batch"])
def test_dkdv_orientations(name, qrows, device):
    """The dK/dV program computes S (queries as rows: head dim 256 and dropout on the GPU)
    or S^T (keys as rows: the other defaults); both against the reference, with GQA and
    ragged blocks, tiles of 32 queries x 16 keys."""
    from ioattn.kernels import configs
    kw = _kwargs(OPTIONS[name], 2, 4, device)
    q, k, v = randn(2, 37, 4, 24, device=device), randn(2, 43, 2, 24, device=device), randn(2, 43, 2, 24, device=device)
    tiles = dict(num_warps=4, num_stages=1)
    configs.backward_override = dict(dkdv=dict(tiles, BLOCK_M=32, BLOCK_N=16, QROWS=qrows),
                                     dq=dict(tiles, BLOCK_M=16, BLOCK_N=16))
    try:
        check_fwd_bwd(lambda q, k, v: ioattn.flash_attn_func(q, k, v, **kw), q, k, v, kw)
    finally:
        configs.backward_override = None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_all_options_low_precision(dtype, device):
    kw = _kwargs(OPTIONS["all"], 2, 4, device)
    q = randn(2, 45, 4, 32, dtype=dtype, device=device)
    k, v = randn(2, 50, 2, 32, dtype=dtype, device=device), randn(2, 50, 2, 32, dtype=dtype, device=device)
    check_fwd_bwd(lambda q, k, v: ioattn.flash_attn_func(q, k, v, **kw), q, k, v, kw)


def _packed(lens_q, lens_k, hq, hk, d, device, dtype=torch.float32):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=device)
    q = randn(sum(lens_q), hq, d, dtype=dtype, device=device)
    k = randn(sum(lens_k), hk, d, dtype=dtype, device=device)
    v = randn(sum(lens_k), hk, d, dtype=dtype, device=device)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("name", ["plain", "causal", "window", "all"])
def test_varlen_matches_reference(name, device):
    lens_q, lens_k = [5, 0, 33, 17, 1], [9, 4, 33, 0, 20]  # zero-length queries and keys
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 4, 2, 40, device)
    opt = dict(plain={}, causal=dict(causal=True), window=dict(window_size=(4, 2)), all=OPTIONS["all"])[name]
    kw = _kwargs(opt, len(lens_q), 4, device)
    if "alibi_slopes" in kw:
        kw["alibi_slopes"] = torch.rand(len(lens_q), 4, device=device) * 0.5

    out, lse, _ = ioattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                                return_attn_probs=True, **kw)
    ref, ref_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, **kw)
    low, _ = attention_varlen_ref(q, k, v, cu_q, cu_k, upcast=False, **kw)
    assert_close("out", out, ref, low, torch.float32)
    assert lse.shape == (4, sum(lens_q))
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert torch.allclose(lse[fin].double(), ref_lse[fin], atol=1e-5)
    compare_grads(out, ref, low, (q, k, v), torch.float32)


def test_varlen_equals_loop_over_sequences(device):
    lens = [13, 40, 7]
    q, k, v, cu, _ = _packed(lens, lens, 2, 2, 32, device)
    out = ioattn.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        one = ioattn.flash_attn_func(q[None, sl], k[None, sl], v[None, sl], causal=True)[0]
        assert torch.allclose(out[sl], one, atol=1e-6)
        start += n


def test_varlen_packed_forms(device):
    lens = [6, 19]
    qkv = randn(sum(lens), 3, 2, 16, device=device)
    cu = torch.tensor([0, 6, 25], dtype=torch.int32, device=device)
    out = ioattn.flash_attn_varlen_qkvpacked_func(qkv, cu, 19, causal=True)
    ref, _ = attention_varlen_ref(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, causal=True)
    low, _ = attention_varlen_ref(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, causal=True, upcast=False)
    assert_close("out", out, ref, low, torch.float32)
    out = ioattn.flash_attn_varlen_kvpacked_func(qkv[:, 0], qkv[:, 1:], cu, cu, 19, 19)
    ref, _ = attention_varlen_ref(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu)
    low, _ = attention_varlen_ref(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, upcast=False)
    assert_close("out", out, ref, low, torch.float32)


# ---------------------------------------------------------------- dropout

def test_dropout_kept_fraction(device):
    p = 0.3
    q, k, v = (randn(2, 64, 4, 16, device=device, requires_grad=False) for _ in range(3))
    _, _, probs = ioattn.flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True)
    keep = probs >= 0
    n = keep.numel()
    frac = keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - (1 - p)) < 6 * sigma, f"kept {frac:.4f}, expected {1 - p} ± {6 * sigma:.4f}"
    # the mask differs between heads and batch elements
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    # keys c, c + 8 and queries i, i + 8 share a Philox word, keys c, c + 1 a prmt: their
    # draws must still be independent (agreement rate p^2 + (1-p)^2)
    expect = p * p + (1 - p) * (1 - p)
    for name, a, b in (("keys c, c+1", keep[..., 1:], keep[..., :-1]),
                       ("keys c, c+8", keep[..., 8:], keep[..., :-8]),
                       ("queries i, i+8", keep[..., 8:, :], keep[..., :-8, :]),
                       ("queries i, i+1", keep[..., 1:, :], keep[..., :-1, :])):
        same = (a == b).float().mean().item()
        assert abs(same - expect) < 6 * math.sqrt(expect * (1 - expect) / a.numel()), (name, same, expect)


@pytest.mark.parametrize("opts", [dict(), dict(causal=True, softcap=2.0)], ids=["plain", "causal_softcap"])
def test_dropout_replayed_mask_matches_reference(opts, device):
    p = 0.25
    q, k, v = randn(2, 37, 4, 32, device=device), randn(2, 45, 2, 32, device=device), randn(2, 45, 2, 32, device=device)
    out, _, probs = ioattn.flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True, **opts)
    keep = probs >= 0
    ref, _ = attention_ref(q, k, v, dropout_p=p, dropout_mask=keep, **opts)
    low, _ = attention_ref(q, k, v, dropout_p=p, dropout_mask=keep, upcast=False, **opts)
    assert_close("out", out, ref, low, torch.float32)
    compare_grads(out, ref, low, (q, k, v), torch.float32)


_TILES = [  # (forward, dK/dV, dQ) tiles; the mask must not depend on them
    (dict(BLOCK_M=32, BLOCK_N=64), dict(BLOCK_M=64, BLOCK_N=32, QROWS=True), dict(BLOCK_M=16, BLOCK_N=128)),
    (dict(BLOCK_M=16, BLOCK_N=32), dict(BLOCK_M=16, BLOCK_N=64, QROWS=False), dict(BLOCK_M=64, BLOCK_N=16)),
]


@pytest.mark.skipif(not ioattn.kernels.configs.interpreting() and not torch.cuda.is_available(),
                    reason="tile overrides apply to the Triton kernels only")
@pytest.mark.parametrize("tiles", _TILES, ids=["big_qrows", "small_keys_as_rows"])
def test_dropout_mask_independent_of_tiles(tiles, device):
    """Forward, both backward programs (dK/dV with queries or keys as rows) and the mask
    kernel behind return_attn_probs use different tile shapes and still draw one mask."""
    from ioattn.kernels import configs
    fwd, dkdv, dq = (dict(t, num_warps=4, num_stages=1) for t in tiles)
    p = 0.3
    q, k, v = randn(1, 70, 2, 16, device=device), randn(1, 150, 2, 16, device=device), randn(1, 150, 2, 16, device=device)
    configs.forward_override, configs.backward_override = fwd, dict(dkdv=dkdv, dq=dq)
    try:
        out, _, probs = ioattn.flash_attn_func(q, k, v, dropout_p=p, causal=True, return_attn_probs=True)
        keep = probs >= 0
        ref, _ = attention_ref(q, k, v, dropout_p=p, dropout_mask=keep, causal=True)
        low, _ = attention_ref(q, k, v, dropout_p=p, dropout_mask=keep, causal=True, upcast=False)
        assert_close("out", out, ref, low, torch.float32)
        compare_grads(out, ref, low, (q, k, v), torch.float32)
    finally:
        configs.forward_override = configs.backward_override = None


def test_dropout_follows_manual_seed(device):
    q, k, v = (randn(1, 30, 2, 16, device=device, requires_grad=False) for _ in range(3))
    torch.manual_seed(1234)
    a = ioattn.flash_attn_func(q, k, v, dropout_p=0.5)
    torch.manual_seed(1234)
    b = ioattn.flash_attn_func(q, k, v, dropout_p=0.5)
    c = ioattn.flash_attn_func(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dropout_varlen(device):
    lens = [11, 30]
    q, k, v, cu, _ = _packed(lens, lens, 2, 2, 16, device)
    out, _, probs = ioattn.flash_attn_varlen_func(q, k, v, cu, cu, 30, 30, dropout_p=0.2,
                                                  return_attn_probs=True)
    masks = [(probs[i:i + 1, :, :n, :n] >= 0) for i, n in enumerate(lens)]
    ref, _ = attention_varlen_ref(q, k, v, cu, cu, dropout_p=0.2, dropout_masks=masks)
    low, _ = attention_varlen_ref(q, k, v, cu, cu, dropout_p=0.2, dropout_masks=masks, upcast=False)
    assert_close("out", out, ref, low, torch.float32)


# ---------------------------------------------------------------- determinism

@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_deterministic_backward_bit_identical(dropout_p, device):
    q, k, v = randn(2, 50, 4, 32, device=device), randn(2, 50, 1, 32, device=device), randn(2, 50, 1, 32, device=device)
    torch.manual_seed(7)
    out = ioattn.flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True, deterministic=True)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    for _ in range(2):
        again = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_deterministic_follows_torch_setting(monkeypatch):
    """torch.use_deterministic_algorithms(True) in effect at the backward selects the
    deterministic backward, as it does for SDPA's flash backward; the keyword still works alone."""
    import ioattn.interface as interface
    seen, impl = [], interface._backward_impl
    monkeypatch.setattr(interface, "_backward_impl", lambda *a: seen.append(a[-1]) or impl(*a))
    q, k, v = (randn(1, 9, 2, 8) for _ in range(3))
    before = torch.are_deterministic_algorithms_enabled()
    for setting, keyword in ((False, False), (True, False), (False, True)):
        torch.use_deterministic_algorithms(setting)
        try:
            ioattn.flash_attn_func(q, k, v, causal=True, deterministic=keyword).sum().backward()
        finally:
            torch.use_deterministic_algorithms(before)
    assert seen == [False, True, True]
