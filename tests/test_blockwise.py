"""The plain-PyTorch blockwise path (ioattn.blockwise) against the fp64 reference.

Forward outputs and lse are compared with ``attention_ref`` in float64;
gradients with autograd through ``attention_ref`` on float64 copies of the
inputs.  float32 inputs must match to ~1e-5 relative; float16/bfloat16 inputs
must be at most twice as wrong as plain PyTorch computing in that dtype
(``err <= 2 * err_torch + floor``).  Tile sizes are shrunk in some tests so that
short sequences still cross many tiles and window edges.
"""

import math
import zlib

import pytest
import torch

from ioattn import blockwise
from ioattn.reference import attention_ref, attention_varlen_ref, visible_mask

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

@pytest.fixture
def gen(request):
    """A generator seeded per test, so each test draws its own inputs reproducibly."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 32 x 16 so that sequences of ~100 span many tiles."""
    monkeypatch.setattr(blockwise, "BLOCK_M", 32)
    monkeypatch.setattr(blockwise, "BLOCK_N", 16)


def randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def make_qkv(b, sq, sk, hq, hk, d, gen, dtype=torch.float32):
    return (randn(b, sq, hq, d, gen=gen, dtype=dtype), randn(b, sk, hk, d, gen=gen, dtype=dtype),
            randn(b, sk, hk, d, gen=gen, dtype=dtype))


def options(window=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0, rng_state=None,
            softmax_scale=None):
    """Keyword arguments of the blockwise contract (dense)."""
    return dict(cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                softmax_scale=softmax_scale, window_left=window[0], window_right=window[1],
                softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                rng_state=rng_state)


def reference(q, k, v, dout, *, upcast=True, **kwargs):
    """Reference (out, lse, dq, dk, dv): fp64 with upcast, else in the inputs' dtype."""
    dtype = torch.float64 if upcast else q.dtype
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out, lse = attention_ref(q, k, v, upcast=upcast, **kwargs)
    out.backward(dout.to(out.dtype))
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def rel_err(x, ref):
    """Max absolute error relative to the reference's largest magnitude.

    The magnitude is floored at 0.1: some exact gradients are 0 (e.g. dq with a
    single key), where float32 leaves ~1e-7 of cancellation noise.
    """
    if ref.numel() == 0:
        return 0.0
    return max_err(x, ref) / max(ref.double().abs().max().item(), 0.1)


def check_lse(lse, lse_ref, atol):
    seen = torch.isfinite(lse_ref)
    assert torch.equal(torch.isneginf(lse), ~seen), "rows without a visible key must have lse -inf"
    if seen.any():
        assert max_err(lse[seen], lse_ref[seen]) <= atol


def run_blockwise(q, k, v, dout, **opts):
    out, lse = blockwise.attention_forward(q, k, v, **opts)
    dq, dk, dv = blockwise.attention_backward(dout, q, k, v, out, lse, **opts)
    return out, lse, dq, dk, dv


def ref_kwargs(window=(-1, -1), softcap=0.0, alibi_slopes=None, softmax_scale=None, **kwargs):
    return dict(window_size=window, softcap=softcap, alibi_slopes=alibi_slopes,
                softmax_scale=softmax_scale, **kwargs)


# ----------------------------------------------------------------------------
# float32 against the fp64 reference
# ----------------------------------------------------------------------------

# (batch, seqlen_q, seqlen_k, nheads_q, nheads_k, headdim)
SHAPES = [
    (2, 1, 1, 2, 2, 40),
    (2, 1, 257, 4, 2, 40),     # decoding-like: one query, many keys
    (1, 17, 100, 2, 1, 96),    # sq < sk, MQA
    (2, 100, 17, 4, 2, 40),    # sq > sk: with causal, early rows see no key
    (1, 257, 257, 4, 4, 96),
    (1, 257, 130, 6, 2, 40),   # GQA, 3 query heads per KV head
]

