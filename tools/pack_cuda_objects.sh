#!/usr/bin/env bash
# Compile the CUDA kernels here and keep their objects for a lent GPU machine, where linking them instead of running
# nvcc saves minutes of device time (bench/gpu_check.sh picks them up when their digest matches the sources).
#   tools/pack_cuda_objects.sh [DIR]     build (NVEMBED_CUDA=1, archs NVEMBED_CUDA_ARCHS, default "80;90a"), then
#                                        copy csrc/cuda/*.cu's objects to DIR (default .cuda_objects) with a digest
#   tools/pack_cuda_objects.sh --digest  print the digest of what the objects depend on
# The .cu files include no torch or Python header, so the objects link into a build against another torch / Python.
set -euo pipefail
cd "$(dirname "$0")/.."
# The digest covers what the objects are compiled from: csrc/cuda's .cu / .cuh (they include nothing else of csrc;
# a test checks that), the build file and the archs. Headers of the C++ side (launchers, CPU kernels) may change
# after packing without forcing a full nvcc build on the device.
digest() {
  { find csrc/cuda -name '*.cu' -o -name '*.cuh' | LC_ALL=C sort | xargs sha256sum
    sha256sum CMakeLists.txt
    echo "archs=${NVEMBED_CUDA_ARCHS:-80;90a}"
  } | sha256sum | cut -d' ' -f1
}
if [ "${1:-}" = "--digest" ]; then digest; exit 0; fi
dir=${1:-.cuda_objects}
export NVEMBED_CUDA_ARCHS="${NVEMBED_CUDA_ARCHS:-80;90a}"
tag=$(${PYTHON:-python3} -c "import sys; print(sys.implementation.cache_tag)")
build=build/cmake-$tag-cuda  # dev_build.sh's own (incremental) CUDA build folder
NVEMBED_CUDA=1 ./tools/dev_build.sh
rm -rf "$dir"
mkdir -p "$dir"
cp $build/CMakeFiles/nvembed_C.dir/csrc/cuda/*.cu.o "$dir"/
digest > "$dir/digest"
echo "$NVEMBED_CUDA_ARCHS" > "$dir/archs"
nvcc --version | tail -1 > "$dir/nvcc" || true
ls -la "$dir"
