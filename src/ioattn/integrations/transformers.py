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
  integration; a non-causal layer without a window (maybe cross-attention, even of the keys'
  length) keeps all its queries, the mask being the keys';
* packed sequences without padding (padding-free training): from ``cu_seq_lens_q/k`` and
  ``max_length_q/k`` when the data collator passes them, or from ``position_ids`` that
  restart (within any row), each sequence attending only to itself;
* ``sliding_window = w``: each query sees ``w`` keys (itself included), so
  ``window_size = (w - 1, w - 1)`` (right = 0 when causal); ``softcap`` as Gemma-2's;
  a value head dim of its own (MLA: DeepSeek-V2/V3) natively;
* attention sinks (``s_aux``, GPT-OSS): ioattn's ``sinks`` (trained through the lse's gradient).

What raises (use ``"sdpa"`` or ``"eager"`` for those models): a 4-D or other non-2-D mask;
a mask function (composed by transformers for the model) with a data-dependent pattern beyond
padding and packing (image-token / prefix-LM blocks) or chunked attention past its first chunk
(ioattn only masks causally, by window and by sequence; _check_mask_function); a model that
computes attention in its own code rather than through the attention interface (_check_model);
additive position biases (``position_bias``). ``output_attentions=True`` gets no weights (None), with a
warning, as with FlashAttention-2.
"""

from __future__ import annotations

import sys
import warnings
import weakref

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
        from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, flash_attention_mask
    except ImportError as e:
        raise ImportError("ioattn.integrations.transformers needs transformers >= 4.53 "
                          "(AttentionInterface and masking_utils.AttentionMaskInterface): "
                          "pip install 'transformers>=4.53'") from e
    AttentionInterface.register(name, attention_forward)
    # the 2-D padding mask (or None) that FlashAttention-2 gets; without a mask function of its
    # own, a registered name would get no mask at all and padding would be silently ignored

    def mask_interface(*args, **kwargs):
        """flash_attention_mask, after the checks of what the attention function cannot see: the
        model (_check_model) and the composed pattern (_check_mask_function). transformers passes
        keywords (whose set changed across versions: any is passed on as it came)."""
        if not torch.compiler.is_compiling():  # (checks on Python objects: once, before tracing)
            _check_model(kwargs.get("config"))
            _check_mask_function(kwargs.get("mask_function", causal_mask_function),
                                 kwargs.get("kv_offset", 0) + kwargs.get("kv_length", 0))
        return flash_attention_mask(*args, **kwargs)

    AttentionMaskInterface.register(name, mask_interface)
    return name


# transformers' mask functions (masking_utils) are closures; the mask that reaches attention_forward is
# only the 2-D padding, the layer's pattern coming from its is_causal and sliding_window. Patterns
# that depend on the data beyond padding and packing (image-token or prefix-LM blocks: a union with
# a function of token_type_ids or block ids; blockwise_overlay) or chunked attention beyond its first
# chunk cannot be expressed by the kernels: such a model raises instead of running with the pattern
# silently dropped. Functions of positions only (e.g. a bidirectional window overlay) pass.
_DATA_MASKS_OK = frozenset(("padding_mask_function", "packed_sequence_mask_function",
                            "remap_positions_for_packed_sequence"))  # (padding and packing: expressed)


def _check_mask_function(fn, kv_end, in_union=False):
    """Raises if the mask function transformers composed for a layer has a part ioattn cannot
    express (above); kv_end: one past the last key position."""
    factory = getattr(fn, "__qualname__", "").split(".<locals>")[0]
    cells = getattr(fn, "__closure__", None) or ()  # the variables the closure captured
    inner = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells))) if cells else {}
    if factory == "chunked_overlay":
        if kv_end <= inner.get("chunk_size", 0):  # every key in the first chunk: plain causal
            return
        raise ValueError(f"ioattn: this model attends within chunks of {inner.get('chunk_size')} tokens "
                         f"(attention_chunk_size), which ioattn cannot express beyond the first chunk "
                         f"({kv_end} positions here); use attn_implementation='sdpa' or 'eager'")
    data = [v for v in inner.values() if isinstance(v, torch.Tensor)]
    if factory == "blockwise_overlay" or (data and (in_union or factory not in _DATA_MASKS_OK)):
        raise ValueError(f"ioattn: this model's attention mask has a data-dependent pattern ({factory}: e.g. "
                         f"bidirectional blocks over image tokens or a prefix), which ioattn cannot express "
                         f"(it masks causally, by sliding window, padding and packed sequence only); use "
                         f"attn_implementation='sdpa' or 'eager' for it")
    for value in inner.values():  # the functions it combines
        for part in (value if isinstance(value, (tuple, list)) else (value, )):
            if callable(part) and hasattr(part, "__qualname__") and not isinstance(part, type):
                _check_mask_function(part, kv_end, in_union or factory == "or_masks")


_checked_models = {}


def _check_model(config):
    """Raises for a model whose modeling code computes attention itself rather than through
    transformers' AttentionInterface (e.g. Bloom, XGLM, MPT): it would build its masks with this
    name's mask function (None without padding) and silently lose its causal mask. Known by its
    modeling module not using ALL_ATTENTION_FUNCTIONS; models from elsewhere are not checked."""
    module = type(config).__module__ if config is not None else ""
    if module not in _checked_models:
        modeling = sys.modules.get(module.replace(".configuration_", ".modeling_"))
        _checked_models[module] = modeling is None or ".configuration_" not in module or hasattr(
            modeling, "ALL_ATTENTION_FUNCTIONS")
    if not _checked_models[module]:
        raise ValueError(f"ioattn: {getattr(config, 'model_type', module)} models compute attention in "
                         f"their own code, not through transformers' AttentionInterface, so "
                         f"attn_implementation='ioattn' cannot run them (their causal mask would be lost); "
                         f"use 'sdpa' or 'eager'")


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


def _packed_from_position_ids(position_ids, batch, length):
    """cu_seqlens (over the flattened batch) and max length of the sequences packed in the rows,
    where position_ids restart (any step other than +1 starts a sequence, as transformers' masks
    read them; each row starts one); None when every row holds one sequence. Reads the positions
    (a device sync, as FlashAttention-2's integration does)."""
    if position_ids.shape[-1] != length or position_ids.numel() not in (length, batch * length):
        return None
    pos = position_ids.reshape(-1, length).expand(batch, length)
    starts = torch.ones(batch, length, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    first = torch.nonzero(starts.flatten()).flatten()
    if first.numel() <= batch:
        return None
    cu = torch.cat([first, first.new_tensor([batch * length])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


_last_packed = [None, None]  # [(weakref to position_ids, its version, batch, length), result]


def _packed_cached(position_ids, batch, length):
    """_packed_from_position_ids, read once per forward: every layer gets the same position_ids
    tensor, so the layers after the first reuse the first one's result (no device sync each)."""
    if torch.compiler.is_compiling():
        return _packed_from_position_ids(position_ids, batch, length)
    key, found = _last_packed
    if key is not None and key[0]() is position_ids and key[1:] == (position_ids._version, batch, length):
        return found
    found = _packed_from_position_ids(position_ids, batch, length)
    _last_packed[:] = [(weakref.ref(position_ids), position_ids._version, batch, length), found]
    return found


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                      scaling: float | None = None, sliding_window: int | None = None,
                      softcap: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention function contract (as ``flash_attention_forward``'s).

    Args:
        module: the attention layer (its ``is_causal`` is used when ``is_causal`` is None).
        query: ``(batch, heads, q_len, dim)``; key, value: ``(batch, kv_heads, kv_len, dim)``
            (value's dim may differ: MLA).
        attention_mask: None, or the 2-D padding mask ``(batch, kv_len)`` (True/1 = a token).
        dropout: attention dropout probability (the models pass 0 in eval mode).
        scaling: softmax scale (default ``dim ** -0.5``).
        sliding_window: each query sees this many keys, itself included.
        softcap: scores become ``softcap * tanh(scores / softcap)``.
        kwargs: ``position_ids``, ``cu_seq_lens_q/k`` + ``max_length_q/k`` (packed sequences);
            others are ignored.

    Returns:
        ``(attn_output (batch, q_len, heads, value's dim), None)``.
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
    batch, q_len = q.shape[:2]
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
        if q_len == kv_len and (causal or window != (-1, -1)):  # self-attention: the mask is the
            idx_q, cu_q, max_q = idx_k, cu_k, max_k            # queries' too (their positions: the keys')
        elif q_len == 1 or not causal:  # decoding (one real token a row), or a non-causal layer
            # without a window, which may be cross-attention (of any length: every query is real; in
            # an encoder, the padded queries get outputs, as eager's): the mask is the keys' only
            idx_q = torch.arange(batch * q_len, device=q.device)
            cu_q, max_q = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=q.device), q_len
        else:  # queries are the last q_len positions: left padding, as in FlashAttention-2's integration
            idx_q, cu_q, max_q = _unpad(mask[:, -q_len:])
        flat_q = _flat(q)
        out = flash_attn_varlen_func(flat_q[idx_q], _flat(k)[idx_k], _flat(v)[idx_k], cu_q, cu_k,
                                     max_q, max_k, **opts)
        # (shaped from q and v themselves: with batch * q_len and view(batch, q_len, ...),
        # torch.compile's inductor, dynamic=True with a padding mask, emitted a size symbol that it
        # never bound)
        out = out.new_zeros(flat_q.shape[:-1] + v.shape[-1:]).index_copy(0, idx_q, out)
        return out.view(q.shape[:-1] + v.shape[-1:]), None

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    packed = None
    if all(x is not None for x in (cu_q, cu_k, max_q, max_k)):  # padding-free batch from the collator
        packed = cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)
    elif q_len > 1 and q_len == k.shape[1] and kwargs.get("position_ids") is not None:
        found = _packed_cached(kwargs["position_ids"], batch, q_len)
        if found is not None:
            packed = found[0], found[0], found[1], found[1]
    if packed is not None:
        out = flash_attn_varlen_func(_flat(q), _flat(k), _flat(v), *packed, **opts)
        return out.view(batch, -1, *out.shape[1:]), None

    return flash_attn_func(q, k, v, **opts), None
