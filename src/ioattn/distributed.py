"""Context parallelism: one long sequence split across the ranks of a process group.

Each rank holds a shard of the tokens of q, k and v (the same shard of each). The keys
and values are all-gathered (autograd-aware: their gradients are summed back onto the
rank that owns each token), then every local query chunk attends, with
:func:`ioattn.flash_attn_func`, to the keys it may see: under a causal mask the keys
up to its own last position (the bottom-right alignment then puts each query on its
global diagonal), with a left window only from its first visible key on. This is the
all-gather form of context parallelism (as in Llama 3's training); the memory per rank
is O(local queries + all keys) and nothing N x N is formed anywhere.

Layouts of the sequence over ``world`` ranks:

* ``"contiguous"``: rank r holds tokens ``[r N/world, (r+1) N/world)``;
* ``"zigzag"``: the sequence is cut into ``2 world`` chunks and rank r holds chunks r and
  ``2 world - 1 - r`` (concatenated): under a causal mask every rank then does the same
  work (contiguous shards leave the last rank with ``2 world - 1`` times the first's).

:func:`shard_sequence` and :func:`unshard_sequence` convert between a full tensor and a
rank's shard for either layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .interface import _fail, flash_attn_func

__all__ = ["flash_attn_cp_func", "shard_sequence", "unshard_sequence"]

LAYOUTS = ("contiguous", "zigzag")


def _chunks_of(rank, world, layout):
    """The global chunk indices a rank holds, in its shard's order, and the chunk count."""
    if layout == "contiguous":
        return [rank], world
    return [rank, 2 * world - 1 - rank], 2 * world


def shard_sequence(x, rank, world, layout="zigzag", dim=1):
    """The shard of ``x`` (full sequence along ``dim``) that ``rank`` of ``world`` holds."""
    chunks, n = _chunks_of(rank, world, layout)
    if x.shape[dim] % n:
        _fail(f"the sequence length ({x.shape[dim]}) must be a multiple of {n} for the "
              f"{layout!r} layout over {world} ranks")
    parts = x.chunk(n, dim)
    return torch.cat([parts[c] for c in chunks], dim)


def unshard_sequence(shards, layout="zigzag", dim=1):
    """The full sequence from the list of every rank's shard (rank order)."""
    world = len(shards)
    n = _chunks_of(0, world, layout)[1]
    parts = [None] * n
    for r, s in enumerate(shards):
        chunks = _chunks_of(r, world, layout)[0]
        for c, piece in zip(chunks, s.chunk(len(chunks), dim)):
            parts[c] = piece
    return torch.cat(parts, dim)


class _AllGatherSeq(torch.autograd.Function):
    """All-gather along the sequence dim (1); the backward sums every rank's gradient and
    returns this rank's part (reduce-scatter where the backend has it, else all-reduce)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)  # (world, batch, local, heads, dim)

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        rank = dist.get_rank(group)
        grad = grad.contiguous()
        if dist.get_backend(group) == dist.Backend.NCCL:
            out = torch.empty_like(grad[rank])
            dist.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        grad = grad.clone()  # all_reduce works in place; autograd's buffer stays untouched
        dist.all_reduce(grad, group=group)  # gloo and others: no reduce-scatter
        return grad[rank], None


def flash_attn_cp_func(q, k, v, group=None, layout="zigzag", softmax_scale=None, causal=False,
                       window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                       deterministic=False):
    """Attention over a sequence sharded across the ranks of ``group`` (context parallelism).

    Args:
        q, k, v: this rank's shards ``(batch, local_seqlen, nheads[_k], headdim)``, local
            seqlen the same on every rank, laid out by ``layout`` (see the module doc;
            :func:`shard_sequence` makes them). Same dtypes and shapes rules as
            :func:`ioattn.flash_attn_func` (GQA/MQA, head dims up to 256).
        group: a ``torch.distributed`` process group (default: the world). Any backend;
            with NCCL each rank's tensors must be on its own GPU.
        layout: ``"zigzag"`` (balanced causal work) or ``"contiguous"``.
        causal, window_size, softcap, alibi_slopes, softmax_scale: as flash_attn_func, over
            global positions. Windows and ALiBi need ``causal=True`` (a window reaching right
            of the diagonal or a bidirectional ALiBi bias is not expressible per chunk here).

    Returns:
        this rank's shard of the output, ``(batch, local_seqlen, nheads, headdim)``;
        differentiable in q, k, v (the gradients of k, v come back to the ranks that hold them).
    """
    if not dist.is_available() or not dist.is_initialized():
        _fail("flash_attn_cp_func needs an initialized torch.distributed process group")
    if layout not in LAYOUTS:
        _fail(f"layout must be one of {LAYOUTS}, got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            _fail(f"{name} must be a 4-D (batch, local_seqlen, nheads, headdim) tensor, got "
                  f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not (q.shape[1] == k.shape[1] == v.shape[1]):
        _fail(f"q, k, v must hold the same local tokens, got local seqlens {q.shape[1]}, "
              f"{k.shape[1]}, {v.shape[1]}")
    if dropout_p:
        _fail("dropout_p > 0 is not supported by flash_attn_cp_func (every rank would draw the "
              "same mask for its chunk)")
    if not causal and (tuple(window_size) != (-1, -1) or alibi_slopes is not None):
        _fail("flash_attn_cp_func: window_size and alibi_slopes need causal=True")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    chunks, _ = _chunks_of(rank, world, layout)
    local = q.shape[1]
    if local % len(chunks):
        _fail(f"the local seqlen ({local}) must be even for the zigzag layout")
    chunk_len = local // len(chunks)

    def full(x):  # (batch, N, heads, dim) in global order
        gathered = _AllGatherSeq.apply(x, group)  # (world, batch, local, heads, dim)
        return unshard_sequence(list(gathered.unbind(0)), layout)

    k_all, v_all = full(k), full(v)
    left = window_size[0]
    outs = []
    for i, c in enumerate(chunks):
        q_c = q[:, i * chunk_len:(i + 1) * chunk_len]
        start, end = 0, k_all.shape[1]
        if causal:  # keys up to this chunk's last query: its diagonal is then the global one
            end = (c + 1) * chunk_len
            if left >= 0:
                start = max(0, c * chunk_len - left)
        outs.append(flash_attn_func(q_c, k_all[:, start:end], v_all[:, start:end],
                                    softmax_scale=softmax_scale, causal=causal,
                                    window_size=window_size, softcap=softcap,
                                    alibi_slopes=alibi_slopes, deterministic=deterministic))
    return torch.cat(outs, 1) if len(outs) > 1 else outs[0]
