#!/usr/bin/env bash
# Sets up .venv (scripts/setup_env.sh) and runs the main job: `unlearn-kernels demo`
# (--overwrite: a rerun replaces the previous demo's outputs in demo_out/, nothing else).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/unlearn-kernels demo --overwrite "$@"
