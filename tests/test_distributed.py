"""Context parallelism (flash_attn_cp_func) over real torch.distributed processes (gloo, CPU).

Each spawned rank builds the same full inputs, takes its shard, runs the context-parallel
attention and its backward, and compares its shard of out, dq, dk, dv with those of
flash_attn_func over the whole sequence. Under TRITON_INTERPRET=1 (scripts/test.sh) the
ranks run the Triton kernels through the interpreter, otherwise the CPU path.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ioattn
from ioattn.distributed import shard_sequence, unshard_sequence

CASES = {  # world size -> [(layout, batch, seqlen, nheads, nheads_k, headdim, options)]
    2: [("zigzag", 2, 48, 2, 2, 16, dict(causal=True)),
        ("zigzag", 1, 40, 4, 2, 32, dict()),                                     # GQA, bidirectional
        ("contiguous", 1, 36, 2, 1, 16, dict(causal=True, window_size=(7, 0)))],
    3: [("zigzag", 1, 48, 2, 2, 16, dict(causal=True, softcap=3.0, alibi_slopes=True)),
        ("contiguous", 1, 45, 2, 2, 24, dict(causal=True))],
}


def _worker(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for layout, b, n, hq, hk, d, opts in CASES[world]:
            g = torch.Generator().manual_seed(n * 7 + hq)
            q, k, v = (torch.randn(b, n, h, d, generator=g) for h in (hq, hk, hk))
            dout = torch.randn(b, n, hq, d, generator=g)
            if opts.get("alibi_slopes"):
                opts = dict(opts, alibi_slopes=torch.rand(hq, generator=g))
            full = [x.clone().requires_grad_() for x in (q, k, v)]
            out = ioattn.flash_attn_func(*full, **opts)
            want = (out, *torch.autograd.grad(out, full, dout))
            shards = [shard_sequence(x, rank, world, layout).requires_grad_() for x in (q, k, v)]
            out_s = ioattn.flash_attn_cp_func(*shards, layout=layout, **opts)
            got = (out_s, *torch.autograd.grad(out_s, shards, shard_sequence(dout, rank, world, layout)))
            for name, x, w in zip(("out", "dq", "dk", "dv"), got, want):
                w = shard_sequence(w, rank, world, layout)
                err = (x - w).abs().max().item()
                assert torch.isfinite(x).all() and err < 1e-4, (world, layout, opts, name, err)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", sorted(CASES))
def test_context_parallel_matches_whole_sequence(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "init")), nprocs=world, join=True)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_shard_roundtrip(layout):
    x = torch.arange(2 * 24 * 3).reshape(2, 24, 3)
    shards = [shard_sequence(x, r, 3, layout) for r in range(3)]
    assert torch.equal(unshard_sequence(shards, layout), x)
    if layout == "zigzag":  # rank 0 holds the first and the last of the 6 chunks
        assert torch.equal(shards[0], torch.cat([x[:, :4], x[:, 20:]], 1))


def test_cp_errors():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="initialized torch.distributed"):
        ioattn.flash_attn_cp_func(q, q, q)
    with pytest.raises(ValueError, match="multiple of 6"):
        shard_sequence(torch.randn(1, 10, 2, 4), 0, 3, "zigzag")


def test_cp_errors_in_a_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init1'}", rank=0, world_size=1)
    try:
        q = torch.randn(1, 8, 2, 16)
        for kwargs, match in ((dict(dropout_p=0.1), "dropout_p"),
                              (dict(window_size=(3, 3)), "need causal=True"),
                              (dict(layout="ring"), "layout must be one of"),
                              (dict(layout="zigzag", causal=True), None)):
            if match is None:  # one rank: the zigzag shard is the whole sequence
                out = ioattn.flash_attn_cp_func(q, q, q, **kwargs)
                assert torch.allclose(out, ioattn.flash_attn_func(q, q, q, causal=True), atol=1e-6)
                continue
            with pytest.raises(ValueError, match=match):
                ioattn.flash_attn_cp_func(q, q, q, **kwargs)
        with pytest.raises(ValueError, match="same local tokens"):
            ioattn.flash_attn_cp_func(q, q[:, :4], q[:, :4])
    finally:
        dist.destroy_process_group()
