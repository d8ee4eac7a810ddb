"""From padded batches to the packed layout of the varlen API and back.

The helpers FlashAttention-2 users call from ``flash_attn.bert_padding``, with the same names,
arguments and results, so that code written around ``flash_attn_varlen_func`` ports by changing
its imports::

    x, indices, cu_seqlens, max_seqlen, _ = unpad_input(hidden, attention_mask)  # (total, ...)
    out = flash_attn_varlen_func(q(x), k(x), v(x), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    out = pad_input(out, indices, batch, seqlen)                                 # zeros at padding

Everything is differentiable in the tensors it moves (gathers and scatters along the first axis).
"""

from __future__ import annotations

import torch


def _check_mask(mask, name, shape=None):
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a (batch, seqlen) tensor, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"{name} must have 2 dims (batch, seqlen), got shape {tuple(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{name} must be bool or integer (1 = a token, 0 = padding), got {mask.dtype}")
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")


def packed_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of a (batch, seqlen) mask (nonzero = a token) as the varlen API packs them:
    (their indices in the flattened batch, int64; the int32 prefix sums of the rows' counts,
    ``(batch + 1,)``). A token's row need not be a prefix: every nonzero entry is kept, in order."""
    lens = mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten()).flatten()
    return indices, torch.nn.functional.pad(torch.cumsum(lens, dim=0, dtype=torch.int32), (1, 0))


def index_first_axis(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x[indices]`` along the first axis (x: ``(n, ...)``, indices: int64 ``(m,)``)."""
    return torch.index_select(x, 0, indices)


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
    """A ``(first_axis_dim, ...)`` tensor of zeros with ``values`` (``(m, ...)``) at rows ``indices``."""
    if values.shape[0] != indices.shape[0]:
        raise ValueError(f"values must have one row per index, got {values.shape[0]} rows and "
                         f"{indices.shape[0]} indices")
    out = values.new_zeros((first_axis_dim, *values.shape[1:]))
    return out.index_copy(0, indices, values)


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                unused_mask: torch.Tensor | None = None):
    """The tokens of a padded batch, packed.

    Args:
        hidden_states: ``(batch, seqlen, ...)``.
        attention_mask: ``(batch, seqlen)``, bool or integer: nonzero = a token, 0 = padding.
        unused_mask: optional ``(batch, seqlen)``: positions that are packed with the tokens (their
            rows count in ``cu_seqlens``) but not used (left out of ``seqused``).

    Returns:
        ``(hidden (total, ...), indices (total,) int64 into the flattened batch, cu_seqlens
        (batch + 1,) int32, max_seqlen: int, seqused (batch,) int32)``. ``max_seqlen`` is read from
        the GPU (one device sync); :func:`packed_indices` gives the rest without it.
    """
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 2:
        raise ValueError("hidden_states must be a (batch, seqlen, ...) tensor, got "
                         f"{tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__}")
    _check_mask(attention_mask, "attention_mask", hidden_states.shape[:2])
    used = attention_mask != 0
    kept = used
    if unused_mask is not None:
        _check_mask(unused_mask, "unused_mask", hidden_states.shape[:2])
        kept = used | (unused_mask != 0)
    indices, cu_seqlens = packed_indices(kept)
    lens = cu_seqlens.diff()
    max_seqlen = int(lens.max()) if lens.numel() else 0
    seqused = used.sum(dim=-1, dtype=torch.int32)
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen, seqused


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """The inverse of :func:`unpad_input`: ``(total, ...)`` rows back to ``(batch, seqlen, ...)``,
    zeros at the padding."""
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.view(batch, seqlen, *hidden_states.shape[1:])
