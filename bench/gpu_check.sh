#!/usr/bin/env bash
# One-call GPU verification for a lent device machine (H100/H200, torch 2.11+cu130, no internet): build the
# extension there against its torch, a first correctness sweep of every kernel family (bench/gpu_smoke.py), the
# CUDA tests, the GPU benchmarks (bench/gpu_*.py) and compute-sanitizer memcheck / racecheck on small cases.
#
# The steps run in that order (the most telling first) and each has its own time limit and log; a failing step does
# not stop the others. DEADLINE=S (seconds from the start) shortens every step to what is left before it, keeping
# 15 s for the hand-back, and skips the steps that no longer fit, so one device call can be given a fixed budget:
#   DEADLINE=560 bench/gpu_check.sh                          # everything that fits in 560 s
#   ONLY="gpu_attention memcheck_flash" DEADLINE=200 bench/gpu_check.sh   # a second call for the rest
#   EXTRA=.whl/diag.sh ONLY=extra DEADLINE=120 bench/gpu_check.sh   # a carried one-off script after the build
# Logs, CSVs and PNGs go to a folder packed after every step into $OUT/logs.tgz (a device call brings back few
# files); $OUT/steps.txt lists each step's exit status (124 = hit its limit) and duration. $OUT defaults to
# ./gpu_out. Exit status: the build's where it fails; else 1 if any step failed or the verdict could not be formed,
# 3 if none failed but the deadline left some out, 0 when every step run (ONLY: those named) passed.
# NVEMBED_COMMIT=<hash> labels every CSV row (the copied tree's git metadata may be stale); unset, the tree's HEAD
# is used, with "-dirty" where tracked files differ from it, and env.txt says so.
#
# Build: where .cuda_objects/ holds the kernels' objects compiled here (tools/pack_cuda_objects.sh; carry it) and
# its digest matches the sources, only the C++ launchers are compiled there and the objects linked (seconds instead
# of minutes of nvcc); otherwise the full build. Carry the wheels it lacks in .whl/ (nvidia-cutlass; README).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
OUT="${OUT:-$PWD/gpu_out}"
LOGS="${GPU_CHECK_LOGS:-/tmp/gpu_check_logs}"
rm -rf "$LOGS"
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1
STEPS="$LOGS/steps.txt"
: > "$STEPS"
pack() { cp "$STEPS" "$OUT/steps.txt"; tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null; }
FAILED=""   # steps that exited non-zero
SKIPPED=""  # steps the deadline left out
left() { if [ -n "${DEADLINE:-}" ]; then echo $(( DEADLINE - ($(date +%s) - T0) - 15 )); else echo 100000; fi; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/site/bin:$PATH
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  git log -1 --format='git metadata of the copied tree: commit %H %s' 2>/dev/null || true
  nproc
} 2>&1 | tee "$LOGS/env.txt"
if [ -z "${NVEMBED_COMMIT:-}" ]; then
  NVEMBED_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  git diff --quiet HEAD -- 2>/dev/null || NVEMBED_COMMIT="$NVEMBED_COMMIT-dirty"
  echo "NVEMBED_COMMIT unset: rows labelled $NVEMBED_COMMIT from the copied tree's git metadata" | tee -a "$LOGS/env.txt"
else
  echo "NVEMBED_COMMIT=$NVEMBED_COMMIT (given by the caller)" | tee -a "$LOGS/env.txt"
fi
export NVEMBED_COMMIT

# step NAME LIMIT_S CMD...: run CMD with stdout + stderr in $LOGS/NAME.log under min(LIMIT_S, time left), record
# its exit status in steps.txt, show the log's tail when it fails, and go on either way.
step() {
  local name=$1 limit=$2
  shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
    return 0
  fi
  local l t0 rc
  l=$(left)
  if [ "$l" -lt 20 ]; then
    echo "$name not run (deadline)" | tee -a "$STEPS"
    SKIPPED="$SKIPPED $name"
    return 0
  fi
  [ "$l" -lt "$limit" ] && limit=$l
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc in $(( $(date +%s) - t0 ))s (limit ${limit}s; log: $name.log)" | tee -a "$STEPS"
  if [ $rc -ne 0 ]; then tail -15 "$LOGS/$name.log"; FAILED="$FAILED $name"; fi
  pack
  return 0
}

