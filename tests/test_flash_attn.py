"""flash_attn_func and its packed forms against the fp64 reference (issue 2).

Run with TRITON_INTERPRET=1 on a CPU to test the Triton kernels themselves
(scripts/test.sh does); without it, CPU tensors take the blockwise path.
"""

import pytest
import torch

import ioattn
from ioattn.reference import attention_ref

from helpers import assert_close, check_fwd_bwd, randn

# (batch, seqlen_q, seqlen_k, nheads_q, nheads_k, headdim)
SHAPES = [
    (1, 1, 1, 1, 1, 64),
    (2, 17, 17, 2, 2, 40),
    (1, 100, 37, 4, 1, 96),    # seqlen_q > seqlen_k, MQA
    (1, 37, 100, 4, 2, 64),    # seqlen_q < seqlen_k, GQA
    (1, 257, 257, 1, 1, 32),
    (1, 33, 47, 2, 1, 256),
    (2, 20, 24, 2, 2, 3),      # head dim that is no power of two and < 16
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_fp32_forward_backward(shape, causal, device):
    b, sq, sk, hq, hk, d = shape
    q, k, v = randn(b, sq, hq, d, device=device), randn(b, sk, hk, d, device=device), randn(b, sk, hk, d, device=device)
    check_fwd_bwd(lambda q, k, v: ioattn.flash_attn_func(q, k, v, causal=causal), q, k, v, dict(causal=causal))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 17, 33, 4, 2, 40), (1, 100, 60, 2, 1, 96)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision(shape, causal, dtype, device):
    b, sq, sk, hq, hk, d = shape
    q = randn(b, sq, hq, d, dtype=dtype, device=device)
    k, v = randn(b, sk, hk, d, dtype=dtype, device=device), randn(b, sk, hk, d, dtype=dtype, device=device)
    check_fwd_bwd(lambda q, k, v: ioattn.flash_attn_func(q, k, v, causal=causal), q, k, v, dict(causal=causal))


def test_softmax_scale(device):
    q, k, v = (randn(1, 40, 2, 32, device=device) for _ in range(3))
    check_fwd_bwd(lambda q, k, v: ioattn.flash_attn_func(q, k, v, softmax_scale=0.37), q, k, v,
                  dict(softmax_scale=0.37))


@pytest.mark.parametrize("causal", [False, True])
def test_non_contiguous_inputs(causal, device):
    # (b, h, s, d) tensors seen as (b, s, h, d), and a last dim that is not contiguous
    q = randn(2, 3, 50, 48, device=device, requires_grad=False).transpose(1, 2).requires_grad_()
    k = randn(2, 3, 70, 48, device=device, requires_grad=False).transpose(1, 2).requires_grad_()
    v = randn(2, 70, 3, 96, device=device, requires_grad=False)[..., ::2].requires_grad_()
    assert not q.is_contiguous() and v.stride(-1) == 2
    check_fwd_bwd(lambda q, k, v: ioattn.flash_attn_func(q, k, v, causal=causal), q, k, v, dict(causal=causal))


def test_rows_without_keys_are_zero(device):
    # causal with seqlen_q > seqlen_k: the first sq - sk query rows see no key
    q, k, v = randn(1, 30, 2, 16, device=device), randn(1, 10, 2, 16, device=device), randn(1, 10, 2, 16, device=device)
    out, lse, _ = ioattn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.equal(out[:, :20], torch.zeros_like(out[:, :20]))
    assert torch.isneginf(lse[:, :, :20]).all() and torch.isfinite(lse[:, :, 20:]).all()
    dq, = torch.autograd.grad(out.sum(), q)
    assert torch.equal(dq[:, :20], torch.zeros_like(dq[:, :20]))
    assert torch.isfinite(dq).all()


def test_lse_and_probs(device):
    q, k, v = (randn(2, 33, 2, 32, device=device, requires_grad=False) for _ in range(3))
    out, lse, probs = ioattn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    ref, ref_lse = attention_ref(q, k, v, causal=True)
    low, low_lse = attention_ref(q, k, v, causal=True, upcast=False)
    assert lse.shape == (2, 2, 33) and lse.dtype == torch.float32
    assert_close("lse", lse, ref_lse, low_lse, torch.float32)
    assert probs.shape == (2, 2, 33, 33)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 2, 33, device=device), atol=1e-5)


