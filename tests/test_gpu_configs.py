"""Every default tile configuration fits the shared memory of the GPUs it is chosen for.

Compiled ahead of time for the target (no GPU needed: Triton ships ptxas), so a
configuration that would fail at launch with OutOfResources fails here in CI.
"""

import pytest
import torch

from ioattn.kernels import configs
from ioattn.kernels.aot import SMEM_LIMIT, compile_kernel, default_launches, ptxas_report

pytestmark = pytest.mark.skipif(configs.interpreting(), reason="ahead-of-time compiles need the real Triton "
                                "compiler, not the interpreter (scripts/test.sh runs this file without it)")

FLAGS = [{}, {"gqa": True}, {"dropout": True}, {"dropout": True, "gqa": True},
         {"window": True, "softcap": True, "alibi": True, "varlen": True, "gqa": True},
         {"seqlen_k": 1024, "dropout": True}, {"seqlen_k": 1024, "softcap": True, "alibi": True},
         {"varlen": True, "page_size": 16}, {"varlen": True, "page_size": 256, "gqa": True}]


@pytest.mark.parametrize("capability", [(9, 0), (8, 0)], ids=["sm90", "sm80"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: ",".join(map(str, f)) or "plain")
def test_default_configs_fit_shared_memory(head_dim, flags, capability):
    _assert_fits(head_dim, flags, capability)


@pytest.mark.parametrize("capability", [(9, 0), (8, 0)], ids=["sm90", "sm80"])
def test_value_head_dim_configs_fit_shared_memory(capability):
    """A V head dim of its own (MLA's q/k 192, v 128) takes the tiles of the larger one
    (configs.tile_head_dim): they fit, and the kernels use wgmma on Hopper."""
    _assert_fits(192, {"head_dim_v": 128}, capability)


def _assert_fits(head_dim, flags, capability):
    for name, fn, consts, warps, stages in default_launches(head_dim, "bf16", capability, **flags):
        kernel = compile_kernel(fn, "bf16", consts, warps, stages, capability)
        smem = kernel.metadata.shared
        assert smem <= SMEM_LIMIT[capability], (
            f"{name} hdim {head_dim} {flags}: {smem} B of shared memory > {SMEM_LIMIT[capability]} "
            f"(BLOCK_M={consts['BLOCK_M']}, BLOCK_N={consts['BLOCK_N']}, stages={stages})")
        if capability == (9, 0):
            assert "wgmma" in kernel.asm["ptx"], f"{name}: no wgmma on Hopper"


@pytest.mark.parametrize("head_dim,causal,dtype", [(64, True, "bf16"), (128, False, "bf16"), (128, True, "fp16"),
                                                   (256, True, "bf16")])
def test_gluon_forward_compiles_for_sm90a(head_dim, causal, dtype):
    """The Gluon Hopper forward (kernels/forward_sm90.py) compiles for sm_90a: it fits the
    shared memory, uses asynchronous wgmma, the TMA and the consumer/producer register split,
    and does not spill. (Its numbers are checked on a GPU: benchmarks/gluon_check.py.)"""
    forward_sm90 = pytest.importorskip("ioattn.kernels.forward_sm90")
    kernel = forward_sm90.compile_for(head_dim, dtype, causal)
    assert kernel.metadata.shared <= SMEM_LIMIT[(9, 0)], kernel.metadata.shared
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx and "setmaxnreg" in ptx
    rep = ptxas_report(kernel)
    assert rep["spill_bytes"] == 0, rep


@pytest.mark.parametrize("head_dim,causal", [(128, True), (256, False)])
def test_gluon_varlen_forward_compiles_for_sm90a(head_dim, causal):
    """The Gluon forward over packed sequences (per-sequence bounds from cu_seqlens, a masked
    output store) compiles for sm_90a without spills."""
    forward_sm90 = pytest.importorskip("ioattn.kernels.forward_sm90")
    kernel = forward_sm90.compile_for(head_dim, "bf16", causal, varlen=True)
    assert kernel.metadata.shared <= SMEM_LIMIT[(9, 0)], kernel.metadata.shared
    assert "wgmma.mma_async" in kernel.asm["ptx"] and ptxas_report(kernel)["spill_bytes"] == 0


@pytest.mark.parametrize("head_dim,causal", [(64, False), (128, False), (128, True)])
def test_gluon_persistent_forward_compiles_for_sm90a(head_dim, causal):
    """The persistent Gluon forward (a CTA per SM over the tiles, Q double-buffered across
    tiles) fits the shared memory at head dims <= 128; at most a few bytes of spills (16 B at
    hdim 128 causal, from the tile order's arithmetic)."""
    forward_sm90 = pytest.importorskip("ioattn.kernels.forward_sm90")
    kernel = forward_sm90.compile_for(head_dim, "bf16", causal, persistent=True)
    assert kernel.metadata.shared <= SMEM_LIMIT[(9, 0)], kernel.metadata.shared
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx and "setmaxnreg" in ptx
    assert ptxas_report(kernel)["spill_bytes"] <= 32


@pytest.mark.parametrize("causal", [True, False])
def test_gluon_persistent_forward_256_compiles_for_sm90a(causal):
    """The persistent forward at head dim 256 (forward_sm90.PERSISTENT_256, opt-in) with one Q buffer
    (SINGLE_Q): the per-tile kernel's shared memory (Q 64 KB, K/V rings 128 KB), a few bytes of spills
    (12 B causal, 4 B without a mask; none in the key loops)."""
    forward_sm90 = pytest.importorskip("ioattn.kernels.forward_sm90")
    kernel = forward_sm90.compile_for(256, "bf16", causal, persistent=True)
    assert 192 * 1024 <= kernel.metadata.shared <= SMEM_LIMIT[(9, 0)], kernel.metadata.shared
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx and "setmaxnreg" in ptx
    assert ptxas_report(kernel)["spill_bytes"] <= 16


def test_persistent_256_dispatch_and_launch(monkeypatch):
    """PERSISTENT_256 off (default): head dim 256 keeps the per-tile kernel; on: the persistent one with
    SINGLE_Q for equal head dims on the 256-wide tiles (256, padded 160 with PAD_DIMS), not for V's own
    head dim (192/128) nor above PERSISTENT_MAX_KEYS keys; head dim 128 keeps its two Q buffers."""
    f = pytest.importorskip("ioattn.kernels.forward_sm90")
    up = f.use_persistent
    assert not f.PERSISTENT_256 and not up(256, 1024, True, -1, 0, False, False)
    assert up(128, 1024, True, -1, 0, False, False)
    monkeypatch.setattr(f, "PERSISTENT_256", True)
    monkeypatch.setattr(f, "PAD_DIMS", True)
    assert up(256, 1024, True, -1, 0, False, False) and up(256, 4096, False, -1, 0, False, False, None, 256)
    assert up(160, 2048, True, -1, 0, False, False, None, 160) and not up(192, 1024, True, -1, 0, False, False, None, 128)
    assert not up(256, 8192, True, -1, 0, False, False) and not up(256, 1024, True, 100, 0, False, False)
    calls = []
    monkeypatch.setattr(f, "launch", lambda kern, grid, *a, **kw: calls.append((kern, grid, kw)))
    monkeypatch.setattr(f, "_num_sms", lambda device: 132)
    for d in (256, 128):
        q, k, v = (torch.empty(2, 1000, 4, d, dtype=torch.bfloat16) for _ in range(3))
        f.attention_forward_sm90(q, k, v, torch.empty_like(q), torch.empty(2, 4, 1000), softmax_scale=0.1, causal=True)
    (k1, g1, kw1), (k2, g2, kw2) = calls
    assert k1 is k2 is f._attn_fwd_sm90_persistent and kw1["SINGLE_Q"] and not kw2["SINGLE_Q"]
    assert kw1["HEAD_DIM"] == 256 and g1 == (min(132, 8 * 2 * 4), ) and kw1["key"] != kw2["key"]


@pytest.mark.parametrize("head_dim,causal,with_dq", [(64, True, True), (128, False, True), (128, True, False),
                                                     (64, False, False)])
def test_gluon_backward_compiles_for_sm90a(head_dim, causal, with_dq):
    """The Gluon Hopper backward (kernels/backward_sm90.py) compiles for sm_90a within the
    shared memory, with asynchronous wgmma, TMA loads, stores and (for dQ) reductions, the register split, and at
    most a few bytes of spills (16 B at hdim 128 causal, from its mask; GPU check:
    benchmarks/gluon_bwd_check.py)."""
    backward_sm90 = pytest.importorskip("ioattn.kernels.backward_sm90")
    kernel = backward_sm90.compile_for(head_dim, "bf16", causal, with_dq=with_dq)
    assert kernel.metadata.shared <= SMEM_LIMIT[(9, 0)], kernel.metadata.shared
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx and "setmaxnreg" in ptx
    # the dQ sums: bulk TMA reductions of each warpgroup's tile, no per-element atomics
    assert ("cp.reduce.async.bulk.tensor" in ptx and ".add" in ptx) == with_dq
    assert "atom.global" not in ptx
    rep = ptxas_report(kernel)
    # hdim 64 causal, one pass (128-row query blocks): 148-180 B from the mask, and still faster
    # than 64-row blocks without spills (results/h200-session7b)
    assert rep["spill_bytes"] <= (192 if (head_dim, causal, with_dq) == (64, True, True) else 32), rep


def _int_rows_per_flag(var, flags, code, n_rows):
    """Run ``code`` (which prints n_rows lines of ints) in a fresh process per value of the env var
    (compile-time flags are constexpr globals, read at import): {flag: [tuple of ints, ...]}."""
    import os
    import subprocess
    import sys
    got = {}
    for flag in flags:
        res = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **{var: flag}),
                             capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-2000:]
        got[flag] = [tuple(map(int, line.split())) for line in res.stdout.strip().splitlines()[-n_rows:]]
    return got


