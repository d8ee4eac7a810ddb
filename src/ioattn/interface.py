"""Public attention functions with FlashAttention-2's arguments and semantics.

Layers, from the user down:

* ``flash_attn_func`` & friends: argument checks with clear messages, layout
  handling (packed → separate views), dropout RNG state, ``return_attn_probs``.
* ``torch.ops.ioattn.fwd`` / ``torch.ops.ioattn.bwd``: ``torch.library`` custom
  ops with fake (meta) implementations, so ``torch.compile(fullgraph=True)``
  traces through them; the autograd formula is registered on ``fwd``. A plain
  eager call skips the op's dispatch (tens of microseconds a call): it runs the
  same implementation and formula as a ``torch.autograd.Function`` (``_attention``).
* The compute paths, picked by device: the Triton kernels (CUDA, or any device
  under ``TRITON_INTERPRET=1``) or the plain-PyTorch blockwise path (CPU).

Semantics (as FlashAttention-2): tensors are ``(batch, seqlen, nheads, headdim)``
(varlen: ``(total_tokens, nheads, headdim)`` with int32 ``cu_seqlens``); the
causal mask and windows are aligned to the bottom-right corner when
``seqlen_q != seqlen_k``::

    causal, seqlen_q = 2, seqlen_k = 5:      causal, seqlen_q = 5, seqlen_k = 2:
        1 1 1 1 0                                0 0
        1 1 1 1 1                                0 0
                                                 0 0
                                                 1 0
                                                 1 1

Query ``i`` sees key ``j`` when ``i + sk - sq - left <= j <= i + sk - sq + right``
(``window_size = (left, right)``, -1 = unlimited; ``causal`` sets ``right = 0``).
A query row that sees no key outputs 0, has log-sum-exp ``-inf`` and gets zero
gradients.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import reference
from .kernels import configs

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEADDIM = 256


# --------------------------------------------------------------------------- compute paths

def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or configs.interpreting()


# the keyword arguments that both compute paths take after their tensors (docs/ARCHITECTURE.md)
_PATH_KWARGS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale",
                "window_left", "window_right", "softcap", "alibi_slopes", "dropout_p", "rng_state")


@functools.cache
def _path_modules(triton):
    """(forward module, backward module) of the Triton launchers or of the blockwise path."""
    if triton:
        from .kernels import backward, forward
        return forward, backward
    from . import blockwise
    return blockwise, blockwise


def on_device_of(t: torch.Tensor, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with ``t``'s GPU as the current CUDA device.

    Triton launches a kernel on the *current* CUDA device and its current stream, not on
    the device of the tensors: with tensors on cuda:1 while cuda:0 is current, the launch
    would go to the wrong GPU. Only then is the launch wrapped in
    ``with torch.cuda.device(...)``; a CPU tensor, or one on the current GPU (the common
    case), costs a ``get_device()`` (and on CUDA a ``current_device()``) and no context
    manager. The hot paths (_forward_impl, _backward_impl, kvcache._fwd_kvcache) inline
    the same test to save this call's frame and argument repacking (~0.5 us on a slow CPU).
    """
    index = t.get_device()  # -1 off CUDA
    if index >= 0 and index != torch.cuda.current_device():
        with torch.cuda.device(index):
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


def _forward_impl(q, k, v, *params):
    """params: those of _PATH_KWARGS, then (optionally) block_table (paged k/v) or None, then
    (optionally) deterministic, which only the backward reads (zip drops it here)."""
    forward, _ = _path_modules(_use_triton(q))
    kwargs = dict(zip(_PATH_KWARGS + ("block_table",), params))
    index = q.get_device()  # Triton launches on the current GPU: q's, if not already (on_device_of)
    if index >= 0 and index != torch.cuda.current_device():
        with torch.cuda.device(index):
            return forward.attention_forward(q, k, v, **kwargs)
    return forward.attention_forward(q, k, v, **kwargs)


def _backward_impl(dout, q, k, v, out, lse, *params):
    """params: those of _PATH_KWARGS, then (optionally) dlse, the gradient of lse or None, then
    (optionally) deterministic: bit-reproducible gradients (no atomic dQ sums)."""
    _, backward = _path_modules(_use_triton(q))
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    kwargs = dict(zip(_PATH_KWARGS + ("dlse", "deterministic"), params))
    # autograd's engine runs a CUDA backward on a thread whose current device is the tensors';
    # a backward called otherwise (torch.func, a compiled graph) gets the same guard as the forward
    index = q.get_device()
    if index >= 0 and index != torch.cuda.current_device():
        with torch.cuda.device(index):
            return backward.attention_backward(dout, q, k, v, out, lse, **kwargs)
    return backward.attention_backward(dout, q, k, v, out, lse, **kwargs)


