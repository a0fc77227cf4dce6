#!/usr/bin/env bash
# Build and run one CPU emulator of the CUDA kernels: tools/cuda_emu/run.sh NAME [args], NAME = infonce or flash
# (the source is tools/NAME_emu/emu.cpp). Needs g++ >= 11, the CUDA toolkit headers and the nvidia-cutlass wheel;
# no GPU. Extra arguments go to the binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
NAME=${1:?usage: tools/cuda_emu/run.sh NAME [args]}
shift
SRC=tools/${NAME}_emu/emu.cpp
[ -f "$SRC" ] || { echo "no emulator $SRC"; exit 2; }
CUTLASS=$(${PYTHON:-python3} -c "import importlib.util, os; s = importlib.util.find_spec('cutlass_library'); print(os.path.join(list(s.submodule_search_locations)[0], 'source', 'include'))")
# The CUDA headers (vector types, cuda_runtime_api.h): the first candidate that has them.
NVCC_DIR=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent/bin/nvcc)")")")
for c in "${CUDA_HOME:-}" "$NVCC_DIR" /usr/local/cuda /usr/local/cuda-*; do
  if [ -n "$c" ] && [ -f "$c/include/cuda_runtime_api.h" ]; then CUDA_HOME=$c; break; fi
done
[ -n "${CUDA_HOME:-}" ] || { echo "CUDA toolkit headers not found (set CUDA_HOME)"; exit 2; }
# EMU_SANITIZE=1: with UBSan's alignment, null, bounds and return checks, fatal on the first report (x86 tolerates
# misaligned vector loads that a GPU would fault on; this makes them errors).
SAN=()
if [ "${EMU_SANITIZE:-0}" = 1 ]; then SAN=(-fsanitize=alignment,null,bounds,return,vla-bound -fno-sanitize-recover=all); fi
OUT=${EMU_BUILD_DIR:-build/${NAME}_emu${SAN:+_ubsan}}
mkdir -p "$OUT"
if [ ! -x "$OUT/emu" ] || [ -n "$(find "$SRC" csrc/cuda tools/cuda_emu -newer "$OUT/emu" \( -name '*.c*' -o -name '*.h' -o -name '*.sh' \))" ]; then
  # -fno-strict-aliasing: CuTe reinterprets register fragments (bf16 pairs as the uint32 mma operands); legal for
  # nvcc's register model, undefined for a host compiler, and g++ -O2 miscompiles it without the flag.
  ${CXX:-g++} -std=c++20 -O2 -fno-strict-aliasing -pthread -Wall -Wno-unused-variable -Wno-unused-but-set-variable -Wno-maybe-uninitialized -Wno-uninitialized -Wno-unknown-pragmas \
    -Icsrc -Itools -isystem "$CUTLASS" -isystem "$CUDA_HOME/include" -isystem "$CUDA_HOME/include/cccl" \
    ${SAN[@]+"${SAN[@]}"} "$SRC" -o "$OUT/emu"
fi
exec "$OUT/emu" "$@"
