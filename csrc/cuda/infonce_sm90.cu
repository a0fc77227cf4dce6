// The Hopper (sm_90a) InfoNCE forward tile pass (infonce_sm90.cuh), bf16 and fp16. Its body is compiled for sm_90a
// only; infonce_tc.cu calls it when the plan says so (InfoNCETCPlan::sm90_fwd).
#include "cuda/infonce_sm90.cuh"

namespace nvembed::cuda {

void infonce_sm90_fwd_tile(const InfoNCEParams& p, int splits, int64_t qblocks, const tc::FwdArgs& a,
                           cudaStream_t stream) {
  if (p.dtype == InfoNCEDType::kBFloat16) return nce90::fwd_tile<cute::bfloat16_t>(p, splits, qblocks, a, stream);
  if (p.dtype == InfoNCEDType::kFloat16) return nce90::fwd_tile<cute::half_t>(p, splits, qblocks, a, stream);
}

}  // namespace nvembed::cuda