# --------------------------------------------------------------------------- torch.library ops

@torch.library.custom_op("ioattn::fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
            max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
            window_left: int, window_right: int, softcap: float,
            alibi_slopes: Optional[torch.Tensor], dropout_p: float,
            rng_state: Optional[torch.Tensor],
            block_table: Optional[torch.Tensor] = None,
            deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale, window_left, window_right, softcap, alibi_slopes,
                         dropout_p, rng_state, block_table)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
              window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state,
              block_table=None, deterministic=False):
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    if cu_seqlens_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("ioattn::bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor,
            cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
            max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
            window_left: int, window_right: int, softcap: float,
            alibi_slopes: Optional[torch.Tensor], dropout_p: float,
            rng_state: Optional[torch.Tensor],
            dlse: Optional[torch.Tensor],
            deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, softmax_scale, window_left, window_right, softcap,
                          alibi_slopes, dropout_p, rng_state, dlse, deterministic)


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, out, lse, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "ioattn: gradients of gradients (a backward through the attention backward, e.g. "
        "torch.autograd.grad(..., create_graph=True) then .backward()) are not supported, as in "
        "FlashAttention-2; use ioattn.reference.attention_ref for a twice-differentiable reference")


# (create_graph=True records the backward op; a second backward through it gets a clear error)
_bwd_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


_FWD_ARGS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
             "softmax_scale", "window_left", "window_right", "softcap", "alibi_slopes",
             "dropout_p", "rng_state", "block_table", "deterministic")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FWD_ARGS, inputs))
    out, lse = output
    ctx.save_for_backward(args["q"], args["k"], args["v"], out, lse, args["cu_seqlens_q"],
                          args["cu_seqlens_k"], args["alibi_slopes"], args["rng_state"])
    ctx.params = [args[n] for n in ("max_seqlen_q", "max_seqlen_k", "softmax_scale", "window_left",
                                    "window_right", "softcap")]
    ctx.dropout_p = args["dropout_p"]
    ctx.deterministic = bool(args.get("deterministic", False))


def _backward_args(ctx, dout, dlse):
    """The arguments of ioattn::bwd from what _setup_context saved and the outputs' gradients.

    ``dlse`` is the gradient of the log-sum-exp (returned with return_lse or return_attn_probs;
    merge_attention_states and ring attention differentiate through it): it enters the
    backward as delta - dlse. A missing gradient (None: the output was not used) costs
    nothing; a missing ``dout`` is zeros.
    """
    q, k, v, out, lse, cu_q, cu_k, alibi, rng = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    # torch.use_deterministic_algorithms(True) asks for it too, as SDPA's flash backward reads it
    deterministic = ctx.deterministic or torch.are_deterministic_algorithms_enabled()
    return (dout, q, k, v, out, lse, cu_q, cu_k, *ctx.params, alibi, ctx.dropout_p, rng, dlse,
            deterministic)


_NO_GRADS = (None,) * (len(_FWD_ARGS) - 3)  # only q, k and v get gradients (never with block_table)


def _backward(ctx, dout, dlse):
    return (*torch.ops.ioattn.bwd(*_backward_args(ctx, dout, dlse)), *_NO_GRADS)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """ioattn::fwd and its autograd formula without the custom op's dispatch.

    Same implementations (_forward_impl, _backward_impl) and same saved context;
    only for eager calls on plain tensors (see _attention). The context is set up
    inside forward: a separate setup_context staticmethod would make every apply()
    bind the arguments with inspect.signature (~10 us).
    """

    @staticmethod
    def forward(ctx, *args):
        output = _forward_impl(*args)
        _setup_context(ctx, args, output)
        ctx.set_materialize_grads(False)  # an unused lse gets no zero-filled gradient
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        # create_graph=True: through the op, whose node refuses a second backward as on the op path
        bwd = torch.ops.ioattn.bwd if torch.is_grad_enabled() else _backward_impl
        return (*bwd(*_backward_args(ctx, dout, dlse)), *_NO_GRADS)