def test_qkvpacked_and_kvpacked(device):
    qkv = randn(2, 25, 3, 2, 40, device=device)
    out = ioattn.flash_attn_qkvpacked_func(qkv, causal=True)
    ref, _ = attention_ref(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    low, _ = attention_ref(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True, upcast=False)
    assert_close("out", out, ref, low, torch.float32)
    g, = torch.autograd.grad(out.sum(), qkv)
    gr, = torch.autograd.grad(ref.sum(), qkv)
    gl, = torch.autograd.grad(low.sum(), qkv)
    assert_close("dqkv", g, gr, gl, torch.float32)

    q, kv = randn(2, 19, 4, 32, device=device), randn(2, 31, 2, 2, 32, device=device)
    out = ioattn.flash_attn_kvpacked_func(q, kv)
    ref, _ = attention_ref(q, kv[:, :, 0], kv[:, :, 1])
    low, _ = attention_ref(q, kv[:, :, 0], kv[:, :, 1], upcast=False)
    assert_close("out", out, ref, low, torch.float32)


def test_torch_compile_fullgraph(device):
    q, k, v = (randn(1, 24, 2, 16, device=device) for _ in range(3))

    def layer(q, k, v):
        return ioattn.flash_attn_func(q * 2, k, v, causal=True).sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(layer(q, k, v), (q, k, v))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6)


def test_torch_compile_dynamic_shapes(device):
    """torch.compile(dynamic=True): every dim is symbolic, the head dim too, so the default scale
    is a SymFloat (math.sqrt / math.isfinite on it broke tracing before). Dense and varlen, forward
    and backward, three sizes through one compiled graph each, equal to eager; a user scale
    computed from a symbolic head dim as well."""
    torch._dynamo.reset()

    def dense(q, k, v):
        return ioattn.flash_attn_func(q, k, v, causal=True)

    def dense_scaled(q, k, v):
        return ioattn.flash_attn_func(q, k, v, softmax_scale=q.shape[-1] ** -0.5 * 0.5)

    def varlen(q, k, v, cu, max_len):
        return ioattn.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)

    for fn in (dense, dense_scaled):
        compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
        for n, d in ((9, 16), (23, 16), (17, 32)):
            q, k, v = randn(2, n, 4, d, device=device), randn(2, n, 2, d, device=device), randn(2, n, 2, d, device=device)
            got, want = compiled(q, k, v), fn(q, k, v)
            assert torch.allclose(got, want, atol=1e-6), (fn.__name__, n, d)
            for g, w in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
                assert torch.allclose(g, w, atol=1e-6), (fn.__name__, n, d)
    compiled = torch.compile(varlen, fullgraph=True, dynamic=True, backend="aot_eager")
    for lens in ((3, 5), (10, 1, 7)):
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        total = int(cu[-1])
        q, k, v = randn(total, 4, 16, device=device), randn(total, 2, 16, device=device), randn(total, 2, 16, device=device)
        got, want = compiled(q, k, v, cu, max(lens)), varlen(q, k, v, cu, max(lens))
        assert torch.allclose(got, want, atol=1e-6), lens
        for g, w in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
            assert torch.allclose(g, w, atol=1e-6), lens


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q = torch.empty(2, 10, 4, 64)
        k = torch.empty(2, 12, 2, 64)
        out, lse = torch.ops.ioattn.fwd(q, k, k, None, None, 10, 12, 0.125, -1, 0, 0.0, None, 0.0, None)
        assert out.shape == (2, 10, 4, 64) and lse.shape == (2, 4, 10)


@pytest.mark.parametrize("sq,sk", [(0, 5), (5, 0), (0, 0)])
def test_empty_sequences(sq, sk, device):
    q, k, v = randn(2, sq, 2, 16, device=device), randn(2, sk, 2, 16, device=device), randn(2, sk, 2, 16, device=device)
    out = ioattn.flash_attn_func(q, k, v)
    assert out.shape == (2, sq, 2, 16) and torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for g, x in zip(grads, (q, k, v)):
        assert g.shape == x.shape and torch.equal(g, torch.zeros_like(g))


