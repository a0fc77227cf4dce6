#!/usr/bin/env bash
# One-call GPU verification for a lent device machine (H100/H200, torch 2.11+cu130, no internet):
#   build the extension there against its torch, run the CUDA tests, compute-sanitizer memcheck on a small case,
#   and the GPU benchmarks; logs and CSVs go to $OUT (or ./gpu_out).
# Carry the wheels it lacks in .whl/ (nvidia-cutlass, pybind11, cmake, ninja, pytest-benchmark); see README.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/site/bin:$PATH
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

# Build in place (no install needed), CUDA required.
start=$(date +%s)
MAX_JOBS=16 NVEMBED_CUDA=1 NVEMBED_CUDA_ARCHS="${NVEMBED_CUDA_ARCHS:-90a}" ./tools/dev_build.sh > "$OUT/build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - start ))s" | tee -a "$OUT/env.txt"
[ $rc -eq 0 ] || { tail -60 "$OUT/build.log"; exit $rc; }
export PYTHONPATH=$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}

# CUDA tests (fresh random inputs, fp64 references), then everything else once on this machine too.
python3 -m pytest tests/ -q -p no:cacheprovider -m cuda -rs 2>&1 | tee "$OUT/cuda_tests.log"

# compute-sanitizer memcheck on a small case of every CUDA op that exists.
if command -v compute-sanitizer >/dev/null 2>&1; then
  compute-sanitizer --tool memcheck --error-exitcode 9 python3 - <<'PY' 2>&1 | tee "$OUT/memcheck.log"
import torch, nvembed_ext
q = torch.randn(37, 65, device="cuda", dtype=torch.bfloat16, requires_grad=True)
d = torch.randn(37 * 3, 65, device="cuda", dtype=torch.bfloat16, requires_grad=True)
for inb in (True, False):
    loss = torch.ops.nvembed.infonce(q, d, 3, 0.05, inb)
    loss.backward()
torch.cuda.synchronize()
print("memcheck case done")
PY
fi

# GPU benchmarks (each writes its CSV under $OUT).
for b in bench/gpu_*.py; do
  [ -e "$b" ] || continue
  python3 "$b" --out "$OUT" 2>&1 | tee "$OUT/$(basename "$b" .py).log"
done
ls -la "$OUT"
