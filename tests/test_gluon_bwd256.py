"""The Gluon Hopper backward at head dim 256 (kernels/backward_sm90_d256.py, default on sm_90;
IOATTN_GLUON_BWD256=0 turns it off): compiled for sm_90a on the CPU (shared memory, wgmma shapes, TMA loads,
stores and dQ reductions, the register split, no spills), its dispatch rules and the launcher's
wiring; the options (sliding windows, softcap, ALiBi, packed varlen batches; on by default,
IOATTN_GLUON_BWD256_OPTIONS=0 turns them off) likewise. Its numbers are checked on a GPU:
benchmarks/gluon_bwd256_check.py (gpu_suite s10b; --options: s10e)."""

import re

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
    options = (dict(softcap=30.0), dict(alibi_slopes=torch.ones(2)), dict(window_left=64),
               dict(window_left=63, window_right=0), dict(softcap=50.0, window_left=1023, window_right=0))
    packed = torch.zeros(1000, 2, 256, dtype=torch.bfloat16)
    varlen = lambda deterministic=False, **kw: bwd.supported(  # noqa: E731
        packed, packed[:, :1], packed[:, :1], packed, **{**dense, "varlen": True, **kw}, max_seqlen_k=1000,
        deterministic=deterministic, capability=(9, 0))
    # the options are on by default since the H200 check (results/h200-session9f);
    # IOATTN_GLUON_BWD256_OPTIONS=0 sends them to the Triton backward
    assert bwd.D256_OPTIONS
    monkeypatch.setattr(bwd, "D256_OPTIONS", False)
    for kw in options + (dict(dropout_p=0.1), dict(window_right=16)):
        assert b(**kw) is None, kw
    assert varlen() is None and b(dtype=torch.float32) is None
    monkeypatch.setattr(bwd, "D256_OPTIONS", True)
    for kw in options:
        assert b(**kw) == "split" and b(deterministic=True, **kw) == "split", kw
    assert varlen() == "split" and varlen(window_left=100, window_right=0, softcap=30.0) == "split"
    # dropout and right windows stay on the Triton backward; the forward's switches still apply
    for kw in (dict(dropout_p=0.1), dict(dropout_p=0.1, window_left=64), dict(window_right=16)):
        assert b(**kw) is None and varlen(**kw) is None, kw
    assert b(dtype=torch.float32, softcap=30.0) is None
    monkeypatch.setattr(bwd, "VARLEN", False)
    assert varlen() is None
    monkeypatch.setattr(bwd, "VARLEN", True)
    monkeypatch.setattr(bwd.forward_sm90, "SCORES", False)
    assert b(softcap=30.0) is None and b(window_left=64) == "split"
    monkeypatch.setattr(bwd.forward_sm90, "SCORES", True)
    monkeypatch.setattr(bwd, "MODE", "atomic")
    assert b(softcap=30.0) == "atomic" and varlen() == "atomic" and varlen(deterministic=True) == "split"
    monkeypatch.setattr(bwd, "MODE", "auto")
    monkeypatch.setattr(bwd, "D256", False)  # IOATTN_GLUON_BWD256=0 turns the options off as well
    assert b(softcap=30.0) is None and varlen() is None
    monkeypatch.setattr(bwd, "D256", True)
    monkeypatch.setattr(bwd, "D256_OPTIONS", False)
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


# (dtype, causal, with_dq, options, spill bytes allowed): the split kernels, the default at hdim 256,
# must not spill; the one pass under varlen spilled 4 bytes in the producer's loop (24 registers)
OPTION_VARIANTS = [
    ("bf16", True, False, dict(window=True), 0),
    ("bf16", False, False, dict(window=True, alibi=True), 0),  # window (left, -1)
    ("fp16", True, False, dict(softcap=True), 0),
    ("bf16", True, False, dict(varlen=True, window=True, softcap=True, alibi=True), 0),
    ("bf16", True, True, dict(window=True, softcap=True), 0),
    ("bf16", False, True, dict(varlen=True), 8),
]


