// CPU launcher of nvembed::_infonce_fwd / _infonce_bwd: argument checks, dtype conversion, dispatch to the
// torch-free kernels in cpu/infonce.h.
#include "cpu/infonce.h"

#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>

#include <limits>
#include <string_view>

#include "checks.h"
#include "infonce_gemm.h"
#include "ops.h"

namespace nvembed {

namespace {
constexpr const char* kOp = "infonce";

}  // namespace

// Every check on (queries, docs, group_size, temperature, in_batch_negatives).
// docs = [B*G grouped rows | E >= 0 extra rows]. The extra rows are negatives for every query, which only the
// in-batch softmax (over all N = B*G + E docs) can use; the own-group softmax reads exactly the G rows of each
// query, so there extra rows would be ignored silently and are rejected instead.
void infonce_check_inputs(const Tensor& queries, const Tensor& docs, int64_t group_size, double temperature,
                          std::initializer_list<at::ScalarType> dtypes, bool in_batch_negatives) {
  check_rank(queries, kOp, "queries", 2, "[B, d]");
  check_rank(docs, kOp, "docs", 2, "[B*G + E, d]");
  check_same_device(docs, queries, kOp, "docs", "queries");
  check_dtype(queries, kOp, "queries", dtypes);
  check_same_dtype(docs, queries, kOp, "docs", "queries");
  NVE_CHECK_VALUE(group_size >= 1, kOp, "group_size must be >= 1, got ", group_size);
  check_finite_positive(temperature, kOp, "temperature");
  // the kernels scale by 1/t in float32 for float32 / bf16 / fp16 inputs: beyond its range the loss would be NaN
  NVE_CHECK_VALUE(queries.scalar_type() == at::kDouble || 1.0 / temperature <= std::numeric_limits<float>::max(),
                  kOp, "temperature=", temperature, " is too small for ", queries.scalar_type(),
                  " inputs: 1/temperature must be within float32's range");
  const int64_t B = queries.size(0), N = docs.size(0);
  NVE_CHECK_VALUE(B > 0, kOp, "queries.size(0) must be > 0 (empty batch)");
  NVE_CHECK_VALUE(docs.size(1) == queries.size(1), kOp, "docs.size(1)=", docs.size(1),
                  " is not queries.size(1)=", queries.size(1));
  // The kernels index docs[i*G]: a product that wraps around would pass the size checks below.
  int64_t BG = 0;
  NVE_CHECK_VALUE(!c10::mul_overflows(B, group_size, &BG), kOp, "queries.size(0)*group_size overflows int64 (",
                  "queries.size(0)=", B, ", group_size=", group_size, ")");
  if (in_batch_negatives) {
    NVE_CHECK_VALUE(N >= BG, kOp, "docs.size(0)=", N, " is less than queries.size(0)*group_size=", BG,
                    " (docs holds the B*G grouped docs, then any extra negatives)");
  } else {
    NVE_CHECK_VALUE(N == BG, kOp, "docs.size(0)=", N, " is not queries.size(0)*group_size=", BG,
                    N > BG ? " (extra negative docs need in_batch_negatives=True)" : "");
  }
}

// Checks of the backward's extra arguments against the (already checked) inputs.
void infonce_check_bwd_inputs(const Tensor& grad_loss, const Tensor& queries, const Tensor& lse) {
  NVE_CHECK_VALUE(grad_loss.numel() == 1, kOp, "grad_loss must hold one element, got shape ", grad_loss.sizes());
  check_same_device(grad_loss, queries, kOp, "grad_loss", "queries");
  check_same_device(lse, queries, kOp, "lse", "queries");
  NVE_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == queries.size(0), kOp, "lse must have shape [B]=[",
                  queries.size(0), "], got ", lse.sizes());
  check_dtype(lse, kOp, "lse", {at::kFloat, at::kDouble});
}

namespace {

template <typename T>
cpu::InfoNCEParams<T> make_params(const Tensor& q, const Tensor& docs, int64_t group_size, double temperature,
                                  bool in_batch_negatives) {
  cpu::InfoNCEParams<T> p{};
  p.queries = q.data_ptr<T>();
  p.docs = docs.data_ptr<T>();
  p.B = q.size(0);
  p.N = docs.size(0);
  p.d = q.size(1);
  p.G = group_size;
  p.inv_temperature = static_cast<T>(1.0 / temperature);
  p.in_batch_negatives = in_batch_negatives;
  return p;
}

}  // namespace