_PLAIN_ARGS = frozenset((torch.Tensor, int, float, bool, type(None)))


def plain_eager(args) -> bool:
    """True for a plain eager call, which may skip a custom op's dispatch (~60 us of host
    time): not compiling or exporting, no dispatch mode (FakeTensorMode, ...), no torch.func
    transform, and only plain tensors and scalars (no subclasses) among ``args``."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
                or torch._C._are_functorch_transforms_active()
                or not all(type(a) in _PLAIN_ARGS for a in args))


def _attention(*args):
    """(out, lse) = ioattn::fwd(*args), differentiable in q, k, v.

    torch.compile / export, dispatch modes (FakeTensorMode, ...), torch.func
    transforms and tensor subclasses need the custom op; a plain eager call takes
    _EagerAttention, or _forward_impl alone when there is nothing to differentiate:
    the same outputs and gradients, bit for bit, with less host overhead.
    """
    if not plain_eager(args) or args[0].is_meta:  # (meta tensors: the op's fake kernels)
        return torch.ops.ioattn.fwd(*args)
    q, k, v = args[:3]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _EagerAttention.apply(*args)
    return _forward_impl(*args)


# --------------------------------------------------------------------------- argument checks

def _fail(msg):
    raise ValueError(msg)


def _check_tensor(name, t, rank):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        layout = "(batch, seqlen, nheads, headdim)" if rank == 4 else "(total_tokens, nheads, headdim)"
        _fail(f"{name} must have {rank} dims {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def _autocast(q, k, v):
    """Inside ``torch.autocast``, q, k and v run in its dtype (e.g. fp32 inputs as bf16), as
    autocast runs SDPA: attention is on its list of ops cast to lower precision. The casts are
    differentiable, so fp32 leaves get fp32 gradients; ``out`` has the autocast dtype."""
    device = q.device.type
    if device not in ("cuda", "cpu") or not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in (q, k, v))


def _last_dim_contiguous(t):
    # the kernels read a head vector as one contiguous run; any other stride is fine
    return t if t.stride(-1) == 1 else t.contiguous()


_NUMBER = (int, float, torch.SymInt, torch.SymFloat)


def _finite(x):
    """math.isfinite for a Python number or a symbolic one (torch.compile with dynamic shapes: a
    scale computed from a head dim is a SymFloat, which math.isfinite cannot take)."""
    return x - x == 0


def _check_scores_options(softmax_scale, window_size, softcap, head_dim):
    """Checks softmax_scale, window_size and softcap (every entry point's); returns the scale,
    head_dim ** -0.5 for None."""
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5  # (as FlashAttention-2; symbolic under dynamic shapes)
    if not isinstance(softmax_scale, _NUMBER) or isinstance(softmax_scale, bool) or not _finite(softmax_scale):
        _fail(f"softmax_scale must be a finite float or None, got {softmax_scale!r}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and w >= -1 for w in window_size)):
        _fail(f"window_size must be a pair of ints >= -1 (-1 = unlimited), got {window_size!r}")
    if not isinstance(softcap, _NUMBER) or isinstance(softcap, bool) or softcap < 0 or not _finite(softcap):
        _fail(f"softcap must be a float >= 0 (0 = off), got {softcap!r}")
    return softmax_scale


def _check_common(q, k, v, softmax_scale, window_size, softcap, dropout_p, alibi_slopes, batch):
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        _fail(f"q, k, v must be on the same device, got q on {q.device}, k on {k.device}, "
              f"v on {v.device}")
    if q.device.type not in ("cuda", "cpu", "meta"):  # (meta: shapes only, through the fake kernels)
        _fail(f"ioattn runs on CUDA GPUs (Triton) and on the CPU, got device {q.device}")
    nheads, head_dim = q.shape[-2], q.shape[-1]
    nheads_k = k.shape[-2]
    if k.shape[-1] != head_dim:
        _fail(f"k must have the head dim of q ({head_dim}), got {k.shape[-1]}")
    if v.shape[-2] != nheads_k:
        _fail(f"k and v must have the same number of heads, got {nheads_k} and {v.shape[-2]}")
    if not 1 <= head_dim <= MAX_HEADDIM:
        _fail(f"head dim must be between 1 and {MAX_HEADDIM}, got {head_dim}")
    if not 1 <= v.shape[-1] <= MAX_HEADDIM:  # (v may have a head dim of its own: out has it)
        _fail(f"v's head dim must be between 1 and {MAX_HEADDIM}, got {v.shape[-1]}")
    if nheads_k == 0 or nheads % nheads_k != 0:
        _fail(f"nheads of q ({nheads}) must be a multiple of nheads of k/v ({nheads_k}) (GQA/MQA)")
    softmax_scale = _check_scores_options(softmax_scale, window_size, softcap, head_dim)
    if not isinstance(dropout_p, _NUMBER) or not 0.0 <= dropout_p < 1.0:
        _fail(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(f"alibi_slopes must be a tensor, got {type(alibi_slopes).__name__}")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if alibi_slopes.device != q.device:
            _fail(f"alibi_slopes must be on q's device {q.device}, got {alibi_slopes.device}")
        if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
            _fail(f"alibi_slopes must have shape ({nheads},) or ({batch}, {nheads}), "
                  f"got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.stride(-1) != 1:
            alibi_slopes = alibi_slopes.contiguous()
    return (float(softmax_scale) if isinstance(softmax_scale, int) else softmax_scale), alibi_slopes


def _window(causal, window_size):
    left, right = window_size
    if causal:
        right = 0
    return int(left), int(right)


def _rng_state(dropout_p, device):
    if dropout_p == 0.0:
        return None
    # (seed, offset) drawn from torch's generator of the device: follows torch.manual_seed
    return torch.randint(0, 2 ** 62, (2,), dtype=torch.int64, device=device)


def _attn_probs(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                window, softcap, alibi_slopes, dropout_p, rng_state):
    """Attention probabilities for testing (materialized, O(N²)): (batch, nheads, sq, sk) float32.

    With dropout, dropped entries are returned negated (as FlashAttention-2 does),
    so ``probs >= 0`` is the keep mask.
    """
    if q.is_meta:  # (shapes only)
        batch = q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.shape[0] - 1
        return q.new_empty((batch, q.shape[-2], max_seqlen_q, max_seqlen_k), dtype=torch.float32)
    if cu_seqlens_q is None:
        seqs = [(q[i], k[i], lse[i], i) for i in range(q.shape[0])]
    else:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        seqs = [(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], lse[:, cq[i]:cq[i + 1]], i)
                for i in range(len(cq) - 1)]
    nheads = q.shape[-2]
    probs = torch.zeros(len(seqs), nheads, max_seqlen_q, max_seqlen_k, device=q.device, dtype=torch.float32)
    keep = None
    if dropout_p > 0:
        keep = dropout_keep_mask(len(seqs), nheads, max_seqlen_q, max_seqlen_k, dropout_p, rng_state,
                                 q.device)
    for qi, ki, lsei, b in seqs:
        sq, sk = qi.shape[0], ki.shape[0]
        kr = reference._repeat_kv(ki.unsqueeze(0), nheads)[0]
        s = torch.einsum("qhd,khd->hqk", qi.float(), kr.float()) * softmax_scale
        if softcap > 0:
            s = torch.tanh(s / softcap) * softcap
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
            s = s + reference.alibi_bias(slopes, 1, nheads, sq, sk, dtype=torch.float32)[0]
        mask = reference.visible_mask(sq, sk, False, window, device=q.device)
        p = torch.exp(s - lsei.float().unsqueeze(-1)).masked_fill(~mask, 0.0)
        if keep is not None:
            p = torch.where(keep[b, :, :sq, :sk], p, -p)
        probs[b, :, :sq, :sk] = p
    return probs


def dropout_keep_mask(batch, nheads, seqlen_q, seqlen_k, dropout_p, rng_state, device):
    """The keep mask (batch, nheads, seqlen_q, seqlen_k) that a call with this rng_state used."""
    if _use_triton(rng_state):
        from .kernels.forward import dropout_keep_mask as kernel_mask
        return on_device_of(rng_state, kernel_mask, batch, nheads, seqlen_q, seqlen_k, dropout_p,
                            rng_state)
    from .blockwise import dropout_keep_mask as cpu_mask
    return torch.cat([cpu_mask(b, nheads, seqlen_q, seqlen_k, rng_state, dropout_p, device)
                      for b in range(batch)])


# --------------------------------------------------------------------------- public API

# The kernels launch a grid whose y axis holds the (batch, head) pairs, which CUDA caps at 65,535.
# A call with more pairs runs as calls over groups of sequences (_run_in_groups).
MAX_GRID_PAIRS = configs.MAX_GRID_Y


def _run_in_groups(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                   causal, window_size, softcap, alibi_slopes, return_attn_probs, return_lse, block_table,
                   sinks, deterministic):
    """_run over groups of at most MAX_GRID_PAIRS // nheads sequences, the results concatenated
    (differentiable: autograd goes through the slices and the concatenation). Dense groups are
    views; packed ones are sliced by their rows, which reads cu_seqlens on the host (a device sync,
    in this case only). Each group draws its own dropout seed, so that no two sequences share a
    mask; the probabilities of return_attn_probs are each group's."""
    nheads = q.shape[-2]
    varlen = cu_seqlens_q is not None
    batch = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
    per = MAX_GRID_PAIRS // nheads
    if per < 1:
        _fail(f"nheads ({nheads}) exceeds what one launch grid can hold ({MAX_GRID_PAIRS})")
    cq = cu_seqlens_q.tolist() if varlen else None
    ck = cu_seqlens_k.tolist() if varlen and block_table is None else None
    results = []

    def rows(t, start, stop):  # (narrow: no indexing machinery, so also on FakeTensorMode's CUDA tensors)
        return t.narrow(0, start, stop - start)
    for b0 in range(0, batch, per):
        b1 = min(b0 + per, batch)
        alibi = rows(alibi_slopes, b0, b1) if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        table = None if block_table is None else rows(block_table, b0, b1)
        if not varlen:
            qg, kg, vg, cqg, ckg = rows(q, b0, b1), rows(k, b0, b1), rows(v, b0, b1), None, None
        else:
            qg, cqg = rows(q, cq[b0], cq[b1]), rows(cu_seqlens_q, b0, b1 + 1) - cq[b0]
            ckg = rows(cu_seqlens_k, b0, b1 + 1)
            if block_table is None:
                kg, vg, ckg = rows(k, ck[b0], ck[b1]), rows(v, ck[b0], ck[b1]), ckg - ck[b0]
            else:  # (k, v: the page pools; the sequences' keys through their table rows)
                kg, vg, ckg = k, v, ckg - ckg.narrow(0, 0, 1)
        res = _run(qg, kg, vg, cqg, ckg, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                   softcap, alibi, return_attn_probs, return_lse, table, sinks, deterministic)
        results.append(res if isinstance(res, tuple) else (res, ))
    # out and probs along the batch (or packed rows); lse (nheads, total_q) packed, (batch, nheads, seqlen_q) dense
    dims = (0, 1 if varlen else 0, 0)
    merged = tuple(torch.cat(parts, dim=d) for parts, d in zip(zip(*results), dims))
    return merged if len(merged) > 1 else merged[0]


def _run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
         causal, window_size, softcap, alibi_slopes, return_attn_probs, return_lse=False,
         block_table=None, sinks=None, deterministic=False):
    pairs = (cu_seqlens_q.shape[0] - 1 if cu_seqlens_q is not None else q.shape[0]) * q.shape[-2]
    if pairs > MAX_GRID_PAIRS and not q.is_meta:
        return _run_in_groups(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                              softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
                              return_lse, block_table, sinks, deterministic)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    window = _window(causal, window_size)
    rng_state = _rng_state(dropout_p, q.device)
    out, lse = _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          softmax_scale, window[0], window[1], float(softcap), alibi_slopes,
                          float(dropout_p), rng_state, block_table, bool(deterministic))
    if sinks is not None:
        out, lse = _apply_sinks(out, lse, sinks, varlen=cu_seqlens_q is not None)
    if not return_attn_probs:
        return (out, lse) if return_lse else out
    with torch.no_grad():
        if block_table is not None:  # the probabilities are for testing: gather the pages
            k = reference.gather_pages(k, block_table, cu_seqlens_k)
        probs = _attn_probs(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            softmax_scale, window, softcap, alibi_slopes, dropout_p, rng_state)
    return out, lse, probs


