// CPU kernel of the per-class feature means and counts.
//
// The same bits on every instruction set and thread count (rules in cpu_vec.h): every mean is
// a per-feature sum over the rows in their original order of x * (1 / count), the product
// rounded before the add (never fused); the vector width and the column tiling only decide
// how many features are worked on at once.
//
// Counts in one sequential pass over the labels (checking their range). The sums run in
// parallel over column tiles (whole kLanes blocks wide), one per thread, in blocks of kLanes
// lanes (bf16/fp16 converted to fp32 on load): a task walks every row in order and adds
// the row's slice, times 1 / count of its label, to its label's accumulator row
// ([classes][width] for the tile): scaling before summing keeps every partial sum within the
// range of the values (a convex combination), so a mean that fits in fp32 is finite even
// for rows near 3e38. Empty classes get zeros. Each sum is over the rows in their
// original order whatever the tiling, so the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "class_means_cpu.h"
#include "cpu_vec.h"

namespace uk::cpu::CPU_CAPABILITY {

namespace {

constexpr int64_t kMinWidth = 64;  // columns per task, at least

template <typename scalar_t>
void means_impl(const at::Tensor& x, const int64_t* label, const int64_t* count,
                int64_t classes, const at::Tensor& means_out) {
  using acc_t = typename Io<scalar_t>::A;
  using L = Lanes<acc_t>;
  const int64_t n = x.size(0), d = x.size(1), xs = x.stride(0);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  acc_t* means = means_out.data_ptr<acc_t>();
  const int64_t threads = at::get_num_threads();
  const int64_t width = padded_length(std::max(kMinWidth, (d + threads - 1) / threads));
  const int64_t tiles = (d + width - 1) / width;
  std::vector<acc_t> inv(classes);
  for (int64_t c = 0; c < classes; ++c)
    inv[c] = count[c] > 0 ? acc_t(1) / static_cast<acc_t>(count[c]) : acc_t(0);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(classes * width);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t c0 = tile * width, w = std::min(width, d - c0);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t i = 0; i < n; ++i) {
        const scalar_t* row = xp + i * xs + c0;
        acc_t* a = acc.data() + label[i] * width;
        const L s(inv[label[i]]);
        for (int64_t j = 0; j < w; j += kLanes)  // the accumulator rows are whole blocks
          (L::load(a + j) + load_block(row + j, w - j) * s).store(a + j);
      }
      for (int64_t c = 0; c < classes; ++c)
        for (int64_t j = 0; j < w; ++j) means[c * d + c0 + j] = acc[c * width + j];
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
  if (x.size(1) == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "class_means_cpu", [&] {
    means_impl<scalar_t>(x, label, count, classes, means);
  });
}

}  // namespace uk::cpu::CPU_CAPABILITY