std::tuple<Tensor, Tensor> infonce_fwd_cpu(const Tensor& queries, const Tensor& docs, int64_t group_size,
                                           double temperature, bool in_batch_negatives) {
  infonce_check_inputs(queries, docs, group_size, temperature, cpu_dtypes(), in_batch_negatives);
  NVE_CHECK_VALUE(queries.device().is_cpu(), kOp, "queries must be a CPU tensor here, got ", queries.device());
  if (in_batch_negatives && std::string_view(infonce_fwd_choice(false)) == "gemm") {
    // the CUDA GEMM forward's loop on CPU tensors (NVEMBED_INFONCE_FWD=gemm): its tests
    return infonce_fwd_gemm(queries.contiguous(), docs.contiguous(), group_size, temperature, nullptr);
  }
  const auto acc = accum_dtype(queries.scalar_type());
  const Tensor q = queries.contiguous().to(acc);
  const Tensor dc = docs.contiguous().to(acc);
  const int64_t B = q.size(0);
  Tensor lse = at::empty({B}, q.options());
  Tensor loss;
  AT_DISPATCH_FLOATING_TYPES(acc, "nvembed_infonce_fwd_cpu", [&] {
    std::vector<scalar_t> row_loss(B);
    auto p = make_params<scalar_t>(q, dc, group_size, temperature, in_batch_negatives);
    p.lse = lse.data_ptr<scalar_t>();
    p.row_loss = row_loss.data();
    cpu::infonce_fwd(p);
    double total = 0;  // a fixed-order double sum: the loss does not depend on the thread count
    for (auto v : row_loss) total += static_cast<double>(v);
    loss = at::scalar_tensor(total / static_cast<double>(B), q.options());
  });
  return {loss, lse};
}

std::tuple<Tensor, Tensor> infonce_bwd_cpu(const Tensor& grad_loss, const Tensor& queries, const Tensor& docs,
                                           const Tensor& lse, int64_t group_size, double temperature,
                                           bool in_batch_negatives) {
  infonce_check_inputs(queries, docs, group_size, temperature, cpu_dtypes(), in_batch_negatives);
  infonce_check_bwd_inputs(grad_loss, queries, lse);
  NVE_CHECK_VALUE(queries.device().is_cpu(), kOp, "queries must be a CPU tensor here, got ", queries.device());
  if (in_batch_negatives && std::string_view(infonce_bwd_choice(false)) == "gemm") {
    // the CUDA blocked-GEMM backward's loop on CPU tensors (NVEMBED_INFONCE_BWD=gemm): its tests
    return infonce_bwd_gemm(grad_loss, queries.contiguous(), docs.contiguous(), lse, group_size, temperature,
                            nullptr);
  }
  const auto acc = accum_dtype(queries.scalar_type());
  const Tensor q = queries.contiguous().to(acc);
  const Tensor dc = docs.contiguous().to(acc);
  const Tensor lse_c = lse.contiguous().to(acc);
  const int64_t B = q.size(0);
  const double g = grad_loss.item<double>();
  Tensor grad_q = at::zeros_like(q);
  Tensor grad_d = at::zeros_like(dc);
  AT_DISPATCH_FLOATING_TYPES(acc, "nvembed_infonce_bwd_cpu", [&] {
    auto p = make_params<scalar_t>(q, dc, group_size, temperature, in_batch_negatives);
    p.lse_in = lse_c.data_ptr<scalar_t>();
    p.grad_scale = static_cast<scalar_t>(g / (static_cast<double>(B) * temperature));
    p.grad_queries = grad_q.data_ptr<scalar_t>();
    p.grad_docs = grad_d.data_ptr<scalar_t>();
    std::vector<scalar_t> neg_prob_sum(B, scalar_t(0));
    p.neg_prob_sum = neg_prob_sum.data();
    cpu::infonce_bwd(p);
  });
  return {grad_q.to(queries.scalar_type()), grad_d.to(docs.scalar_type())};
}

std::tuple<Tensor, Tensor, Tensor> infonce_fwd_grad_cpu(const Tensor& queries, const Tensor& docs,
                                                        int64_t group_size, double temperature,
                                                        bool in_batch_negatives) {
  infonce_check_inputs(queries, docs, group_size, temperature, cpu_dtypes(), in_batch_negatives);
  NVE_CHECK_VALUE(queries.device().is_cpu(), kOp, "queries must be a CPU tensor here, got ", queries.device());
  if (in_batch_negatives) {
    // the CUDA path's loop on CPU tensors, with ATen's elementwise passes (its tests; the CPU default is the
    // tile kernels' forward and backward, faster here)
    return infonce_fwd_grad_gemm(queries.contiguous(), docs.contiguous(), group_size, temperature, nullptr, nullptr);
  }
  auto [loss, lse] = infonce_fwd_cpu(queries, docs, group_size, temperature, in_batch_negatives);
  auto [grad_q, grad_d] = infonce_bwd_cpu(at::ones({}, loss.options()), queries, docs, lse, group_size, temperature,
                                          in_batch_negatives);
  return {loss, grad_q, grad_d};
}

}  // namespace nvembed
