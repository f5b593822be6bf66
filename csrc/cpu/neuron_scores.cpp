// CPU kernel of the Optimal-Brain-Damage neuron scores, forget and retain in one pass:
//   dim 0: s_i = 1/2 sum_j h_ij w_ij^2      dim 1: s_j = 1/2 sum_i h_ij w_ij^2
//
// dim 0: rows in parallel; a row is summed in the lanes of two at::vec vectors (kLanes
// interleaved scalar accumulators for fp64) combined in a fixed order. dim 1: the matrix is cut into
// fixed row parts x column tiles (a function of the shape only); a task adds its rows into
// its part's partial columns, vectorised along the row (at::vec); the parts are then added in
// order. Both orders are fixed, so the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "cpu_vec.h"
#include "neuron_scores_cpu.h"

namespace uk::cpu::CPU_CAPABILITY {

namespace {

constexpr int kLanes = 8;
constexpr int64_t kRowGrainElems = 1 << 15;  // dim 0: elements per parallel task at least
constexpr int64_t kTileCols = 512;           // dim 1: columns per task
constexpr int64_t kPartRows = 256;           // dim 1: rows per part at least
constexpr int64_t kMaxParts = 16;

template <typename W, typename H>
using acc_of = std::conditional_t<std::is_same_v<W, double>, double, float>;

struct Sums {
  double forget, retain;
};

// sum_j h_j w_j^2 over one row for hf and (if hr) hr: at::vec lanes for fp32 arithmetic
// (bf16/fp16 converted on load; two vectors of lanes combined in a fixed order at the end),
// kLanes interleaved scalar accumulators for fp64.
template <typename W, typename H>
Sums row_sums(const W* w, const H* hf, const H* hr, int64_t n) {
  using acc_t = acc_of<W, H>;
  if constexpr (std::is_same_v<acc_t, float>) {
    static_assert(Io<W>::kStep == Io<H>::kStep, "weights and Hessians move in steps of one size");
    using V = Vectorized<float>;
    V f0(0.f), f1(0.f), r0(0.f), r1(0.f);
    for (int64_t j = 0; j < n; j += Io<W>::kStep) {
      const int64_t k = std::min<int64_t>(Io<W>::kStep, n - j);
      V w0, w1, h0, h1;
      load2(w + j, k, w0, w1);
      load2(hf + j, k, h0, h1);
      const V q0 = w0 * w0, q1 = w1 * w1;
      f0 = at::vec::fmadd(h0, q0, f0);
      f1 = at::vec::fmadd(h1, q1, f1);
      if (hr) {
        load2(hr + j, k, h0, h1);
        r0 = at::vec::fmadd(h0, q0, r0);
        r1 = at::vec::fmadd(h1, q1, r1);
      }
    }
    return {static_cast<double>(sum_lanes(f0 + f1)), static_cast<double>(sum_lanes(r0 + r1))};
  } else {
    acc_t f[kLanes] = {}, r[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int k = 0; k < kLanes; ++k) {
        const acc_t x = static_cast<acc_t>(w[j + k]);
        const acc_t x2 = x * x;
        f[k] += static_cast<acc_t>(hf[j + k]) * x2;
        if (hr) r[k] += static_cast<acc_t>(hr[j + k]) * x2;
      }
    }
    for (; j < n; ++j) {
      const acc_t x = static_cast<acc_t>(w[j]);
      f[0] += static_cast<acc_t>(hf[j]) * x * x;
      if (hr) r[0] += static_cast<acc_t>(hr[j]) * x * x;
    }
    for (int width = kLanes / 2; width > 0; width /= 2) {
      for (int k = 0; k < width; ++k) {
        f[k] += f[k + width];
        r[k] += r[k + width];
      }
    }
    return {static_cast<double>(f[0]), static_cast<double>(r[0])};
  }
}

// acc[j] += h[j] * w[j]^2 for j in [0, n) (fp32 lanes; scalar for fp64).
template <typename W, typename H, typename acc_t>
void add_scores(acc_t* __restrict acc, const W* __restrict w, const H* __restrict h, int64_t n) {
  int64_t j = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    using V = Vectorized<float>;
    for (; j + Io<W>::kStep <= n; j += Io<W>::kStep) {
      V w0, w1, h0, h1, a0, a1;
      Io<W>::load(w + j, w0, w1);
      Io<H>::load(h + j, h0, h1);
      Io<float>::load(acc + j, a0, a1);
      Io<float>::store(acc + j, at::vec::fmadd(h0, w0 * w0, a0), at::vec::fmadd(h1, w1 * w1, a1));
    }
  }
  for (; j < n; ++j) {
    const acc_t x = static_cast<acc_t>(w[j]);
    acc[j] += static_cast<acc_t>(h[j]) * (x * x);
  }
}

