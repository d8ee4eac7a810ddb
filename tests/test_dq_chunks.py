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
