"""``flash_attn_with_kvcache``: attention of new queries over a KV cache, for decoding.

The cache is contiguous ``(batch_cache, seqlen_cache, nheads_k, d)`` or paged
``(num_blocks, page_size, nheads_k, d)`` with a ``block_table``. New keys and
values are appended to it in place (rotary applied to the keys), then the
queries attend to ``cache[leftpad : cache_seqlens + seqlen_new]``.

On CUDA, or on any device under ``TRITON_INTERPRET=1``, this runs the split-KV
Triton kernels of :mod:`ioattn.kernels.decode`; on CPU otherwise it runs
:func:`_with_kvcache_torch`, the same computation in plain PyTorch.

Both paths run behind the ``torch.ops.ioattn.fwd_kvcache`` custom op, which
declares that it mutates ``k_cache`` and ``v_cache`` and has a fake
implementation, so ``torch.compile(fullgraph=True)`` traces a decoding step
without a graph break. The public function checks shapes, dtypes and devices
before the op (under ``torch.compile`` these checks run at trace time).

Nothing in the CUDA path reads device values on the host, so a decoding step
can be captured in a CUDA graph. That is why the *values* of ``block_table``,
``cache_seqlens``, ``cache_leftpad`` and ``cache_batch_idx`` are checked only
for CPU tensors, or when you pass ``validate_values=True`` (which synchronizes).
Those checks run at the start of the op, the only place that sees the values
under ``torch.compile``.

Inference only: the op has no autograd formula (PyTorch allows none on an op
that mutates its inputs), so backpropagating through its outputs raises.
"""

from __future__ import annotations

from typing import Optional

import torch

from .interface import _apply_sinks, _check_sinks, _check_scores_options, plain_eager
from .kernels import configs
from .merge import _weights

__all__ = ["flash_attn_with_kvcache"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None,
                            block_table=None, softmax_scale=None, causal=False, window_size=(-1, -1),
                            softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False, *, validate_values=False, sinks=None):
    """Attention of ``q`` over a KV cache, after appending ``k``/``v`` to it in place.

    Arguments (FlashAttention-2's)::

        q:          (batch, seqlen_q, nheads, headdim)
        k_cache:    (batch_cache, seqlen_cache, nheads_k, headdim), or with block_table
                    (num_blocks, page_size, nheads_k, headdim), page_size a multiple of 16
        v_cache:    same shape as k_cache
        k, v:       (batch, seqlen_new, nheads_k, headdim) or None. Written into the cache
                    at positions cache_seqlens .. cache_seqlens + seqlen_new - 1 (in place).
        rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2), seqlen_ro >= cache capacity.
                    Rotary is applied to k at positions cache_seqlens + j and to q at
                    cache_seqlens + i when causal or local, else at cache_seqlens for every
                    query (FA2's convention; positions past seqlen_ro use its last row,
                    which happens only when seqlen_q > seqlen_new). rotary_interleaved: GPT-J pairs (0,1),(2,3)...
                    (True) or GPT-NeoX halves (False). Needs k and v.
        cache_seqlens: int or int32 (batch,): tokens already in the cache (needed with k/v).
                    None means the whole cache is valid.
        cache_batch_idx: int32 (batch,): cache row of each batch element (contiguous cache).
        cache_leftpad: int32 (batch,): first valid cache position; keys before it are masked.
        block_table: int32 (batch, max_blocks_per_seq): physical page of each logical page.
        causal, window_size: bottom-right aligned over the valid keys. With seqlen_q = 2
                    and 5 valid keys, causal is (1 = visible)::

                        1 1 1 1 0
                        1 1 1 1 1

                    window_size = (left, right), -1 meaning unlimited.
        softcap:    scores become softcap * tanh(scores / softcap) when > 0.
        alibi_slopes: fp32 (nheads,) or (batch, nheads); bias -slope * |i + sk - sq - j|.
        num_splits: how many parts the keys are split into (Flash-Decoding); 0 chooses
                    from the shapes and the SM count.
        validate_values: check block_table / cache_seqlens / leftpad / batch_idx values
                    also on CUDA (synchronizes; breaks CUDA-graph capture). Always on CPU.
        sinks:      (keyword only) fp (nheads,) attention-sink logits (GPT-OSS), as in
                    :func:`ioattn.flash_attn_func`; the returned lse includes them.

    Returns:
        out (batch, seqlen_q, nheads, headdim) in q's dtype, and with return_softmax_lse
        also lse (batch, nheads, seqlen_q) fp32 (natural log; -inf for a query that sees
        no key, whose output is 0). Inference only: backpropagating through them raises.
    """
    args = _check_and_normalize(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                                cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal,
                                window_size, softcap, alibi_slopes, num_splits)
    op_args = _op_args(args, rotary_interleaved=rotary_interleaved,
                       validate_values=bool(validate_values) or q.device.type == "cpu")
    tensors = [t for t in op_args[:3] + tuple(op_args[3]) if t is not None]
    if plain_eager(tensors) and not q.is_meta and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        out, lse = _fwd_kvcache(*op_args)  # the op's body without its dispatch (host time)
    else:
        out, lse = torch.ops.ioattn.fwd_kvcache(*op_args)
    if sinks is not None:
        out, lse = _apply_sinks(out, lse, _check_sinks(sinks, q), varlen=False)
    return (out, lse) if return_softmax_lse else out


