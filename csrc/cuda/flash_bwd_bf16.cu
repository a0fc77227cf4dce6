// Flash-attention bwdward kernels for bf16, head dims 32 / 64 / 128 (see flash_kernels.cuh).
#include "cuda/flash_kernels.cuh"

namespace nvembed::cuda {

void flash_bwd_bf16(const FlashParams& p, cudaStream_t stream) { fa::run_bwd_hdim<cute::bfloat16_t>(p, stream); }

}  // namespace nvembed::cuda
