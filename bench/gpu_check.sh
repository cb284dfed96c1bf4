#!/usr/bin/env bash
# One command for a lent GPU: GPU tests, GPU benchmarks at the paper's shapes, profiles; <= 8 minutes on one
# H100/H200. Writes OUT_DIR/summary.{json,md} and prints the summary. Details: bench/gpu_check.py.
#
#   bench/gpu_check.sh OUT_DIR              # on the GPU machine
#   bench/gpu_check.sh --dry-run OUT_DIR    # the same entry points at tiny sizes on the CPU (a rehearsal)
#
# Works from a fresh copy of the repository: Python is $PYTHON, else .venv/bin/python, else python3; with a
# GPU and no CUDA kernel in dpt_fast/_C*.so, the extension is built for this GPU (if nvcc is found; at most 150 s).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [[ "${1:-}" != "--dry-run" ]] && "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null \
  && ! "$PY" -c "import sys; from dpt_fast.ops.dpm_solver_update import cpp_available; sys.exit(not cpp_available('cuda'))" 2>/dev/null; then
  arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  echo "gpu_check: building the CUDA extension for sm_${arch/./} (log: build/gpu_check_build.log)"
  mkdir -p build
  DPT_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" timeout 150 "$PY" setup.py build_ext --inplace \
    > build/gpu_check_build.log 2>&1 || echo "gpu_check: build failed or no nvcc (see the log); continuing without it"
fi
exec "$PY" bench/gpu_check.py "$@"
