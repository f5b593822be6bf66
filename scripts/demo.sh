#!/usr/bin/env bash
# Sets up .venv (scripts/setup_env.sh) and runs the main job: `unlearn-kernels demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/unlearn-kernels demo "$@"
