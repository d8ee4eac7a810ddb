"""flash_attn_with_kvcache against an fp64 reference.

Run the Triton kernels on CPU with ``TRITON_INTERPRET=1`` set before Python
starts; without it, the public function takes the plain-PyTorch path (the
tests then check that path instead). With a GPU, inputs go to CUDA and the
compiled kernels are tested (the reference always runs on CPU).

Every cache position that must never be read (past ``cache_seqlens + seqlen_new``,
before ``cache_leftpad``, unused pages) holds NaN, and the kernels' output
buffers are NaN-filled before each launch, so an out-of-range read or an
unwritten output cannot pass.
"""

from __future__ import annotations

import math

import pytest
import torch

from ioattn import kvcache
from ioattn.kernels import decode
from ioattn.kvcache import flash_attn_with_kvcache
from ioattn.reference import attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# ----------------------------------------------------------------------------
# Reference: logical cache -> fp64 rotary -> append -> attention_ref per batch row
# ----------------------------------------------------------------------------


def rotary_ref(x, cos, sin, positions, interleaved):
    """Rotary in fp64 through complex multiplication. x (b, s, h, d), positions (b, s)."""
    r = 2 * cos.shape[1]
    x = x.double()
    positions = positions.clamp(max=cos.shape[0] - 1)      # the kernels' rule past the table
    rot = torch.polar(torch.ones_like(cos.double()), torch.atan2(sin.double(), cos.double()))
    rot = rot[positions].unsqueeze(2)                                   # (b, s, 1, r/2)
    xr = x[..., :r]
    if interleaved:
        pairs = torch.view_as_complex(xr.reshape(*xr.shape[:-1], r // 2, 2).contiguous())
        xr = torch.view_as_real(pairs * rot).flatten(-2)
    else:
        pairs = torch.complex(xr[..., : r // 2], xr[..., r // 2:])
        turned = pairs * rot
        xr = torch.cat((turned.real, turned.imag), dim=-1)
    return torch.cat((xr, x[..., r:]), dim=-1)


def logical_cache(cache, block_table, cache_batch_idx, batch):
    """(batch, capacity, hk, d) view of a contiguous or paged cache, one row per batch element."""
    if block_table is not None:
        return torch.stack([cache[block_table[b].long()].flatten(0, 1) for b in range(batch)])
    idx = cache_batch_idx.long() if cache_batch_idx is not None else torch.arange(batch)
    return cache[idx]


def kvcache_ref(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                rotary_interleaved=True, alibi_slopes=None, sinks=None):
    """Returns (out fp64, lse fp64, k_logical, v_logical): the caches as they must be after the
    append (in the cache dtype), in logical (batch, capacity, hk, d) layout."""
    batch, seqlen_q, nheads, _ = q.shape
    k_log = logical_cache(k_cache, block_table, cache_batch_idx, batch).clone()
    v_log = logical_cache(v_cache, block_table, cache_batch_idx, batch).clone()
    capacity = k_log.shape[1]
    if cache_seqlens is None:
        lens = torch.full((batch,), capacity)
    elif isinstance(cache_seqlens, int):
        lens = torch.full((batch,), cache_seqlens)
    else:
        lens = cache_seqlens.long()
    seqlen_new = 0 if k is None else k.shape[1]
    q64 = q.double()
    if k is not None:
        pos_k = lens.view(-1, 1) + torch.arange(seqlen_new).view(1, -1)
        k_in = rotary_ref(k, rotary_cos, rotary_sin, pos_k, rotary_interleaved) \
            if rotary_cos is not None else k
        for b in range(batch):
            k_log[b, lens[b]:lens[b] + seqlen_new] = k_in[b].to(k_cache.dtype)
            v_log[b, lens[b]:lens[b] + seqlen_new] = v[b]
    if rotary_cos is not None:
        per_row = causal or window_size[0] >= 0 or window_size[1] >= 0
        i = torch.arange(seqlen_q) if per_row else torch.zeros(seqlen_q, dtype=torch.long)
        q64 = rotary_ref(q, rotary_cos, rotary_sin, lens.view(-1, 1) + i.view(1, -1),
                         rotary_interleaved)
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((batch, nheads, seqlen_q), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        start = 0 if cache_leftpad is None else int(cache_leftpad[b])
        end = int(lens[b]) + seqlen_new
        if end <= start:
            if sinks is not None:  # only the sink: out 0, lse = the sink logit
                lse[b] = sinks.double().view(-1, 1)
            continue
        slopes = alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[b]
        o, l = attention_ref(q64[b:b + 1], k_log[b:b + 1, start:end], v_log[b:b + 1, start:end],
                             softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                             softcap=softcap, alibi_slopes=slopes, sinks=sinks)
        out[b], lse[b] = o[0], l[0]
    return out, lse, k_log, v_log


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    """Kernel output buffers start as NaN: an element the kernels do not write fails the test."""
    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(decode, "_new_buffer", alloc)


def make_inputs(*, batch=3, seqlen_q=1, nheads=4, nheads_k=2, d=32, capacity=96, seqlen_new=0,
                lens=None, page_size=None, leftpad=None, batch_idx=False, rotary_dim=0,
                dtype=torch.float32, device="cpu", gen=None):
    """Random inputs; every cache slot outside [leftpad, lens) is NaN (never to be read).

    ``lens``: tokens already in the cache per batch row (default: 0, random, full)."""
    if lens is None:
        lens = [0, int(torch.randint(1, capacity - seqlen_new, (1,), generator=gen)),
                capacity - seqlen_new][:batch]
        lens += [int(torch.randint(0, capacity - seqlen_new + 1, (1,), generator=gen))
                 for _ in range(batch - len(lens))]
    lens = torch.tensor(lens, dtype=torch.int32)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    k_log = randn(batch, capacity, nheads_k, d)
    v_log = randn(batch, capacity, nheads_k, d)
    valid = torch.arange(capacity).view(1, -1) < lens.view(-1, 1).long()
    if leftpad is not None:
        leftpad = torch.tensor(leftpad, dtype=torch.int32)
        valid &= torch.arange(capacity).view(1, -1) >= leftpad.view(-1, 1).long()
    k_log[~valid] = float("nan")
    v_log[~valid] = float("nan")

    inputs = dict(q=randn(batch, seqlen_q, nheads, d), cache_seqlens=lens)
    if page_size is not None:
        pages_per_seq = capacity // page_size
        num_blocks = batch * pages_per_seq + 3                         # a few pages never used
        perm = torch.randperm(num_blocks, generator=gen)[: batch * pages_per_seq]
        block_table = perm.view(batch, pages_per_seq).to(torch.int32)
        k_cache = torch.full((num_blocks, page_size, nheads_k, d), float("nan"), dtype=dtype)
        v_cache = torch.full_like(k_cache, float("nan"))
        for b in range(batch):
            k_cache[block_table[b].long()] = k_log[b].view(pages_per_seq, page_size, nheads_k, d)
            v_cache[block_table[b].long()] = v_log[b].view(pages_per_seq, page_size, nheads_k, d)
        inputs["block_table"] = block_table
    elif batch_idx:
        batch_cache = batch + 2
        idx = torch.randperm(batch_cache, generator=gen)[:batch].to(torch.int32)
        k_cache = torch.full((batch_cache, capacity, nheads_k, d), float("nan"), dtype=dtype)
        v_cache = torch.full_like(k_cache, float("nan"))
        k_cache[idx.long()] = k_log
        v_cache[idx.long()] = v_log
        inputs["cache_batch_idx"] = idx
    else:
        k_cache, v_cache = k_log, v_log
    inputs.update(k_cache=k_cache, v_cache=v_cache)
    if seqlen_new:
        inputs.update(k=randn(batch, seqlen_new, nheads_k, d), v=randn(batch, seqlen_new, nheads_k, d))
    if leftpad is not None:
        inputs["cache_leftpad"] = leftpad
    if rotary_dim:
        angle = torch.rand(capacity, rotary_dim // 2, generator=gen, dtype=torch.float64) * 2 * math.pi
        inputs.update(rotary_cos=angle.cos().to(dtype), rotary_sin=angle.sin().to(dtype))
    return inputs


def clone_inputs(inputs, device=None):
    return {name: x.clone().to(device or x.device) if isinstance(x, torch.Tensor) else x
            for name, x in inputs.items()}


def on_device(inputs):
    return clone_inputs(inputs, DEVICE)


def check(inputs, atol=1e-5, rtol=1e-5, **options):
    """Run kernel and reference on copies of ``inputs``; compare out, lse and the caches."""
    ref_in = clone_inputs(inputs, "cpu")
    inputs = on_device(inputs)
    options_dev = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    out, lse = flash_attn_with_kvcache(**inputs, **options_dev, return_softmax_lse=True)
    out, lse = out.cpu(), lse.cpu()
    out_ref, lse_ref, k_ref, v_ref = kvcache_ref(**ref_in, **{k: v for k, v in options.items()
                                                             if k != "num_splits"})
    assert not out.isnan().any(), "NaN in output"
    torch.testing.assert_close(out.double(), out_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), lse_ref, atol=atol, rtol=rtol)
    batch = inputs["q"].shape[0]
    for cache, expected in ((inputs["k_cache"], k_ref), (inputs["v_cache"], v_ref)):
        got = logical_cache(cache.cpu(), ref_in.get("block_table"), ref_in.get("cache_batch_idx"), batch)
        torch.testing.assert_close(got.double(), expected.double(), atol=atol, rtol=rtol,
                                   equal_nan=True)
    return out, lse


@pytest.fixture
def gen(request):
    """A fresh generator per test, seeded from the test's id (fresh inputs, reproducible)."""
    g = torch.Generator()
    g.manual_seed(hash(request.node.nodeid) % (2 ** 31))
    return g


# ----------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("seqlen_new", [0, 3])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("seqlen_q", [1, 4])
@pytest.mark.parametrize("page_size", [None, 16, 48, 64], ids=["contiguous", "page16", "page48", "page64"])
def test_decode(page_size, seqlen_q, heads, seqlen_new, gen):
    nheads, nheads_k = heads
    inputs = make_inputs(seqlen_q=seqlen_q, nheads=nheads, nheads_k=nheads_k, seqlen_new=seqlen_new,
                         page_size=page_size, capacity=192 if page_size == 64 else 96, gen=gen)
    out, lse = check(inputs, num_splits=3 if seqlen_q == 4 else 0)   # the default picks 1 split here
    if seqlen_new == 0:
        # batch row 0 has an empty cache: no key, out 0 and lse -inf
        assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("page_size,rotary_dim", [(None, 32), (16, 16)])
def test_rotary(page_size, rotary_dim, interleaved, causal, gen):
    inputs = make_inputs(seqlen_q=3, seqlen_new=3, page_size=page_size, rotary_dim=rotary_dim, gen=gen)
    check(inputs, causal=causal, rotary_interleaved=interleaved)


OPTIONS = {
    "causal": dict(causal=True),
    "window": dict(window_size=(5, 2)),
    "window-left": dict(window_size=(7, -1)),
    "softcap": dict(softcap=1.5),
    "alibi": "alibi1d",
    "alibi-batch-causal-softcap": "alibi2d",
    "scale": dict(softmax_scale=0.3, causal=True),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_options(name, gen):
    nheads = 4
    options = OPTIONS[name]
    if options == "alibi1d":
        options = dict(alibi_slopes=torch.rand(nheads, generator=gen))
    elif options == "alibi2d":
        options = dict(alibi_slopes=torch.rand(3, nheads, generator=gen), causal=True, softcap=2.0)
    inputs = make_inputs(seqlen_q=4, nheads=nheads, nheads_k=2, d=40, seqlen_new=2, gen=gen)
    check(inputs, **options)


def test_long_query_block(gen):
    """group * seqlen_q rows larger than one M tile (several M blocks), causal, with append."""
    inputs = make_inputs(batch=2, seqlen_q=40, nheads=4, nheads_k=2, capacity=112, seqlen_new=40,
                         lens=[20, 72], gen=gen)
    check(inputs, causal=True)


@pytest.mark.parametrize("page_size", [None, 16, 64])
def test_leftpad(page_size, gen):
    inputs = make_inputs(seqlen_q=2, seqlen_new=2, capacity=192, lens=[10, 50, 190],
                         leftpad=[0, 17, 60], page_size=page_size, rotary_dim=32, gen=gen)
    check(inputs, causal=True)


def test_leftpad_window(gen):
    inputs = make_inputs(seqlen_q=3, seqlen_new=1, lens=[5, 40, 90], leftpad=[5, 9, 33], gen=gen)
    check(inputs, window_size=(20, 0), alibi_slopes=torch.rand(4, generator=gen))


def test_cache_batch_idx(gen):
    inputs = make_inputs(seqlen_q=2, seqlen_new=2, batch_idx=True, rotary_dim=16, gen=gen)
    check(inputs, rotary_interleaved=False)


@pytest.mark.parametrize("page_size", [None, 16])
def test_sinks(page_size, gen):
    """GPT-OSS's attention sinks while decoding (a batch row with an empty cache included)."""
    inputs = make_inputs(seqlen_q=2, seqlen_new=2, lens=[0, 30, 60], page_size=page_size, gen=gen)
    check(inputs, causal=True, window_size=(8, 0), sinks=torch.randn(4, generator=gen) * 2)
    empty = make_inputs(seqlen_q=1, lens=[0, 12, 40], gen=gen)  # row 0: no key at all
    out, lse = check(empty, sinks=torch.tensor([0.5, -1.0, 2.0, 0.0]))
    assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_num_splits_agree(gen):
    """Forced splits 1..8 give the same result (some splits get no key tile at all)."""
    inputs = make_inputs(batch=2, seqlen_q=2, capacity=320, lens=[0, 300], seqlen_new=2,
                         page_size=64, gen=gen)
    results = []
    for num_splits in range(1, 9):
        out, lse = check(inputs, num_splits=num_splits, causal=True)
        results.append((out, lse))
    for out, lse in results[1:]:
        torch.testing.assert_close(out, results[0][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse, results[0][1], atol=1e-6, rtol=1e-6)


def test_full_cache_no_seqlens(gen):
    """cache_seqlens=None: every cache slot is a valid key."""
    inputs = make_inputs(batch=2, lens=[96, 96], gen=gen)
    del inputs["cache_seqlens"]
    check(inputs, num_splits=3)


def test_int_cache_seqlens(gen):
    inputs = make_inputs(batch=2, lens=[40, 40], seqlen_new=1, gen=gen)
    inputs["cache_seqlens"] = 40
    check(inputs)


def test_default_splits_heuristic():
    """Shape-only: more splits for few long sequences, none when the batch fills the GPU."""
    cpu = torch.device("cpu")
    assert decode.num_splits_heuristic(1, 8, 1, 131072, 64, cpu) > 1
    assert decode.num_splits_heuristic(64, 8, 1, 4096, 64, cpu) == 1
    assert decode.num_splits_heuristic(1, 8, 1, 64, 64, cpu) == 1      # one key tile: nothing to split


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [None, 48])
def test_low_precision(dtype, page_size, gen):
    """err(kernel, fp64) <= 2 err(plain PyTorch in dtype, fp64) + floor."""
    inputs = make_inputs(seqlen_q=2, nheads=4, nheads_k=1, d=64, capacity=96, seqlen_new=2,
                         lens=[30, 60, 94], page_size=page_size, dtype=dtype, gen=gen)
    options = dict(causal=True, softcap=3.0)
    ref_in = clone_inputs(inputs)
    inputs = on_device(inputs)
    out = flash_attn_with_kvcache(**inputs, **options).cpu()
    out_ref, _, k_log, v_log = kvcache_ref(**ref_in, **options)
    err_torch = 0.0
    lens = inputs["cache_seqlens"].long() + 2
    for b in range(3):
        o, _ = attention_ref(ref_in["q"][b:b + 1], k_log[b:b + 1, :lens[b]], v_log[b:b + 1, :lens[b]],
                             upcast=False, **options)
        err_torch = max(err_torch, (o[0].double() - out_ref[b]).abs().max().item())
    err_kernel = (out.double() - out_ref).abs().max().item()
    floor = 1e-3 if dtype == torch.float16 else 8e-3
    assert err_kernel <= 2 * err_torch + floor, (err_kernel, err_torch)
    got = logical_cache(inputs["k_cache"].cpu(), ref_in.get("block_table"), None, 3)
    torch.testing.assert_close(got, k_log, atol=0, rtol=0, equal_nan=True)


def test_torch_path(gen):
    """The plain-PyTorch CPU path, called directly, on a mix of every option."""
    inputs = make_inputs(seqlen_q=3, seqlen_new=2, page_size=16, capacity=96, lens=[0, 30, 94],
                         leftpad=[0, 4, 50], rotary_dim=16, gen=gen)
    options = dict(causal=False, window_size=(30, 1), softcap=2.0,
                   alibi_slopes=torch.rand(3, 4, generator=gen), rotary_interleaved=False)
    ref_in = clone_inputs(inputs)
    args = kvcache._check_and_normalize(
        inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["k"], inputs["v"],
        inputs["rotary_cos"], inputs["rotary_sin"], inputs["cache_seqlens"], None,
        inputs["cache_leftpad"], inputs["block_table"], None, False, options["window_size"],
        options["softcap"], options["alibi_slopes"], 0)
    out, lse = kvcache._with_kvcache_torch(**args, rotary_interleaved=False, block_n=16)
    out_ref, lse_ref, k_ref, _ = kvcache_ref(**ref_in, **options)
    torch.testing.assert_close(out.double(), out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-5, rtol=1e-5)
    got = logical_cache(inputs["k_cache"], inputs["block_table"], None, 3)
    torch.testing.assert_close(got.double(), k_ref.double(), atol=1e-6, rtol=1e-6, equal_nan=True)


# ----------------------------------------------------------------------------
# Errors: messages say what was expected and what was received
# ----------------------------------------------------------------------------


def _bad(match, exc=ValueError, **changes):
    inputs = make_inputs(batch=2, lens=[10, 20], seqlen_new=1, page_size=16)
    inputs.update(changes)
    with pytest.raises(exc, match=match):
        flash_attn_with_kvcache(**inputs)


def test_errors():
    _bad("v_cache: expected the shape", v_cache=torch.zeros(7, 16, 2, 32))
    _bad("expected head dim 32", k_cache=torch.zeros(7, 16, 2, 16), v_cache=torch.zeros(7, 16, 2, 16))
    cache = make_inputs(batch=2, lens=[10, 20], seqlen_new=1, page_size=16)
    _bad(r"v_cache: expected the head dim of k_cache \(32\), got 16: flash_attn_with_kvcache takes no value head dim",
         v_cache=cache["v_cache"][..., :16].contiguous(), v=cache["v"][..., :16])
    _bad("multiple of the cache", q=torch.zeros(2, 1, 3, 32))
    _bad("k: expected shape", k=torch.zeros(2, 1, 3, 32))
    _bad("expected dtype torch.float32", exc=TypeError, k=torch.zeros(2, 1, 2, 32, dtype=torch.float16))
    _bad("head dim: expected at most 256", q=torch.zeros(2, 1, 4, 320),
         k_cache=torch.zeros(7, 16, 2, 320), v_cache=torch.zeros(7, 16, 2, 320),
         k=torch.zeros(2, 1, 2, 320), v=torch.zeros(2, 1, 2, 320))
    _bad("page size .* multiple of 16", k_cache=torch.zeros(9, 8, 2, 32), v_cache=torch.zeros(9, 8, 2, 32),
         block_table=torch.zeros(2, 12, dtype=torch.int32))
    _bad(r"block_table: expected shape \(2, max_blocks_per_seq\)", block_table=torch.zeros(3, 6, dtype=torch.int32))
    _bad("block_table: expected int32", exc=TypeError, block_table=torch.zeros(2, 6))
    _bad(r"block_table: entries must index the cache's 15 pages, got block_table\[1, 0\] = 15",
         block_table=torch.tensor([[0, 1, 2, 3, 4, 5], [15, 6, 7, 8, 9, 10]], dtype=torch.int32))
    _bad("cache_seqlens: expected 0 <= cache_seqlens <= 95", cache_seqlens=torch.tensor([10, 96], dtype=torch.int32))
    _bad("cache_seqlens: expected shape", cache_seqlens=torch.tensor([10], dtype=torch.int32))
    _bad("cache_seqlens: expected an int32 tensor", exc=TypeError, cache_seqlens=torch.tensor([1.0, 2.0]))
    _bad("cache_batch_idx: not supported with a paged cache", cache_batch_idx=torch.zeros(2, dtype=torch.int32))
    _bad("rotary needs new keys", k=None, v=None, rotary_cos=torch.zeros(96, 8), rotary_sin=torch.zeros(96, 8))
    _bad("seqlen_ro >= cache capacity 96", rotary_cos=torch.zeros(50, 8), rotary_sin=torch.zeros(50, 8))
    _bad("alibi_slopes: expected float32", exc=TypeError, alibi_slopes=torch.zeros(4, dtype=torch.float64))
    _bad(r"alibi_slopes: expected shape \(4,\) or \(2, 4\)", alibi_slopes=torch.zeros(3))
    _bad("cache_leftpad: expected 0 <= cache_leftpad <= cache_seqlens",
         cache_leftpad=torch.tensor([0, 25], dtype=torch.int32))
    # the options take flash_attn_func's checks
    _bad("softmax_scale must be a finite float", softmax_scale=float("nan"))
    _bad("softmax_scale must be a finite float", softmax_scale=float("inf"))
    _bad("softcap must be a float >= 0", softcap=float("inf"))
    _bad("softcap must be a float >= 0", softcap=float("nan"))
    _bad("softcap must be a float >= 0", softcap="1")
    _bad("window_size must be a pair of ints >= -1", window_size=(1.5, 0))
    _bad("window_size must be a pair of ints >= -1", window_size=(-5, 0))
    _bad("window_size must be a pair of ints >= -1", window_size=None)
    _bad("alibi_slopes: expected a float32 tensor", exc=TypeError, alibi_slopes=[0.5] * 4)
    _bad("rotary_cos: expected a tensor", exc=TypeError, rotary_cos=[[1.0] * 8] * 96, rotary_sin=torch.zeros(96, 8))
    _bad("cache_seqlens: expected an int or an int32 tensor", exc=TypeError, cache_seqlens=True)
    inputs = make_inputs(batch=2, lens=[10, 20], seqlen_new=1)
    inputs.pop("cache_seqlens")
    with pytest.raises(ValueError, match="cache_seqlens: required"):
        flash_attn_with_kvcache(**inputs)
    inputs = make_inputs(batch=2, lens=[10, 20], batch_idx=True)
    inputs["cache_batch_idx"] = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cache_batch_idx: expected values in \[0, 4\)"):
        flash_attn_with_kvcache(**inputs)


def test_validate_values():
    """Value checks run on CPU tensors always, and on any device with validate_values=True."""
    inputs = on_device(make_inputs(batch=2, lens=[10, 20], seqlen_new=1, page_size=16))
    inputs["block_table"][0, 0] = -1
    with pytest.raises(ValueError, match=r"got block_table\[0, 0\] = -1"):
        flash_attn_with_kvcache(**inputs, validate_values=True)
    inputs = on_device(make_inputs(batch=2, lens=[10, 20], seqlen_new=1))
    inputs["cache_seqlens"][1] = 96
    with pytest.raises(ValueError, match="cache_seqlens: expected 0 <= cache_seqlens <= 95"):
        flash_attn_with_kvcache(**inputs, validate_values=True)


# ----------------------------------------------------------------------------
# torch.compile and the custom op (ioattn::fwd_kvcache)
# ----------------------------------------------------------------------------


def _decode_step(q, k_cache, v_cache, k, v, cache_seqlens, block_table=None, rotary_cos=None,
                 rotary_sin=None):
    """One decoding step with work around the attention, as a model would compile it."""
    out, lse = flash_attn_with_kvcache(q * 0.5, k_cache, v_cache, k, v, rotary_cos=rotary_cos,
                                       rotary_sin=rotary_sin, cache_seqlens=cache_seqlens,
                                       block_table=block_table, causal=True,
                                       return_softmax_lse=True)
    return out.float() + 1.0, lse


@pytest.mark.parametrize("layout", ["contiguous", "paged", "int-seqlens"])
def test_torch_compile_fullgraph(layout):
    """Two decoding steps compiled with fullgraph=True (no graph break) give the outputs and the
    in-place appended caches of eager, step after step."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    lens = [5, 37] if layout != "int-seqlens" else [37, 37]
    inputs = make_inputs(batch=2, seqlen_q=1, seqlen_new=1, lens=lens,
                         page_size=16 if layout == "paged" else None,
                         rotary_dim=16 if layout == "paged" else 0, gen=gen)
    if layout == "int-seqlens":
        inputs["cache_seqlens"] = 37
    eager_in, compiled_in = on_device(inputs), on_device(inputs)
    compiled = torch.compile(_decode_step, fullgraph=True, backend="aot_eager")
    for step in range(2):
        if step:                                                        # next token
            new = on_device(make_inputs(batch=2, seqlen_q=1, seqlen_new=1, lens=lens, gen=gen))
            for d in (eager_in, compiled_in):
                for name in ("q", "k", "v"):
                    d[name] = new[name].clone()
                if layout == "int-seqlens":
                    d["cache_seqlens"] += 1
                else:
                    d["cache_seqlens"] = d["cache_seqlens"] + 1
        want = _decode_step(**eager_in)
        got = compiled(**compiled_in)
        for name, g, w in zip(("out", "lse"), got, want):
            torch.testing.assert_close(g, w, atol=0, rtol=0, msg=f"step {step}: {name}")
        for name in ("k_cache", "v_cache"):
            torch.testing.assert_close(compiled_in[name], eager_in[name], atol=0, rtol=0,
                                       equal_nan=True, msg=f"step {step}: {name}")
    # the append happened: the caches now differ from the inputs
    assert not torch.equal(compiled_in["k_cache"].nan_to_num(), inputs["k_cache"].to(DEVICE).nan_to_num())


def test_torch_compile_checks_values():
    """The value checks run inside the op, so they also run in a compiled call (CPU tensors)."""
    torch._dynamo.reset()
    inputs = make_inputs(batch=2, lens=[10, 20], seqlen_new=1, page_size=16,
                         gen=torch.Generator().manual_seed(3))
    inputs["block_table"][1, 0] = -1
    compiled = torch.compile(_decode_step, fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"got block_table\[1, 0\] = -1"):
        compiled(**inputs)


def _op_args(inputs, **options):
    args = kvcache._check_and_normalize(
        inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs.get("k"), inputs.get("v"),
        inputs.get("rotary_cos"), inputs.get("rotary_sin"), inputs.get("cache_seqlens"),
        inputs.get("cache_batch_idx"), inputs.get("cache_leftpad"), inputs.get("block_table"),
        None, options.get("causal", False), (-1, -1), 0.0, None, options.get("num_splits", 0))
    return kvcache._op_args(args, rotary_interleaved=True, validate_values=False)


@pytest.mark.parametrize("case", ["append-contiguous", "append-paged-rotary", "no-append-splits"])
def test_opcheck(case):
    """torch.library.opcheck, all its checks: schema (only the declared caches are mutated, no
    output aliases an input), autograd registration, fake tensor impl against the real one, and
    AOT dispatch with dynamic shapes."""
    gen = torch.Generator().manual_seed(1)
    if case == "append-contiguous":
        inputs = make_inputs(batch=2, seqlen_q=2, seqlen_new=2, lens=[3, 40], gen=gen)
        options = dict(causal=True)
    elif case == "append-paged-rotary":
        inputs = make_inputs(batch=2, seqlen_q=1, seqlen_new=1, lens=[3, 40], page_size=16,
                             rotary_dim=16, gen=gen)
        options = dict(causal=True)
    else:
        inputs = make_inputs(batch=2, seqlen_q=1, lens=[3, 90], gen=gen)
        options = dict(num_splits=3)
    torch.library.opcheck(torch.ops.ioattn.fwd_kvcache.default,
                          _op_args(on_device(inputs), **options))


def test_no_autograd():
    """Inference only: the forward runs with inputs that require grad; backward raises."""
    gen = torch.Generator().manual_seed(2)
    inputs = on_device(make_inputs(batch=2, lens=[10, 20], seqlen_new=1, gen=gen))
    inputs["q"].requires_grad_(True)
    out = flash_attn_with_kvcache(**inputs)
    with pytest.raises(RuntimeError, match="ioattn.fwd_kvcache"):    # "no autograd formula"
        out.float().sum().backward()
    with torch.no_grad():
        assert not flash_attn_with_kvcache(**inputs).requires_grad


# ----------------------------------------------------------------------------
# CUDA graph: one decoding step captured and replayed (needs a GPU)
# ----------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("page_size", [None, 64])
def test_cuda_graph(page_size):
    gen = torch.Generator().manual_seed(0)
    inputs = make_inputs(batch=2, seqlen_q=1, nheads=8, nheads_k=2, d=64, capacity=1024,
                         lens=[100, 700], seqlen_new=1, page_size=page_size, dtype=torch.float16,
                         rotary_dim=64, gen=gen)
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    static = clone_inputs(inputs)
    flash_attn_with_kvcache(**clone_inputs(inputs), causal=True)        # compile outside capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = flash_attn_with_kvcache(**static, causal=True)
    torch.cuda.current_stream().wait_stream(stream)
    for step in range(3):                                               # new token each step
        fresh = make_inputs(batch=2, seqlen_q=1, nheads=8, nheads_k=2, d=64, capacity=1024,
                            lens=[100 + step, 700 + step], seqlen_new=1, dtype=torch.float16, gen=gen)
        for name in ("q", "k", "v"):
            static[name].copy_(fresh[name].cuda())
        static["cache_seqlens"].copy_(torch.tensor([100 + step, 700 + step], dtype=torch.int32))
        before = clone_inputs(static)
        graph.replay()
        torch.cuda.synchronize()
        expected = flash_attn_with_kvcache(**before, causal=True)
        torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)
