// Hopper (sm_90a) flash-attention backward for fp16, head dims 64 / 128 (flash_sm90_bwd.cuh): the dsum kernel, then
// the dQ and dK / dV kernels. Their bodies are compiled for sm_90a only; the launcher never selects them elsewhere.
#include "cuda/flash_sm90_bwd.cuh"

namespace nvembed::cuda {

void flash_bwd_sm90_fp16(const FlashParams& p, cudaStream_t stream) { fa90::run_bwd_hdim<cute::half_t>(p, stream); }

}  // namespace nvembed::cuda
