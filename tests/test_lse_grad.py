"""The returned log-sum-exp is differentiable (return_lse=True / return_attn_probs=True).

A loss that uses lse (merging partial attentions, ring attention, z-loss style
regularizers) must get d lse / d scores = P folded into dq and dk. Compared with
autograd through the fp64 reference, whose lse is torch.logsumexp.
"""

import pytest
import torch

import ioattn
from ioattn.reference import attention_ref, attention_varlen_ref

from helpers import assert_close, randn


def _grads_with_lse(out, lse, inputs, dout, dlse):
    loss = 0
    if dout is not None:
        loss = loss + (out * dout.to(out.dtype)).sum()
    if dlse is not None:
        loss = loss + (lse * dlse.to(lse.dtype)).sum()
    return torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)


def _check(fn, ref_fn, inputs, use_out=True, use_lse=True):
    """fn(*inputs) -> (out, lse) against ref_fn(*inputs, upcast) -> (out, lse), values and grads."""
    dtype = inputs[0].dtype
    out, lse = fn(*inputs)
    ref, ref_lse = ref_fn(*inputs, True)
    low, low_lse = ref_fn(*inputs, False)
    assert_close("out", out, ref, low, dtype)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert_close("lse", lse[fin], ref_lse[fin], low_lse[fin], dtype)
    dout = torch.randn_like(out, dtype=torch.float64) if use_out else None
    dlse = torch.randn_like(lse, dtype=torch.float64) if use_lse else None
    got = _grads_with_lse(out, lse, inputs, dout, dlse)
    # rows without any visible key: lse = -inf and no gradient flows from it
    dlse_ref = None if dlse is None else torch.where(fin, dlse, 0.0)
    want = _grads_with_lse(ref, torch.where(fin, ref_lse, 0.0), inputs, dout, dlse_ref)
    lowg = _grads_with_lse(low, torch.where(fin, low_lse, 0.0), inputs, dout, dlse_ref)
    for name, g, r, lg in zip(("dq", "dk", "dv"), got, want, lowg):
        assert_close(name, g, r, lg, dtype)


CASES = [  # (batch, seqlen_q, seqlen_k, nheads_q, nheads_k, headdim, options)
    (2, 33, 33, 2, 2, 32, dict()),
    (1, 40, 70, 4, 2, 64, dict(causal=True)),                        # GQA, sq < sk
    (1, 50, 20, 2, 1, 16, dict(causal=True)),                        # rows without keys
    (1, 45, 45, 2, 2, 40, dict(window_size=(8, 3), softcap=3.0)),
]


@pytest.mark.parametrize("case", CASES, ids=["plain", "gqa_causal", "empty_rows", "window_softcap"])
@pytest.mark.parametrize("uses", ["out_and_lse", "lse_only"])
def test_lse_gradient(case, uses, device):
    b, sq, sk, hq, hk, d, opts = case
    q, k, v = randn(b, sq, hq, d, device=device), randn(b, sk, hk, d, device=device), randn(b, sk, hk, d, device=device)
    _check(lambda q, k, v: ioattn.flash_attn_func(q, k, v, return_lse=True, **opts),
           lambda q, k, v, up: attention_ref(q, k, v, upcast=up, **opts), (q, k, v),
           use_out=uses == "out_and_lse")


