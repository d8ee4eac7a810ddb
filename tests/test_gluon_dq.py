"""The Gluon dQ kernel of the split-mode backward (kernels/backward_sm90_dq.py, default on sm_90;
IOATTN_GLUON_DQ=0 turns it off): compiled for sm_90a on the CPU (shared memory, wgmma shapes, TMA
loads and store, no reductions or atomics, no spills), its dispatch rules and the launcher's
arguments. Its numbers are checked on a GPU: benchmarks/gluon_dq_check.py (gpu_suite s21b)."""

import re

import pytest
import torch

from ioattn.kernels import configs
from ioattn.kernels.aot import SMEM_LIMIT, ptxas_report

pytestmark = pytest.mark.skipif(configs.interpreting(), reason="ahead-of-time compiles need the real Triton "
                                "compiler, not the interpreter (scripts/test.sh runs this file without it)")


def _mod():
    return pytest.importorskip("ioattn.kernels.backward_sm90_dq")


@pytest.mark.parametrize("head_dims", [(64, 64), (128, 128), (192, 128), (256, 128), (256, 256)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_gluon_dq_compiles_for_sm90a(head_dims, causal):
    """Every pair fits the shared memory with at least 2 stages, computes S and dP on m64 wgmma
    tiles of BLOCK_N keys and dQ on tiles of the head dim's parts (192 = 128 + 64: not padded),
    adds in a fixed order (no bulk reductions, no atomics: bit-reproducible) and stores dQ by the
    TMA. Spills: none, except 12 B measured at 256 / 128 without a mask (bound 16)."""
    m = _mod()
    d, dv = head_dims
    cfg = m.config(d, dv)
    kernel = m.compile_for(d, dv, causal=causal)
    assert kernel.metadata.shared <= SMEM_LIMIT[(9, 0)], kernel.metadata.shared
    assert cfg["STAGES"] >= 2
    ptx = kernel.asm["ptx"]
    shapes = set(re.findall(r"m64n(\d+)k16", ptx))
    parts = {min(d, 128), d - 128} if d > 128 else {d}
    assert str(cfg["BLOCK_N"]) in shapes and {str(p) for p in parts} <= shapes, shapes
    assert "cp.async.bulk.tensor" in ptx and "cp.async.bulk.tensor.4d.global.shared" in ptx
    assert "cp.reduce.async.bulk" not in ptx and "atom.global" not in ptx and "red.global" not in ptx
    assert ptxas_report(kernel)["spill_bytes"] <= 16


@pytest.mark.parametrize("head_dims", [(128, 128), (192, 128), (256, 256)], ids=str)
def test_gluon_dq_options_compile_for_sm90a(head_dims):
    """A sliding window, softcap and ALiBi together still fit without spills."""
    m = _mod()
    kernel = m.compile_for(*head_dims, causal=True, window=True, softcap=True, alibi=True)
    assert kernel.metadata.shared <= SMEM_LIMIT[(9, 0)]
    assert "tanh.approx.f32" in kernel.asm["ptx"]
    assert ptxas_report(kernel)["spill_bytes"] <= 16


def test_gluon_dq_dispatch(monkeypatch):
    """Which split-mode calls take it: the pairs of PAIRS (64 / 64 measured slower: not taken),
    dense, no dropout, no right window; IOATTN_GLUON_DQ=0 (ENABLED False) takes none."""
    m = _mod()

    def sup(d, dv, varlen=False, window_right=-1, dropout_p=0.0):
        shape = (700, 4, d) if varlen else (1, 700, 4, d)
        q = torch.zeros(shape, dtype=torch.bfloat16)
        v = torch.zeros(shape[:-1] + (dv, ), dtype=torch.bfloat16)
        return m.supported(q, q, v, v, varlen=varlen, window_right=window_right, dropout_p=dropout_p)

    assert m.ENABLED  # on by default since the H100 check (results/h100-session21b)
    assert sup(128, 128) and sup(192, 128) and sup(256, 128) and sup(256, 256) and sup(128, 128, window_right=0)
    assert not sup(64, 64) and not sup(128, 64) and not sup(192, 160)
    # equal padded head dims of 136-248 (backward_sm90.PAD_BWD256, opt-in) run as 256 / 256
    assert sup(192, 192) == sup(160, 160) == m.pads_to_256(160) and not sup(96, 96)
    assert not sup(128, 128, varlen=True) and not sup(192, 128, dropout_p=0.1) and not sup(128, 128, window_right=3)
    monkeypatch.setattr(m, "ENABLED", False)
    assert not sup(192, 128)


@pytest.mark.parametrize("head_dims", [(192, 128), (128, 128)], ids=str)
def test_gluon_dq_launch_arguments(monkeypatch, head_dims):
    """The launcher's grid (one CTA per 128 query rows of a (batch, query head)), the TMA tiles
    (Q/K up to column 128, then the rest from column 128; dO/V whole; dQ on Q's tiles), the stats
    strides, the GQA group and the options' flags."""
    m = _mod()
    d, dv = head_dims
    seen = {}

    def fake_launch(kernel, grid, *args, key=None, **kwargs):
        seen.update(kernel=kernel, grid=grid, args=args, kwargs=kwargs)

    monkeypatch.setattr(m, "launch", fake_launch)
    b, sq, sk, h, hk = 2, 300, 333, 8, 2
    q = torch.zeros(b, sq, h, d, dtype=torch.bfloat16)
    k = torch.zeros(b, sk, hk, d, dtype=torch.bfloat16)
    v = torch.zeros(b, sk, hk, dv, dtype=torch.bfloat16)
    dout = torch.zeros(b, sq, h, dv, dtype=torch.bfloat16)
    stats = torch.zeros(b, h, 2, 304)[..., :sq]
    m.attention_backward_dq(dout, q, k, v, stats, torch.empty_like(q), softmax_scale=0.1, causal=True,
                            window_left=64, softcap=20.0, alibi_slopes=torch.ones(h))
    assert seen["grid"] == (3, b * h)
    blocks = [tuple(a.block_shape) for a in seen["args"][:8]]
    lo, hi = min(d, 128), (d - 128 if d > 128 else min(d, 128))
    bn = m.config(d, dv)["BLOCK_N"]
    assert blocks == [(1, 64, 1, lo), (1, 64, 1, hi), (1, 64, 1, dv), (1, bn, 1, lo), (1, bn, 1, hi), (1, bn, 1, dv),
                      (1, 64, 1, lo), (1, 64, 1, hi)]
    rest = seen["args"][8:]
    assert rest[0] is stats and tuple(rest[1:4]) == stats.stride()[:3]
    assert tuple(rest[4:8]) == (sq, sk, h, h // hk) and rest[10] == 64
    kw = seen["kwargs"]
    assert kw["CAUSAL"] and kw["HAS_WINDOW"] and kw["HAS_SOFTCAP"] and kw["HAS_ALIBI"]
    assert kw["HAS_HI"] == (d > 128)
