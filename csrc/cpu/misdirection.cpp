// CPU kernels of the misdirection family (semantics in cuda_launchers.h).
//
// Arithmetic is in at::opmath_type (fp32 for fp32/bf16/fp16, fp64 for the fp64 inputs that
// gradcheck uses), on at::vec vectors of it (bf16/fp16 rows converted on load and store).
// Rows are cut into fixed chunks of kRowsPerChunk; each chunk's loss is summed in fp32 per
// row (vector lanes added in a fixed order) and in double across the chunk, and the chunk
// partials are added in order, so the result does not depend on the number of threads.
#include <cmath>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "cpu_kernels.h"
#include "cpu_vec.h"

namespace uk::cpu::CPU_CAPABILITY {

namespace {

constexpr int64_t kRowsPerChunk = 16;

int64_t num_chunks(int64_t n) { return (n + kRowsPerChunk - 1) / kRowsPerChunk; }

// A per-feature fp32 vector (or `fill` when undefined) as acc_t, zero-padded to a multiple
// of `step` so the row loops load whole vectors of it.
template <typename acc_t>
std::vector<acc_t> padded(const at::Tensor& v, int64_t d, int64_t step, acc_t fill) {
  std::vector<acc_t> out((d + step - 1) / step * step, acc_t(0));
  const float* p = v.defined() ? v.data_ptr<float>() : nullptr;
  for (int64_t j = 0; j < d; ++j) out[j] = p ? static_cast<acc_t>(p[j]) : fill;
  return out;
}

// One valid row: returns sum_j [w_j (s dc_j)^2 + (1 - w_j) (s da_j)^2] with s = sqrt(scale)
// (the terms are scaled before summing, so a loss that fits is finite), and writes
// grad_j = 2 scale (w_j dc_j + (1 - w_j) da_j) when kGrad; dc = h - control, da = h - anchor
// (da = 0 without an anchor).
template <typename scalar_t, bool kAnchor, bool kGrad>
typename Io<scalar_t>::A misdirection_row(const scalar_t* hrow, const scalar_t* arow,
                                          const typename Io<scalar_t>::A* w,
                                          const typename Io<scalar_t>::A* omw,
                                          const typename Io<scalar_t>::A* c, int64_t d,
                                          typename Io<scalar_t>::A root_scale,
                                          typename Io<scalar_t>::A two_scale, scalar_t* grow) {
  using IO = Io<scalar_t>;
  using V = typename IO::V;
  constexpr int64_t L = V::size();
  const V rs(root_scale), ts(two_scale);
  V sum0(0), sum1(0);
  for (int64_t j = 0; j < d; j += IO::kStep) {
    const int64_t n = std::min<int64_t>(IO::kStep, d - j);
    V x0, x1;
    load2(hrow + j, n, x0, x1);
    const V w0 = V::loadu(w + j), w1 = V::loadu(w + j + L);
    const V dc0 = x0 - V::loadu(c + j), dc1 = x1 - V::loadu(c + j + L);
    const V sc0 = dc0 * rs, sc1 = dc1 * rs;
    sum0 = at::vec::fmadd(w0 * sc0, sc0, sum0);
    sum1 = at::vec::fmadd(w1 * sc1, sc1, sum1);
    V g0 = w0 * dc0, g1 = w1 * dc1;
    if constexpr (kAnchor) {
      V a0, a1;
      load2(arow + j, n, a0, a1);
      const V o0 = V::loadu(omw + j), o1 = V::loadu(omw + j + L);
      const V da0 = x0 - a0, da1 = x1 - a1;
      const V sa0 = da0 * rs, sa1 = da1 * rs;
      sum0 = at::vec::fmadd(o0 * sa0, sa0, sum0);
      sum1 = at::vec::fmadd(o1 * sa1, sa1, sum1);
      g0 = at::vec::fmadd(o0, da0, g0);
      g1 = at::vec::fmadd(o1, da1, g1);
    }
    if constexpr (kGrad) store2(grow + j, n, ts * g0, ts * g1);
  }
  return sum_lanes(sum0 + sum1);
}

template <typename scalar_t, bool kAnchor, bool kGrad>
double misdirection_impl(const at::Tensor& h, const at::Tensor& control,
                         const at::Tensor& importance, const at::Tensor& anchor,
                         const at::Tensor& mask, double scale, const at::Tensor& grad) {
  using acc_t = typename Io<scalar_t>::A;
  constexpr int64_t kStep = Io<scalar_t>::kStep;
  const int64_t n = h.size(0), d = h.size(1);
  const scalar_t* hp = h.data_ptr<scalar_t>();
  const int64_t hs = h.stride(0);
  const scalar_t* ap = kAnchor ? anchor.data_ptr<scalar_t>() : nullptr;
  const int64_t as = kAnchor ? anchor.stride(0) : 0;
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  scalar_t* gp = kGrad ? grad.data_ptr<scalar_t>() : nullptr;
  // Weight of the control term: importance, 1 (control only) or 0 (anchor only).
  const std::vector<acc_t> w =
      padded<acc_t>(importance, d, kStep, control.defined() ? acc_t(1) : acc_t(0));
  std::vector<acc_t> omw(w.size(), acc_t(0));
  for (int64_t j = 0; j < d; ++j) omw[j] = acc_t(1) - w[j];
  const std::vector<acc_t> c = padded<acc_t>(control, d, kStep, acc_t(0));
  const acc_t two_scale = static_cast<acc_t>(2 * scale);
  const acc_t root_scale = static_cast<acc_t>(std::sqrt(scale));
  std::vector<double> partials(num_chunks(n), 0.0);

  at::parallel_for(0, num_chunks(n), 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      double chunk_sum = 0.0;
      const int64_t row_end = std::min(n, (chunk + 1) * kRowsPerChunk);
      for (int64_t i = chunk * kRowsPerChunk; i < row_end; ++i) {
        scalar_t* grow = kGrad ? gp + i * d : nullptr;
        if (mp && !mp[i]) {
          if constexpr (kGrad) std::fill(grow, grow + d, scalar_t(0.f));
          continue;
        }
        chunk_sum += static_cast<double>(misdirection_row<scalar_t, kAnchor, kGrad>(
            hp + i * hs, kAnchor ? ap + i * as : nullptr, w.data(), omw.data(), c.data(), d,
            root_scale, two_scale, grow));
      }
      partials[chunk] = chunk_sum;
    }
  });
  double total = 0.0;
  for (double p : partials) total += p;
  return total;
}