# (window_left, window_right): full, causal, sliding window, left-only, right-only
WINDOWS = [(-1, -1), (-1, 0), (8, 0), (5, 3), (20, -1), (-1, 7)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"w{w[0]}_{w[1]}")
def test_fp32_matches_reference(shape, window, gen):
    b, sq, sk, hq, hk, d = shape
    q, k, v = make_qkv(b, sq, sk, hq, hk, d, gen)
    dout = randn(b, sq, hq, d, gen=gen)
    got = run_blockwise(q, k, v, dout, **options(window=window))
    ref = reference(q, k, v, dout, **ref_kwargs(window=window))
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert got[0].shape == q.shape and got[1].shape == (b, hq, sq)
    check_lse(got[1], ref[1], atol=1e-5)
    for name, x, r in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], ref[:1] + ref[2:]):
        assert x.shape == r.shape, name
        assert rel_err(x, r) <= 1e-5, name


@pytest.mark.parametrize("softcap", [0.0, 2.0, 30.0])
@pytest.mark.parametrize("alibi", [None, "per_head", "per_batch_head"])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (6, 2)], ids=lambda w: f"w{w[0]}_{w[1]}")
def test_fp32_softcap_alibi(softcap, alibi, window, gen, small_tiles):
    b, sq, sk, hq, hk, d = 2, 37, 83, 4, 2, 40
    q, k, v = make_qkv(b, sq, sk, hq, hk, d, gen)
    q = q * 3  # larger scores, so the softcap really bends them
    dout = randn(b, sq, hq, d, gen=gen)
    slopes = None
    if alibi == "per_head":
        slopes = torch.rand(hq, generator=gen)
    elif alibi == "per_batch_head":
        slopes = torch.rand(b, hq, generator=gen)
    kw = dict(window=window, softcap=softcap, alibi_slopes=slopes, softmax_scale=0.3)
    got = run_blockwise(q, k, v, dout, **options(**kw))
    ref = reference(q, k, v, dout, **ref_kwargs(**kw))
    check_lse(got[1], ref[1], atol=2e-5)
    for name, x, r in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], ref[:1] + ref[2:]):
        assert rel_err(x, r) <= 1e-5, name


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"w{w[0]}_{w[1]}")
def test_many_tiles(window, gen, small_tiles):
    """Tiles of 32 x 16: windows cut through tiles, whole tiles are skipped."""
    b, sq, sk, hq, hk, d = 2, 100, 77, 4, 1, 40
    q, k, v = make_qkv(b, sq, sk, hq, hk, d, gen)
    dout = randn(b, sq, hq, d, gen=gen)
    got = run_blockwise(q, k, v, dout, **options(window=window))
    ref = reference(q, k, v, dout, **ref_kwargs(window=window))
    check_lse(got[1], ref[1], atol=1e-5)
    for name, x, r in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], ref[:1] + ref[2:]):
        assert rel_err(x, r) <= 1e-5, name


def test_rows_without_keys(gen, small_tiles):
    """sq > sk with causal masking, and a window that leaves early rows empty: out 0,
    lse -inf, zero gradients, no NaN anywhere."""
    b, sq, sk, hq, hk, d = 2, 70, 20, 2, 2, 40
    q, k, v = make_qkv(b, sq, sk, hq, hk, d, gen)
    dout = randn(b, sq, hq, d, gen=gen)
    out, lse, dq, dk, dv = run_blockwise(q, k, v, dout, **options(window=(-1, 0)))
    empty = sq - sk  # rows 0 .. sq - sk - 1 see no key
    for x in (out, lse, dq, dk, dv):
        assert not torch.isnan(x).any()
    assert torch.all(out[:, :empty] == 0) and torch.all(dq[:, :empty] == 0)
    assert torch.all(lse[:, :, :empty] == NEG_INF)
    assert torch.isfinite(lse[:, :, empty:]).all()

    # sk == 0: every row is empty
    k0, v0 = k[:, :0], v[:, :0]
    out, lse, dq, dk, dv = run_blockwise(q, k0, v0, dout, **options())
    assert torch.all(out == 0) and torch.all(dq == 0) and torch.all(lse == NEG_INF)
    assert dk.shape == k0.shape and dv.shape == v0.shape


