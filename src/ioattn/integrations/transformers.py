"""ioattn as a Hugging Face transformers attention implementation.

    import ioattn.integrations.transformers as ioattn_hf
    from transformers import AutoModelForCausalLM

    ioattn_hf.register()                      # once per process, before the model is built
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="ioattn")

:func:`register` puts :func:`attention_forward` into transformers' ``AttentionInterface``
and transformers' own FlashAttention mask function into ``AttentionMaskInterface``, both
under the same name. The model then hands the attention function what it hands
FlashAttention-2: the causal flag, a 2-D boolean padding mask ``(batch, kv_len)`` (or
None when nothing is padded), the sliding window, the softcap and the dropout
probability (non-zero in training only). Needs transformers >= 4.53 (the mask interface).

What :func:`attention_forward` does, as transformers' FlashAttention-2 integration does:

* no padding: :func:`ioattn.flash_attn_func` on ``(batch, seq, heads, dim)`` views of the
  model's ``(batch, heads, seq, dim)`` tensors; GQA/MQA natively (no ``repeat_kv``);
* a padding mask: the padded tokens are removed, the sequences packed with ``cu_seqlens``
  for :func:`ioattn.flash_attn_varlen_func`, and the output padded back with zeros. When
  the queries are fewer than the keys, a causal layer's queries (prefill after a cache)
  are the last columns of the mask, i.e. left padding, as in FlashAttention-2's
  integration; a non-causal layer's (cross-attention) are all real, the mask being the
  keys';
* packed sequences without padding (padding-free training): from ``cu_seq_lens_q/k`` and
  ``max_length_q/k`` when the data collator passes them, or from ``position_ids`` that
  restart (batch 1), each sequence attending only to itself;
* ``sliding_window = w``: each query sees ``w`` keys (itself included), so
  ``window_size = (w - 1, w - 1)`` (right = 0 when causal); ``softcap`` as Gemma-2's;
  a value head dim smaller than the query's is zero-padded and the output cropped;
* attention sinks (``s_aux``, GPT-OSS): ioattn's ``sinks`` (trained through the lse's gradient).

What raises: a 4-D or other non-2-D mask (custom patterns, prefix-LM / bidirectional
blocks: ioattn only masks causally, by window and by sequence) and additive position
biases (``position_bias``): use ``"sdpa"`` or
``"eager"`` for those models. ``output_attentions=True`` gets no weights (None), with a
warning, as with FlashAttention-2.
"""

from __future__ import annotations

import warnings

import torch

from ..interface import flash_attn_func, flash_attn_varlen_func
from ..padding import packed_indices

__all__ = ["register", "attention_forward"]

# names transformers gives another meaning: "flash" loads a FlashAttention package or a Hub
# kernel, "sdpa"/"flex"/"eager" run those implementations' checks, "a/b" is a Hub kernel
# repository and "paged|..." a paged variant
_RESERVED = ("flash", "sdpa", "flex", "eager", "/", "|", ":")

_warned = set()


def register(name: str = "ioattn") -> str:
    """Registers ioattn with transformers as ``attn_implementation=name``; returns ``name``.

    Call it before building the model (``from_pretrained``/``from_config`` check the name).
    """
    if not isinstance(name, str) or not name or any(r in name for r in _RESERVED):
        raise ValueError(f"register(name={name!r}): pick a name without any of {list(_RESERVED)}; "
                         "transformers gives those another meaning")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError as e:
        raise ImportError("ioattn.integrations.transformers needs transformers >= 4.53 "
                          "(AttentionInterface and masking_utils.AttentionMaskInterface): "
                          "pip install 'transformers>=4.53'") from e
    AttentionInterface.register(name, attention_forward)
    # the 2-D padding mask (or None) that FlashAttention-2 gets; without a mask function of its
    # own, a registered name would get no mask at all and padding would be silently ignored
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


def _warn_once(key, msg):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


def _unpad(mask):
    """(indices of the kept tokens in the flattened batch, int32 cu_seqlens, max length). The max
    length is the mask's width, a bound on every row's count that needs no device sync (the
    kernels' programs past a shorter sequence's end return at once)."""
    return (*packed_indices(mask), mask.shape[-1])


def _flat(x):
    """(batch, seq, heads, dim) -> (batch * seq, heads, dim)."""
    return x.reshape(-1, *x.shape[2:])