def _op_args(q, k, dense, window=(-1, 0), softcap=0.0, alibi=None, dropout_p=0.0):
    """ioattn::fwd's arguments: dense (b, s, h, d) or varlen over two sequences (9 and 15 tokens)."""
    rng = torch.tensor([123, 456], device=q.device) if dropout_p > 0 else None
    if dense:
        cu_q = cu_k = None
        sq, sk = q.shape[1], k.shape[1]
    else:
        cu_q = cu_k = torch.tensor([0, 9, 24], dtype=torch.int32, device=q.device)
        sq = sk = 15
    return (q, k, k.flip(0), cu_q, cu_k, sq, sk, 0.3, *window, softcap, alibi, dropout_p, rng)


@pytest.mark.parametrize("opts", [
    dict(), dict(window=(4, 2), softcap=5.0, alibi=True), dict(dropout_p=0.25), dict(dense=False)],
    ids=["causal", "window_softcap_alibi", "dropout", "varlen"])
def test_eager_path_bit_identical_to_custom_op(opts, device):
    """The eager path (_EagerAttention) runs ioattn::fwd's implementation and autograd formula
    without the op's dispatch: outputs and gradients must be bit-identical to the op's."""
    from ioattn import interface
    opts = dict(opts)
    dense = opts.pop("dense", True)
    if opts.pop("alibi", False):
        opts["alibi"] = torch.rand(4, device=device)
    shape = (2, 12, 4, 16) if dense else (24, 4, 16)
    q, k = randn(*shape, device=device), randn(*shape[:-2], 2, 16, device=device)
    args = _op_args(q, k, dense, **opts)
    runs = []
    for attention in (torch.ops.ioattn.fwd, interface._EagerAttention.apply):
        out, lse = attention(*args)
        dout = torch.arange(out.numel(), device=device).reshape(out.shape).sin()
        runs.append((out, lse, *torch.autograd.grad(out, (q, k), dout)))
    op, eager = runs
    with torch.no_grad():  # nothing to differentiate: _attention runs the implementation alone
        inference = interface._attention(*args)
    for name, a, b in zip(("out", "lse", "dq", "dk (k and v)"), op, eager):
        assert torch.equal(a, b), name
    for name, a, b in zip(("out", "lse"), op, inference):
        assert torch.equal(a, b), f"{name}, no_grad"


def test_eager_path_taken_only_in_eager(device):
    q, k, v = (randn(1, 8, 2, 16, device=device) for _ in range(3))
    assert type(ioattn.flash_attn_func(q, k, v).grad_fn).__name__ == "_EagerAttentionBackward"
    with torch.no_grad():
        assert ioattn.flash_attn_func(q, k, v).grad_fn is None
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():  # a dispatch mode sees the custom op (fake impl, no kernel)
        out = ioattn.flash_attn_func(*(torch.empty(1, 8, 2, 16, device=device) for _ in range(3)))
        assert out.shape == (1, 8, 2, 16)
    with pytest.raises(NotImplementedError, match="gradients of gradients"):  # like the op: no double backward
        dq, = torch.autograd.grad(ioattn.flash_attn_func(q, k, v).sum(), q, create_graph=True)
        torch.autograd.grad(dq.sum(), q)


def test_autocast_runs_in_its_dtype(device):
    """Inside torch.autocast, fp32 inputs run in the autocast dtype, as SDPA does there: the
    output is bit-equal to the call on cast inputs, gradients reach the fp32 leaves in fp32."""
    q, k, v = randn(2, 21, 4, 32, device=device), randn(2, 30, 2, 32, device=device), randn(2, 30, 2, 32, device=device)
    cast = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    want = ioattn.flash_attn_func(*cast, causal=True)
    want.float().sum().backward()
    with torch.autocast(device.type if isinstance(device, torch.device) else str(device).split(":")[0],
                        dtype=torch.bfloat16):
        out = ioattn.flash_attn_func(q, k, v, causal=True)
        packed = ioattn.flash_attn_varlen_func(q[0], k[0], v[0], torch.tensor([0, 21], dtype=torch.int32,
                                               device=device), torch.tensor([0, 30], dtype=torch.int32,
                                               device=device), 21, 30, causal=True)
    assert out.dtype == packed.dtype == torch.bfloat16
    assert torch.equal(out, want) and torch.equal(packed, want[0])
    out.float().sum().backward()
    for t, c in zip((q, k, v), cast):
        assert t.grad.dtype == torch.float32 and torch.equal(t.grad, c.grad.float())
    # outside autocast, fp32 stays fp32
    assert ioattn.flash_attn_func(q, k, v).dtype == torch.float32
