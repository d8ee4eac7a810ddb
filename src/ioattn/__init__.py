"""ioattn: exact, IO-aware FlashAttention as Triton kernels behind a FlashAttention-2 API."""

from .interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from .distributed import flash_attn_cp_func
from .kvcache import flash_attn_with_kvcache
from .merge import merge_attention_states
from .padding import index_first_axis, pad_input, unpad_input
from .sdpa import scaled_dot_product_attention
from .integrations import flop_counter as _flop_counter

_flop_counter.register()  # FLOP formulas for torch.utils.flop_counter.FlopCounterMode

__version__ = "0.1.0"

__all__ = [
    "flash_attn_cp_func",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "index_first_axis",
    "merge_attention_states",
    "pad_input",
    "scaled_dot_product_attention",
    "unpad_input",
]