def test_gluon_forward_mask_bounds():
    """MASK_BOUNDS (IOATTN_GLUON_MASK_BOUNDS, on by default since session 20): the forward's mask from per-row bounds
    compiles at hdim 64/128 (per-tile, varlen, persistent) with fewer selects than the general
    mask and no more spills. (A process per setting: the flag is a constexpr global.)"""
    pytest.importorskip("ioattn.kernels.forward_sm90")
    code = ("import re; from ioattn.kernels import forward_sm90; from ioattn.kernels.aot import ptxas_report\n"
            "for d in (64, 128):\n"
            "    for kw in ({}, {'varlen': True}, {'persistent': True}):\n"
            "        k = forward_sm90.compile_for(d, 'bf16', True, **kw)\n"
            "        print(len(re.findall(r'selp\\.f32', k.asm['ptx'])), ptxas_report(k)['spill_bytes'])")
    got = _int_rows_per_flag("IOATTN_GLUON_MASK_BOUNDS", ("0", "1"), code, 6)
    for (sel0, spill0), (sel1, spill1) in zip(got["0"], got["1"]):
        assert sel1 < sel0 and spill1 <= spill0, got


def test_gluon_forward_pingpong():
    """PINGPONG (IOATTN_GLUON_PINGPONG=1|2, opt-in): each consumer warpgroup waits for its turn before
    its three wgmma issue points and hands the turn over after each (+6 mbarrier arrivals and waits
    in the kernel), level 2 also loads K ahead of V (more TMA load sites); both compile at hdim 64/128,
    per-tile and persistent, with spills within 16 B of the default's (hdim 128 persistent causal:
    16 B by default). (A process per setting: the flag is a constexpr global.)"""
    pytest.importorskip("ioattn.kernels.forward_sm90")
    code = ("import re; from ioattn.kernels import forward_sm90; from ioattn.kernels.aot import ptxas_report\n"
            "for d in (64, 128):\n"
            "    for kw in ({}, {'persistent': True}):\n"
            "        k = forward_sm90.compile_for(d, 'bf16', True, **kw); ptx = k.asm['ptx']\n"
            "        print(len(re.findall(r'mbarrier\\.arrive\\.shared', ptx)), len(re.findall(r'mbarrier\\.try_wait', ptx)),"
            " len(re.findall(r'cp\\.async\\.bulk\\.tensor', ptx)), ptxas_report(k)['spill_bytes'])")
    got = _int_rows_per_flag("IOATTN_GLUON_PINGPONG", ("0", "1", "2"), code, 4)
    for (arr0, wait0, tma0, spill0), (arr1, wait1, tma1, spill1), (arr2, wait2, tma2, spill2) in zip(
            got["0"], got["1"], got["2"]):
        assert arr1 == arr0 + 6 and wait1 == wait0 + 6 and tma1 == tma0, got
        assert arr2 == arr1 and wait2 > wait1 and tma2 > tma1, got
        assert spill1 <= spill0 + 16 and spill2 <= spill0 + 16, got


