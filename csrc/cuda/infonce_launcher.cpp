// CUDA launcher of nvembed::_infonce_fwd / _infonce_bwd / _infonce_fwd_grad: checks, path choice, workspaces, stream
// and device guard; the kernels (infonce.cu, infonce_tc.cu) see raw pointers only.
//
// Paths:
//   * in-batch negatives, bf16 / fp16, sm_80+: the tensor-core kernels (infonce_tc.cu). They move rows in
//     16-byte vectors, so d % 8 != 0 or a misaligned row start is handled by a zero-padded (or re-allocated) copy
//     to d8 = roundup(d, 8): zero columns add nothing to the logits and the padded gradient columns are dropped.
//   * in-batch negatives, fp32 (or NVEMBED_INFONCE_CUDA_PLAIN=1, which the tests use to check both paths): the
//     plain fp32-FMA tiles of infonce.cu.
//   * own-group negatives (in_batch_negatives=False), any dtype: one warp per query, G dot products (infonce.cu).
//   * backward with in-batch negatives and NVEMBED_INFONCE_BWD=gemm (any dtype): the chunked cuBLAS GEMMs of
//     infonce_gemm.cpp around the chunk kernel of infonce.cu (auto's backward for bf16 / fp16:
//     kInfonceGemmBwdVerified).
//   * forward with in-batch negatives and NVEMBED_INFONCE_FWD=gemm (any dtype): chunks of cuBLAS GEMMs with fp32
//     output around the online log-sum-exp kernel of infonce.cu (verified; auto keeps the tiles:
//     kInfonceGemmFwdDefault).
//   * _infonce_fwd_grad (in-batch negatives; NVEMBED_INFONCE_GRAD=fused, the composite op calls it when the inputs
//     need gradients): row blocks of cuBLAS GEMMs around both chunk kernels, the gradients formed in the forward
//     (infonce_gemm.h; auto's choice for bf16 / fp16: kInfonceFusedGradVerified). Own-group: the forward, then
//     the backward.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string_view>

#include "checks.h"
#include "cuda/infonce.cuh"
#include "infonce_gemm.h"
#include "kernel_choice.h"
#include "ops.h"

