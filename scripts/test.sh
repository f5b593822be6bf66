#!/usr/bin/env bash
# Sets up .venv (scripts/setup_env.sh) and runs the whole test suite. Without a GPU the
# CUDA tests skip and the Triton kernels run under TRITON_INTERPRET=1 (set in conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pytest -q --durations=15 "$@"
