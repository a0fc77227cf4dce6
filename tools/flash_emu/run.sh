#!/usr/bin/env bash
# Build and run the CPU emulation of the sm80 flash-attention kernels (see emu.cpp). --quick: 3 small cases.
exec "$(dirname "$0")/../cuda_emu/run.sh" flash "$@"