template <typename W, typename H, typename S>
void rows_impl(const at::Tensor& weight, const at::Tensor& hf, const at::Tensor& hr, S* sf,
               S* sr) {
  const int64_t rows = weight.size(0), cols = weight.size(1);
  const W* wp = weight.data_ptr<W>();
  const H* fp = hf.data_ptr<H>();
  const H* rp = hr.defined() ? hr.data_ptr<H>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, kRowGrainElems / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Sums s = row_sums(wp + i * weight.stride(0), fp + i * hf.stride(0),
                              rp ? rp + i * hr.stride(0) : nullptr, cols);
      sf[i] = static_cast<S>(0.5 * s.forget);
      if (sr) sr[i] = static_cast<S>(0.5 * s.retain);
    }
  });
}

template <typename W, typename H, typename S>
void cols_impl(const at::Tensor& weight, const at::Tensor& hf, const at::Tensor& hr, S* sf,
               S* sr) {
  using acc_t = acc_of<W, H>;
  const int64_t rows = weight.size(0), cols = weight.size(1);
  const W* wp = weight.data_ptr<W>();
  const H* fp = hf.data_ptr<H>();
  const H* rp = hr.defined() ? hr.data_ptr<H>() : nullptr;
  const int64_t parts = std::clamp<int64_t>(rows / kPartRows, 1, kMaxParts);
  const int64_t part_rows = (rows + parts - 1) / parts;
  const int64_t tiles = (cols + kTileCols - 1) / kTileCols;
  std::vector<acc_t> pf(parts * cols, acc_t(0)), pr(rp ? parts * cols : 0, acc_t(0));
  at::parallel_for(0, parts * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t part = task / tiles, c0 = task % tiles * kTileCols;
      const int64_t c1 = std::min(cols, c0 + kTileCols);
      acc_t* f = pf.data() + part * cols;
      acc_t* r = rp ? pr.data() + part * cols : nullptr;
      for (int64_t i = part * part_rows; i < std::min(rows, (part + 1) * part_rows); ++i) {
        const W* w = wp + i * weight.stride(0);
        const H* hfi = fp + i * hf.stride(0);
        const H* hri = rp ? rp + i * hr.stride(0) : nullptr;
        add_scores(f + c0, w + c0, hfi + c0, c1 - c0);
        if (r) add_scores(r + c0, w + c0, hri + c0, c1 - c0);
      }
    }
  });
  for (int64_t j = 0; j < cols; ++j) {
    acc_t f = 0, r = 0;
    for (int64_t p = 0; p < parts; ++p) {
      f += pf[p * cols + j];
      if (sr) r += pr[p * cols + j];
    }
    sf[j] = static_cast<S>(acc_t(0.5) * f);
    if (sr) sr[j] = static_cast<S>(acc_t(0.5) * r);
  }
}

template <typename W, typename H>
void scores_impl(const at::Tensor& weight, const at::Tensor& hf, const at::Tensor& hr,
                 int64_t dim, const at::Tensor& s_forget, const at::Tensor& s_retain) {
  using S = acc_of<W, H>;
  S* sf = s_forget.data_ptr<S>();
  S* sr = s_retain.defined() ? s_retain.data_ptr<S>() : nullptr;
  if (dim == 0) {
    rows_impl<W, H, S>(weight, hf, hr, sf, sr);
  } else {
    cols_impl<W, H, S>(weight, hf, hr, sf, sr);
  }
}

}  // namespace

void neuron_scores(const at::Tensor& weight, const at::Tensor& hess_forget,
                   const at::Tensor& hess_retain, int64_t dim, const at::Tensor& s_forget,
                   const at::Tensor& s_retain) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "neuron_scores_cpu", [&] {
    if (hess_forget.scalar_type() == at::kFloat && weight.scalar_type() != at::kFloat) {
      scores_impl<scalar_t, float>(weight, hess_forget, hess_retain, dim, s_forget, s_retain);
    } else {
      scores_impl<scalar_t, scalar_t>(weight, hess_forget, hess_retain, dim, s_forget, s_retain);
    }
  });
}

}  // namespace uk::cpu::CPU_CAPABILITY
