"""ioattn: exact, IO-aware FlashAttention as Triton kernels behind a FlashAttention-2 API."""
