// CPU kernels of the statistics family (semantics in cuda_launchers.h).
//
// The same bits on every instruction set and thread count (rules in cpu_vec.h): every sum
// below is per feature, over rows in a fixed order, so the vector width only decides how
// many features are worked on at once; the kernel sources are compiled with
// -ffp-contract=off, so the compiler's vectorisation of the fp64 loops never fuses a
// multiply-add, and the ranges and tiles are functions of the shape only.
//
// masked_moments splits the rows into kParts fixed ranges (so the result does not depend on
// the thread count). Everything is accumulated in fp64 (whatever the input type) and rounded
// to fp32 once at the end: at mean/sigma = 1e6 an fp32 tile mean would lose the variance, and
// rows near 3e38 would overflow an fp32 sum although their mean fits. An M2 beyond fp32's
// range comes out as +inf (never NaN). Each range is walked in tiles of kTileRows rows: a tile's column sums
// give its mean, a second sweep over the same cache-resident tile gives its centred M2, and
// the tile is merged into the range's running (count, mean, M2) with Chan's formula
//   n = na + nb,  mean = mean_a + (mean_b - mean_a) nb / n,
//   M2 = M2a + M2b + (mean_b - mean_a)^2 na nb / n.
// The ranges are then merged in order the same way.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "cpu_kernels.h"
#include "cpu_vec.h"

namespace uk::cpu::CPU_CAPABILITY {

namespace {

constexpr int64_t kParts = 64;
constexpr int64_t kTileRows = 32;

struct Running {
  std::vector<double> mean, m2;
  int64_t count = 0;
  explicit Running(int64_t d) : mean(d, 0.0), m2(d, 0.0) {}

  void merge(int64_t nb, const double* mean_b, const double* m2_b) {
    if (nb == 0) return;
    const int64_t n = count + nb;
    const double fb = static_cast<double>(nb) / n;
    const double cross = static_cast<double>(count) * nb / n;
    for (size_t j = 0; j < mean.size(); ++j) {
      const double delta = mean_b[j] - mean[j];
      mean[j] += delta * fb;
      m2[j] += m2_b[j] + delta * delta * cross;
    }
    count = n;
  }
};

// Rows as F (float, or double for fp64 input): fp32/fp64 rows are read in place, bf16/fp16
// rows are converted (exactly) into `buf` first. The fp64 sums below are plain element-wise
// loops over contiguous F rows that the compiler vectorises for the ISA of this variant
// (the same IEEE operations per element whatever the width).
template <typename scalar_t>
using row_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
const row_t<scalar_t>* row_as_float(const scalar_t* row, int64_t d, row_t<scalar_t>* buf) {
  if constexpr (std::is_same_v<scalar_t, row_t<scalar_t>>) {
    return row;
  } else {
    for (int64_t j = 0; j < d; j += kLanes) store_block(buf + j, d - j, load_block(row + j, d - j));
    return buf;
  }
}

template <typename F>
void add_row(double* __restrict sum, const F* __restrict row, int64_t d) {
  for (int64_t j = 0; j < d; ++j) sum[j] += static_cast<double>(row[j]);
}

template <typename F>
void add_centred_squares(double* __restrict m2, const F* __restrict row,
                         const double* __restrict mean, int64_t d) {
  for (int64_t j = 0; j < d; ++j) {
    const double c = static_cast<double>(row[j]) - mean[j];
    m2[j] += c * c;
  }
}

template <typename scalar_t>
int64_t moments_impl(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& mean_out,
                     const at::Tensor& m2_out) {
  using F = row_t<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<scalar_t, F>;
  const int64_t n = x.size(0), d = x.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t xs = x.stride(0);
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const int64_t part_rows = std::max<int64_t>(kTileRows, (n + kParts - 1) / kParts);
  const int64_t parts = n == 0 ? 0 : (n + part_rows - 1) / part_rows;
  std::vector<Running> results(parts, Running(0));

  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> tile_mean(d), tile_m2(d);
    std::vector<F> buf(kConvert ? kTileRows * d : 0);
    std::vector<const F*> rows;
    rows.reserve(kTileRows);
    for (int64_t p = begin; p < end; ++p) {
      Running run(d);
      const int64_t stop = std::min(n, (p + 1) * part_rows);
      for (int64_t t0 = p * part_rows; t0 < stop; t0 += kTileRows) {
        rows.clear();
        for (int64_t i = t0; i < std::min(stop, t0 + kTileRows); ++i)
          if (!mp || mp[i])
            rows.push_back(row_as_float(xp + i * xs, d, buf.data() + rows.size() * d));
        if (rows.empty()) continue;
        std::fill(tile_mean.begin(), tile_mean.end(), 0.0);
        for (const F* row : rows) add_row(tile_mean.data(), row, d);
        const double inv = 1.0 / static_cast<double>(rows.size());
        for (int64_t j = 0; j < d; ++j) tile_mean[j] *= inv;
        std::fill(tile_m2.begin(), tile_m2.end(), 0.0);
        for (const F* row : rows) add_centred_squares(tile_m2.data(), row, tile_mean.data(), d);
        run.merge(static_cast<int64_t>(rows.size()), tile_mean.data(), tile_m2.data());
      }
      results[p] = std::move(run);
    }
  });

  Running total(d);
  for (const Running& r : results) total.merge(r.count, r.mean.data(), r.m2.data());
  float* mean = mean_out.data_ptr<float>();
  float* m2 = m2_out.data_ptr<float>();
  for (int64_t j = 0; j < d; ++j) {
    mean[j] = static_cast<float>(total.mean[j]);
    m2[j] = static_cast<float>(total.m2[j]);
  }
  return total.count;
}

}  // namespace

int64_t masked_moments(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& mean,
                       const at::Tensor& m2) {
  int64_t count = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_moments_cpu", [&] {
    count = moments_impl<scalar_t>(x, mask, mean, m2);
  });
  return count;
}

void feature_scores(const at::Tensor& mean_f, const at::Tensor& var_f,
                    const at::Tensor& mean_r, const at::Tensor& var_r, double eps,
                    const at::Tensor& scores) {
  const float* mf = mean_f.data_ptr<float>();
  const float* vf = var_f.data_ptr<float>();
  const float* mr = mean_r.data_ptr<float>();
  const float* vr = var_r.data_ptr<float>();
  float* s = scores.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, mean_f.size(0), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const float delta = mf[j] - mr[j];
      s[j] = delta * delta / (vf[j] + vr[j] + e);
    }
  });
}

}  // namespace uk::cpu::CPU_CAPABILITY
