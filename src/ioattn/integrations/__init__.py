"""Integrations of ioattn with other libraries; each submodule imports its library lazily.

* :mod:`ioattn.integrations.transformers`: ioattn as a Hugging Face transformers attention
  implementation (``register()``, then ``attn_implementation="ioattn"``).
* :mod:`ioattn.integrations.flop_counter`: FLOP formulas of ioattn's ops for
  ``torch.utils.flop_counter.FlopCounterMode`` (registered on import of ioattn; torch only).
"""