namespace nvembed {

// cpu/infonce.cpp: the argument checks are the same on every device (the dtypes aside).
void infonce_check_inputs(const Tensor& queries, const Tensor& docs, int64_t group_size, double temperature,
                          std::initializer_list<at::ScalarType> dtypes, bool in_batch_negatives);
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

// The CPU launcher's checks (one function, cpu/infonce.cpp: the same messages, the int64 overflow check of B*G and
// the float32 range of 1/temperature), with the CUDA dtypes.
void check_inputs(const Tensor& queries, const Tensor& docs, int64_t group_size, double temperature,
                  bool in_batch_negatives) {
  infonce_check_inputs(queries, docs, group_size, temperature, {at::kFloat, at::kBFloat16, at::kHalf},
                       in_batch_negatives);
  NVE_CHECK_VALUE(queries.is_cuda(), kOp, "queries must be a CUDA tensor here, got ", queries.device());
}

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

// Grid limits of the tensor-core kernels: query / doc blocks of 128 rows index gridDim.y (<= 65535).
constexpr int64_t kTcMaxRows = int64_t{65535} * 128;

bool use_tensor_cores(const Tensor& queries, const Tensor& docs, bool in_batch_negatives) {
  if (!in_batch_negatives || queries.scalar_type() == at::kFloat) return false;
  if (env_flag("NVEMBED_INFONCE_CUDA_PLAIN")) return false;
  if (docs.size(0) > kTcMaxRows || queries.size(1) > (int64_t{1} << 20)) return false;
  if (queries.size(1) == 0) return false;  // no columns to tile: the plain kernels (all logits 0)
  return cuda::infonce_tc_supported(queries.get_device(), nullptr);
}

int64_t round_up8(int64_t d) { return (d + 7) / 8 * 8; }

// A [rows, d8] contiguous operand with 16-byte aligned rows for the tensor-core kernels.
Tensor tc_operand(const Tensor& x, int64_t d8) {
  Tensor c = x.contiguous();
  if (c.size(1) != d8) return at::constant_pad_nd(c, {0, d8 - c.size(1)});
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) return c.clone();  // fresh allocations are aligned
  return c;
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

// The blocked-GEMM backward's elementwise pass (infonce_gemm.h) on the CUDA kernel of infonce.cu.
void cuda_chunk_grad(Tensor& scores, const Tensor& lse, Tensor& neg_prob_sum, Tensor& probs, int64_t col0,
                     int64_t group_size, double inv_temperature) {
  infonce_check_chunk_grad(scores, lse, neg_prob_sum, probs);
  TORCH_INTERNAL_ASSERT(scores.scalar_type() == at::kFloat, "infonce: the chunk kernels read fp32 scores");
  cuda::InfoNCEChunkGradParams p{};
  p.scores = scores.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.neg_prob_sum = neg_prob_sum.data_ptr<float>();
  p.probs = probs.data_ptr();
  p.dtype = kernel_dtype(probs.scalar_type());
  p.rows = scores.size(0);
  p.cols = scores.size(1);
  p.probs_ld = probs.stride(0);
  p.col0 = col0;
  p.G = group_size;
  p.inv_temperature = static_cast<float>(inv_temperature);
  p.vec4 = p.cols % 4 == 0 && p.probs_ld % 4 == 0 && reinterpret_cast<uintptr_t>(p.scores) % 16 == 0 &&
           reinterpret_cast<uintptr_t>(p.probs) % (4 * probs.element_size()) == 0;
  // written over the scores (the fused forward); infonce_check_chunk_grad asserted the row-by-row layout
  p.in_place = probs.data_ptr() == scores.data_ptr();
  cuda::infonce_chunk_grad_launch(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The GEMM forward's elementwise pass (infonce_gemm.h) on the CUDA kernel of infonce.cu.
void cuda_chunk_lse(Tensor& scores, Tensor& run_max, Tensor& run_sum, Tensor& target, int64_t col0,
                    int64_t group_size, double inv_temperature) {
  infonce_check_chunk_lse(scores, run_max, run_sum, target);
  TORCH_INTERNAL_ASSERT(scores.scalar_type() == at::kFloat, "infonce: the chunk kernels read fp32 scores");
  cuda::InfoNCEChunkLseParams p{};
  p.scores = scores.data_ptr<float>();
  p.run_max = run_max.data_ptr<float>();
  p.run_sum = run_sum.data_ptr<float>();
  p.target = target.data_ptr<float>();
  p.rows = scores.size(0);
  p.cols = scores.size(1);
  p.col0 = col0;
  p.G = group_size;
  p.inv_temperature = static_cast<float>(inv_temperature);
  p.vec4 = p.cols % 4 == 0 && reinterpret_cast<uintptr_t>(p.scores) % 16 == 0;
  cuda::infonce_chunk_lse_launch(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<Tensor, Tensor> infonce_fwd_cuda(const Tensor& queries, const Tensor& docs, int64_t group_size,
                                            double temperature, bool in_batch_negatives) {
  check_inputs(queries, docs, group_size, temperature, in_batch_negatives);
  const c10::cuda::CUDAGuard guard(queries.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = queries.options().dtype(at::kFloat);
  const int64_t B = queries.size(0);
  if (in_batch_negatives && std::string_view(infonce_fwd_choice(kInfonceGemmFwdDefault &&
                                                                queries.scalar_type() != at::kFloat)) == "gemm") {
    NVE_CHECK_VALUE(B <= int64_t{0x7fffffff}, kOp, "queries.size(0)=", B, " is too large for the gemm forward");
    return infonce_fwd_gemm(queries.contiguous(), docs.contiguous(), group_size, temperature, &cuda_chunk_lse);
  }
  Tensor lse = at::empty({B}, f32);
  Tensor row_loss = at::empty({B}, f32);
  if (use_tensor_cores(queries, docs, in_batch_negatives)) {
    const int64_t d8 = round_up8(queries.size(1));
    const Tensor q = tc_operand(queries, d8);
    const Tensor dc = tc_operand(docs, d8);
    auto p = make_params(q, dc, group_size, temperature, in_batch_negatives);
    p.lse = lse.data_ptr<float>();
    p.row_loss = row_loss.data_ptr<float>();
    cuda::InfoNCETCPlan plan = cuda::infonce_tc_plan(p, queries.get_device());
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(queries.get_device());
    plan.sm90_fwd = std::string_view(infonce_fwd_kernel_for(prop->major, prop->minor)) == "sm90";
    Tensor ws = at::empty({2 * plan.fwd_part_floats + B}, f32);
    float* w = ws.data_ptr<float>();
    const cuda::InfoNCETCWorkspace workspace{w, w + plan.fwd_part_floats, w + 2 * plan.fwd_part_floats, nullptr,
                                             nullptr};
    cuda::infonce_tc_fwd_launch(p, plan, workspace, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {row_loss.mean(), lse};
  }
  const Tensor q = queries.contiguous();
  const Tensor dc = docs.contiguous();
  auto p = make_params(q, dc, group_size, temperature, in_batch_negatives);
  p.lse = lse.data_ptr<float>();
  p.row_loss = row_loss.data_ptr<float>();
  cuda::infonce_fwd_launch(p, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {row_loss.mean(), lse};
}

std::tuple<Tensor, Tensor> infonce_bwd_cuda(const Tensor& grad_loss, const Tensor& queries, const Tensor& docs,
                                            const Tensor& lse, int64_t group_size, double temperature,
                                            bool in_batch_negatives) {
  check_inputs(queries, docs, group_size, temperature, in_batch_negatives);
  infonce_check_bwd_inputs(grad_loss, queries, lse);
  const c10::cuda::CUDAGuard guard(queries.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = queries.options().dtype(at::kFloat);
  const int64_t B = queries.size(0);
  const Tensor lse_c = lse.to(at::kFloat).contiguous();
  const Tensor g = grad_loss.reshape({}).to(at::kFloat).contiguous();  // stays on the device: no host sync
  const bool low_precision = queries.scalar_type() != at::kFloat;
  if (in_batch_negatives &&
      std::string_view(infonce_bwd_choice(kInfonceGemmBwdVerified && low_precision)) == "gemm") {
    NVE_CHECK_VALUE(B <= int64_t{0x7fffffff}, kOp, "queries.size(0)=", B, " is too large for the gemm backward");
    return infonce_bwd_gemm(g, queries.contiguous(), docs.contiguous(), lse_c, group_size, temperature,
                            &cuda_chunk_grad);
  }
  if (use_tensor_cores(queries, docs, in_batch_negatives)) {
    const int64_t d = queries.size(1), d8 = round_up8(d);
    const Tensor q = tc_operand(queries, d8);
    const Tensor dc = tc_operand(docs, d8);
    Tensor grad_q = at::empty(q.sizes(), q.options());
    Tensor grad_d = at::empty(dc.sizes(), dc.options());
    auto p = make_params(q, dc, group_size, temperature, in_batch_negatives);
    p.lse_in = lse_c.data_ptr<float>();
    p.grad_loss = g.data_ptr<float>();
    p.grad_queries_out = grad_q.data_ptr();
    p.grad_docs_out = grad_d.data_ptr();
    const cuda::InfoNCETCPlan plan = cuda::infonce_tc_plan(p, queries.get_device());
    // one allocation: scratch | per-split neg sums | neg_prob_sum (every element is written before it is read)
    Tensor ws = at::empty({plan.scratch_floats + plan.part_negsum_floats + B}, f32);
    float* w = ws.data_ptr<float>();
    p.neg_prob_sum = w + plan.scratch_floats + plan.part_negsum_floats;
    const cuda::InfoNCETCWorkspace workspace{nullptr, nullptr, nullptr, w, w + plan.scratch_floats};
    cuda::infonce_tc_bwd_launch(p, plan, workspace, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (d8 != d) return {grad_q.narrow(1, 0, d).contiguous(), grad_d.narrow(1, 0, d).contiguous()};
    return {grad_q, grad_d};
  }
  const Tensor q = queries.contiguous();
  const Tensor dc = docs.contiguous();
  Tensor grad_q = at::zeros(q.sizes(), f32);
  Tensor grad_d = at::zeros(dc.sizes(), f32);
  auto p = make_params(q, dc, group_size, temperature, in_batch_negatives);
  p.lse_in = lse_c.data_ptr<float>();
  p.grad_loss = g.data_ptr<float>();
  p.grad_queries = grad_q.data_ptr<float>();
  p.grad_docs = grad_d.data_ptr<float>();
  Tensor neg_prob_sum = at::empty({B}, f32);  // every row written by the dQ kernel before it is read
  p.neg_prob_sum = neg_prob_sum.data_ptr<float>();
  cuda::infonce_bwd_launch(p, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_q.to(queries.scalar_type()), grad_d.to(docs.scalar_type())};
}

std::tuple<Tensor, Tensor, Tensor> infonce_fwd_grad_cuda(const Tensor& queries, const Tensor& docs,
                                                         int64_t group_size, double temperature,
                                                         bool in_batch_negatives) {
  check_inputs(queries, docs, group_size, temperature, in_batch_negatives);
  const c10::cuda::CUDAGuard guard(queries.device());
  if (in_batch_negatives) {
    NVE_CHECK_VALUE(queries.size(0) <= int64_t{0x7fffffff}, kOp, "queries.size(0)=", queries.size(0),
                    " is too large for the fused forward");
    return infonce_fwd_grad_gemm(queries.contiguous(), docs.contiguous(), group_size, temperature, &cuda_chunk_lse,
                                 &cuda_chunk_grad);
  }
  auto [loss, lse] = infonce_fwd_cuda(queries, docs, group_size, temperature, in_batch_negatives);
  auto [grad_q, grad_d] = infonce_bwd_cuda(at::ones({}, loss.options()), queries, docs, lse, group_size, temperature,
                                           in_batch_negatives);
  return {loss, grad_q, grad_d};
}

}  // namespace nvembed
