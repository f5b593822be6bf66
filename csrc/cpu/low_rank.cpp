// CPU kernels of the low-rank family.
//
// low_rank_project: y = x - s (x U) U^T, row block by row block. A block of kBlockElems
// elements (512 KiB in fp32, inside a core's L2) is converted to the accumulation type once, then
//   c_blk = x_blk U                       (at::mm)
//   y_blk = x_blk - s c_blk U^T           (at::addmm, the subtraction fused as beta = 1)
// so x is read from memory once and y written once, the block staying in the core's cache
// between the two products. Blocks run in parallel (at::parallel_for); the matrix products
// inside a parallel region run single-threaded, so there is no oversubscription.
//
// masked_gram: G = sum over kept rows of x_i^T x_i, accumulated chunk by chunk with
// at::addmm (multi-threaded BLAS) on fp32 copies of the kept rows of each chunk.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "low_rank_cpu.h"

namespace uk::cpu::CPU_CAPABILITY {

namespace {

constexpr int64_t kBlockElems = 1 << 17;    // elements of x per row block
constexpr int64_t kGramChunkRows = 4096;    // rows converted at once by masked_gram

int64_t block_rows(int64_t d) { return std::clamp<int64_t>(kBlockElems / std::max<int64_t>(d, 1), 4, 512); }

template <typename scalar_t>
void project_impl(const at::Tensor& x, const at::Tensor& basis, double scale,
                  const at::Tensor& y, const at::Tensor& coeffs) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr auto acc = c10::CppTypeToScalarType<acc_t>::value;
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  const int64_t n = x.size(0), d = x.size(1);
  const at::Tensor u = basis.to(acc).contiguous();
  const at::Tensor ut = u.t();
  const int64_t rows = block_rows(d);
  const int64_t blocks = (n + rows - 1) / rows;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t i0 = b * rows, m = std::min(rows, n - i0);
      const at::Tensor xb = x.narrow(0, i0, m);
      const at::Tensor xf = same ? xb : xb.to(acc);
      const at::Tensor c = at::mm(xf, u);
      if (coeffs.defined()) coeffs.narrow(0, i0, m).copy_(c);
      at::Tensor yb = y.narrow(0, i0, m);
      if constexpr (same) {
        at::addmm_out(yb, xf, c, ut, 1, -scale);
      } else {
        yb.copy_(at::addmm(xf, c, ut, 1, -scale));
      }
    }
  });
}

}  // namespace

void low_rank_project(const at::Tensor& x, const at::Tensor& basis, double scale,
                      const at::Tensor& y, const at::Tensor& coeffs) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "low_rank_project_cpu", [&] {
    project_impl<scalar_t>(x, basis, scale, y, coeffs);
  });
}

at::Tensor masked_gram(const at::Tensor& x, const at::Tensor& mask) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor gram = at::zeros({d, d}, x.options().dtype(acc));
  for (int64_t i0 = 0; i0 < n; i0 += kGramChunkRows) {
    const int64_t m = std::min(kGramChunkRows, n - i0);
    at::Tensor rows = x.narrow(0, i0, m);
    if (mask.defined()) rows = rows.index_select(0, at::nonzero(mask.narrow(0, i0, m)).view(-1));
    if (rows.size(0) == 0) continue;
    rows = rows.to(acc);
    gram.addmm_(rows.t(), rows);
  }
  return gram;
}

}  // namespace uk::cpu::CPU_CAPABILITY