# The lent machines' image points CXX at a toolchain (/opt/gcc) whose libstdc++ code ended up inside the library,
# where its locale code segfaulted on the first error message an op formatted (2026-11-26, H200): build with the
# system g++, whose libstdc++ is the one torch loads.
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
echo "CXX=${CXX:-} ($(${CXX:-c++} --version | head -1))" | tee -a "$LOGS/env.txt"

# Build in place (no install needed), CUDA required. Nothing after it can run without the library: a failed build
# ends the script.
start=$(date +%s)
if [ -f .cuda_objects/digest ] && [ -f .cuda_objects/archs ] &&
   [ "$(NVEMBED_CUDA_ARCHS=$(cat .cuda_objects/archs) ./tools/pack_cuda_objects.sh --digest)" = "$(cat .cuda_objects/digest)" ]; then
  export NVEMBED_CUDA_OBJECTS=$PWD/.cuda_objects NVEMBED_CUDA_ARCHS=$(cat .cuda_objects/archs)
  echo "build: linking the prebuilt kernel objects (.cuda_objects, archs $NVEMBED_CUDA_ARCHS, $(cat .cuda_objects/nvcc 2>/dev/null))" | tee -a "$STEPS"
elif [ -d .cuda_objects ]; then
  echo "build: .cuda_objects does not match the sources: full build" | tee -a "$STEPS"
fi
# under the deadline too (a full nvcc build takes minutes): a build cut off still packs its log
build_limit() { local l; l=$(left); [ "$l" -lt 60 ] && l=60; echo "$l"; }
MAX_JOBS=16 NVEMBED_CUDA=1 NVEMBED_CUDA_ARCHS="${NVEMBED_CUDA_ARCHS:-90a}" timeout -k 10 "$(build_limit)" \
  ./tools/dev_build.sh > "$LOGS/build.log" 2>&1
rc=$?
if [ $rc -ne 0 ] && [ -n "${NVEMBED_CUDA_OBJECTS:-}" ]; then
  echo "build with the prebuilt objects failed (rc=$rc; build_objects.log): full build" | tee -a "$STEPS"
  mv "$LOGS/build.log" "$LOGS/build_objects.log"
  unset NVEMBED_CUDA_OBJECTS
  MAX_JOBS=16 NVEMBED_CUDA=1 NVEMBED_BUILD_DIR=build/gpu-check-full timeout -k 10 "$(build_limit)" \
    ./tools/dev_build.sh > "$LOGS/build.log" 2>&1
  rc=$?
fi
echo "build rc=$rc in $(( $(date +%s) - start ))s" | tee -a "$STEPS"
pack
[ $rc -eq 0 ] || { tail -60 "$LOGS/build.log"; exit $rc; }
export PYTHONPATH=$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
# pytest on 8 workers (pytest-xdist); a test that hangs (a kernel waiting on a barrier forever) is ended after
# 60 s by pytest-timeout's thread method, its worker replaced, and reported as failed (60, not more: a hang late in
# a step must still end before the step's own limit, which would kill pytest before it writes its JUnit XML). -v:
# one line per test as it finishes, so the log says what ran even without the XML (gpu_verdict reads it then).
PYTEST="python3 -m pytest -v -p no:cacheprovider -rfE -n 8 --timeout 60 -o timeout_method=thread"

# The order puts first the paths verified last (on an H100 on 2026-11-28; the k...Verified flags in csrc: InfoNCE's
# GEMM forward / backward and fused gradients, latent_pool's fused stages and saved activations): their tests,
# sanitizer cases and benchmarks. The flash attention kernels, verified on an H200 on 2026-11-26 and unchanged since,
# come after.
# 1. Every kernel family on a few awkward shapes against the float64 references: seconds, and says which kernel
#    hangs if one does.
step smoke 90 python3 bench/gpu_smoke.py
grep -E "^(ok|FAIL)|^---" "$LOGS/smoke.log" | tail -60
# EXTRA=script: a one-off diagnosis to run on the built library (a carried file), logged as step extra
[ -n "${EXTRA:-}" ] && step extra 200 bash "$EXTRA"

# 2. The CUDA tests other than flash attention's (fresh random inputs, fp64 references).
step cuda_tests 180 $PYTEST --junitxml "$LOGS/cuda_tests.xml" tests/ -m cuda --ignore=tests/test_flash_attn_cuda.py \
  --ignore=tests/test_hopper_kernels.py

