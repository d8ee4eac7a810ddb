"""Integrations of ioattn with other libraries; each submodule imports its library lazily.

* :mod:`ioattn.integrations.transformers`: ioattn as a Hugging Face transformers attention
  implementation (``register()``, then ``attn_implementation="ioattn"``).
"""