@pytest.mark.parametrize("linear", [False, True])
def test_gluon_forward_alibi_linear(linear):
    """ALiBi in the Gluon forward: the exact form converts an int distance per score (256 I2FP in
    the hdim-128 causal SASS); with ALIBI_LINEAR (IOATTN_GLUON_ALIBI_LINEAR=1) the positions are
    converted per row and per column only, within a few bytes of spills. (A process of its own:
    the flag is a constexpr global, read when the kernel is first specialized.)"""
    import os
    import subprocess
    import sys
    pytest.importorskip("ioattn.kernels.forward_sm90")
    code = ("import re; from ioattn.kernels import forward_sm90; from ioattn.kernels.aot import ptxas_report; "
            "k = forward_sm90.compile_for(128, 'bf16', True, alibi=True); "
            "print(len(re.findall(r'cvt\\.rn\\.f32\\.s32', k.asm['ptx'])), ptxas_report(k)['spill_bytes'])")
    env = dict(os.environ, IOATTN_GLUON_ALIBI_LINEAR="1" if linear else "0")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    n_cvt, spills = map(int, res.stdout.split()[-2:])
    assert (n_cvt <= 16) if linear else (n_cvt >= 256), n_cvt
    assert spills <= 32, spills


@pytest.mark.parametrize("option", ["softcap", "dropout"])
def test_gluon_backward_hdim64_option_rows(option):
    """hdim 64 under softcap or dropout: 128-row query blocks spill hundreds of bytes, 64-row
    blocks none; config() takes 64 rows by default under softcap and dropout (where that measured
    faster; under ALiBi 128 did: forward_sm90.option_rows_64, IOATTN_GLUON_BWD64_OPTION_ROWS)."""
    backward_sm90 = pytest.importorskip("ioattn.kernels.backward_sm90")
    rows128 = ptxas_report(backward_sm90.compile_for(64, "bf16", True, block_m=128, **{option: True}))
    rows64 = ptxas_report(backward_sm90.compile_for(64, "bf16", True, block_m=64, **{option: True}))
    assert rows128["spill_bytes"] > 128 and rows64["spill_bytes"] == 0, (rows128, rows64)
    fwd = backward_sm90.forward_sm90
    if fwd.OPTION_ROWS_64 == "auto":
        assert backward_sm90.config(64, softcap=True)["BLOCK_M"] == backward_sm90.config(64, dropout=True)["BLOCK_M"] == 64
        assert backward_sm90.config(64, alibi=True)["BLOCK_M"] == 128
        assert fwd.DROPOUT_BWD_HEAD_DIMS == (128, 64) and fwd.dropout_ok(64, backward=True)
    assert backward_sm90.config(64)["BLOCK_M"] == 128 and backward_sm90.config(128, softcap=True)["BLOCK_M"] == 64