@pytest.mark.parametrize("seqlens", [(1, 1), (17, 100), (100, 17), (64, 64), (65, 33)])
def test_key_blocks_are_exactly_the_visible_ones(seqlens):
    """The key blocks visited for a query block are those holding a visible key."""
    sq, sk = seqlens
    block_m, block_n = 16, 16
    for window in [(-1, -1), (-1, 0), (0, 0), (15, 0), (16, 1), (3, 17), (31, -1), (-1, 32)]:
        visible = visible_mask(sq, sk, window_size=window)
        for m in range(0, sq, block_m):
            got = [nb for nb, _, _ in blockwise._key_blocks(m, min(m + block_m, sq), sq, sk,
                                                            *window, block_n)]
            rows = visible[m:m + block_m]
            want = [nb for nb in range(math.ceil(sk / block_n))
                    if rows[:, nb * block_n:(nb + 1) * block_n].any()]
            assert got == want, (window, m)


def test_key_blocks_skip_outside_window():
    """A sliding window visits O(window) key blocks per query block, not all of them."""
    seqlen, block_m, block_n = 1024, 128, 128
    for m_start in range(0, seqlen, block_m):
        blocks = list(blockwise._key_blocks(m_start, m_start + block_m, seqlen, seqlen,
                                            window_left=64, window_right=0, block_n=block_n))
        assert 1 <= len(blocks) <= 2
        assert all(n_start % block_n == 0 for _, n_start, _ in blocks)
    # causal: the upper-right triangle of tiles is never visited
    visits = sum(len(list(blockwise._key_blocks(m, m + block_m, seqlen, seqlen, -1, 0, block_n)))
                 for m in range(0, seqlen, block_m))
    n_tiles = seqlen // block_m
    assert visits == n_tiles * (n_tiles + 1) // 2


def test_float64_inputs(gen):
    b, sq, sk, hq, hk, d = 2, 33, 57, 2, 1, 40
    q, k, v = make_qkv(b, sq, sk, hq, hk, d, gen, dtype=torch.float64)
    dout = randn(b, sq, hq, d, gen=gen, dtype=torch.float64)
    got = run_blockwise(q, k, v, dout, **options(window=(-1, 0), softcap=10.0))
    ref = reference(q, k, v, dout, **ref_kwargs(window=(-1, 0), softcap=10.0))
    assert got[0].dtype == torch.float64 and got[1].dtype == torch.float32
    check_lse(got[1], ref[1], atol=1e-5)
    assert rel_err(got[0], ref[0]) <= 1e-12
    # lse is stored in float32 (the contract), so gradients carry its rounding
    for x, r in zip(got[2:], ref[2:]):
        assert rel_err(x, r) <= 1e-6


def test_noncontiguous_inputs(gen):
    """q/k/v as views into a packed qkv tensor (only the last dim is contiguous)."""
    b, s, h, d = 2, 45, 3, 40
    qkv = randn(b, s, 3, h, d, gen=gen)
    q, k, v = qkv.unbind(dim=2)
    assert not q.is_contiguous()
    dout = randn(b, s, h, d, gen=gen)
    got = run_blockwise(q, k, v, dout, **options(window=(-1, 0)))
    ref = reference(q, k, v, dout, **ref_kwargs(window=(-1, 0)))
    for x, r in zip(got[:1] + got[2:], ref[:1] + ref[2:]):
        assert rel_err(x, r) <= 1e-5


# ----------------------------------------------------------------------------
# float16 / bfloat16: no worse than plain PyTorch in that dtype
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window,softcap", [((-1, -1), 0.0), ((-1, 0), 0.0), ((16, 4), 20.0)],
                         ids=["full", "causal", "window_softcap"])
def test_low_precision(dtype, window, softcap, gen):
    b, sq, sk, hq, hk, d = 2, 129, 200, 4, 2, 96
    q, k, v = make_qkv(b, sq, sk, hq, hk, d, gen, dtype=dtype)
    dout = randn(b, sq, hq, d, gen=gen, dtype=dtype)
    kw = dict(window=window, softcap=softcap)
    got = run_blockwise(q, k, v, dout, **options(**kw))
    ref = reference(q, k, v, dout, **ref_kwargs(**kw))
    ref_torch = reference(q, k, v, dout, upcast=False, **ref_kwargs(**kw))
    assert got[0].dtype == dtype and got[2].dtype == dtype
    check_lse(got[1], ref[1], atol=1e-4)  # lse is float32 from (rounded) inputs: exact math
    for name, x, x_torch, r in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:],
                                   ref_torch[:1] + ref_torch[2:], ref[:1] + ref[2:]):
        err, err_torch = max_err(x, r), max_err(x_torch, r)
        assert err <= 2 * err_torch + 1e-5, f"{name}: {err:.3g} vs torch {err_torch:.3g}"


