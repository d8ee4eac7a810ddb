#!/usr/bin/env bash
# Runs the test suite. Without a GPU, the Triton kernels themselves run on the CPU
# through Triton's interpreter (TRITON_INTERPRET=1), then the plain-PyTorch CPU path
# is tested through the same public API.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  .venv/bin/python -m pytest tests -q "$@"
else
  echo "== Triton kernels under the interpreter =="
  TRITON_INTERPRET=1 .venv/bin/python -m pytest tests -q "$@"
  echo "== CPU (blockwise) path =="
  .venv/bin/python -m pytest tests/test_flash_attn.py tests/test_features.py tests/test_blockwise.py \
    tests/test_kvcache.py tests/test_merge.py tests/test_gpu_configs.py tests/test_transformers.py \
    tests/test_lse_grad.py tests/test_paged_varlen.py tests/test_distributed.py tests/test_launch.py \
    tests/test_dropout_sm90.py tests/test_gluon_bwd256.py tests/test_grid_groups.py tests/test_errors.py tests/test_flop_counter.py tests/test_padding.py tests/test_sdpa.py \
    tests/test_value_headdim.py tests/test_gluon_dq.py tests/test_pad_dims.py -q "$@"
fi
