#!/usr/bin/env bash
# Creates .venv with what ioattn needs (idempotent). On a machine without a GPU this
# installs the CPU build of torch; with CUDA present, any torch >= 2.4 you already have works.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, triton, numpy, pytest" 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip
  # numpy < 2.3: the Triton 3.6 interpreter (used for CPU testing) breaks on newer numpy
  .venv/bin/python -m pip install -q "torch==2.13.0" "triton==3.6.0" "numpy<2.3" pytest
fi
# transformers: only for tests/test_transformers.py (the Hugging Face integration); pinned to a
# release that works with torch 2.13 (CPU) and Python 3.11; numpy stays < 2.3 (~35 s, ~200 MB)
if ! .venv/bin/python -c "import transformers" 2>/dev/null; then
  .venv/bin/python -m pip install -q "transformers==5.24.0" "numpy<2.3"
fi
.venv/bin/python -m pip install -q --no-deps -e .
