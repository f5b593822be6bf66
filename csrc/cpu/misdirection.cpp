// CPU kernels of the misdirection family (semantics in cuda_launchers.h).
//
// The same bits on every instruction set and thread count (rules in cpu_vec.h). Arithmetic is
// in at::opmath_type (fp32 for fp32/bf16/fp16, fp64 for the fp64 inputs that gradcheck uses),
// in blocks of kLanes = 16 lanes (bf16/fp16 rows converted on load and store), with an
// explicit multiply then add (never fused). A row's loss is accumulated lane by lane (element
// j in lane j mod 16, the tail block zero-filled) and the 16 lanes are added in cpu_vec.h's
// fixed tree; rows are cut into fixed chunks of kRowsPerChunk, each chunk's row sums are added
// in double in row order, and the chunk partials in chunk order.
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

// A per-feature fp32 vector (or `fill` when undefined) as acc_t, zero-padded to whole blocks
// so the row loops load whole blocks of it.
template <typename acc_t>
std::vector<acc_t> padded(const at::Tensor& v, int64_t d, acc_t fill) {
  std::vector<acc_t> out(padded_length(d), acc_t(0));
  const float* p = v.defined() ? v.data_ptr<float>() : nullptr;
  for (int64_t j = 0; j < d; ++j) out[j] = p ? static_cast<acc_t>(p[j]) : fill;
  return out;
}

// One valid row: returns sum_j [w_j (s dc_j)^2 + (1 - w_j) (s da_j)^2] with s = sqrt(scale)
// (the terms are scaled before summing, so a loss that fits is finite), and writes
// grad_j = 2 scale (w_j dc_j + (1 - w_j) da_j) when kGrad; dc = h - control, da = h - anchor
// (da = 0 without an anchor). w, omw and c are zero-padded to whole blocks.
template <typename scalar_t, bool kAnchor, bool kGrad>
typename Io<scalar_t>::A misdirection_row(const scalar_t* hrow, const scalar_t* arow,
                                          const typename Io<scalar_t>::A* w,
                                          const typename Io<scalar_t>::A* omw,
                                          const typename Io<scalar_t>::A* c, int64_t d,
                                          typename Io<scalar_t>::A root_scale,
                                          typename Io<scalar_t>::A two_scale, scalar_t* grow) {
  using A = typename Io<scalar_t>::A;
  using L = Lanes<A>;
  const L rs(root_scale), ts(two_scale);
  L sum(A(0));
  for (int64_t j = 0; j < d; j += kLanes) {
    const int64_t n = d - j;
    const L x = load_block(hrow + j, n);
    const L wj = L::load(w + j);
    const L dc = x - L::load(c + j);
    const L sc = dc * rs;
    sum = sum + (wj * sc) * sc;
    L g = wj * dc;
    if constexpr (kAnchor) {
      const L o = L::load(omw + j);
      const L da = x - load_block(arow + j, n);
      const L sa = da * rs;
      sum = sum + (o * sa) * sa;
      g = g + o * da;
    }
    if constexpr (kGrad) store_block(grow + j, n, ts * g);
  }
  return reduce_lanes(sum);
}

template <typename scalar_t, bool kAnchor, bool kGrad>
double misdirection_impl(const at::Tensor& h, const at::Tensor& control,
                         const at::Tensor& importance, const at::Tensor& anchor,
                         const at::Tensor& mask, double scale, const at::Tensor& grad) {
  using acc_t = typename Io<scalar_t>::A;
  const int64_t n = h.size(0), d = h.size(1);
  const scalar_t* hp = h.data_ptr<scalar_t>();
  const int64_t hs = h.stride(0);
  const scalar_t* ap = kAnchor ? anchor.data_ptr<scalar_t>() : nullptr;
  const int64_t as = kAnchor ? anchor.stride(0) : 0;
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  scalar_t* gp = kGrad ? grad.data_ptr<scalar_t>() : nullptr;
  // Weight of the control term: importance, 1 (control only) or 0 (anchor only).
  const std::vector<acc_t> w =
      padded<acc_t>(importance, d, control.defined() ? acc_t(1) : acc_t(0));
  std::vector<acc_t> omw(w.size(), acc_t(0));
  for (int64_t j = 0; j < d; ++j) omw[j] = acc_t(1) - w[j];
  const std::vector<acc_t> c = padded<acc_t>(control, d, acc_t(0));
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

// out = h + alpha m (control - h) on valid rows (computed as (alpha m) (control - h) + h, the
// product rounded before the add), h on masked rows.
template <typename scalar_t>
void masked_edit_impl(const at::Tensor& h, const at::Tensor& importance,
                      const at::Tensor& control, double alpha_in, const at::Tensor& mask,
                      const at::Tensor& out) {
  using acc_t = typename Io<scalar_t>::A;
  using L = Lanes<acc_t>;
  const acc_t alpha = static_cast<acc_t>(alpha_in);
  const int64_t n = h.size(0), d = h.size(1);
  const scalar_t* hp = h.data_ptr<scalar_t>();
  const int64_t hs = h.stride(0);
  std::vector<acc_t> am = padded<acc_t>(importance, d, acc_t(0));
  for (acc_t& v : am) v *= alpha;
  const std::vector<acc_t> c = padded<acc_t>(control, d, acc_t(0));
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
      for (int64_t j = 0; j < d; j += kLanes) {
        const L x = load_block(hrow + j, d - j);
        store_block(orow + j, d - j, L::load(am.data() + j) * (L::load(c.data() + j) - x) + x);
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