def test_lse_gradient_alibi_through_return_attn_probs(device):
    q, k, v = randn(2, 30, 2, 32, device=device), randn(2, 36, 2, 32, device=device), randn(2, 36, 2, 32, device=device)
    slopes = torch.tensor([0.3, 0.05], device=device)

    def fn(q, k, v):
        out, lse, _ = ioattn.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes,
                                             return_attn_probs=True)
        return out, lse
    _check(fn, lambda q, k, v, up: attention_ref(q, k, v, causal=True, alibi_slopes=slopes, upcast=up),
           (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lse_gradient_low_precision(dtype, device):
    q = randn(1, 40, 4, 64, dtype=dtype, device=device)
    k, v = randn(1, 56, 2, 64, dtype=dtype, device=device), randn(1, 56, 2, 64, dtype=dtype, device=device)
    _check(lambda q, k, v: ioattn.flash_attn_func(q, k, v, causal=True, return_lse=True),
           lambda q, k, v, up: attention_ref(q, k, v, causal=True, upcast=up), (q, k, v))


def test_lse_gradient_with_dropout(device):
    """lse is the log-sum-exp before dropout; its gradient goes through the undropped P
    while out's goes through the kept entries (mask replayed from return_attn_probs)."""
    p = 0.2
    q, k, v = randn(1, 37, 2, 32, device=device), randn(1, 41, 2, 32, device=device), randn(1, 41, 2, 32, device=device)
    out, lse, probs = ioattn.flash_attn_func(q, k, v, dropout_p=p, causal=True, return_attn_probs=True)
    keep = probs >= 0
    _check(lambda q, k, v: (out, lse),
           lambda q, k, v, up: attention_ref(q, k, v, causal=True, dropout_p=p, dropout_mask=keep,
                                             upcast=up), (q, k, v))


def test_lse_gradient_varlen(device):
    lens_q, lens_k = [5, 0, 33, 17], [9, 4, 33, 0]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = randn(sum(lens_q), 4, 32, device=device)
    k, v = randn(sum(lens_k), 2, 32, device=device), randn(sum(lens_k), 2, 32, device=device)
    _check(lambda q, k, v: ioattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                                         causal=True, return_lse=True),
           lambda q, k, v, up: attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True, upcast=up),
           (q, k, v))


def test_ring_attention_by_merging(device):
    """Attention over keys split in two chunks, merged by lse, equals attention over all
    keys: values and gradients (the dlse path is what carries dq, dk across chunks)."""
    q, k, v = randn(2, 48, 4, 32, device=device), randn(2, 64, 2, 32, device=device), randn(2, 64, 2, 32, device=device)
    o1, l1 = ioattn.flash_attn_func(q, k[:, :24], v[:, :24], return_lse=True)
    o2, l2 = ioattn.flash_attn_func(q, k[:, 24:], v[:, 24:], return_lse=True)
    out, lse = ioattn.merge_attention_states(torch.stack([o1, o2]), torch.stack([l1, l2]))
    whole, whole_lse = ioattn.flash_attn_func(q, k, v, return_lse=True)
    assert torch.allclose(out, whole, atol=1e-5) and torch.allclose(lse, whole_lse, atol=1e-5)
    dout = torch.randn_like(out)
    got = torch.autograd.grad((out * dout).sum(), (q, k, v))
    want = torch.autograd.grad((whole * dout).sum(), (q, k, v))
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert torch.allclose(g, w, atol=1e-4), (name, (g - w).abs().max().item())


def test_lse_gradient_under_torch_compile(device):
    q, k, v = (randn(1, 24, 2, 16, device=device) for _ in range(3))

    def layer(q, k, v):
        out, lse = ioattn.flash_attn_func(q, k, v, causal=True, return_lse=True)
        return out.sum() + (lse * lse).sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(layer(q, k, v), (q, k, v))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)


def test_unused_lse_changes_nothing(device):
    """With return_lse but a loss on out alone, gradients equal those without return_lse."""
    q, k, v = (randn(1, 29, 2, 32, device=device) for _ in range(3))
    dout = torch.randn(1, 29, 2, 32, device=device)
    out, _ = ioattn.flash_attn_func(q, k, v, causal=True, return_lse=True)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ioattn.flash_attn_func(q, k, v, causal=True), (q, k, v), dout)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# --------------------------------------------------------------------------- attention sinks

@pytest.mark.parametrize("opts", [dict(causal=True), dict(window_size=(6, 0), causal=True), dict()],
                         ids=["causal", "sliding_window", "bidirectional"])
