"""flash_attn_varlen_func with block_table: packed queries over a paged KV cache.

The pages of each sequence are scattered over the cache in random order (and the
table has unused trailing entries); the result must equal attention over the same
keys packed contiguously, and the fp64 reference.
"""

import pytest
import torch

import ioattn
from ioattn.reference import attention_varlen_ref, gather_pages

from helpers import assert_close


def _paged_case(lens_q, lens_k, page_size, nheads, nheads_k, d, dtype, device, spare_pages=3):
    g = torch.Generator().manual_seed(sum(lens_q) * 31 + sum(lens_k) + page_size)
    max_pages = max(1, max(-(-n // page_size) for n in lens_k)) + 1  # a spare entry per row
    num_pages = sum(-(-n // page_size) for n in lens_k) + spare_pages
    perm = torch.randperm(num_pages, generator=g)
    table = torch.full((len(lens_k), max_pages), num_pages - 1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens_k):
        need = -(-n // page_size)
        table[b, :need] = perm[used:used + need].to(torch.int32)
        used += need
    k_cache = torch.randn(num_pages, page_size, nheads_k, d, generator=g).to(dtype)
    v_cache = torch.randn(num_pages, page_size, nheads_k, d, generator=g).to(dtype)
    q = torch.randn(sum(lens_q), nheads, d, generator=g).to(dtype)
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    return [t.to(device) for t in (q, k_cache, v_cache, cu_q, cu_k, table)]


CASES = [  # lens_q, lens_k, page_size, nheads, nheads_k, d, options
    ([5, 17, 1], [40, 17, 9], 16, 2, 2, 32, dict(causal=True)),
    ([33, 0, 8], [33, 12, 70], 7, 4, 2, 64, dict()),                  # odd page size, GQA, empty q
    ([20, 9], [0, 45], 64, 2, 1, 40, dict(causal=True)),              # a sequence without keys
    ([12, 30], [50, 30], 1, 2, 2, 16, dict(window_size=(9, 2), softcap=4.0)),
    ([16, 24], [64, 24], 32, 2, 2, 96, dict(alibi_slopes="yes", causal=True)),
]


@pytest.mark.parametrize("case", CASES, ids=["causal", "odd_page_gqa", "no_keys", "window_softcap",
                                             "alibi"])
def test_paged_matches_packed(case, device):
    lens_q, lens_k, page_size, hq, hk, d, opts = case
    q, kc, vc, cu_q, cu_k, table = _paged_case(lens_q, lens_k, page_size, hq, hk, d, torch.float32, device)
    if opts.get("alibi_slopes") == "yes":
        opts = dict(opts, alibi_slopes=torch.rand(len(lens_q), hq, device=device))
    out, lse = ioattn.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, max(lens_q), max(lens_k),
                                             block_table=table, return_lse=True, **opts)
    k, v = gather_pages(kc, table, cu_k), gather_pages(vc, table, cu_k)
    ref, ref_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, **opts)
    low, low_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, upcast=False, **opts)
    assert_close("out", out, ref, low, torch.float32)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert_close("lse", lse[fin], ref_lse[fin], low_lse[fin], torch.float32)
    packed = ioattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), **opts)
    assert torch.allclose(out, packed, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_low_precision(dtype, device):
    q, kc, vc, cu_q, cu_k, table = _paged_case([30, 9], [47, 64], 16, 4, 2, 64, dtype, device)
    out = ioattn.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, 30, 64, causal=True, block_table=table)
    k, v = gather_pages(kc, table, cu_k), gather_pages(vc, table, cu_k)
    ref, _ = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True)
    low, _ = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True, upcast=False)
    assert_close("out", out, ref, low, dtype)


def test_paged_dropout_draws_the_packed_mask(device):
    """Same seed, same mask: the paged call equals the packed one under dropout too."""
    q, kc, vc, cu_q, cu_k, table = _paged_case([21, 14], [30, 50], 16, 2, 2, 32, torch.float32, device)
    k, v = gather_pages(kc, table, cu_k), gather_pages(vc, table, cu_k)
    torch.manual_seed(7)
    paged, _, probs = ioattn.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, 21, 50, dropout_p=0.3,
                                                    block_table=table, return_attn_probs=True)
    torch.manual_seed(7)
    packed, _, probs_packed = ioattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 21, 50, dropout_p=0.3,
                                                            return_attn_probs=True)
    assert torch.allclose(paged, packed, atol=1e-5)
    assert torch.equal(probs >= 0, probs_packed >= 0) and (probs < 0).any()


def test_paged_under_torch_compile(device):
    q, kc, vc, cu_q, cu_k, table = _paged_case([9, 12], [20, 33], 16, 2, 2, 16, torch.float32, device)

    def step(q, kc, vc):
        return ioattn.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, 12, 33, causal=True,
                                             block_table=table) * 2

    with torch.no_grad():
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc, vc)
        want = step(q, kc, vc)
    assert torch.allclose(got, want, atol=1e-6)


def test_paged_errors(device):
    q, kc, vc, cu_q, cu_k, table = _paged_case([5, 6], [20, 10], 16, 2, 2, 16, torch.float32, device)
    call = ioattn.flash_attn_varlen_func
    with pytest.raises(ValueError, match="inference only"):
        call(q.clone().requires_grad_(), kc, vc, cu_q, cu_k, 6, 20, block_table=table)
    with pytest.raises(TypeError, match="int32"):
        call(q, kc, vc, cu_q, cu_k, 6, 20, block_table=table.long())
    with pytest.raises(ValueError, match="batch, max_pages_per_seq"):
        call(q, kc, vc, cu_q, cu_k, 6, 20, block_table=table[:1])
    with pytest.raises(ValueError, match="paged cache"):
        call(q, kc[:, 0], vc[:, 0], cu_q, cu_k, 6, 20, block_table=table)
    with pytest.raises(ValueError, match="exceeds what block_table can address"):
        call(q, kc, vc, cu_q, cu_k, 6, 16 * table.shape[1] + 1, block_table=table)
    if device == "cpu":  # values are read only where that costs no device sync
        bad = table.clone()
        bad[0, 0] = kc.shape[0]
        with pytest.raises(ValueError, match="page indices"):
            call(q, kc, vc, cu_q, cu_k, 6, 20, block_table=bad)
        # entries past a sequence's pages are never read: -1 padding there is fine (as in FA2)
        padded = table.clone()
        padded[1, 1:] = -1  # sequence 1 has 10 keys: one page of 16
        assert torch.equal(call(q, kc, vc, cu_q, cu_k, 6, 20, block_table=padded),
                           call(q, kc, vc, cu_q, cu_k, 6, 20, block_table=table))
        long_k = torch.tensor([0, 16 * table.shape[1] + 1, 16 * table.shape[1] + 2], dtype=torch.int32)
        with pytest.raises(ValueError, match="longer than block_table"):
            call(q, kc, vc, cu_q, long_k, 6, 20, block_table=table)