@pytest.mark.parametrize("dtype,causal,with_dq,options,spills", OPTION_VARIANTS)
def test_gluon_bwd256_options_compile_for_sm90a(dtype, causal, with_dq, options, spills):
    """Windows, softcap, ALiBi and varlen (IOATTN_GLUON_BWD256_OPTIONS): the same shared memory
    (+ at most 128 B for the placeholder that carries the options), wgmma shapes and register
    split; softcap by tanh.approx; varlen's dK/dV by masked stores, not TMA stores."""
    d256 = pytest.importorskip("ioattn.kernels.backward_sm90_d256")
    kernel = d256.compile_for(dtype, causal, with_dq, **options)
    assert kernel.metadata.shared <= SMEM_LIMIT[(9, 0)], kernel.metadata.shared
    ptx = kernel.asm["ptx"]
    assert "m64n32k16" in ptx and "m64n128k16" in ptx and "setmaxnreg" in ptx
    assert ("cp.reduce.async.bulk.tensor" in ptx) == with_dq and "atom.global" not in ptx
    assert ("tanh.approx.f32" in ptx) == options.get("softcap", False)
    tma_store = "cp.async.bulk.tensor.4d.global.shared"
    assert (tma_store not in ptx) == options.get("varlen", False)
    if options.get("varlen"):
        assert "st.global" in ptx
    regs = d256.config(with_dq, True)
    assert re.search(rf"setmaxnreg.inc.sync.aligned.u32\s+{regs['CONSUMER_REGS']};", ptx)
    assert re.search(rf"setmaxnreg.dec.sync.aligned.u32\s+{regs['PRODUCER_REGS']};", ptx)
    assert ptxas_report(kernel)["spill_bytes"] <= spills


@pytest.mark.parametrize("varlen", [False, True])
def test_gluon_bwd256_options_launcher_wiring(monkeypatch, varlen):
    """The launcher passes the window, softcap, ALiBi (per-batch slopes) and varlen arguments
    (recorded, not launched): descriptors on (1, total, heads, 128) views under varlen, one CTA
    per 64 keys of the longest sequence, the options' constexprs and register split."""
    bwd = pytest.importorskip("ioattn.kernels.backward_sm90")
    d256 = pytest.importorskip("ioattn.kernels.backward_sm90_d256")
    calls = []
    monkeypatch.setattr(d256, "launch", lambda kern, grid, *a, **kw: calls.append((kern, grid, a, kw)))
    b, h, hk = 3, 4, 2
    lens_q, lens_k = [300, 0, 129], [130, 0, 200]
    slopes = torch.rand(b, h)
    if varlen:
        q = torch.empty(sum(lens_q), h, 256, dtype=torch.bfloat16)
        kv = torch.empty(sum(lens_k), hk, 256, dtype=torch.bfloat16)
        cu_q = torch.tensor([0, 300, 300, 429], dtype=torch.int32)
        cu_k = torch.tensor([0, 130, 130, 330], dtype=torch.int32)
        stats = bwd.new_stats_varlen(h, q.shape[0], b, "cpu")
        kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_k=200)
    else:
        q = torch.empty(b, 300, h, 256, dtype=torch.bfloat16)
        kv = torch.empty(b, 130, hk, 256, dtype=torch.bfloat16)
        stats = bwd.new_stats(b, h, 300, "cpu")
        kw = {}
    bwd.attention_backward_sm90(q, q, kv, kv, stats, None, torch.empty_like(kv), torch.empty_like(kv),
                                softmax_scale=0.0625, causal=True, window_left=101, softcap=30.0,
                                alibi_slopes=slopes, **kw)
    (kern, grid, args, kwargs), = calls
    names = kern.arg_names
    assert len(args) + sum(n in kwargs for n in names) == len(names)
    assert grid == ((4 if varlen else 3), b * hk)  # (200 or 130 keys, 64 a CTA)
    descs = args[:8]
    assert [tuple(x.block_shape) for x in descs[:7]] == [(1, 64, 1, 128)] * 7
    assert all(x.base.dim() == 4 for x in descs[:7]) and descs[0].base.shape[0] == (1 if varlen else b)
    a = dict(zip(names, args))
    assert a["left"] == 101 and a["qk_scale"] == 1.0 and a["ALIBI"] is slopes and a["stride_ab"] == h
    assert a["sc_in"] == pytest.approx(0.0625 / 30.0) and a["sc_out"] == pytest.approx(30.0 * 1.4426950408889634)
    assert (a["CU_Q"] is kw["cu_seqlens_q"]) if varlen else (a["CU_Q"] is stats)
    assert a["stride_ks"] == hk * 256 and a["stride_kh"] == 256
    assert kwargs["HAS_WINDOW"] and kwargs["HAS_SOFTCAP"] and kwargs["HAS_ALIBI"] and kwargs["CAUSAL"]
    assert kwargs["IS_VARLEN"] == varlen and not kwargs["WITH_DQ"]
    assert (kwargs["CONSUMER_REGS"], kwargs["PRODUCER_REGS"]) == (232, 40)