def test_sinks_match_reference(opts, device):
    """GPT-OSS's sinks: values, lse and the gradients of q, k, v and of the sinks themselves."""
    q, k, v = randn(1, 40, 4, 32, device=device), randn(1, 45, 2, 32, device=device), randn(1, 45, 2, 32, device=device)
    sinks = (torch.randn(4, device=device) * 2).requires_grad_()
    inputs = (q, k, v, sinks)
    out, lse = ioattn.flash_attn_func(q, k, v, sinks=sinks, return_lse=True, **opts)
    ref, ref_lse = attention_ref(q, k, v, sinks=sinks, **opts)
    low, low_lse = attention_ref(q, k, v, sinks=sinks, upcast=False, **opts)
    assert_close("out", out, ref, low, torch.float32)
    assert_close("lse", lse, ref_lse, low_lse, torch.float32)
    dout, dlse = torch.randn_like(out, dtype=torch.float64), torch.randn_like(lse, dtype=torch.float64)
    got = _grads_with_lse(out, lse, inputs, dout, dlse)
    want = _grads_with_lse(ref, ref_lse, inputs, dout, dlse)
    lowg = _grads_with_lse(low, low_lse, inputs, dout, dlse)
    for name, g, r, lg in zip(("dq", "dk", "dv", "dsinks"), got, want, lowg):
        assert_close(name, g, r, lg, torch.float32)


def test_sinks_varlen_and_rows_without_keys(device):
    lens_q, lens_k = [7, 20, 0], [3, 20, 5]
    cu_q = torch.tensor([0, 7, 27, 27], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 3, 23, 28], dtype=torch.int32, device=device)
    q, k, v = randn(27, 2, 16, device=device), randn(28, 2, 16, device=device), randn(28, 2, 16, device=device)
    sinks = torch.tensor([0.5, -1.0], device=device, requires_grad=True)
    out, lse = ioattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 20, 20, causal=True, sinks=sinks,
                                             return_lse=True)
    ref, ref_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True, sinks=sinks)
    low, low_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True, sinks=sinks, upcast=False)
    assert_close("out", out, ref, low, torch.float32)
    assert torch.equal(out[:4], torch.zeros_like(out[:4]))  # causal, 7 queries over 3 keys
    assert_close("lse", lse, ref_lse, low_lse, torch.float32)  # the empty rows: lse = the sink
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, sinks), dout)
    want = torch.autograd.grad(ref, (q, k, v, sinks), dout.double())
    lowg = torch.autograd.grad(low, (q, k, v, sinks), dout)
    for name, g, r, lg in zip(("dq", "dk", "dv", "dsinks"), got, want, lowg):
        assert_close(name, g, r, lg, torch.float32)


def test_sink_of_minus_inf_is_no_sink(device):
    """A sink of -inf takes no mass: the head's results equal those without sinks, also on rows
    that see no key (out 0, lse -inf), with finite gradients (no -inf - -inf)."""
    q, k, v = randn(1, 6, 2, 8, device=device), randn(1, 3, 2, 8, device=device), randn(1, 3, 2, 8, device=device)
    sinks = torch.tensor([0.3, float("-inf")], device=device, requires_grad=True)
    out, lse = ioattn.flash_attn_func(q, k, v, causal=True, sinks=sinks, return_lse=True)  # rows 0-2 see no key
    plain, plain_lse = ioattn.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out[:, :, 1], plain[:, :, 1]) and torch.equal(lse[:, 1], plain_lse[:, 1])
    assert torch.isneginf(lse[0, 1, :3]).all() and torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))
    grads = torch.autograd.grad((out.sum() + lse[:, 0].sum()), (q, k, v, sinks))
    assert all(torch.isfinite(g).all() for g in grads) and grads[3][1] == 0


def test_sinks_errors():
    q = torch.randn(1, 8, 2, 16)
    for bad, exc, match in ((torch.zeros(3), ValueError, r"shape \(nheads,\) = \(2,\)"),
                            (torch.zeros(2, dtype=torch.int32), TypeError, "floating-point"),
                            ([0.0, 0.0], TypeError, "must be a tensor")):
        with pytest.raises(exc, match=match):
            ioattn.flash_attn_func(q, q, q, sinks=bad)