# ----------------------------------------------------------------------------
# varlen
# ----------------------------------------------------------------------------

def varlen_options(cu_q, cu_k, **kwargs):
    opts = options(**kwargs)
    opts.update(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                max_seqlen_q=int((cu_q[1:] - cu_q[:-1]).max()),
                max_seqlen_k=int((cu_k[1:] - cu_k[:-1]).max()))
    return opts


def cu_seqlens(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)


# per sequence (seqlen_q, seqlen_k): a zero-length sequence, one with no keys, sq > sk, sq < sk
VARLEN_Q = [5, 0, 70, 3, 40]
VARLEN_K = [9, 0, 33, 0, 81]


@pytest.mark.parametrize("window,softcap,alibi", [((-1, -1), 0.0, None), ((-1, 0), 0.0, "bh"),
                                                  ((7, 2), 5.0, "h")],
                         ids=["full", "causal_alibi", "window_softcap_alibi"])
def test_varlen_equals_per_sequence(window, softcap, alibi, gen, small_tiles):
    hq, hk, d = 4, 2, 40
    nseq = len(VARLEN_Q)
    cu_q, cu_k = cu_seqlens(VARLEN_Q), cu_seqlens(VARLEN_K)
    q = randn(sum(VARLEN_Q), hq, d, gen=gen)
    k, v = randn(sum(VARLEN_K), hk, d, gen=gen), randn(sum(VARLEN_K), hk, d, gen=gen)
    dout = randn(sum(VARLEN_Q), hq, d, gen=gen)
    slopes = {None: None, "h": torch.rand(hq, generator=gen),
              "bh": torch.rand(nseq, hq, generator=gen)}[alibi]
    kw = dict(window=window, softcap=softcap, alibi_slopes=slopes)
    out, lse, dq, dk, dv = run_blockwise(q, k, v, dout, **varlen_options(cu_q, cu_k, **kw))
    assert out.shape == q.shape and lse.shape == (hq, q.shape[0])
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for x in (out, lse, dq, dk, dv):
        assert not torch.isnan(x).any()

    # each sequence through the dense path gives the same numbers
    for i in range(nseq):
        q0, q1, k0, k1 = cu_q[i].item(), cu_q[i + 1].item(), cu_k[i].item(), cu_k[i + 1].item()
        seq_slopes = slopes if slopes is None or slopes.dim() == 1 else slopes[i:i + 1]
        dense = run_blockwise(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], dout[None, q0:q1],
                              **options(**dict(kw, alibi_slopes=seq_slopes)))
        torch.testing.assert_close(out[q0:q1], dense[0][0], rtol=0, atol=0)
        torch.testing.assert_close(lse[:, q0:q1], dense[1][0], rtol=0, atol=0)
        torch.testing.assert_close(dq[q0:q1], dense[2][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dk[k0:k1], dense[3][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dv[k0:k1], dense[4][0], rtol=1e-6, atol=1e-6)

    # and the forward agrees with the fp64 varlen reference
    out_ref, lse_ref = attention_varlen_ref(q, k, v, cu_q, cu_k,
                                            **ref_kwargs(window, softcap, slopes))
    assert rel_err(out, out_ref) <= 1e-5
    check_lse(lse, lse_ref, atol=1e-5)


# ----------------------------------------------------------------------------
# dropout
# ----------------------------------------------------------------------------

def rng_state(seed, offset=0):
    return torch.tensor([seed, offset], dtype=torch.int64)


def test_dropout_keep_fraction():
    """Each probability is kept with probability 1 - p: the kept fraction over
    n draws lies within 6 standard deviations of 1 - p."""
    for p, seed in ((0.1, 1), (0.5, 2), (0.9, 3)):
        masks = [blockwise.dropout_keep_mask(i, 4, 300, 200, rng_state(seed), p) for i in range(2)]
        mask = torch.cat(masks)
        assert mask.shape == (2, 4, 300, 200) and mask.dtype == torch.bool
        n = mask.numel()
        kept = mask.double().mean().item()
        assert abs(kept - (1 - p)) <= 6 * math.sqrt(p * (1 - p) / n)
        # batch elements, heads and tiles draw different masks
        assert not torch.equal(masks[0], masks[1])
        assert not torch.equal(mask[0, 0], mask[0, 1])
        assert not torch.equal(mask[0, 0, :128, :128], mask[0, 0, :128, 128:])
    # the offset changes the mask too
    assert not torch.equal(blockwise.dropout_keep_mask(0, 2, 64, 64, rng_state(5, 0), 0.5),
                           blockwise.dropout_keep_mask(0, 2, 64, 64, rng_state(5, 1), 0.5))


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (10, 3)], ids=lambda w: f"w{w[0]}_{w[1]}")
def test_dropout_replays_in_reference(window, gen, small_tiles):
    """Replaying dropout_keep_mask in the reference gives the same output and gradients."""
    b, sq, sk, hq, hk, d = 2, 45, 70, 4, 2, 40
    p = 0.3
    q, k, v = make_qkv(b, sq, sk, hq, hk, d, gen)
    dout = randn(b, sq, hq, d, gen=gen)
    state = rng_state(1234, 56)
    kw = dict(window=window, softcap=15.0, alibi_slopes=torch.rand(hq, generator=gen))
    got = run_blockwise(q, k, v, dout, **options(dropout_p=p, rng_state=state, **kw))
    mask = torch.cat([blockwise.dropout_keep_mask(i, hq, sq, sk, state, p) for i in range(b)])
    ref = reference(q, k, v, dout, dropout_p=p, dropout_mask=mask, **ref_kwargs(**kw))
    check_lse(got[1], ref[1], atol=1e-5)  # lse is the un-dropped normalizer
    for name, x, r in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], ref[:1] + ref[2:]):
        assert rel_err(x, r) <= 1e-5, name

    # same rng_state -> bit-identical results; another seed -> another output
    again = run_blockwise(q, k, v, dout, **options(dropout_p=p, rng_state=state, **kw))
    for x, y in zip(got, again):
        assert torch.equal(x, y)
    other = blockwise.attention_forward(q, k, v, **options(dropout_p=p, rng_state=rng_state(7),
                                                           **kw))
    assert not torch.equal(got[0], other[0])


