#!/usr/bin/env bash
# One call on the device machine: build with the machine's own torch, run the whole test suite
# (CUDA and Triton tests included), the self-check and every benchmark; logs go to $OUT (or
# ./gpu_out). Usage on the device:  bash benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} UNLEARN_KERNELS_CUDA=1 MAX_JOBS=16 \
  pip install -e . --no-build-isolation --no-deps -q 2>&1 | tail -20 | tee "$out/build.log"
python -m unlearn_kernels.cli selfcheck 2>&1 | tee "$out/selfcheck.md"
python -m pytest -q tests/test_gpu_methods.py 2>&1 | tail -15 | tee "$out/gpu_methods.log"
python -m pytest -q -x tests 2>&1 | tail -30 | tee "$out/tests.log"
for bench in bench_ops bench_low_rank bench_simu_scores bench_sophia; do
  python "benchmarks/$bench.py" 2>&1 | tee "$out/$bench.md"
done
# The evaluator against lm-eval (only where the image has lm-eval installed).
if python -c "import lm_eval" 2>/dev/null; then
  timeout 180 python benchmarks/bench_eval.py --bpe --device cuda --dtype bfloat16 --threads 16 2>&1 \
    | tail -8 | tee "$out/bench_eval.md"
fi
