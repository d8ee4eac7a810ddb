"""Head dims between the Gluon kernels' (forward_sm90.PAD_DIMS, on by default, IOATTN_GLUON_PAD_DIMS=0 off: multiples of 8 from 40 to
248 such as 40, 80, 96, 160, 192; not 32, a power of two the Triton kernels run unpadded): the forward runs them on the tiles of the next head dim of 64, 128
and 256, the backward on those of 64 and 128; the TMA zero-fills the columns past the tensors' and its
stores drop them (the packed-varlen stores through pointers by a column mask). Checked here on the CPU: the dispatch rules and the
descriptors and constexprs the launchers pass (stand-in driver, no GPU). The numbers are checked on a
GPU: benchmarks/gpu_check.py's grid has head dims 32, 40, 80, 96, 136, 160, 192 and 200."""

import pytest
import torch

from ioattn.kernels import configs

pytestmark = pytest.mark.skipif(configs.interpreting(), reason="the Gluon launchers do not run under the "
                                "interpreter (scripts/test.sh runs this file without it)")


def _mods():
    f = pytest.importorskip("ioattn.kernels.forward_sm90")
    b = pytest.importorskip("ioattn.kernels.backward_sm90")
    return f, b


@pytest.fixture(autouse=True)
def _pad_dims_on(monkeypatch):
    """PAD_DIMS and backward_sm90.PAD_BWD256 (opt-in) on for these tests, whatever the environment says."""
    if not configs.interpreting():
        monkeypatch.setattr(_mods()[0], "PAD_DIMS", True)
        monkeypatch.setattr(_mods()[1], "PAD_BWD256", True)


def _dq():
    return pytest.importorskip("ioattn.kernels.backward_sm90_dq")


def _qkv(d, n=4096, varlen=False):
    shape = (2 * n, 4, d) if varlen else (2, n, 4, d)
    return [torch.empty(shape, dtype=torch.bfloat16) for _ in range(3)]


def _fwd_ok(f, d, varlen=False, **kw):
    q, k, v = _qkv(d, varlen=varlen)
    opts = dict(window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, dropout_p=0.0, block_table=None)
    opts.update(kw)
    return f.supported(q, k, v, varlen=varlen, capability=(9, 0), max_seqlen_k=4096 if varlen else None, **opts)


def _bwd_mode(b, d, varlen=False, deterministic=False):
    q, k, v = _qkv(d, varlen=varlen)
    return b.supported(q, k, v, q, varlen=varlen, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
                       dropout_p=0.0, deterministic=deterministic, capability=(9, 0),
                       max_seqlen_k=4096 if varlen else None)


def test_padded_dims_and_their_kernel_dims():
    f, _ = _mods()
    assert {d: f.padded_dim(d) for d in (40, 56, 72, 80, 96, 112, 136, 160, 192, 200, 248)} == {
        40: 64, 56: 64, 72: 128, 80: 128, 96: 128, 112: 128, 136: 256, 160: 256, 192: 256, 200: 256,
        248: 256}
    for d in (64, 128, 256, 32, 16, 24, 20, 100, 130, 264):  # the kernels' own, a power of two, too small, not a multiple of 8, too big
        assert f.padded_dim(d) is None, d
    assert f.config(96) == f.config(128) and f.config(40) == f.config(64) and f.config(160) == f.config(256)


def test_dispatch_of_padded_dims(monkeypatch):
    f, b = _mods()
    for d in (40, 80, 96, 112, 160, 192, 200):
        assert _fwd_ok(f, d) and _fwd_ok(f, d, varlen=True), d
    for d in (40, 80, 96, 112):
        assert _bwd_mode(b, d) == "atomic" and _bwd_mode(b, d, deterministic=True) == "split", d
        assert _bwd_mode(b, d, varlen=True) == "atomic", d
    for d in (136, 160, 192, 200, 248):  # (backward_sm90_d256 on its 256-wide tiles, then the Gluon dQ kernel)
        assert _bwd_mode(b, d) == _bwd_mode(b, d, deterministic=True) == _bwd_mode(b, d, varlen=True) == "split", d
        q, k, v = _qkv(d)
        assert _dq().supported(q, k, v, q, varlen=False, window_right=-1, dropout_p=0.0), d
        assert not _dq().supported(q, k, v, q, varlen=True, window_right=-1, dropout_p=0.0), d
    for d in (20, 100, 264):
        assert not _fwd_ok(f, d) and _bwd_mode(b, d) is None, d
    assert not _fwd_ok(f, 96, dropout_p=0.1)  # (dropout: the Gluon kernels at 64 and 128 only)
    monkeypatch.setattr(b, "PAD_BWD256", False)  # (136-248: the Triton backward, the forward still padded)
    q, k, v = _qkv(160)
    assert _bwd_mode(b, 160) is None and _bwd_mode(b, 200, varlen=True) is None and _fwd_ok(f, 160)
    assert not _dq().supported(q, k, v, q, varlen=False, window_right=-1, dropout_p=0.0)
    assert _bwd_mode(b, 256) == "split" and _bwd_mode(b, 96) == "atomic"
    monkeypatch.setattr(b, "PAD_BWD256", True)
    monkeypatch.setattr(f, "PAD_DIMS", False)
    assert not _fwd_ok(f, 96) and _bwd_mode(b, 96) is None and not _fwd_ok(f, 160) and _bwd_mode(b, 160) is None
    q, k, v = _qkv(160)
    assert not _dq().supported(q, k, v, q, varlen=False, window_right=-1, dropout_p=0.0)
    assert _fwd_ok(f, 128) and _bwd_mode(b, 128) == "atomic"