# ----------------------------------------------------------------- V's own head dim (MLA)

@pytest.mark.parametrize("causal,options", [(False, {}), (True, {}), (True, dict(window=True, softcap=True)),
                                            (False, dict(alibi=True)), (True, dict(varlen=True))], ids=str)
def test_gluon_bwd256_value_dim_compiles_for_sm90a(causal, options):
    """V with head dim 128 under Q/K 256 or 192 (backward_sm90.VALUE_DIMS): dO and V in 64-wide
    column halves of a ring of their own, dV 64 x 64 a warpgroup (m64n64 wgmma), dP over V's two
    halves (m64n32); within the shared memory (177 KB measured) and without spills."""
    d256 = pytest.importorskip("ioattn.kernels.backward_sm90_d256")
    kernel = d256.compile_for("bf16", causal, False, head_dim_v=128, **options)
    assert kernel.metadata.shared <= 182 * 1024, kernel.metadata.shared
    ptx = kernel.asm["ptx"]
    assert "m64n32k16" in ptx and "m64n64k16" in ptx and "m64n128k16" in ptx
    tma_store = "cp.async.bulk.tensor.4d.global.shared" in ptx
    assert "cp.reduce.async.bulk.tensor" not in ptx and tma_store != options.get("varlen", False)
    assert ptxas_report(kernel)["spill_bytes"] == 0
    assert d256.head_dims_ok(192, 128) and d256.head_dims_ok(256, 128) and d256.head_dims_ok(256, 256)
    assert not d256.head_dims_ok(192, 128, with_dq=True)
    # (equal padded dims of 136-248 on the 256-wide tiles: backward_sm90.PAD_BWD256, opt-in)
    assert d256.head_dims_ok(192, 192) == d256.head_dims_ok(160, 160) == d256.pads_to_256(160)
    assert not d256.head_dims_ok(128, 64) and not d256.head_dims_ok(128, 128)


def test_gluon_bwd256_value_dim_dispatch(monkeypatch):
    """Which calls with dv != d take the Gluon backward: with VALUE_DIMS, (192 | 256, 128) dense or
    varlen without dropout, in the split mode (deterministic or not); otherwise the Triton backward."""
    bwd = pytest.importorskip("ioattn.kernels.backward_sm90")
    opts = dict(varlen=False, window_left=-1, window_right=0, softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                capability=(9, 0), deterministic=False)

    def sup(d, dv, **kw):
        q, k, v = (torch.zeros(1, 512, 2, n, dtype=torch.bfloat16) for n in (d, d, dv))
        return bwd.supported(q, k, v, torch.zeros_like(v), **{**opts, **kw})

    monkeypatch.setattr(bwd, "VALUE_DIMS", False)
    assert sup(192, 128) is None and sup(256, 256) == "split"
    monkeypatch.setattr(bwd, "VALUE_DIMS", True)
    assert sup(192, 128) == sup(256, 128) == sup(192, 128, deterministic=True) == "split"
    assert sup(192, 128, softcap=30.0, window_left=64) == "split"
    assert sup(192, 128, dropout_p=0.1) is None and sup(128, 64) is None and sup(192, 64) is None
    assert sup(192, 128, capability=(8, 0)) is None
    packed = (torch.zeros(512, 2, n, dtype=torch.bfloat16) for n in (192, 192, 128))
    q, k, v = packed
    assert bwd.supported(q, k, v, torch.zeros_like(v), **{**opts, "varlen": True, "max_seqlen_k": 512}) == "split"