// out = h + alpha m (control - h) on valid rows (computed as fma(alpha m, control - h, h)),
// h on masked rows.
template <typename scalar_t>
void masked_edit_impl(const at::Tensor& h, const at::Tensor& importance,
                      const at::Tensor& control, double alpha_in, const at::Tensor& mask,
                      const at::Tensor& out) {
  using IO = Io<scalar_t>;
  using acc_t = typename IO::A;
  using V = typename IO::V;
  constexpr int64_t L = V::size();
  const acc_t alpha = static_cast<acc_t>(alpha_in);
  const int64_t n = h.size(0), d = h.size(1);
  const scalar_t* hp = h.data_ptr<scalar_t>();
  const int64_t hs = h.stride(0);
  std::vector<acc_t> am = padded<acc_t>(importance, d, IO::kStep, acc_t(0));
  for (acc_t& v : am) v *= alpha;
  const std::vector<acc_t> c = padded<acc_t>(control, d, IO::kStep, acc_t(0));
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
      for (int64_t j = 0; j < d; j += IO::kStep) {
        const int64_t m = std::min<int64_t>(IO::kStep, d - j);
        V x0, x1;
        load2(hrow + j, m, x0, x1);
        const V y0 = at::vec::fmadd(V::loadu(am.data() + j), V::loadu(c.data() + j) - x0, x0);
        const V y1 = at::vec::fmadd(V::loadu(am.data() + j + L), V::loadu(c.data() + j + L) - x1, x1);
        store2(orow + j, m, y0, y1);
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
    if (anchor.defined()) {
      loss = grad.defined()
          ? misdirection_impl<scalar_t, true, true>(h, control, importance, anchor, mask, scale, grad)
          : misdirection_impl<scalar_t, true, false>(h, control, importance, anchor, mask, scale, grad);
    } else {
      loss = grad.defined()
          ? misdirection_impl<scalar_t, false, true>(h, control, importance, anchor, mask, scale, grad)
          : misdirection_impl<scalar_t, false, false>(h, control, importance, anchor, mask, scale, grad);
    }
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
