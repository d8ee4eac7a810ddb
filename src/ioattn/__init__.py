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
    "merge_attention_states",
]