# 3. compute-sanitizer on small cases (uncached allocations so memcheck sees accesses past a tensor's end):
#    InfoNCE's tile kernels (sm80 and Hopper forward, plain path), the blocked-GEMM backward, the GEMM forward and
#    the fused forward's row blocks, latent_pool's fused stages and saved activations (bench/sanitize_cases.py: one
#    table of cases, each under its own environment; CI runs the same table on CPU tensors); flash fwd + bwd of every
#    instantiation, sm80 and Hopper (bench/sanitize_flash.py), later.
sanitize() {  # sanitize TOOL WHAT: WHAT = cases | flash under compute-sanitizer TOOL
  [ -n "$SANITIZER" ] || { echo "compute-sanitizer not found: $1 $2 skipped" | tee -a "$STEPS"; return 0; }
  if [ "$2" = cases ]; then
    step "$1_infonce_latent_pool" 120 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SANITIZER" --tool "$1" --error-exitcode 9 python3 bench/sanitize_cases.py
  else
    step "$1_flash" 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SANITIZER" --tool "$1" --error-exitcode 9 python3 bench/sanitize_flash.py
  fi
}
sanitize memcheck cases

# 4. InfoNCE against the naive loss in the same run (issue 6): the tile backward after the Hopper forward, the
#    blocked-GEMM backward, the GEMM forward + backward, the gradients formed in the forward (nvembed-fused), the
#    naive loss (the sm80 forward's row is in bench/results/h200_2026-11-26; INFONCE_VARIANTS=nvembed,... adds it
#    back).
step gpu_infonce 180 python3 bench/gpu_infonce.py --out "$LOGS" --max-seconds 4 --rounds 6 \
  --variants "${INFONCE_VARIANTS:-nvembed-sm90,nvembed-gemm,nvembed-gemm-fwd,nvembed-fused,naive}"
#    ... and the fused path's dD accumulators against float64 (bf16 error per plan beside PyTorch's bf16 loss)
step infonce_fused_accuracy 60 python3 bench/infonce_fused_accuracy.py --device cuda --B 4096 --G 8 --extra 0 \
  --d 1024 --seeds 1 --out "$LOGS"
# 5. The latent-attention layer against the eager released layer and torch.compile of it (issue 7).
step gpu_latent_pool 200 python3 bench/gpu_latent_pool.py --out "$LOGS"
sanitize racecheck cases
# 6. Where the time goes (InfoNCE, latent_pool), and cuBLAS vs CUTLASS on the layer's GEMMs.
step infonce_profile 60 python3 bench/gpu_profile_infonce.py
step latent_pool_profile 90 python3 bench/gpu_profile_latent_pool.py --out "$LOGS"
step gemm_compare 90 python3 bench/gpu_gemm_compare.py --out "$LOGS"

# 7. Flash attention (sm80 and Hopper kernels; the Hopper SASS / dispatcher checks), its sanitizers, against SDPA
#    flash / cuDNN (FA3 protocol), and the encoder end to end.
step flash_tests 180 $PYTEST --junitxml "$LOGS/flash_tests.xml" tests/test_flash_attn_cuda.py tests/test_hopper_kernels.py
sanitize memcheck flash
step gpu_attention 150 python3 bench/gpu_attention.py --out "$LOGS" --warmup 3 --iters 10
sanitize racecheck flash
step gpu_model_e2e 120 python3 bench/gpu_model_e2e.py --out "$LOGS"
tail -3 "$LOGS/cuda_tests.log" "$LOGS/flash_tests.log" 2>/dev/null
for f in gpu_infonce gpu_latent_pool gpu_attention gpu_model_e2e; do
  [ -f "$LOGS/$f.log" ] && { echo "--- $f"; tail -12 "$LOGS/$f.log"; }
done
# What this run says about each of those paths (tests, smoke, sanitizers, speed against the path auto ran before
# them): verdict.md, its verdict lines here.
if python3 bench/gpu_verdict.py "$LOGS" --out "$LOGS/verdict.md" > "$LOGS/verdict.log" 2>&1; then
  grep -E "^## |verdict:" "$LOGS/verdict.md"
else
  echo "gpu_verdict failed:"; tail -20 "$LOGS/verdict.log"; FAILED="$FAILED verdict"
fi
echo "--- steps ($(( $(date +%s) - T0 ))s)"
cat "$STEPS"
[ -n "$FAILED" ] && echo "failed:$FAILED"
[ -n "$SKIPPED" ] && echo "not run:$SKIPPED"
pack
if [ -n "$FAILED" ]; then exit 1; elif [ -n "$SKIPPED" ]; then exit 3; fi
exit 0
