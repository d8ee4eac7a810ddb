"""The Gluon Hopper backward at head dim 256 (kernels/backward_sm90_d256.py, default on sm_90;
IOATTN_GLUON_BWD256=0 turns it off): compiled for sm_90a on the CPU (shared memory, wgmma shapes, TMA loads,
stores and dQ reductions, the register split, no spills), its dispatch rules and the launcher's
wiring. Its numbers are checked on a GPU: benchmarks/gluon_bwd256_check.py (gpu_suite s10b)."""

import pytest
import torch

from ioattn.kernels import configs
from ioattn.kernels.aot import SMEM_LIMIT, ptxas_report

pytestmark = pytest.mark.skipif(configs.interpreting(), reason="ahead-of-time compiles need the real Triton "
                                "compiler, not the interpreter (scripts/test.sh runs this file without it)")


@pytest.mark.parametrize("causal,with_dq,dtype", [(True, True, "bf16"), (False, False, "bf16"),
                                                  (True, False, "fp16")])
def test_gluon_bwd256_compiles_for_sm90a(causal, with_dq, dtype):
    """Both modes fit the shared memory (230,784 B measured) without spills: per consumer thread
    dK, dV halves (64 + 64 fp32), the 64 x 32 scores and dP (16 + 16), the dQ half (64) in the
    one pass, under the 240 registers of the split."""
    d256 = pytest.importorskip("ioattn.kernels.backward_sm90_d256")
    kernel = d256.compile_for(dtype, causal, with_dq)
    assert kernel.metadata.shared <= SMEM_LIMIT[(9, 0)], kernel.metadata.shared
    ptx = kernel.asm["ptx"]
    assert "cp.async.bulk.tensor" in ptx and "setmaxnreg" in ptx
    # scores of 32 keys per warpgroup; dK/dV (and dQ) halves of 128 columns
    assert "m64n32k16" in ptx and "m64n128k16" in ptx
    assert ("cp.reduce.async.bulk.tensor" in ptx) == with_dq and "atom.global" not in ptx
    assert ptxas_report(kernel)["spill_bytes"] == 0


def test_gluon_bwd256_dispatch(monkeypatch):
    bwd = pytest.importorskip("ioattn.kernels.backward_sm90")

    def t(d=256, n=1000, h=2, dtype=torch.bfloat16):
        return torch.zeros(1, n, h, d, dtype=dtype)

    dense = dict(varlen=False, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, dropout_p=0.0)
    b = lambda deterministic=False, dtype=torch.bfloat16, **kw: bwd.supported(  # noqa: E731
        t(dtype=dtype), t(h=1, dtype=dtype), t(h=1, dtype=dtype), t(dtype=dtype), **{**dense, **kw},
        deterministic=deterministic, capability=(9, 0))
    assert bwd.D256  # on by default since the H200 check (results/h200-session9d)
    monkeypatch.setattr(bwd, "D256", False)
    assert b() is None and b(window_right=0) is None  # IOATTN_GLUON_BWD256=0: the Triton backward
    monkeypatch.setattr(bwd, "D256", True)
    # "split" (Gluon dK/dV, Triton dQ) measured ahead of the one pass at hdim 256: the default
    assert b() == "split" and b(window_right=0) == "split" and b(dtype=torch.float16) == "split"
    assert b(deterministic=True) == "split"
    monkeypatch.setattr(bwd, "MODE", "atomic")
    assert b() == "atomic" and b(deterministic=True) == "split"
    monkeypatch.setattr(bwd, "MODE", "auto")
    for kw in (dict(softcap=30.0), dict(alibi_slopes=torch.ones(2)), dict(dropout_p=0.1), dict(window_left=64),
               dict(window_left=64, window_right=0), dict(window_right=16)):
        assert b(**kw) is None, kw
    assert b(dtype=torch.float32) is None
    packed = torch.zeros(1000, 2, 256, dtype=torch.bfloat16)
    assert bwd.supported(packed, packed, packed, packed, **{**dense, "varlen": True}, max_seqlen_k=1000,
                         deterministic=False, capability=(9, 0)) is None
    monkeypatch.setattr(bwd, "MODE", "split")
    assert b() == "split"
    monkeypatch.setattr(bwd, "MODE", "0")
    assert b() is None


@pytest.mark.parametrize("with_dq", [True, False])
def test_gluon_bwd256_launcher_wiring(monkeypatch, with_dq):
    """backward_sm90's launcher hands hdim 256 to the new kernel with column-half tiles, one CTA
    per 64 keys, and the arguments its signature takes (recorded, not launched)."""
    bwd = pytest.importorskip("ioattn.kernels.backward_sm90")
    d256 = pytest.importorskip("ioattn.kernels.backward_sm90_d256")
    calls = []
    monkeypatch.setattr(d256, "launch", lambda kern, grid, *a, **kw: calls.append((kern, grid, a, kw)))
    b, sq, sk, h, hk = 2, 300, 130, 4, 2
    q = torch.empty(b, sq, h, 256, dtype=torch.bfloat16)
    kv = torch.empty(b, sk, hk, 256, dtype=torch.bfloat16)
    stats = bwd.new_stats(b, h, sq, "cpu")
    bwd.attention_backward_sm90(q, q, kv, kv, stats, torch.zeros(q.shape) if with_dq else None,
                                torch.empty_like(kv), torch.empty_like(kv), softmax_scale=0.0625, causal=True)
    (kern, grid, args, kw), = calls
    assert kern is d256._attn_bwd_d256 and grid == (3, b * hk)
    names = kern.arg_names
    assert len(args) + sum(n in kw for n in names) == len(names)
    assert all(names.index(n) in kern.constexprs for n in kw if n in names)
    descs = args[:8]
    assert [tuple(x.block_shape) for x in descs[:7]] == [(1, 64, 1, 128)] * 7
    assert descs[6].base.dtype == (torch.float32 if with_dq else torch.bfloat16)
    assert tuple(descs[7].block_shape) == (1, 1, 1, 64)
    assert args[8:12] == (sq, sk, hk, h // hk) and kw["CAUSAL"] and kw["WITH_DQ"] == with_dq
