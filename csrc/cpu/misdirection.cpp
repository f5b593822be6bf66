// CPU kernels of the misdirection family (semantics in cuda_launchers.h).
//
// Arithmetic is in at::opmath_type (fp32 for fp32/bf16/fp16, fp64 for the fp64 inputs that
// gradcheck uses). Rows are cut into fixed chunks of kRowsPerChunk; each chunk's loss is summed in fp32 per
// row and in double across the chunk, and the chunk partials are added in order, so the
// result does not depend on the number of threads.
#include <cmath>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "cpu_kernels.h"

namespace uk::cpu::CPU_CAPABILITY {

namespace {

constexpr int64_t kRowsPerChunk = 16;

int64_t num_chunks(int64_t n) { return (n + kRowsPerChunk - 1) / kRowsPerChunk; }

// Per-feature weight of the control term: importance, 1 (control only) or 0 (anchor only).
template <typename acc_t>
std::vector<acc_t> control_weights(const at::Tensor& control, const at::Tensor& importance,
                                   int64_t d) {
  if (importance.defined()) {
    const float* m = importance.data_ptr<float>();
    return std::vector<acc_t>(m, m + d);
  }
  return std::vector<acc_t>(d, control.defined() ? acc_t(1) : acc_t(0));
}

template <typename acc_t>
std::vector<acc_t> vector_or_zeros(const at::Tensor& v, int64_t d) {
  if (!v.defined()) return std::vector<acc_t>(d, acc_t(0));
  const float* p = v.data_ptr<float>();
  return std::vector<acc_t>(p, p + d);
}

template <typename scalar_t>
double misdirection_impl(const at::Tensor& h, const at::Tensor& control,
                         const at::Tensor& importance, const at::Tensor& anchor,
                         const at::Tensor& mask, double scale, const at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = h.size(0), d = h.size(1);
  const scalar_t* hp = h.data_ptr<scalar_t>();
  const int64_t hs = h.stride(0);
  const scalar_t* ap = anchor.defined() ? anchor.data_ptr<scalar_t>() : nullptr;
  const int64_t as = anchor.defined() ? anchor.stride(0) : 0;
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  scalar_t* gp = grad.defined() ? grad.data_ptr<scalar_t>() : nullptr;
  const std::vector<acc_t> w = control_weights<acc_t>(control, importance, d);
  const std::vector<acc_t> c = vector_or_zeros<acc_t>(control, d);
  const acc_t two_scale = static_cast<acc_t>(2 * scale);
  const acc_t root_scale = static_cast<acc_t>(std::sqrt(scale));  // terms scaled before summing
  std::vector<double> partials(num_chunks(n), 0.0);

  at::parallel_for(0, num_chunks(n), 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      double chunk_sum = 0.0;
      const int64_t row_end = std::min(n, (chunk + 1) * kRowsPerChunk);
      for (int64_t i = chunk * kRowsPerChunk; i < row_end; ++i) {
        scalar_t* grow = gp ? gp + i * d : nullptr;
        if (mp && !mp[i]) {
          if (grow) std::fill(grow, grow + d, scalar_t(0.f));
          continue;
        }
        const scalar_t* hrow = hp + i * hs;
        const scalar_t* arow = ap ? ap + i * as : nullptr;
        acc_t row_sum = 0;
        for (int64_t j = 0; j < d; ++j) {
          const acc_t x = static_cast<acc_t>(hrow[j]);
          const acc_t dc = x - c[j];
          const acc_t da = arow ? x - static_cast<acc_t>(arow[j]) : acc_t(0);
          const acc_t wj = w[j];
          const acc_t sc = dc * root_scale, sa = da * root_scale;
          row_sum += wj * sc * sc + (1 - wj) * sa * sa;
          if (grow) grow[j] = static_cast<scalar_t>(two_scale * (wj * dc + (1 - wj) * da));
        }
        chunk_sum += row_sum;
      }
      partials[chunk] = chunk_sum;
    }
  });
  double total = 0.0;
  for (double p : partials) total += p;
  return total;
}

template <typename scalar_t>
void masked_edit_impl(const at::Tensor& h, const at::Tensor& importance,
                      const at::Tensor& control, double alpha_in, const at::Tensor& mask,
                      const at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t alpha = static_cast<acc_t>(alpha_in);
  const int64_t n = h.size(0), d = h.size(1);
  const scalar_t* hp = h.data_ptr<scalar_t>();
  const int64_t hs = h.stride(0);
  const float* m = importance.data_ptr<float>();
  const float* c = control.data_ptr<float>();
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, n, kRowsPerChunk, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* hrow = hp + i * hs;
      scalar_t* orow = op + i * d;
      if (mp && !mp[i]) {
        std::copy(hrow, hrow + d, orow);
        continue;
      }
      for (int64_t j = 0; j < d; ++j) {
        const acc_t x = static_cast<acc_t>(hrow[j]);
        orow[j] = static_cast<scalar_t>(x + alpha * m[j] * (c[j] - x));
      }
    }
  });
}

}  // namespace

double misdirection_fwd_bwd(const at::Tensor& h, const at::Tensor& control,
                            const at::Tensor& importance, const at::Tensor& anchor,
                            const at::Tensor& mask, double scale, const at::Tensor& grad) {
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "misdirection_cpu", [&] {
    loss = misdirection_impl<scalar_t>(h, control, importance, anchor, mask, scale, grad);
  });
  return loss;
}

void masked_edit(const at::Tensor& h, const at::Tensor& importance, const at::Tensor& control,
                 double alpha, const at::Tensor& mask, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "masked_edit_cpu", [&] {
    masked_edit_impl<scalar_t>(h, importance, control, alpha, mask, out);
  });
}

}  // namespace uk::cpu::CPU_CAPABILITY
