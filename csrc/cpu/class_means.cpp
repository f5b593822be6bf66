// CPU kernel of the per-class feature means and counts.
//
// A stable counting sort of the row indices by label (sequential, O(n)), then parallel
// tasks over (class, column tile): a task adds its class's rows of its columns in sorted
// (= original) order into an accumulator and divides by the count. Empty classes get zeros.
// The order of every sum is fixed, so the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "class_means_cpu.h"

namespace uk::cpu {

namespace {

constexpr int64_t kTileCols = 512;

template <typename scalar_t>
void means_impl(const at::Tensor& x, const std::vector<int64_t>& start,
                const std::vector<int64_t>& perm, const at::Tensor& means_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t d = x.size(1), xs = x.stride(0);
  const int64_t classes = static_cast<int64_t>(start.size()) - 1;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  acc_t* means = means_out.data_ptr<acc_t>();
  const int64_t tiles = (d + kTileCols - 1) / kTileCols;
  at::parallel_for(0, classes * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(kTileCols);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / tiles, c0 = task % tiles * kTileCols;
      const int64_t width = std::min(kTileCols, d - c0);
      std::fill(acc.begin(), acc.begin() + width, acc_t(0));
      for (int64_t p = start[c]; p < start[c + 1]; ++p) {
        const scalar_t* row = xp + perm[p] * xs + c0;
        for (int64_t j = 0; j < width; ++j) acc[j] += static_cast<acc_t>(row[j]);
      }
      const int64_t count = start[c + 1] - start[c];
      const acc_t inv = count > 0 ? acc_t(1) / static_cast<acc_t>(count) : acc_t(0);
      acc_t* out = means + c * d + c0;
      for (int64_t j = 0; j < width; ++j) out[j] = acc[j] * inv;
    }
  });
}

}  // namespace

void class_means(const at::Tensor& x, const at::Tensor& labels, int64_t classes,
                 const at::Tensor& means, const at::Tensor& counts) {
  const int64_t n = x.size(0);
  const int64_t* label = labels.data_ptr<int64_t>();
  int64_t* count = counts.data_ptr<int64_t>();
  std::fill(count, count + classes, int64_t{0});
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(label[i] >= 0 && label[i] < classes, "labels must lie in [0, ", classes,
                "), found ", label[i]);
    ++count[label[i]];
  }
  std::vector<int64_t> start(classes + 1, 0), perm(n);
  for (int64_t c = 0; c < classes; ++c) start[c + 1] = start[c] + count[c];
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < n; ++i) perm[next[label[i]]++] = i;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "class_means_cpu", [&] {
    means_impl<scalar_t>(x, start, perm, means);
  });
}

}  // namespace uk::cpu