@pytest.mark.parametrize("head_dim,causal,with_dq", [(128, True, True), (64, False, True), (128, False, False)])
def test_gluon_varlen_backward_compiles_for_sm90a(head_dim, causal, with_dq):
    """The Gluon backward over packed variable-length batches (bounds from cu_seqlens, rows and
    keys past a sequence masked, dK/dV by a masked store): within the shared memory, TMA loads
    and dQ reductions, spills within what the dense kernel has at hdim 64 causal."""
    backward_sm90 = pytest.importorskip("ioattn.kernels.backward_sm90")
    kernel = backward_sm90.compile_for(head_dim, "bf16", causal, with_dq=with_dq, varlen=True)
    assert kernel.metadata.shared <= SMEM_LIMIT[(9, 0)], kernel.metadata.shared
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
    assert ("cp.reduce.async.bulk.tensor" in ptx) == with_dq and "atom.global" not in ptx
    # (measured: hdim 128 8-16 B, hdim 64 non-causal 264 B)
    assert ptxas_report(kernel)["spill_bytes"] <= (32 if head_dim == 128 else 288)


@pytest.mark.parametrize("head_dim,causal", [(128, True), (64, False), (256, True)])
def test_gluon_dropout_compiles_for_sm90a(head_dim, causal):
    """Dropout in the Gluon kernels (the Philox masks of dropout_sm90): the forward without
    spills, the backward (hdim <= 128) within a few hundred bytes (measured: 72-364 B)."""
    forward_sm90 = pytest.importorskip("ioattn.kernels.forward_sm90")
    backward_sm90 = pytest.importorskip("ioattn.kernels.backward_sm90")
    kernel = forward_sm90.compile_for(head_dim, "bf16", causal, dropout=True)
    assert "mul.hi" in kernel.asm["ptx"] and ptxas_report(kernel)["spill_bytes"] == 0
    if head_dim <= 128:
        kernel = backward_sm90.compile_for(head_dim, "bf16", causal, dropout=True)
        assert kernel.metadata.shared <= SMEM_LIMIT[(9, 0)]
        # (Philox's products: mul.hi, or mul.wide where each call runs once: dropout_sm90.COLS_SHARED,
        # hdim 64 on its 64-row blocks, without spills)
        assert "mul.hi" in kernel.asm["ptx"] or "mul.wide" in kernel.asm["ptx"]
        assert ptxas_report(kernel)["spill_bytes"] <= (0 if head_dim == 64 else 400)


