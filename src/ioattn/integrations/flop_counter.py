"""FLOP formulas of ioattn's ops for ``torch.utils.flop_counter.FlopCounterMode``.

Registered when ioattn is imported, so that FlopCounterMode, and the tools built on it (e.g.
Lightning's ``measure_flops``, which runs the model on the meta device), count ioattn's attention
instead of leaving it out. The counts follow the ones torch gives SDPA for the same call, so that a
model's FLOPs do not change with the attention backend:

* forward: the two matrix products per (sequence, query head), ``2 * sq * sk * d`` for QK^T and
  ``2 * sq * sk * dv`` for PV (``dv``: V's head dim, usually ``d``);
* backward: the five of the recomputing backward, three over ``d`` (S, dQ, dK) and two over ``dv``
  (dP, dV): ``2 * sq * sk * (3 d + 2 dv)``, ``10 * sq * sk * d`` when ``dv = d``;
* the full ``sq x sk`` products whatever the mask: causal masks and windows are not subtracted.

Packed (varlen) batches count each sequence with its own lengths, read from ``cu_seqlens`` (one
host read per call while counting); on the meta device or under FakeTensorMode, where the lengths
are unknown, every sequence counts at ``max_seqlen`` (torch does the same for nested tensors).
``flash_attn_with_kvcache`` counts for each sequence the keys it attends to (``cache_seqlens``,
plus the appended keys, less ``cache_leftpad``), or the cache's capacity without ``cache_seqlens``.
"""

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula

from .. import interface  # noqa: F401  (defines ioattn::fwd and ioattn::bwd)
from .. import kvcache


def _known(t):
    """Whether t's values can be read: not meta, not fake, not functional."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    return not (t.is_meta or isinstance(t, (FakeTensor, FunctionalTensor)))


def _lengths(cu_seqlens, max_seqlen):
    if _known(cu_seqlens):
        return cu_seqlens.diff().tolist()
    return [max_seqlen] * (cu_seqlens.shape[0] - 1)


def _pairs(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """Sum over the sequences of seqlen_q * seqlen_k (dense: from the shapes)."""
    if cu_seqlens_q is None:
        return q.shape[0] * q.shape[1] * k.shape[1]
    return sum(a * b for a, b in zip(_lengths(cu_seqlens_q, max_seqlen_q),
                                     _lengths(cu_seqlens_k, max_seqlen_k)))


def _fwd_flop(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *args,
              out_val=None, **kwargs) -> int:
    pairs = _pairs(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return 2 * q.shape[-2] * (q.shape[-1] + v.shape[-1]) * pairs


def _bwd_flop(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
              *args, out_val=None, **kwargs) -> int:
    pairs = _pairs(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return 2 * q.shape[-2] * (3 * q.shape[-1] + 2 * v.shape[-1]) * pairs


def _kvcache_flop(q, k_cache, v_cache, tensors, ints, floats, *args, out_val=None, **kwargs) -> int:
    kw = dict(zip(kvcache._OP_TENSORS, tensors))
    batch, seqlen_q, nheads, head_dim = q.shape
    table = kw["block_table"]
    capacity = k_cache.shape[1] if table is None else table.shape[1] * k_cache.shape[1]
    seqlens, leftpad, k_new = kw["cache_seqlens"], kw["cache_leftpad"], kw["k_new"]
    if seqlens is None or not _known(seqlens):
        keys = [capacity] * batch
    else:
        appended = 0 if k_new is None else k_new.shape[1]
        keys = [n + appended for n in seqlens.expand(batch).tolist()]
        if leftpad is not None and _known(leftpad):
            keys = [n - p for n, p in zip(keys, leftpad.tolist())]
    return 4 * nheads * head_dim * seqlen_q * sum(min(max(n, 0), capacity) for n in keys)


def register() -> None:
    """Adds the formulas to torch's registry (idempotent; ioattn's import calls it)."""
    for op, formula in ((torch.ops.ioattn.fwd, _fwd_flop), (torch.ops.ioattn.bwd, _bwd_flop),
                        (torch.ops.ioattn.fwd_kvcache, _kvcache_flop)):
        if op not in flop_registry:
            register_flop_formula(op, get_raw=True)(formula)

