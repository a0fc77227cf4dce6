#!/usr/bin/env bash
# Build and run the host-side layout checks of the Hopper flash forward (tools/sm90_check/check.cu): nvcc and the
# nvidia-cutlass wheel's headers, no GPU. EMU_BUILD_DIR: where the binary goes (default build/sm90_check).
set -euo pipefail
cd "$(dirname "$0")/../.."
CUTLASS=$(${PYTHON:-python3} -c "import importlib.util, os; s = importlib.util.find_spec('cutlass_library'); print(os.path.join(list(s.submodule_search_locations)[0], 'source', 'include'))")
NVCC=${NVCC:-$(command -v nvcc || ls /usr/local/cuda*/bin/nvcc 2>/dev/null | head -1)}
[ -n "$NVCC" ] || { echo "nvcc not found"; exit 2; }
OUT=${EMU_BUILD_DIR:-build/sm90_check}
mkdir -p "$OUT"
"$NVCC" -std=c++20 -O1 -arch=sm_90a --expt-relaxed-constexpr -Icsrc -isystem "$CUTLASS" \
  tools/sm90_check/check.cu -o "$OUT/check"
exec "$OUT/check"
