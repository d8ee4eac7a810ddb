"""A value head dim of its own (dv != d, as in DeepSeek's MLA: 192 for q/k, 128 for v): out has
v's head dim, dq and dk q's, dv v's; the default scale stays d ** -0.5. Forward and backward
against the fp64 reference with the options, dense and varlen, in the Triton kernels (under the
interpreter) and on the CPU path; the Hopper Gluon kernels are not given such calls."""

import pytest
import torch

import ioattn
from ioattn import interface
from ioattn.kernels import configs
from ioattn.reference import attention_ref, attention_varlen_ref

from helpers import assert_close, check_fwd_bwd, compare_grads, randn

OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "window_softcap_alibi": dict(window_size=(6, 2), softcap=2.0, alibi=True),
}


def _qkv(b, sq, sk, hq, hk, d, dv, dtype=torch.float32, device="cpu"):
    return (randn(b, sq, hq, d, dtype=dtype, device=device), randn(b, sk, hk, d, dtype=dtype, device=device),
            randn(b, sk, hk, dv, dtype=dtype, device=device))


def _options(name, b, h, device):
    kw = dict(OPTIONS[name])
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(b, h, device=device) * 0.5
    return kw


# (d, dv): v's smaller, larger, both padded to other powers of two (40 -> 64, 24 -> 32)
@pytest.mark.parametrize("d,dv,name", [(24, 16, "causal"), (16, 40, "window_softcap_alibi"), (40, 24, "plain")],
                         ids=str)
def test_dense_fp32(d, dv, name, device):
    """GQA (4 query heads over 2), seqlen_q != seqlen_k, odd lengths."""
    kw = _options(name, 2, 4, device)
    q, k, v = _qkv(2, 21, 33, 4, 2, d, dv, device=device)
    out = check_fwd_bwd(lambda q, k, v: ioattn.flash_attn_func(q, k, v, **kw), q, k, v, kw)
    assert out.shape == (2, 21, 4, dv)


@pytest.mark.parametrize("d,dv,dtype", [(192, 128, torch.bfloat16), (64, 128, torch.float16)], ids=str)
def test_larger_head_dims_low_precision(d, dv, dtype, device):
    """MLA's head dims (and a v wider than q/k) in bf16/fp16, causal over more keys than queries."""
    q, k, v = _qkv(1, 19, 26, 2, 1, d, dv, dtype=dtype, device=device)
    check_fwd_bwd(lambda q, k, v: ioattn.flash_attn_func(q, k, v, causal=True), q, k, v, dict(causal=True))


def test_default_scale_is_qk_head_dim(device):
    q, k, v = _qkv(1, 9, 9, 2, 2, 16, 40, device=device)
    explicit = ioattn.flash_attn_func(q, k, v, softmax_scale=16 ** -0.5)
    assert torch.equal(ioattn.flash_attn_func(q, k, v), explicit)
    assert not torch.equal(ioattn.flash_attn_func(q, k, v, softmax_scale=40 ** -0.5), explicit)


def _packed(lens_q, lens_k, hq, hk, d, dv, device):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return (randn(sum(lens_q), hq, d, device=device), randn(sum(lens_k), hk, d, device=device),
            randn(sum(lens_k), hk, dv, device=device), cu_q, cu_k)


@pytest.mark.parametrize("d,dv,name", [(24, 16, "window_softcap_alibi"), (16, 40, "causal")], ids=str)
def test_varlen(d, dv, name, device):
    """Empty sequences (no queries; no keys: rows with out 0, lse -inf), odd lengths, GQA."""
    lens_q, lens_k = [5, 0, 17, 3], [9, 4, 17, 0]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 4, 2, d, dv, device)
    kw = _options(name, len(lens_q), 4, device)
    out, lse = ioattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), return_lse=True, **kw)
    ref, ref_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, **kw)
    low, _ = attention_varlen_ref(q, k, v, cu_q, cu_k, upcast=False, **kw)
    assert out.shape == (sum(lens_q), 4, dv)
    assert_close("out", out, ref, low, torch.float32)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin) and torch.allclose(lse[fin].double(), ref_lse[fin], atol=1e-5)
    compare_grads(out, ref, low, (q, k, v), torch.float32)