# ----------------------------------------------------------------------------
# The custom op: value checks, then the Triton kernels or the plain-PyTorch path
# ----------------------------------------------------------------------------

# The op's arguments after q, k_cache, v_cache, packed into three lists by kind. Because the op
# mutates the caches, torch.library runs a Python version-counter kernel on every call whose
# cost grows with the square of the argument count (torch 2.13 on a 2-core CPU: ~100 us per
# call with 20 separate arguments, ~30 us with these 6), so the signature stays short.
_OP_TENSORS = ("k_new", "v_new", "cache_seqlens", "cache_batch_idx", "cache_leftpad", "block_table",
               "alibi_slopes", "rotary_cos", "rotary_sin")
_OP_INTS = ("window_left", "window_right", "num_splits", "rotary_interleaved", "rotary_per_row",
            "validate_values")
_OP_FLOATS = ("softmax_scale", "softcap")


def _op_args(args, *, rotary_interleaved, validate_values):
    """The op's arguments from :func:`_check_and_normalize`'s dict."""
    args = dict(args, rotary_interleaved=rotary_interleaved, validate_values=validate_values)
    return (args["q"], args["k_cache"], args["v_cache"], [args[n] for n in _OP_TENSORS],
            [int(args[n]) for n in _OP_INTS], [args[n] for n in _OP_FLOATS])


@torch.library.custom_op("ioattn::fwd_kvcache", mutates_args=("k_cache", "v_cache"))
def _fwd_kvcache_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    tensors: list[Optional[torch.Tensor]], ints: list[int],
                    floats: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Appends ``k_new``/``v_new`` to the caches in place, then attends; returns ``(out, lse)``.
    The lists hold the arguments named in ``_OP_TENSORS``, ``_OP_INTS``, ``_OP_FLOATS``."""
    return _fwd_kvcache(q, k_cache, v_cache, tensors, ints, floats)


def _fwd_kvcache(q, k_cache, v_cache, tensors, ints, floats):
    """The op's body; plain eager calls run it directly (flash_attn_with_kvcache)."""
    kw = dict(zip(_OP_TENSORS, tensors))
    kw.update(zip(_OP_INTS, ints))
    kw.update(zip(_OP_FLOATS, floats))
    if kw.pop("validate_values"):
        _validate_values(k_cache, kw["k_new"], kw["cache_seqlens"], kw["cache_batch_idx"],
                         kw["cache_leftpad"], kw["block_table"])
    for name in ("rotary_interleaved", "rotary_per_row"):
        kw[name] = bool(kw[name])
    if q.is_cuda or configs.interpreting():
        from .kernels.decode import decode_attention
        index = q.get_device()  # Triton launches on the current GPU: q's, if not already
        if index >= 0 and index != torch.cuda.current_device():  # (interface.on_device_of)
            with torch.cuda.device(index):
                return decode_attention(q, k_cache, v_cache, **kw)
        return decode_attention(q, k_cache, v_cache, **kw)
    return _with_kvcache_torch(q, k_cache, v_cache, **kw)


