// PLACEHOLDER
#include "checks.h"
#include "ops.h"
namespace nvembed {
std::tuple<Tensor, Tensor> flash_attn_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                              const std::optional<Tensor>& key_padding_mask,
                                              std::optional<double> scale) { TORCH_CHECK(false, "todo"); }
std::tuple<Tensor, Tensor, Tensor> flash_attn_bwd_cpu(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                      const Tensor& v, const Tensor& out, const Tensor& lse,
                                                      const std::optional<Tensor>& key_padding_mask,
                                                      std::optional<double> scale) { TORCH_CHECK(false, "todo"); }
std::tuple<Tensor, Tensor> flash_attn_varlen_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                     int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                     std::optional<double> scale) { TORCH_CHECK(false, "todo"); }
std::tuple<Tensor, Tensor, Tensor> flash_attn_varlen_bwd_cpu(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                             const Tensor& v, const Tensor& out, const Tensor& lse,
                                                             const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                             int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                             std::optional<double> scale) { TORCH_CHECK(false, "todo"); }
}  // namespace nvembed