def test_dropout_replayed_mask(device):
    """return_attn_probs gives the keep mask the kernels drew; the reference replays it."""
    p = 0.25
    q, k, v = _qkv(1, 23, 30, 4, 2, 24, 40, device=device)
    out, _, probs = ioattn.flash_attn_func(q, k, v, dropout_p=p, causal=True, return_attn_probs=True)
    keep = probs >= 0
    assert not keep.all()
    ref, _ = attention_ref(q, k, v, dropout_p=p, dropout_mask=keep, causal=True)
    low, _ = attention_ref(q, k, v, dropout_p=p, dropout_mask=keep, causal=True, upcast=False)
    assert_close("out", out, ref, low, torch.float32)
    compare_grads(out, ref, low, (q, k, v), torch.float32)


def test_sinks_lse_and_deterministic(device):
    """Sinks and the lse's own gradient (return_lse), then bit-identical repeated backwards."""
    q, k, v = _qkv(2, 17, 22, 4, 1, 40, 24, device=device)
    sinks = torch.randn(4, device=device, requires_grad=True)
    out, lse = ioattn.flash_attn_func(q, k, v, causal=True, sinks=sinks, return_lse=True, deterministic=True)
    ref, ref_lse = attention_ref(q, k, v, causal=True, sinks=sinks)
    low, low_lse = attention_ref(q, k, v, causal=True, sinks=sinks, upcast=False)
    assert_close("out", out, ref, low, torch.float32)
    assert_close("lse", lse, ref_lse, low_lse, torch.float32)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    inputs = (q, k, v, sinks)
    got = torch.autograd.grad((out, lse), inputs, (dout, dlse), retain_graph=True)
    want = torch.autograd.grad((ref, ref_lse), inputs, (dout.double(), dlse.double()))
    lows = torch.autograd.grad((low, low_lse), inputs, (dout, dlse))
    for name, g, w, lg in zip(("dq", "dk", "dv", "dsinks"), got, want, lows):
        assert_close(name, g, w, lg, torch.float32)
    again = torch.autograd.grad((out, lse), inputs, (dout, dlse))
    assert all(torch.equal(a, b) for a, b in zip(got, again))


def test_grid_groups(monkeypatch, device):
    """More (batch, head) pairs than one grid holds (lowered to 8 here): the groups' results equal
    the single call's, dense and varlen, gradients included."""
    q, k, v = _qkv(3, 9, 12, 4, 2, 16, 24, device=device)
    qp, kp, vp, cu_q, cu_k = _packed([3, 0, 7], [4, 2, 9], 4, 2, 24, 16, device)

    def calls():
        dense = ioattn.flash_attn_func(q, k, v, causal=True)
        packed, lse = ioattn.flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, 7, 9, return_lse=True)
        return (dense, packed, lse, *torch.autograd.grad(dense.sum() + packed.sum() + lse.sum(),
                                                          (q, k, v, qp, kp, vp)))
    want = calls()
    monkeypatch.setattr(interface, "MAX_GRID_PAIRS", 8)
    got = calls()
    for a, b in zip(want, got):
        assert a.shape == b.shape and torch.equal(a, b)