@pytest.mark.parametrize("head_dim,causal", [(128, True), (64, False), (256, True)])
def test_gluon_softcap_alibi_compile_for_sm90a(head_dim, causal):
    """Softcap (tanh.approx) and ALiBi in the Gluon kernels (IOATTN_GLUON_SCORES=0 keeps Triton's):
    the forward within 16 B of spills (ALiBi as row + column terms, forward_sm90.ALIBI_LINEAR, on by
    default since session 20: 4 B at hdim 128 causal with both options, 0 without ALIBI_LINEAR),
    the backward (hdim <= 128) within 1 KB (measured: hdim 128 4-292 B, hdim 64 108-980 B)."""
    forward_sm90 = pytest.importorskip("ioattn.kernels.forward_sm90")
    backward_sm90 = pytest.importorskip("ioattn.kernels.backward_sm90")
    kernel = forward_sm90.compile_for(head_dim, "bf16", causal, softcap=True, alibi=True)
    assert "tanh.approx.f32" in kernel.asm["ptx"]
    assert ptxas_report(kernel)["spill_bytes"] <= (16 if forward_sm90.ALIBI_LINEAR.value else 0)
    if head_dim <= 128:
        kernel = backward_sm90.compile_for(head_dim, "bf16", causal, softcap=True, alibi=True)
        assert kernel.metadata.shared <= SMEM_LIMIT[(9, 0)]
        assert "tanh.approx.f32" in kernel.asm["ptx"] and ptxas_report(kernel)["spill_bytes"] <= 1024


