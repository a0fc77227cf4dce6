#!/usr/bin/env bash
# Build and run the CPU emulation of the tensor-core InfoNCE kernels (see emu.cpp). Extra arguments go to the
# binary (--quick: 3 small cases; --big: one d=1024 case). Needs g++ >= 11, the CUDA toolkit headers and the
# nvidia-cutlass wheel; no GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
CUTLASS=$(python -c "import importlib.util, os; s = importlib.util.find_spec('cutlass_library'); print(os.path.join(list(s.submodule_search_locations)[0], 'source', 'include'))")
# The CUDA headers (vector types, cuda_runtime_api.h): the first candidate that has them.
NVCC_DIR=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent/bin/nvcc)")")")
for c in "${CUDA_HOME:-}" "$NVCC_DIR" /usr/local/cuda /usr/local/cuda-*; do
  if [ -n "$c" ] && [ -f "$c/include/cuda_runtime_api.h" ]; then CUDA_HOME=$c; break; fi
done
[ -n "${CUDA_HOME:-}" ] || { echo "CUDA toolkit headers not found (set CUDA_HOME)"; exit 2; }
OUT=${EMU_BUILD_DIR:-build/infonce_emu}
mkdir -p "$OUT"
if [ ! -x "$OUT/emu" ] || [ -n "$(find tools/infonce_emu/emu.cpp csrc/cuda/infonce_tc.cuh csrc/cuda/infonce.cuh -newer "$OUT/emu")" ]; then
  ${CXX:-g++} -std=c++20 -O2 -pthread -Wall -Wno-unused-variable -Wno-unused-but-set-variable -Wno-maybe-uninitialized \
    -Icsrc -isystem "$CUTLASS" -isystem "$CUDA_HOME/include" -isystem "$CUDA_HOME/include/cccl" \
    tools/infonce_emu/emu.cpp -o "$OUT/emu"
fi
exec "$OUT/emu" "$@"