@pytest.mark.parametrize("d", [40, 96, 160])
def test_padded_forward_launch(monkeypatch, d):
    """The forward's descriptors: tiles of the kernel dim over the tensors' own shapes and strides."""
    f, _ = _mods()
    calls = []
    monkeypatch.setattr(f, "launch", lambda kern, grid, *a, **kw: calls.append((kern, a, kw)))
    monkeypatch.setattr(f, "_num_sms", lambda device: 132)
    q, k, v = _qkv(d, n=300)
    out, lse = torch.empty_like(q), torch.empty(2, 4, 300)
    for causal in (False, True):
        f.attention_forward_sm90(q, k, v, out, lse, softmax_scale=d ** -0.5, causal=causal)
    kd = f.padded_dim(d)
    for kern, a, kw in calls:
        assert kw["HEAD_DIM"] == kd
        for desc, t in zip(a[:4], (q, k, v, out)):
            assert desc.base is t and desc.block_shape[-1] == kd and list(desc.shape) == list(t.shape)
            assert list(desc.strides) == list(t.stride())


def test_padded_backward_launch(monkeypatch):
    """The hdim-96 backward: the hdim-128 kernel's tiles over the hdim-96 tensors, dQ into an fp32
    accumulator of the tensors' own shape (the TMA's reductions drop the columns past 96)."""
    _, b = _mods()
    calls = []
    monkeypatch.setattr(b, "launch", lambda kern, grid, *a, **kw: calls.append((kern, a, kw)))
    q, k, v = _qkv(96, n=300)
    stats = b.new_stats(2, 4, 300, "cpu")
    dq = torch.zeros(q.shape)
    b.attention_backward_sm90(q, q, k, v, stats, dq, torch.empty_like(k), torch.empty_like(v), softmax_scale=0.1,
                              causal=True)
    (kern, a, kw), = calls
    assert kw["HEAD_DIM"] == 128
    blocks = [tuple(x.block_shape) for x in a[:8]]
    assert blocks == [(1, 64, 1, 128)] * 4 + [(1, 128, 1, 64)] + [(1, 64, 1, 128)] * 2 + [(1, 64, 1, 64)], blocks
    assert a[7].base is dq and all(list(x.shape) == list(x.base.shape) for x in a[:8])


@pytest.mark.parametrize("d", [136, 160, 200])
def test_padded_backward_d256_launch(monkeypatch, d):
    """Head dims 136-248: backward_sm90_d256's 128-wide column halves of 256 over the tensors' own shapes
    (the second half's columns past the tensor zero-filled, dropped from the stores), then the dQ kernel
    as 256 / 256."""
    _, b = _mods()
    from ioattn.kernels import backward_sm90_d256 as d256
    dqm = _dq()
    calls = []
    for m in (d256, dqm):
        monkeypatch.setattr(m, "launch", lambda kern, grid, *a, **kw: calls.append((kern, a, kw)))
    q, k, v = _qkv(d, n=300)
    stats = b.new_stats(2, 4, 300, "cpu")
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    b.attention_backward_sm90(q, q, k, v, stats, None, dk, dv, softmax_scale=0.1, causal=True)
    dq = torch.empty_like(q)
    dqm.attention_backward_dq(q, q, k, v, stats, dq, softmax_scale=0.1, causal=True)
    (k1, a1, kw1), (k2, a2, kw2) = calls
    assert k1 is d256._attn_bwd_d256 and k2 is dqm._attn_bwd_dq_sm90
    assert [tuple(x.block_shape) for x in a1[:6]] == [(1, 64, 1, 128)] * 2 + [(1, 64, 1, 128)] * 4
    assert [x.base for x in a1[:6]] == [q, q, k, v, dk, dv]
    assert all(list(x.shape) == list(x.base.shape) for x in a1[:6]) and not kw1["WITH_DQ"]
    blocks = [tuple(x.block_shape) for x in a2[:8]]
    n = dqm.config(256, 256)["BLOCK_N"]
    assert blocks == [(1, 64, 1, 128)] * 2 + [(1, 64, 1, 256), (1, n, 1, 128), (1, n, 1, 128), (1, n, 1, 256)] + [
        (1, 64, 1, 128)] * 2, blocks
    assert a2[6].base is dq and all(list(x.shape) == list(x.base.shape) for x in a2[:8]) and kw2["HAS_HI"]


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_varlen_stores_mask_the_padded_columns(which):
    """The packed-varlen stores through pointers (forward_sm90._epilogue_masked, backward_sm90._store_rows)
    compare the column index with the descriptor's own head dim (a run-time value). Spills on sm_90a at
    hdim 128 stay small: forward 0 B, backward 24 B (16 B before the column mask)."""
    f, b = _mods()
    from ioattn.kernels.aot import ptxas_report
    k = f.compile_for(128, "bf16", True, varlen=True) if which == "forward" else b.compile_for(128, "bf16", True,
                                                                                              varlen=True)
    assert ptxas_report(k)["spill_bytes"] <= (0 if which == "forward" else 32)