def _check_sinks(sinks, q):
    """Returns the (nheads,) fp32 sink logits, or None."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a tensor of shape (nheads,), got {type(sinks).__name__}")
    if not sinks.is_floating_point():
        raise TypeError(f"sinks must be a floating-point tensor, got {sinks.dtype}")
    if tuple(sinks.shape) != (q.shape[-2],):
        _fail(f"sinks must have shape (nheads,) = ({q.shape[-2]},), got {tuple(sinks.shape)}")
    if sinks.device != q.device:
        _fail(f"sinks must be on q's device {q.device}, got {sinks.device}")
    return sinks


def _apply_sinks(out, lse, sinks, varlen):
    """Attention sinks (GPT-OSS): one more logit per head in every row's softmax, with no value.
    With the kernels' (out, lse) over the keys, the sink takes exp(sink) / (exp(lse) + exp(sink))
    of each row's mass, so out *= sigmoid(lse - sink) and lse becomes logaddexp(lse, sink).
    Differentiable in out, lse (the kernels' backward takes lse's gradient) and sinks; a row
    that sees no key (lse = -inf) keeps out = 0."""
    s = sinks.float()
    lse_rows = lse.transpose(0, 1) if varlen else lse.transpose(1, 2)  # (..., seqlen, nheads)
    # (a sink of -inf is no sink: where the row has no key either, -inf - -inf would be NaN; such
    # entries take 0 - 0 instead, and their gradients stay 0, not NaN)
    none = torch.isneginf(s)
    s = torch.where(none, 0.0, s)
    keep = torch.where(none, 1.0, torch.sigmoid(torch.where(none, 0.0, lse_rows) - s))
    out = (out.float() * keep.unsqueeze(-1)).to(out.dtype)
    shape = (-1, 1) if varlen else (1, -1, 1)  # (lse's layout: heads, then rows)
    none, s = none.view(shape), s.view(shape)
    return out, torch.where(none, lse, torch.logaddexp(torch.where(none, 0.0, lse), s))


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                    return_lse=False, sinks=None):
    """Exact attention, FlashAttention-2 compatible.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; k: ``(batch, seqlen_k, nheads_k, headdim)``;
            v: ``(batch, seqlen_k, nheads_k, headdim_v)``, ``nheads % nheads_k == 0`` (GQA/MQA).
            fp16, bf16 or fp32; headdim and headdim_v 1..256, headdim_v may differ from headdim
            (e.g. DeepSeek's MLA: 192 and 128; on Hopper the Gluon forward takes Q/K 128/192/256
            with a smaller V head dim of 64/128/256, the Gluon backward Q/K 192/256 with V 128
            without dropout; the other pairs run the Triton kernels).
        dropout_p: dropout on the attention probabilities (use 0.0 at evaluation).
        softmax_scale: defaults to ``1 / sqrt(headdim)`` (q's head dim).
        causal: bottom-right aligned causal mask (see the module docstring).
        window_size: ``(left, right)`` sliding window, -1 = unlimited.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        alibi_slopes: fp32 ``(nheads,)`` or ``(batch, nheads)``; adds ``-slope * |i + sk - sq - j|``.
        deterministic: bit-identical gradients on repeated calls. With ``False`` (the default)
            the Hopper backward at head dims 64 and 128 (kernels/backward_sm90.py) runs one pass
            that adds dQ by TMA reductions in no fixed order (last-bit differences between
            runs); ``True``, or ``torch.use_deterministic_algorithms(True)`` in effect when the
            backward runs, runs dQ as a second pass there. Every other backward is deterministic.
        return_attn_probs: also return the log-sum-exp ``(batch, nheads, seqlen_q)`` and the
            attention probabilities (materialized; for testing only; dropped entries negated).
        return_lse: (keyword only, not in FlashAttention-2) also return the log-sum-exp, without
            materializing anything else: ``(out, lse)``. For merging partial attentions
            (:func:`merge_attention_states`, ring / context-parallel attention).

        sinks: (keyword only) ``(nheads,)`` attention-sink logits (GPT-OSS's ``s_aux``): each row's
            softmax gets one more logit per head that carries no value; the returned lse
            includes it. Differentiable (sinks are usually trained parameters).

    The returned lse is differentiable: a loss that uses it gets its gradient in dq and dk
    (d lse_i / d scores_ij = P_ij), at no cost when it is not used.

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim_v)``, ``(out, lse)`` with return_lse, or
        ``(out, lse, probs)`` with return_attn_probs.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4)
    q, k, v = _autocast(q, k, v)
    batch, seqlen_q = q.shape[:2]
    if k.shape[0] != batch or v.shape[0] != batch:
        _fail(f"q, k, v must have the same batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        _fail(f"k and v must have the same seqlen, got {k.shape[1]} and {v.shape[1]}")
    softmax_scale, alibi_slopes = _check_common(q, k, v, softmax_scale, window_size, softcap, dropout_p,
                                                alibi_slopes, batch)
    return _run(q, k, v, None, None, seqlen_q, k.shape[1], dropout_p, softmax_scale, causal,
                window_size, softcap, alibi_slopes, return_attn_probs, return_lse,
                sinks=_check_sinks(sinks, q), deterministic=deterministic)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False, *,
                              return_lse=False, sinks=None):
    """:func:`flash_attn_func` with ``qkv`` packed as ``(batch, seqlen, 3, nheads, headdim)``."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        _fail(f"qkv must have shape (batch, seqlen, 3, nheads, headdim), got "
              f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                                  return_lse=return_lse, sinks=sinks)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False, *,
                             return_lse=False, sinks=None):
    """:func:`flash_attn_func` with ``kv`` packed as ``(batch, seqlen_k, 2, nheads_k, headdim)``."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
        _fail(f"kv must have shape (batch, seqlen_k, 2, nheads_k, headdim), got "
              f"{tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__}")
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                                  return_lse=return_lse, sinks=sinks)


