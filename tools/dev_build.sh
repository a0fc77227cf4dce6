#!/usr/bin/env bash
# Developer loop: build the extension in place (nvembed_ext/_C*.so in the source tree), incrementally.
# Use with: PYTHONPATH=$PWD:$PWD/python pytest tests/...   (NVEMBED_CUDA=1 to compile the CUDA kernels too)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SP=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
export CPATH="${SP}/nvidia/cu13/include${CPATH:+:$CPATH}"
NVEMBED_CUDA="${NVEMBED_CUDA:-0}" $PY setup.py -q build_ext --inplace
