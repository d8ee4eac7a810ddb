"""The one-pass Hopper backward over groups of KV heads (backward._dq_accum_chunks), without a GPU.

Above backward.DQ_ACCUM_CHUNK_BYTES the one pass runs once per group of KV heads, each with an
fp32 dQ accumulator for that group only. Here backward_sm90 is replaced by a stand-in whose
"kernel" computes exact gradients (fp64 autograd) of the slices it is handed and adds/writes them
where the real kernel would (dQ into the accumulator, dK/dV into their slices): the gradients that
come back must equal those of attention over all heads, so every slice (query heads of a GQA
group, KV heads, dout, the stats rows, ALiBi slopes) must be the right one. Under the interpreter
the real preprocess kernel fills the stats buffer, whose head slices are checked too.
"""

import types

import pytest
import torch

from ioattn.kernels import backward, configs
from ioattn.reference import attention_ref

pytestmark = pytest.mark.skipif(not configs.interpreting(), reason="runs the Triton preprocess: TRITON_INTERPRET=1")


def test_chunk_counts():
    q = torch.empty(1, 16384, 16, 128, dtype=torch.bfloat16)
    assert backward._dq_accum_chunks(q, 16, 0.0) == 2  # 128 MiB accumulator -> two of 64 MiB
    assert backward._dq_accum_chunks(q, 16, 0.1) == 1  # dropout salts masks by head: never
    assert backward._dq_accum_chunks(q, 1, 0.0) == 1  # MQA: one KV head cannot be split
    assert backward._dq_accum_chunks(q, 3, 0.0) == 3  # the smallest equal split of the KV heads
    assert backward._dq_accum_chunks(q[:, :1024], 16, 0.0) == 1  # 8 MiB: one launch
    assert backward._dq_accum_chunks(q.float(), 16, 0.0) == 1  # fp32: no larger than dQ already


def _stand_in(calls, nheads_total):
    def attention_backward_sm90(dout, q, k, v, stats, dq_accum, dk, dv, *, softmax_scale, causal, window_left=-1,
                                alibi_slopes=None, softcap=0.0, **_):
        calls.append(dict(hq=q.shape[2], hk=k.shape[2], stats=tuple(stats.shape), accum=tuple(dq_accum.shape)))
        assert stats.shape[1] == q.shape[2] and dq_accum.shape == q.shape and not dq_accum.any()
        assert torch.isfinite(stats).all()  # the preprocess filled these rows
        qf, kf, vf = (t.detach().double().requires_grad_() for t in (q, k, v))
        out, _ = attention_ref(qf, kf, vf, softmax_scale=softmax_scale, causal=causal, alibi_slopes=alibi_slopes,
                               softcap=softcap, window_size=(window_left, 0 if causal else -1))
        gq, gk, gv = torch.autograd.grad(out, (qf, kf, vf), dout.double())
        dq_accum += gq.float()
        dk.copy_(gk)
        dv.copy_(gv)

    return types.SimpleNamespace(
        supported=lambda *a, **kw: "atomic",
        new_stats=lambda b, h, s, device: torch.full((b, h, 2, s), float("nan"), device=device),
        attention_backward_sm90=attention_backward_sm90)


@pytest.mark.parametrize("nheads,nheads_k,alibi", [(8, 4, False), (6, 2, True), (4, 4, False)])
def test_chunked_one_pass_equals_attention_over_all_heads(monkeypatch, nheads, nheads_k, alibi):
    torch.manual_seed(nheads * 10 + nheads_k)
    b, sq, sk, d = 2, 37, 45, 16
    bf = dict(dtype=torch.bfloat16)  # (fp32 needs no split: its accumulator is dQ's size)
    q = torch.randn(b, sq, nheads, d, **bf)
    k, v = torch.randn(b, sk, nheads_k, d, **bf), torch.randn(b, sk, nheads_k, d, **bf)
    dout = torch.randn(b, sq, nheads, d, **bf)
    slopes = torch.rand(b, nheads) * 0.5 if alibi else None
    out, lse = attention_ref(q, k, v, causal=True, alibi_slopes=slopes)
    calls = []
    monkeypatch.setattr(backward, "_sm90", _stand_in(calls, nheads))
    monkeypatch.setattr(backward, "DQ_ACCUM_CHUNK_BYTES", 0)  # split whenever the KV heads allow
    dq, dk, dv = backward.attention_backward(dout, q, k, v, out.to(q.dtype), lse.float(), max_seqlen_q=sq,
                                             max_seqlen_k=sk, softmax_scale=d ** -0.5, window_right=0,
                                             alibi_slopes=slopes)
    want = backward._dq_accum_chunks(q, nheads_k, 0.0)
    assert len(calls) == want and (want > 1) == (nheads_k > 1)
    assert all(c["hq"] == nheads // want and c["hk"] == nheads_k // want for c in calls)
    qf, kf, vf = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_ref(qf, kf, vf, causal=True, alibi_slopes=slopes)
    for got, exp in zip((dq, dk, dv), torch.autograd.grad(ref, (qf, kf, vf), dout.double())):
        torch.testing.assert_close(got.double(), exp, rtol=1e-2, atol=1e-2)  # bf16 rounding of the result


def _stand_in_varlen(calls):
    """The stand-in for packed batches: per sequence of cu_seqlens_q/k, as the kernel would."""
    def attention_backward_sm90(dout, q, k, v, stats, dq_accum, dk, dv, *, softmax_scale, causal, window_left=-1,
                                alibi_slopes=None, softcap=0.0, cu_seqlens_q, cu_seqlens_k, **_):
        calls.append(dict(hq=q.shape[1], hk=k.shape[1]))
        assert stats.shape[1] == q.shape[1] and dq_accum.shape == q.shape and not dq_accum.any()
        for i in range(cu_seqlens_q.shape[0] - 1):
            rq = slice(int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]))
            rk = slice(int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1]))
            qf, kf, vf = (t[r].detach().double().unsqueeze(0).requires_grad_() for t, r in ((q, rq), (k, rk), (v, rk)))
            out, _ = attention_ref(qf, kf, vf, softmax_scale=softmax_scale, causal=causal, softcap=softcap,
                                   alibi_slopes=alibi_slopes, window_size=(window_left, 0 if causal else -1))
            gq, gk, gv = torch.autograd.grad(out, (qf, kf, vf), dout[rq].double().unsqueeze(0))
            dq_accum[rq] += gq[0].float()
            dk[rk] = gk[0].to(dk.dtype)
            dv[rk] = gv[0].to(dv.dtype)

    return types.SimpleNamespace(
        supported=lambda *a, **kw: "atomic",
        new_stats_varlen=lambda h, total, b, device: torch.zeros(1, h, 2, total + 4 * b, device=device),
        attention_backward_sm90=attention_backward_sm90)


