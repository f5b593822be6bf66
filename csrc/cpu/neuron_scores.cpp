// CPU kernel of the Optimal-Brain-Damage neuron scores, forget and retain in one pass:
//   dim 0: s_i = 1/2 sum_j h_ij w_ij^2      dim 1: s_j = 1/2 sum_i h_ij w_ij^2
//
// The same bits on every instruction set and thread count (rules in cpu_vec.h): fp32
// arithmetic (fp64 for fp64 weights) in blocks of kLanes = 16 lanes, bf16/fp16 converted on
// load, every h w^2 computed as (w * w) then h * that then an add, never fused.
// dim 0: rows in parallel; a row is summed lane by lane (element j in lane j mod 16, the tail
// block zero-filled) and the 16 lanes are added in cpu_vec.h's fixed tree. dim 1: the matrix
// is cut into fixed row parts x column tiles (a function of the shape only); a task adds its
// rows in order into its part's partial columns, block by block along the row (element-wise,
// so the width does not matter); the parts are then added in order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "cpu_vec.h"
#include "neuron_scores_cpu.h"

namespace uk::cpu::CPU_CAPABILITY {

namespace {

constexpr int64_t kRowGrainElems = 1 << 15;  // dim 0: elements per parallel task at least
constexpr int64_t kTileCols = 512;           // dim 1: columns per task
constexpr int64_t kPartRows = 256;           // dim 1: rows per part at least
constexpr int64_t kMaxParts = 16;

template <typename W, typename H>
using acc_of = std::conditional_t<std::is_same_v<W, double>, double, float>;

struct Sums {
  double forget, retain;
};

// A block of T as lanes of acc_t: in place when T's arithmetic type is acc_t, else (fp32
// Hessians of fp64 weights) widened element by element (exact).
template <typename acc_t, typename T>
inline Lanes<acc_t> load_as(const T* p, int64_t remaining) {
  if constexpr (std::is_same_v<typename Io<T>::A, acc_t>) {
    return load_block(p, remaining);
  } else {
    acc_t tmp[kLanes] = {};
    for (int64_t e = 0; e < std::min<int64_t>(remaining, kLanes); ++e) tmp[e] = static_cast<acc_t>(p[e]);
    return Lanes<acc_t>::load(tmp);
  }
}

// sum_j h_j w_j^2 over one row for hf and (if hr) hr, in 16 lanes added in the fixed tree.
template <typename W, typename H>
Sums row_sums(const W* w, const H* hf, const H* hr, int64_t n) {
  using acc_t = acc_of<W, H>;
  using L = Lanes<acc_t>;
  L f(acc_t(0)), r(acc_t(0));
  for (int64_t j = 0; j < n; j += kLanes) {
    const L x = load_block(w + j, n - j);
    const L q = x * x;
    f = f + load_as<acc_t>(hf + j, n - j) * q;
    if (hr) r = r + load_as<acc_t>(hr + j, n - j) * q;
  }
  return {static_cast<double>(reduce_lanes(f)), static_cast<double>(reduce_lanes(r))};
}

// acc[j] += h[j] * w[j]^2 for j in [0, n).
template <typename W, typename H, typename acc_t>
void add_scores(acc_t* __restrict acc, const W* __restrict w, const H* __restrict h, int64_t n) {
  using L = Lanes<acc_t>;
  for (int64_t j = 0; j < n; j += kLanes) {
    const L x = load_block(w + j, n - j);
    store_block(acc + j, n - j, load_block(acc + j, n - j) + load_as<acc_t>(h + j, n - j) * (x * x));
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