def test_gluon_dispatch_rules():
    """Which calls the launchers hand to the Gluon kernels (decided on the host, so testable
    with CPU tensors and a given capability)."""
    import torch
    fwd = pytest.importorskip("ioattn.kernels.forward_sm90")
    bwd = pytest.importorskip("ioattn.kernels.backward_sm90")

    def t(d, n=4096, dtype=torch.bfloat16):
        return torch.zeros(1, n, 2, d, dtype=dtype)

    dense = dict(varlen=False, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, dropout_p=0.0)
    f = lambda d, cap=(9, 0), n=4096, dtype=torch.bfloat16, **kw: fwd.supported(  # noqa: E731
        t(d, n, dtype), t(d, n, dtype), t(d, n, dtype), **{**dense, "block_table": None, **kw}, capability=cap)
    assert fwd.ENABLED
    assert f(128) and f(64) and f(256) and f(128, window_right=0)
    assert not f(128, cap=(8, 0)) and not f(128, cap=(10, 0))
    assert f(96) == fwd.PAD_DIMS and not f(100) and not f(128, dtype=torch.float32)  # (96: PAD_DIMS)
    # hdim 64 causal up to 2k keys: the persistent Gluon kernel with the per-row mask bounds (H100,
    # session 20), the Triton kernel for what the persistent one does not take (a window, an option)
    assert f(64, n=2048, window_right=0) == (fwd.MASK_BOUNDS.value and fwd.PERSISTENT != "0")
    assert not f(64, n=2048, window_left=256, window_right=0) and not f(64, n=2048, window_right=0, softcap=30.0)
    assert f(64, n=4096, window_left=256, window_right=0)
    assert f(128, window_left=256, window_right=0) and f(128, window_left=256)  # sliding windows
    assert not f(128, window_left=256, window_right=16)
    assert fwd.SCORES  # softcap / ALiBi on the Gluon kernels by default (checked on an H200, session 9)
    assert f(128, softcap=30.0) and f(64, alibi_slopes=torch.ones(2))
    assert bwd.supported(t(128), t(128), t(128), t(128), **{**dense, "softcap": 30.0}, deterministic=False,
                         capability=(9, 0)) == "atomic"
    fwd.SCORES = False
    try:
        assert not f(128, softcap=30.0) and not f(64, alibi_slopes=torch.ones(2))
    finally:
        fwd.SCORES = True
    # dropout (dropout_sm90's masks): at hdim 128 by default, where it measured ahead
    # dropout: the Gluon forward and backward at hdim 64/128 (where each measured ahead)
    assert f(128, dropout_p=0.1) and f(64, dropout_p=0.1) and not f(256, dropout_p=0.1)
    fwd.DROPOUT = "all"
    try:
        assert f(64, dropout_p=0.1) and f(256, dropout_p=0.1)
    finally:
        fwd.DROPOUT = "auto"
    # packed variable-length batches: (total, heads, dim) tensors, not a paged cache
    p = lambda d, **kw: fwd.supported(  # noqa: E731
        *(torch.zeros(4096, 2, d, dtype=torch.bfloat16) for _ in range(3)),
        **{**dense, "varlen": True, "block_table": None, "max_seqlen_k": 1024, **kw}, capability=(9, 0))
    assert p(128) and p(64) and p(128, window_right=0) and not p(64, window_right=0)
    assert not p(128, block_table=torch.zeros(1, 1, dtype=torch.int32))
    assert f(128, alibi_slopes=torch.ones(2))  # Gluon softcap/ALiBi (SCORES) by default

    b = lambda d, deterministic=False, cap=(9, 0), **kw: bwd.supported(  # noqa: E731
        t(d), t(d), t(d), t(d), **{**dense, **kw}, deterministic=deterministic, capability=cap)
    assert bwd.MODE == "auto"
    assert b(128) == "atomic" and b(128, window_right=0) == "atomic"  # one pass, dQ by TMA reductions
    assert b(128, deterministic=True) == "split"  # no order-dependent sums
    assert b(128, cap=(8, 0)) is None
    assert b(128, softcap=5.0) == "atomic" and b(128, window_left=64, window_right=16) is None
    assert b(128, dropout_p=0.1) == "atomic" and b(128, dropout_p=0.1, deterministic=True) == "split"
    # hdim 64 under dropout: the Gluon backward on 64-row blocks (forward_sm90.option_rows_64; H100, session 19),
    # causal or not (4k keys; causal up to 2k keys it is the Triton one, with dropout or without)
    assert b(64, dropout_p=0.1) == "atomic" and b(64, dropout_p=0.1, window_right=0) == "atomic"
    # packed variable-length batches: the hdim 64 causal rule looks at the longest sequence
    pb = lambda d, **kw: bwd.supported(  # noqa: E731
        *(torch.zeros(4096, 2, d, dtype=torch.bfloat16) for _ in range(4)),
        **{**dense, "varlen": True, "max_seqlen_k": 4096, **kw}, deterministic=False, capability=(9, 0))
    assert pb(128) == "atomic" and pb(128, window_right=0) == "atomic" and pb(64, window_right=0) == "atomic"
    assert pb(64, window_right=0, max_seqlen_k=1024) is None and pb(128, alibi_slopes=torch.ones(2)) == "atomic"
    assert b(128, window_left=64, window_right=0) == "atomic" and b(128, window_left=64) == "atomic"
    assert b(64) == "atomic" and b(64, deterministic=True) == "split"
    assert b(64, window_right=0) == "atomic" and b(256) == "split"  # (backward_sm90_d256)
    causal64_2k = bwd.supported(t(64, 2048), t(64, 2048), t(64, 2048), t(64, 2048), **{**dense, "window_right": 0},
                                deterministic=False, capability=(9, 0))
    assert causal64_2k is None  # the Triton backward
    bwd.MODE = "atomic"
    try:
        assert b(64) == "atomic" and b(128) == "atomic" and b(128, deterministic=True) == "split"
        bwd.MODE = "split"
        assert b(128) == "split" and b(64) == "split"
        bwd.MODE = "0"
        assert b(128) is None
    finally:
        bwd.MODE = "auto"