@_fwd_kvcache_op.register_fake
def _fwd_kvcache_fake(q, k_cache, v_cache, tensors, ints, floats):
    batch, seqlen_q, nheads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)


# ----------------------------------------------------------------------------
# Argument checks: shapes always (free), values only where they cost no sync
# ----------------------------------------------------------------------------


def _int_tensor(name, x, batch, device):
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected an int32 tensor of shape ({batch},), got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name}: expected an int32 tensor, got dtype {x.dtype}")
    if tuple(x.shape) != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (q's device), got {x.device}")
    return x.to(torch.int32).contiguous()


def _check_and_normalize(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                         cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal,
                         window_size, softcap, alibi_slopes, num_splits):
    """Shape, dtype and device checks (no device values read); returns the op's arguments."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims, got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: expected float16, bfloat16 or float32, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (q's), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected a tensor on {q.device} (q's device), got {t.device}")
    batch, seqlen_q, nheads, head_dim = q.shape
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim: expected at most {MAX_HEAD_DIM}, got {head_dim}")
    if seqlen_q < 1 or batch < 1:
        raise ValueError(f"q: expected batch >= 1 and seqlen_q >= 1, got shape {tuple(q.shape)}")
    if k_cache.shape[:3] == v_cache.shape[:3] and k_cache.shape[3] != v_cache.shape[3]:
        raise ValueError(f"v_cache: expected the head dim of k_cache ({k_cache.shape[3]}), got "
                         f"{v_cache.shape[3]}: flash_attn_with_kvcache takes no value head dim of its own "
                         f"(flash_attn_func and flash_attn_varlen_func, paged too, do)")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache: expected the shape of k_cache {tuple(k_cache.shape)}, "
                         f"got {tuple(v_cache.shape)}")
    nheads_k = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache: expected head dim {head_dim} (q's), got shape {tuple(k_cache.shape)}")
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(f"nheads: q's {nheads} heads must be a multiple of the cache's "
                         f"{nheads_k} KV heads")
    if q.is_cuda and batch * nheads_k > configs.MAX_GRID_Y:  # (the kernels' grid: (batch, KV head) pairs on y)
        raise ValueError(f"batch x KV heads: at most {configs.MAX_GRID_Y} (CUDA's limit on a launch grid's y axis), got "
                         f"{batch} x {nheads_k} = {batch * nheads_k}; call flash_attn_with_kvcache on smaller batches")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a contiguous last dim (stride 1), got strides {t.stride()}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    device = q.device

    # -- cache layout
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx: not supported with a paged cache (block_table); "
                             "index the block_table rows instead")
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 \
                or block_table.shape[0] != batch:
            shape = tuple(block_table.shape) if isinstance(block_table, torch.Tensor) else block_table
            raise ValueError(f"block_table: expected shape ({batch}, max_blocks_per_seq), got {shape}")
        if block_table.is_floating_point() or block_table.dtype == torch.bool:
            raise TypeError(f"block_table: expected int32, got {block_table.dtype}")
        if block_table.device != device:
            raise ValueError(f"block_table: expected a tensor on {device} (q's device), "
                             f"got {block_table.device}")
        block_table = block_table.to(torch.int32).contiguous()
        page_size = k_cache.shape[1]
        if page_size % 16 != 0:
            raise ValueError(f"k_cache: page size (dim 1 with a block_table) must be a multiple of 16, "
                             f"got {page_size}")
        capacity = block_table.shape[1] * page_size
        batch_cache = None
    else:
        capacity = k_cache.shape[1]
        batch_cache = k_cache.shape[0]
        if cache_batch_idx is None and batch_cache < batch:
            raise ValueError(f"k_cache: expected at least {batch} batch rows (q's batch), "
                             f"got shape {tuple(k_cache.shape)}")

    # -- new keys / values
    seqlen_new = 0
    if (k is None) != (v is None):
        raise ValueError("k, v: pass both new keys and new values, or neither")
    if k is not None:
        if cache_seqlens is None:
            raise ValueError("cache_seqlens: required when appending new keys/values (k, v)")
        expected = (batch, k.shape[1], nheads_k, head_dim)
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != expected:
                raise ValueError(f"{name}: expected shape {expected} (batch, seqlen_new, nheads_k, "
                                 f"headdim), got {tuple(t.shape)}")
        seqlen_new = k.shape[1]
        if seqlen_new > capacity:
            raise ValueError(f"k: seqlen_new {seqlen_new} exceeds the cache capacity {capacity}")
        k = k if k.stride(-1) == 1 else k.contiguous()
        v = v if v.stride(-1) == 1 else v.contiguous()

    # -- int tensors
    if cache_seqlens is not None and not isinstance(cache_seqlens, torch.Tensor):
        if not isinstance(cache_seqlens, int) or isinstance(cache_seqlens, bool):
            raise TypeError(f"cache_seqlens: expected an int or an int32 tensor, "
                            f"got {type(cache_seqlens).__name__}")
        if not 0 <= cache_seqlens <= capacity - seqlen_new:
            raise ValueError(f"cache_seqlens: expected 0 <= cache_seqlens <= {capacity - seqlen_new} "
                             f"(capacity {capacity} - seqlen_new {seqlen_new}), got {cache_seqlens}")
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    cache_seqlens = _int_tensor("cache_seqlens", cache_seqlens, batch, device)
    cache_batch_idx = _int_tensor("cache_batch_idx", cache_batch_idx, batch, device)
    cache_leftpad = _int_tensor("cache_leftpad", cache_leftpad, batch, device)

    # -- rotary
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos, rotary_sin: pass both or neither")
    if rotary_cos is not None:
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a tensor (seqlen_ro, rotary_dim / 2), got {type(t).__name__}")
        if k is None:
            raise ValueError("rotary_cos/rotary_sin: rotary needs new keys/values (k, v) to append")
        if rotary_cos.dim() != 2 or rotary_cos.shape != rotary_sin.shape:
            raise ValueError(f"rotary_cos/rotary_sin: expected equal shapes (seqlen_ro, rotary_dim / 2), "
                             f"got {tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
        if 2 * rotary_cos.shape[1] > head_dim:
            raise ValueError(f"rotary_cos: rotary_dim {2 * rotary_cos.shape[1]} exceeds head dim {head_dim}")
        if rotary_cos.shape[0] < capacity:
            raise ValueError(f"rotary_cos: expected seqlen_ro >= cache capacity {capacity}, "
                             f"got {rotary_cos.shape[0]}")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if not t.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
            if t.device != device:
                raise ValueError(f"{name}: expected a tensor on {device} (q's device), got {t.device}")
        rotary_cos, rotary_sin = rotary_cos.contiguous(), rotary_sin.contiguous()  # one stride for both

    # -- options
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(f"alibi_slopes: expected a float32 tensor, got {type(alibi_slopes).__name__}")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes: expected float32, got {alibi_slopes.dtype}")
        if alibi_slopes.device != device:
            raise ValueError(f"alibi_slopes: expected a tensor on {device} (q's device), "
                             f"got {alibi_slopes.device}")
        if tuple(alibi_slopes.shape) == (nheads,):
            alibi_slopes = alibi_slopes.view(1, nheads).expand(batch, nheads)
        elif tuple(alibi_slopes.shape) != (batch, nheads):
            raise ValueError(f"alibi_slopes: expected shape ({nheads},) or ({batch}, {nheads}), "
                             f"got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.stride(-1) != 1:
            alibi_slopes = alibi_slopes.contiguous()
    # (the same checks as flash_attn_func's: finite scale and softcap, window ints >= -1)
    softmax_scale = _check_scores_options(softmax_scale, window_size, softcap, head_dim)
    window_left, window_right = window_size
    if causal:
        window_right = 0
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 0:
        raise ValueError(f"num_splits: expected an int >= 0 (0 = heuristic), got {num_splits}")

    return dict(q=q, k_cache=k_cache, v_cache=v_cache, k_new=k, v_new=v, cache_seqlens=cache_seqlens,
                cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, block_table=block_table,
                softmax_scale=float(softmax_scale), window_left=window_left, window_right=window_right,
                softcap=float(softcap), alibi_slopes=alibi_slopes, rotary_cos=rotary_cos,
                rotary_sin=rotary_sin, rotary_per_row=causal or window_left >= 0 or window_right >= 0,
                num_splits=num_splits)


def _validate_values(k_cache, k_new, cache_seqlens, cache_batch_idx, cache_leftpad, block_table):
    """Checks that read tensor values (a host sync on CUDA); arguments already normalized."""
    seqlen_new = 0 if k_new is None else k_new.shape[1]
    if block_table is not None:
        capacity, batch_cache = block_table.shape[1] * k_cache.shape[1], None
    else:
        capacity, batch_cache = k_cache.shape[1], k_cache.shape[0]
    if cache_seqlens is not None:
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 0 or hi + seqlen_new > capacity:
            raise ValueError(f"cache_seqlens: expected 0 <= cache_seqlens <= {capacity - seqlen_new} "
                             f"(capacity {capacity} - seqlen_new {seqlen_new}), got values in "
                             f"[{lo}, {hi}]")
    if cache_leftpad is not None:
        end = cache_seqlens if cache_seqlens is not None else torch.full_like(cache_leftpad, capacity)
        if bool((cache_leftpad < 0).any()) or bool((cache_leftpad > end).any()):
            raise ValueError(f"cache_leftpad: expected 0 <= cache_leftpad <= cache_seqlens, "
                             f"got {cache_leftpad.tolist()} with cache_seqlens {end.tolist()}")
    if cache_batch_idx is not None:
        if bool((cache_batch_idx < 0).any()) or bool((cache_batch_idx >= batch_cache).any()):
            raise ValueError(f"cache_batch_idx: expected values in [0, {batch_cache}), "
                             f"got {cache_batch_idx.tolist()}")
    if block_table is not None:
        page_size = k_cache.shape[1]
        used = block_table.shape[1]
        if cache_seqlens is not None:
            used_per_row = (cache_seqlens.long() + seqlen_new + page_size - 1) // page_size
        else:
            used_per_row = torch.full((block_table.shape[0],), used, device=block_table.device)
        cols = torch.arange(used, device=block_table.device).view(1, -1)
        in_use = cols < used_per_row.view(-1, 1)
        bad = in_use & ((block_table < 0) | (block_table >= k_cache.shape[0]))
        if bool(bad.any()):
            row, col = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"block_table: entries must index the cache's {k_cache.shape[0]} pages, "
                             f"got block_table[{row}, {col}] = {int(block_table[row, col])}")


# ----------------------------------------------------------------------------
# CPU path: the same computation in plain PyTorch
# ----------------------------------------------------------------------------


def apply_rotary(x, cos, sin, positions, interleaved):
    """Rotary embedding of ``x (b, s, h, d)`` at integer ``positions (b, s)``, computed in fp32.

    ``cos``/``sin``: ``(seqlen_ro, rotary_dim / 2)``; dims past rotary_dim pass through;
    positions past the table use its last row (as the kernels do).
    """
    rotary_dim = 2 * cos.shape[1]
    positions = positions.clamp(max=cos.shape[0] - 1)
    c = cos.float()[positions].unsqueeze(2)                          # (b, s, 1, r/2)
    s = sin.float()[positions].unsqueeze(2)
    xf = x.float()
    x_rot, x_pass = xf[..., :rotary_dim], xf[..., rotary_dim:]
    if interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = x_rot.chunk(2, dim=-1)
        rot = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((rot, x_pass), dim=-1)


def _cache_rows(block_table, b, positions, page_size):
    """(page index, row in page) of cache positions of batch row ``b``."""
    pages = block_table[b].long()[positions // page_size]
    return pages, positions % page_size


@torch.autocast("cpu", enabled=False)  # (its products keep their precision; see blockwise)
def _with_kvcache_torch(q, k_cache, v_cache, *, k_new, v_new, cache_seqlens, cache_batch_idx,
                        cache_leftpad, block_table, softmax_scale, window_left, window_right, softcap,
                        alibi_slopes, rotary_cos, rotary_sin, rotary_interleaved, rotary_per_row,
                        num_splits, block_n=1024):
    """Plain-PyTorch :func:`flash_attn_with_kvcache` (arguments as ``decode_attention``'s).

    Appends in place, then for each batch row gathers its valid keys and attends
    in blocks of ``block_n`` keys, merging the blocks by their LSEs (fp32).
    ``num_splits`` is accepted and ignored.
    """
    batch, seqlen_q, nheads, head_dim = q.shape
    nheads_k = k_cache.shape[2]
    paged = block_table is not None
    page_size = k_cache.shape[1]
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    seqlen_new = 0 if k_new is None else k_new.shape[1]
    lens = cache_seqlens.tolist() if cache_seqlens is not None else [capacity] * batch
    starts = cache_leftpad.tolist() if cache_leftpad is not None else [0] * batch

    q_rows = q
    if rotary_cos is not None:
        i = torch.arange(seqlen_q, device=q.device) if rotary_per_row else torch.zeros(
            seqlen_q, dtype=torch.long, device=q.device)
        pos = cache_seqlens.long().view(-1, 1) + i.view(1, -1)
        q_rows = apply_rotary(q, rotary_cos, rotary_sin, pos, rotary_interleaved).to(q.dtype)

    out = q.new_empty(q.shape)                                        # contiguous, as the fake's
    lse = torch.empty(batch, nheads, seqlen_q, dtype=torch.float32, device=q.device)
    for b in range(batch):
        cache_b = int(cache_batch_idx[b]) if cache_batch_idx is not None else b
        positions = torch.arange(lens[b], lens[b] + seqlen_new, device=q.device)
        if k_new is not None:
            kb = k_new[b:b + 1]
            if rotary_cos is not None:
                kb = apply_rotary(kb, rotary_cos, rotary_sin, positions.view(1, -1), rotary_interleaved)
            if paged:
                pages, rows = _cache_rows(block_table, b, positions, page_size)
                k_cache[pages, rows] = kb[0].to(k_cache.dtype)
                v_cache[pages, rows] = v_new[b].to(v_cache.dtype)
            else:
                k_cache[cache_b, positions] = kb[0].to(k_cache.dtype)
                v_cache[cache_b, positions] = v_new[b].to(v_cache.dtype)

        kv_end = lens[b] + seqlen_new
        key_pos = torch.arange(starts[b], kv_end, device=q.device)
        if paged:
            pages, rows = _cache_rows(block_table, b, key_pos, page_size)
            keys, values = k_cache[pages, rows], v_cache[pages, rows]
        else:
            keys, values = k_cache[cache_b, key_pos], v_cache[cache_b, key_pos]
        group = nheads // nheads_k
        keys = keys.float().repeat_interleave(group, dim=1)          # (n, h, d)
        values = values.float().repeat_interleave(group, dim=1)
        qb = q_rows[b].float()                                        # (sq, h, d)
        diag = torch.arange(seqlen_q, device=q.device) + kv_end - seqlen_q
        slopes = alibi_slopes[b].float() if alibi_slopes is not None else None

        outs, lses = [torch.zeros(seqlen_q, nheads, head_dim, device=q.device)], \
            [torch.full((nheads, seqlen_q), float("-inf"), device=q.device)]
        for n0 in range(0, key_pos.numel(), block_n):
            kp = key_pos[n0:n0 + block_n]
            scores = torch.einsum("qhd,khd->hqk", qb, keys[n0:n0 + block_n]) * softmax_scale
            if softcap > 0:
                scores = torch.tanh(scores / softcap) * softcap
            if slopes is not None:
                dist = (diag.view(-1, 1) - kp.view(1, -1)).abs().float()
                scores = scores - slopes.view(-1, 1, 1) * dist
            visible = torch.ones(seqlen_q, kp.numel(), dtype=torch.bool, device=q.device)
            if window_right >= 0:
                visible &= kp.view(1, -1) <= diag.view(-1, 1) + window_right
            if window_left >= 0:
                visible &= kp.view(1, -1) >= diag.view(-1, 1) - window_left
            scores = scores.masked_fill(~visible, float("-inf"))
            block_lse = torch.logsumexp(scores, dim=-1)                # (h, sq)
            probs = torch.exp(scores - torch.where(torch.isneginf(block_lse), 0.0, block_lse)
                              .unsqueeze(-1))
            outs.append(torch.einsum("hqk,khd->qhd", probs, values[n0:n0 + block_n]))
            lses.append(block_lse)
        w, lse_b = _weights(torch.stack(lses))                        # (n, h, sq)
        out[b] = (w.transpose(-1, -2).unsqueeze(-1) * torch.stack(outs)).sum(0).to(q.dtype)
        lse[b] = lse_b
    return out, lse
