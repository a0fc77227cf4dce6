#!/usr/bin/env bash
# Build and run the CPU emulation of the tensor-core InfoNCE kernels (see emu.cpp). Extra arguments go to the
# binary (--quick: 3 small cases; --big: one d=1024 case).
exec "$(dirname "$0")/../cuda_emu/run.sh" infonce "$@"