@pytest.mark.parametrize("nheads,nheads_k,alibi", [(8, 4, True), (4, 2, False)])
def test_chunked_one_pass_varlen(monkeypatch, nheads, nheads_k, alibi):
    """Packed batches (with an empty sequence): the head slices of q/k/v/dout/dq/dk/dv on axis 1,
    of the stats buffer and of the ALiBi slopes, sequence by sequence."""
    torch.manual_seed(nheads + nheads_k)
    lens_q, lens_k, d = [13, 0, 29], [20, 0, 31], 16
    cu_q = torch.tensor([0, 13, 13, 42], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 20, 51], dtype=torch.int32)
    bf = dict(dtype=torch.bfloat16)
    q, dout = torch.randn(42, nheads, d, **bf), torch.randn(42, nheads, d, **bf)
    k, v = torch.randn(51, nheads_k, d, **bf), torch.randn(51, nheads_k, d, **bf)
    slopes = torch.rand(nheads) * 0.5 if alibi else None
    outs, lses = [], []
    for i in range(3):
        rq, rk = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        o, l = attention_ref(q[rq][None], k[rk][None], v[rk][None], causal=True, alibi_slopes=slopes)
        outs.append(o[0])
        lses.append(l[0])
    out, lse = torch.cat(outs).to(q.dtype), torch.cat(lses, dim=-1).float()
    calls = []
    monkeypatch.setattr(backward, "_sm90", _stand_in_varlen(calls))
    monkeypatch.setattr(backward, "DQ_ACCUM_CHUNK_BYTES", 0)
    dq, dk, dv = backward.attention_backward(dout, q, k, v, out, lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                             max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k),
                                             softmax_scale=d ** -0.5, window_right=0, alibi_slopes=slopes)
    want = backward._dq_accum_chunks(q, nheads_k, 0.0)
    assert want == 2 and len(calls) == want  # (the accumulator is never split below dQ's own size)
    assert all(c["hq"] == nheads // want and c["hk"] == nheads_k // want for c in calls)
    for i in range(3):
        rq, rk = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        qf, kf, vf = (t[r].double()[None].requires_grad_() for t, r in ((q, rq), (k, rk), (v, rk)))
        ref, _ = attention_ref(qf, kf, vf, causal=True, alibi_slopes=slopes)
        exp = torch.autograd.grad(ref, (qf, kf, vf), dout[rq].double()[None], allow_unused=True)
        for got, e, r in zip((dq, dk, dv), exp, (rq, rk, rk)):
            if e is not None:
                torch.testing.assert_close(got[r].double(), e[0], rtol=1e-2, atol=1e-2)


def test_no_chunks_for_short_sequences(monkeypatch):
    """Short sequences keep one launch (the host time of more is not hidden there), unless forced."""
    q = torch.empty(16, 1024, 16, 128, dtype=torch.bfloat16)  # 128 MiB accumulator at 1k keys
    assert backward._dq_accum_chunks(q, 16, 0.0, seqlen_k=1024) == 1
    assert backward._dq_accum_chunks(q, 16, 0.0, seqlen_k=4096) == 1
    assert backward._dq_accum_chunks(q, 16, 0.0, seqlen_k=8192) == 2
    monkeypatch.setattr(backward, "DQ_ACCUM_CHUNK_BYTES", 0)  # IOATTN_DQ_ACCUM_CHUNK_MIB=0: always
    assert backward._dq_accum_chunks(q, 16, 0.0, seqlen_k=1024) == 2