def test_gluon_bwd256_value_dim_launcher_wiring(monkeypatch):
    """The launcher at Q/K 192, V 128 (recorded, not launched): Q, K, dK tiles 128 wide (the TMA
    zero-fills past 192 and drops those columns from the dK store), dO, V, dV tiles 64 wide, on
    the tensors themselves; dK and dV with their own strides; the split mode."""
    bwd = pytest.importorskip("ioattn.kernels.backward_sm90")
    d256 = pytest.importorskip("ioattn.kernels.backward_sm90_d256")
    calls = []
    monkeypatch.setattr(d256, "launch", lambda kern, grid, *a, **kw: calls.append((kern, grid, a, kw)))
    b, h, hk, sq, sk = 2, 4, 2, 300, 130
    q = torch.empty(b, sq, h, 192, dtype=torch.bfloat16)
    k = torch.empty(b, sk, hk, 192, dtype=torch.bfloat16)
    v = torch.empty(b, sk, hk, 128, dtype=torch.bfloat16)
    dout = torch.empty(b, sq, h, 128, dtype=torch.bfloat16)
    stats = bwd.new_stats(b, h, sq, "cpu")
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    bwd.attention_backward_sm90(dout, q, k, v, stats, None, dk, dv, softmax_scale=192 ** -0.5, causal=True)
    (kern, grid, args, kwargs), = calls
    assert kern is d256._attn_bwd_d256 and grid == (3, b * hk)
    blocks = [tuple(x.block_shape) for x in args[:7]]
    assert blocks == [(1, 64, 1, 128), (1, 64, 1, 64), (1, 64, 1, 128), (1, 64, 1, 64), (1, 64, 1, 128),
                      (1, 64, 1, 64), (1, 64, 1, 64)]
    assert [x.base for x in args[:6]] == [q, dout, k, v, dk, dv]
    assert not kwargs["WITH_DQ"] and not kwargs["IS_VARLEN"]
    with pytest.raises(AssertionError):  # the one pass has no slot for its dQ tile with V's own head dim
        bwd.attention_backward_sm90(dout, q, k, v, stats, torch.zeros(q.shape), dk, dv, softmax_scale=0.1,
                                    causal=True)


def test_gluon_bwd256_value_dim_varlen_wiring(monkeypatch):
    """Packed varlen at Q/K 192, V 128: descriptors on (1, total, heads, dim) views, one CTA per 64
    keys of the longest sequence, dK's strides for the kernel (it derives dV's: contiguous dK, dV,
    checked), IS_VARLEN."""
    bwd = pytest.importorskip("ioattn.kernels.backward_sm90")
    d256 = pytest.importorskip("ioattn.kernels.backward_sm90_d256")
    calls = []
    monkeypatch.setattr(d256, "launch", lambda kern, grid, *a, **kw: calls.append((kern, grid, a, kw)))
    h, hk = 4, 2
    q = torch.empty(429, h, 192, dtype=torch.bfloat16)
    k = torch.empty(330, hk, 192, dtype=torch.bfloat16)
    v = torch.empty(330, hk, 128, dtype=torch.bfloat16)
    dout = torch.empty(429, h, 128, dtype=torch.bfloat16)
    cu_q = torch.tensor([0, 300, 300, 429], dtype=torch.int32)
    cu_k = torch.tensor([0, 130, 130, 330], dtype=torch.int32)
    stats = bwd.new_stats_varlen(h, 429, 3, "cpu")
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    kw = dict(softmax_scale=0.1, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_k=200)
    bwd.attention_backward_sm90(dout, q, k, v, stats, None, dk, dv, **kw)
    (kern, grid, args, kwargs), = calls
    assert grid == (4, 3 * hk) and kwargs["IS_VARLEN"] and not kwargs["WITH_DQ"]
    assert [tuple(x.block_shape)[-1] for x in args[:7]] == [128, 64, 128, 64, 128, 64, 64]
    assert all(x.base.dim() == 4 and x.base.shape[0] == 1 for x in args[:6])
    a = dict(zip(kern.arg_names, args))
    assert (a["stride_ks"], a["stride_kh"]) == (hk * 192, 192) and a["DK"] is dk and a["DV"] is dv
    with pytest.raises(AssertionError):  # a strided dV would be written with the wrong strides
        bwd.attention_backward_sm90(dout, q, k, v, stats, None, dk, torch.empty(330, hk, 256, dtype=torch.bfloat16)[..., :128], **kw)