def _check_block_table(block_table, device, num_pages, page_size, cu_seqlens_q):
    """Checks a varlen block_table's type, shape and device (int32 (batch, max_pages)); returns
    the keys a sequence can hold. Its values: _check_pages_in_use."""
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be an int32 tensor, got {type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32, got {block_table.dtype}")
    batch = cu_seqlens_q.shape[0] - 1 if isinstance(cu_seqlens_q, torch.Tensor) else None
    if block_table.dim() != 2 or (batch is not None and block_table.shape[0] != batch):
        _fail(f"block_table must have shape (batch, max_pages_per_seq) = ({batch}, ...), got "
              f"{tuple(block_table.shape)}")
    if block_table.device != device:
        _fail(f"block_table must be on q's device {device}, got {block_table.device}")
    if block_table.stride(-1) != 1:
        _fail("block_table must have a contiguous last dim")
    if page_size < 1:
        _fail(f"the paged cache must have pages of at least one key, got page_size {page_size}")
    return block_table.shape[1] * page_size


def _check_pages_in_use(block_table, cu_seqlens_k, num_pages, page_size):
    """The entries of block_table that the sequences' keys use (the first ceil(len / page_size)
    of each row; the rest, e.g. -1 padding, are never read, as in FA2) must be page indices in
    [0, num_pages). CPU tensors only, where reading them costs no sync."""
    if block_table.device.type != "cpu" or not block_table.numel() or torch.compiler.is_compiling():
        return
    used = (cu_seqlens_k.diff() + page_size - 1) // page_size
    pages = block_table[torch.arange(block_table.shape[1]) < used[:, None]]
    if pages.numel() and not (0 <= int(pages.min()) and int(pages.max()) < num_pages):
        _fail(f"block_table entries in use must be page indices in [0, {num_pages}), got values in "
              f"[{int(pages.min())}, {int(pages.max())}]")


def _check_cu_seqlens(name, cu, device, total, max_len=None, max_seqlen=None):
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        _fail(f"{name} must be 1-D with batch + 1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        _fail(f"{name} must be on q's device {device}, got {cu.device}")
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():  # values: no device sync
        c = cu.tolist()
        if c[0] != 0 or any(b < a for a, b in zip(c, c[1:])) or c[-1] > total:
            _fail(f"{name} must be non-decreasing prefix sums from 0 to at most {total}, got {c}")
        if max_len is not None and any(b - a > max_len for a, b in zip(c, c[1:])):
            _fail(f"{name}: a sequence is longer than block_table can address ({max_len} keys), "
                  f"got lengths {[b - a for a, b in zip(c, c[1:])]}")
        longest = max(b - a for a, b in zip(c, c[1:]))
        if max_seqlen is not None and longest > max_seqlen:  # (the kernels cover max_seqlen rows a sequence)
            _fail(f"{name.replace('cu_seqlens', 'max_seqlen')} must be at least the longest sequence in {name} "
                  f"({longest}), got {max_seqlen}")
    return cu if cu.is_contiguous() else cu.contiguous()


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None, *,
                           return_lse=False, sinks=None):
    """Variable-length attention over packed sequences (no padding).

    Args:
        q: ``(total_q, nheads, headdim)``; k, v: ``(total_k, nheads_k, headdim)`` and
            ``(total_k, nheads_k, headdim_v)`` (headdim_v: as in :func:`flash_attn_func`), or with
            ``block_table`` paged caches ``(num_pages, page_size, nheads_k, headdim / headdim_v)``
            (any page size): key ``j`` of sequence ``b`` is row ``j % page_size`` of page
            ``block_table[b, j // page_size]``, and ``cu_seqlens_k`` counts each sequence's keys.
        block_table: int32 ``(batch, max_pages_per_seq)`` or None. Paged attention is
            inference only (no gradients); its values are checked only for CPU tensors.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` prefix sums of the sequence lengths
            (a sequence may have length 0).
        max_seqlen_q, max_seqlen_k: ints >= the longest sequence's length (the kernels cover
            that many rows / keys of each sequence). Checked against cu_seqlens for CPU tensors;
            on a GPU that would need a device sync, so there, as in FlashAttention-2, a smaller
            value is the caller's error.
        Other arguments as :func:`flash_attn_func`; alibi_slopes ``(nheads,)`` or ``(batch, nheads)``.

    Returns:
        ``out`` ``(total_q, nheads, headdim_v)``, ``(out, lse (nheads, total_q))`` with
        return_lse, or ``(out, lse, probs)`` with return_attn_probs; lse is differentiable.
    """
    _check_tensor("q", q, 3)
    paged = block_table is not None
    for name, t in (("k", k), ("v", v)):
        if paged and isinstance(t, torch.Tensor) and t.dim() != 4:
            _fail(f"{name} must be a paged cache (num_pages, page_size, nheads_k, headdim) with "
                  f"block_table, got shape {tuple(t.shape)}")
        _check_tensor(name, t, 4 if paged else 3)
    q, k, v = _autocast(q, k, v)
    if k.shape[:-1] != v.shape[:-1]:
        _fail(f"k and v must have the same shape but for the head dim, got {tuple(k.shape)} and "
              f"{tuple(v.shape)}")
    capacity = 0
    if paged:
        capacity = _check_block_table(block_table, q.device, k.shape[0], k.shape[1], cu_seqlens_q)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if torch.is_grad_enabled() and t.requires_grad:
                _fail(f"flash_attn_varlen_func with block_table is inference only (no gradients "
                      f"through a paged KV cache), but {name} requires grad: call it under "
                      f"torch.no_grad() or pass detached tensors")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(m, int) or m < 0:
            _fail(f"{name} must be an int >= 0, got {m!r}")
    cu_seqlens_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device, q.shape[0], max_seqlen=max_seqlen_q)
    cu_seqlens_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device,
                                     block_table.shape[0] * capacity if paged else k.shape[0],
                                     max_len=capacity if paged else None, max_seqlen=max_seqlen_k)
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        _fail(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
              f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    if paged:
        _check_pages_in_use(block_table, cu_seqlens_k, k.shape[0], k.shape[1])
    if paged and max_seqlen_k > capacity:
        _fail(f"max_seqlen_k ({max_seqlen_k}) exceeds what block_table can address "
              f"({block_table.shape[1]} pages of {k.shape[1]} = {capacity} keys per sequence)")
    batch = cu_seqlens_q.shape[0] - 1
    softmax_scale, alibi_slopes = _check_common(q, k, v, softmax_scale, window_size, softcap, dropout_p,
                                                alibi_slopes, batch)
    return _run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs, return_lse,
                block_table, _check_sinks(sinks, q), deterministic=deterministic)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0,
                                     alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                     *, return_lse=False, sinks=None):
    """Varlen with ``qkv`` packed as ``(total, 3, nheads, headdim)``."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4 or qkv.shape[1] != 3:
        _fail(f"qkv must have shape (total, 3, nheads, headdim), got "
              f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen,
                                  max_seqlen, dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs,
                                  return_lse=return_lse, sinks=sinks)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False, *,
                                    return_lse=False, sinks=None):
    """Varlen with ``kv`` packed as ``(total_k, 2, nheads_k, headdim)``."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 4 or kv.shape[1] != 2:
        _fail(f"kv must have shape (total_k, 2, nheads_k, headdim), got "
              f"{tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__}")
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs,
                                  return_lse=return_lse, sinks=sinks)
