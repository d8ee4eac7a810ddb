#!/usr/bin/env bash
# Runs the demo: `python -m ioattn demo` (real kernels on a GPU; the interpreter on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m ioattn demo "$@"