@pytest.mark.parametrize("head_dim,head_dim_v,causal,options", [(192, 128, True, {}), (192, 128, False, {"varlen": True}),
                                                               (256, 128, True, {"dropout": "packed"}),
                                                               (128, 64, True, {"persistent": True}),
                                                               (192, 64, False, {"softcap": True, "alibi": True})],
                         ids=str)
def test_gluon_forward_value_dims_compile_for_sm90a(head_dim, head_dim_v, causal, options):
    """The Gluon forward with V's own head dim (forward_sm90.VALUE_DIMS; Q/K 192 runs in 256-wide
    tiles) compiles for sm_90a within the shared memory, with wgmma and without spills; the
    blocks fit the budget that config() picks them by."""
    forward_sm90 = pytest.importorskip("ioattn.kernels.forward_sm90")
    kernel = forward_sm90.compile_for(head_dim, "bf16", causal, head_dim_v=head_dim_v, **options)
    assert kernel.metadata.shared <= SMEM_LIMIT[(9, 0)], kernel.metadata.shared
    assert "wgmma.mma_async" in kernel.asm["ptx"]
    assert ptxas_report(kernel)["spill_bytes"] == 0
    cfg = forward_sm90.config(head_dim, head_dim_v)
    assert forward_sm90._smem_bytes(forward_sm90._kernel_dim(head_dim), head_dim_v, cfg["BLOCK_N"],
                                    cfg["STAGES"]) <= forward_sm90._SMEM_BUDGET


def test_gluon_forward_value_dims_dispatch():
    """Which (d, dv) pairs the Gluon forward takes: equal dims as before; unequal ones only with
    VALUE_DIMS, with dv < d and Q/K's dim in VALUE_QK_DIMS."""
    forward_sm90 = pytest.importorskip("ioattn.kernels.forward_sm90")
    prev = forward_sm90.VALUE_DIMS
    try:
        forward_sm90.VALUE_DIMS = False
        assert forward_sm90.head_dims_ok(128, 128) and not forward_sm90.head_dims_ok(192, 128)
        forward_sm90.VALUE_DIMS = True
        assert forward_sm90.head_dims_ok(192, 128) and forward_sm90.head_dims_ok(128, 64)
        assert not forward_sm90.head_dims_ok(64, 128)  # (the output tile reuses Q's buffer: dv < d)
        assert not forward_sm90.head_dims_ok(160, 128)
        # equal padded dims (PAD_DIMS) run on the next head dim's tiles; without it, not here
        assert forward_sm90.head_dims_ok(192, 192) == forward_sm90.PAD_DIMS
    finally:
        forward_sm90.VALUE_DIMS = prev
