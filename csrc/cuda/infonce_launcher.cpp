// CUDA launcher of nvembed::_infonce_fwd / _infonce_bwd: checks, output allocation, stream and device guard; the
// kernels (infonce.cu) see raw pointers only.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "cuda/infonce.cuh"
#include "ops.h"

namespace nvembed {

// Defined with the CPU launcher (cpu/infonce.cpp): one set of checks and messages for both devices.
void infonce_check_inputs(const Tensor& queries, const Tensor& docs, int64_t group_size, double temperature,
                          std::initializer_list<at::ScalarType> dtypes);
void infonce_check_bwd_inputs(const Tensor& grad_loss, const Tensor& queries, const Tensor& lse);

namespace {
constexpr const char* kOp = "infonce";

cuda::InfoNCEDType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::InfoNCEDType::kFloat32;
    case at::kBFloat16: return cuda::InfoNCEDType::kBFloat16;
    case at::kHalf: return cuda::InfoNCEDType::kFloat16;
    default: NVE_CHECK_TYPE(false, kOp, "queries has unsupported dtype ", t);
  }
  return cuda::InfoNCEDType::kFloat32;
}

void check_cuda(const Tensor& queries, const Tensor& docs, int64_t group_size, double temperature) {
  infonce_check_inputs(queries, docs, group_size, temperature, {at::kFloat, at::kBFloat16, at::kHalf});
  NVE_CHECK_VALUE(queries.is_cuda(), kOp, "queries must be a CUDA tensor here, got ", queries.device());
}

cuda::InfoNCEParams make_params(const Tensor& q, const Tensor& docs, int64_t group_size, double temperature,
                                bool in_batch_negatives) {
  cuda::InfoNCEParams p{};
  p.queries = q.data_ptr();
  p.docs = docs.data_ptr();
  p.dtype = kernel_dtype(q.scalar_type());
  p.B = q.size(0);
  p.N = docs.size(0);
  p.d = q.size(1);
  p.G = group_size;
  p.inv_temperature = static_cast<float>(1.0 / temperature);
  p.in_batch_negatives = in_batch_negatives;
  p.inv_batch_temperature = static_cast<float>(1.0 / (static_cast<double>(p.B) * temperature));
  return p;
}

}  // namespace

std::tuple<Tensor, Tensor> infonce_fwd_cuda(const Tensor& queries, const Tensor& docs, int64_t group_size,
                                            double temperature, bool in_batch_negatives) {
  check_cuda(queries, docs, group_size, temperature);
  const c10::cuda::CUDAGuard guard(queries.device());
  const Tensor q = queries.contiguous();
  const Tensor dc = docs.contiguous();
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor lse = at::empty({q.size(0)}, f32);
  Tensor row_loss = at::empty({q.size(0)}, f32);
  auto p = make_params(q, dc, group_size, temperature, in_batch_negatives);
  p.lse = lse.data_ptr<float>();
  p.row_loss = row_loss.data_ptr<float>();
  cuda::infonce_fwd_launch(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {row_loss.mean(), lse};
}

std::tuple<Tensor, Tensor> infonce_bwd_cuda(const Tensor& grad_loss, const Tensor& queries, const Tensor& docs,
                                            const Tensor& lse, int64_t group_size, double temperature,
                                            bool in_batch_negatives) {
  check_cuda(queries, docs, group_size, temperature);
  infonce_check_bwd_inputs(grad_loss, queries, lse);
  const c10::cuda::CUDAGuard guard(queries.device());
  const Tensor q = queries.contiguous();
  const Tensor dc = docs.contiguous();
  const Tensor lse_c = lse.to(at::kFloat).contiguous();
  const Tensor g = grad_loss.reshape({}).to(at::kFloat).contiguous();
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor grad_q = at::zeros(q.sizes(), f32);
  Tensor grad_d = at::zeros(dc.sizes(), f32);
  auto p = make_params(q, dc, group_size, temperature, in_batch_negatives);
  p.lse_in = lse_c.data_ptr<float>();
  p.grad_loss = g.data_ptr<float>();
  p.grad_queries = grad_q.data_ptr<float>();
  p.grad_docs = grad_d.data_ptr<float>();
  Tensor neg_prob_sum = at::empty({q.size(0)}, f32);  // every row written by the dQ kernel before it is read
  p.neg_prob_sum = neg_prob_sum.data_ptr<float>();
  cuda::infonce_bwd_launch(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_q.to(queries.scalar_type()), grad_d.to(docs.scalar_type())};
}

}  // namespace nvembed