def test_paged_kv(device):
    """A paged V cache with its own head dim (block_table; inference only)."""
    lens_q, lens_k, page = [4, 9], [13, 30], 8
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 2, 2, 24, 40, device)
    q, k, v = q.detach(), k.detach(), v.detach()
    pages = [-(-n // page) for n in lens_k]
    perm = torch.randperm(sum(pages), device=device).to(torch.int32)  # pages in random order
    table = torch.zeros(len(lens_k), max(pages), dtype=torch.int32, device=device)
    for b, n in enumerate(pages):
        table[b, :n] = perm[sum(pages[:b]):sum(pages[:b + 1])]
    caches = []
    for x in (k, v):
        cache = torch.full((sum(pages), page, 2, x.shape[-1]), float("nan"), device=device)  # (slots never read)
        for b, (start, n) in enumerate(zip(cu_k.tolist(), lens_k)):
            for j in range(n):
                cache[table[b, j // page], j % page] = x[start + j]
        caches.append(cache)
    with torch.no_grad():
        out = ioattn.flash_attn_varlen_func(q, *caches, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                            block_table=table)
    ref, _ = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True)
    low, _ = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True, upcast=False)
    assert_close("out", out, ref, low, torch.float32)


def test_shapes_on_meta():
    """The custom ops' fake kernels give out v's head dim and dv v's shape."""
    q, k = (torch.empty(2, 7, h, 192, device="meta", requires_grad=True) for h in (4, 2))
    v = torch.empty(2, 7, 2, 128, device="meta", requires_grad=True)
    out = ioattn.flash_attn_func(q, k, v, causal=True)
    assert out.shape == (2, 7, 4, 128)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert [tuple(g.shape) for g in grads] == [(2, 7, 4, 192), (2, 7, 2, 192), (2, 7, 2, 128)]
    cu = torch.tensor([0, 3, 14], dtype=torch.int32, device="meta")
    out = ioattn.flash_attn_varlen_func(q.reshape(14, 4, 192), k.reshape(14, 2, 192), v.reshape(14, 2, 128), cu, cu,
                                        11, 11)
    assert out.shape == (14, 4, 128)


@pytest.mark.skipif(configs.interpreting(), reason="graph capture, not the kernels: the CPU pass runs it")
def test_torch_compile_fullgraph():
    """torch.compile traces the ops (their fake kernels) with v's head dim: as eager, bit for bit."""
    qc, kc, vc = randn(1, 8, 2, 16), randn(1, 8, 2, 16), randn(1, 8, 2, 24)
    layer = lambda q, k, v: ioattn.flash_attn_func(q, k, v, causal=True)  # noqa: E731
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(qc, kc, vc)
    want = layer(qc, kc, vc)
    assert got.shape == (1, 8, 2, 24) and torch.equal(got, want)
    for g, w in zip(torch.autograd.grad(got.sum(), (qc, kc, vc)), torch.autograd.grad(want.sum(), (qc, kc, vc))):
        assert torch.equal(g, w)


@pytest.mark.skipif(configs.interpreting(), reason="the Gluon modules are not imported under the interpreter")
def test_gluon_kernels_value_head_dims_dispatch():
    """On sm_90 the Gluon forward takes dv != d where dv < d and d is 128/192/256
    (forward_sm90.VALUE_DIMS, on by default); the Gluon backward equal head dims, and (192 | 256,
    128) on backward_sm90_d256 in split mode (backward_sm90.VALUE_DIMS, on by default); with both
    flags off, dv != d stays on the Triton kernels in both directions."""
    forward_sm90 = pytest.importorskip("ioattn.kernels.forward_sm90")
    backward_sm90 = pytest.importorskip("ioattn.kernels.backward_sm90")
    opts = dict(varlen=False, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                capability=(9, 0))
    prev = forward_sm90.VALUE_DIMS, backward_sm90.VALUE_DIMS
    try:
        for value_dims in (True, False):
            forward_sm90.VALUE_DIMS = backward_sm90.VALUE_DIMS = value_dims
            for d, dv in ((128, 128), (128, 64), (256, 128), (192, 128), (64, 128), (160, 128)):
                q, k, v = (torch.zeros(1, 4096, 2, n, dtype=torch.bfloat16) for n in (d, d, dv))
                dout = torch.zeros(1, 4096, 2, dv, dtype=torch.bfloat16)
                fwd = forward_sm90.supported(q, k, v, block_table=None, **opts)
                bwd = backward_sm90.supported(q, k, v, dout, deterministic=False, **opts)
                want_fwd = d == dv or (value_dims and dv < d and d in (128, 192, 256))
                want_bwd = d == dv or (value_dims and (d, dv) in ((192, 128), (256, 128)))
                assert (bool(fwd), bwd is not None) == (want_fwd, want_bwd), (value_dims, d, dv, fwd, bwd)
                if d != dv and want_bwd:
                    assert bwd == "split", bwd
    finally:
        forward_sm90.VALUE_DIMS, backward_sm90.VALUE_DIMS = prev