def test_dropout_varlen_replays_per_sequence(gen, small_tiles):
    """In varlen, sequence i uses the mask dropout_keep_mask(i, ...)."""
    hq, hk, d, p = 2, 1, 40, 0.25
    cu_q, cu_k = cu_seqlens(VARLEN_Q), cu_seqlens(VARLEN_K)
    q = randn(sum(VARLEN_Q), hq, d, gen=gen)
    k, v = randn(sum(VARLEN_K), hk, d, gen=gen), randn(sum(VARLEN_K), hk, d, gen=gen)
    state = rng_state(99, 3)
    out, lse = blockwise.attention_forward(
        q, k, v, **varlen_options(cu_q, cu_k, window=(-1, 0), dropout_p=p, rng_state=state))
    masks = [blockwise.dropout_keep_mask(i, hq, sq_i, sk_i, state, p)
             for i, (sq_i, sk_i) in enumerate(zip(VARLEN_Q, VARLEN_K))]
    out_ref, lse_ref = attention_varlen_ref(q, k, v, cu_q, cu_k, dropout_masks=masks,
                                            **ref_kwargs((-1, 0), dropout_p=p))
    assert rel_err(out, out_ref) <= 1e-5
    check_lse(lse, lse_ref, atol=1e-5)


def test_dropout_needs_rng_state(gen):
    q, k, v = make_qkv(1, 4, 4, 1, 1, 8, gen)
    with pytest.raises(ValueError, match="rng_state"):
        blockwise.attention_forward(q, k, v, **options(dropout_p=0.5))