def _packed_from_position_ids(position_ids, length):
    """cu_seqlens and max length of the sequences packed in one row, where position_ids
    restart (any step other than +1 starts a sequence, as transformers' masks read them);
    None for a single sequence. Reads the positions (a device sync, as FlashAttention-2's
    integration does)."""
    pos = position_ids.reshape(-1)
    if pos.numel() != length:
        return None
    starts = torch.ones(length, dtype=torch.bool, device=pos.device)
    starts[1:] = pos[1:] - pos[:-1] != 1
    first = torch.nonzero(starts).flatten()
    if first.numel() < 2:
        return None
    cu = torch.cat([first, first.new_tensor([length])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                      scaling: float | None = None, sliding_window: int | None = None,
                      softcap: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention function contract (as ``flash_attention_forward``'s).

    Args:
        module: the attention layer (its ``is_causal`` is used when ``is_causal`` is None).
        query: ``(batch, heads, q_len, dim)``; key, value: ``(batch, kv_heads, kv_len, dim)``.
        attention_mask: None, or the 2-D padding mask ``(batch, kv_len)`` (True/1 = a token).
        dropout: attention dropout probability (the models pass 0 in eval mode).
        scaling: softmax scale (default ``dim ** -0.5``).
        sliding_window: each query sees this many keys, itself included.
        softcap: scores become ``softcap * tanh(scores / softcap)``.
        kwargs: ``position_ids``, ``cu_seq_lens_q/k`` + ``max_length_q/k`` (packed sequences);
            others are ignored.

    Returns:
        ``(attn_output (batch, q_len, heads, dim), None)``.
    """
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("ioattn: additive position biases (position_bias) are not supported; "
                                  "use attn_implementation='eager' or 'sdpa' for this model")
    if kwargs.get("output_attentions", False):
        _warn_once("output_attentions", "ioattn does not return attention weights "
                   "(output_attentions=True gets None); use attn_implementation='eager' for them")
    if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor)
                                           and attention_mask.dim() == 2):
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
        raise ValueError(
            f"ioattn: attention_mask must be the 2-D padding mask (batch, kv_len) that transformers "
            f"builds for attn_implementation registered by ioattn.integrations.transformers.register(); "
            f"got {shape}. Arbitrary (4-D) masks cannot be expressed by ioattn (causal, sliding-window "
            f"and per-sequence masks only): use attn_implementation='sdpa' or 'eager' for them")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))

    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    batch, q_len, _, head_dim = q.shape
    v_dim = v.shape[-1]
    if v_dim < head_dim:  # e.g. MLA: ioattn needs V's head dim = Q's; zeros add nothing
        v = torch.nn.functional.pad(v, [0, head_dim - v_dim])
    window = (-1, -1)
    if sliding_window is not None and sliding_window > 0:
        window = (int(sliding_window) - 1, int(sliding_window) - 1)
    opts = dict(dropout_p=float(dropout or 0.0), softmax_scale=scaling, causal=causal,
                window_size=window, softcap=float(softcap or 0.0))
    if kwargs.get("s_aux") is not None:  # GPT-OSS's attention sinks, one logit per query head
        opts["sinks"] = kwargs["s_aux"]

    if attention_mask is not None:
        mask = attention_mask.bool()
        if k.shape[1] > mask.shape[1]:  # a static cache longer than the tokens seen
            k, v = k[:, :mask.shape[1]], v[:, :mask.shape[1]]
        elif k.shape[1] < mask.shape[1]:
            raise ValueError(f"ioattn: attention_mask covers {mask.shape[1]} keys, the keys are {k.shape[1]}")
        kv_len = k.shape[1]
        idx_k, cu_k, max_k = _unpad(mask)
        if q_len == kv_len:
            idx_q, cu_q, max_q = idx_k, cu_k, max_k
        elif q_len == 1 or not causal:  # decoding (one real token a row), or cross-attention:
            idx_q = torch.arange(batch * q_len, device=q.device)  # the mask is the keys' only
            cu_q, max_q = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=q.device), q_len
        else:  # queries are the last q_len positions: left padding, as in FlashAttention-2's integration
            idx_q, cu_q, max_q = _unpad(mask[:, -q_len:])
        flat_q = _flat(q)
        out = flash_attn_varlen_func(flat_q[idx_q], _flat(k)[idx_k], _flat(v)[idx_k], cu_q, cu_k,
                                     max_q, max_k, **opts)
        # (shaped from q itself: with batch * q_len and view(batch, q_len, ...), torch.compile's
        # inductor, dynamic=True with a padding mask, emitted a size symbol that it never bound)
        out = torch.zeros_like(flat_q).index_copy(0, idx_q, out)
        return out.view_as(q)[..., :v_dim], None

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    packed = None
    if all(x is not None for x in (cu_q, cu_k, max_q, max_k)):  # padding-free batch from the collator
        packed = cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)
    elif batch == 1 and q_len > 1 and q_len == k.shape[1] and kwargs.get("position_ids") is not None:
        found = _packed_from_position_ids(kwargs["position_ids"], q_len)
        if found is not None:
            packed = found[0], found[0], found[1], found[1]
    if packed is not None:
        out = flash_attn_varlen_func(_flat(q), _flat(k), _flat(v), *packed, **opts)
        return out.view(batch, -1, *out.shape[1:])[..., :v_dim], None

    out = flash_attn_func(q, k, v, **opts)
    return out[..., :v_dim], None
