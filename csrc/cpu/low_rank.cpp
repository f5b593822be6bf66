// CPU kernels of the low-rank family.
//
// The same bits on every instruction set and thread count (rules in cpu_vec.h). That is why
// these are our own loops and not at::mm / at::addmm: the BLAS under them (MKL) picks its own
// kernels, blocking and fused multiply-adds per CPU, so its bits differ between an AVX2 and
// an AVX-512 machine. Arithmetic is fp32 (fp64 for fp64 x) in blocks of kLanes = 16 lanes,
// each product rounded before its add.
//
// low_rank_project: y = x - s (x U) U^T, rows in parallel, kRowTile rows at a time (each
// row's result depends on that row only). The basis is copied once per call as U^T [r][dp]
// in the accumulation type, zero-padded to dp = d rounded up to whole blocks; the rows are
// widened into zero-padded buffers, then
//   c_k = sum_j x_j U_jk      16-lane dot product (element j in lane j mod 16), the lanes
//                             added in cpu_vec.h's fixed tree
//   t_j = sum_k c_k U_jk      k in increasing order, element-wise along j
//   y_j = x_j - s t_j         (s t_j rounded first)
// Each block of U^T read serves the kRowTile rows; the rows stay in the core's cache, so x
// is read from memory once and y written once.
//
// masked_gram: G = sum over kept rows of x_i^T x_i, each entry summed over the kept rows in
// their original order. Kept rows are widened kGramChunkRows at a time into a zero-padded
// buffer; G's upper triangle is walked in tiles of 4 rows x 16 lanes (in parallel over the
// 4-row strips), a tile held in registers while the chunk's rows are added to it one by one
// (G_ab += x_a x_b), then the lower triangle is mirrored (x_a x_b == x_b x_a exactly).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu_vec.h"
#include "low_rank_cpu.h"

namespace uk::cpu::CPU_CAPABILITY {

namespace {

constexpr int64_t kRowGrain = 16;        // rows per parallel task at least (projection)
constexpr int64_t kRowTile = 4;          // rows projected together (projection)
static_assert(kRowTile == 4, "project_impl spells out its four rows");
constexpr int64_t kGramChunkRows = 128;  // kept rows widened at once by masked_gram
constexpr int64_t kGramStrip = 4;        // rows of G per register tile

template <typename scalar_t>
void project_impl(const at::Tensor& x, const at::Tensor& basis, double scale,
                  const at::Tensor& y, const at::Tensor& coeffs) {
  using acc_t = typename Io<scalar_t>::A;
  using L = Lanes<acc_t>;
  constexpr auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t n = x.size(0), d = x.size(1), r = basis.size(1);
  const int64_t dp = padded_length(d);
  const int64_t ld = dp + kLanes;  // U^T's row stride: one spare block, so that the r rows of
                                   // a column block do not all fall in one L1 cache set
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t xs = x.stride(0);
  scalar_t* yp = y.data_ptr<scalar_t>();
  acc_t* cp = coeffs.defined() ? coeffs.data_ptr<acc_t>() : nullptr;
  const at::Tensor u = basis.to(acc).contiguous();
  const acc_t* up = u.data_ptr<acc_t>();
  std::vector<acc_t> ut(r * ld, acc_t(0));  // U^T, rows zero-padded
  for (int64_t j = 0; j < d; ++j)
    for (int64_t k = 0; k < r; ++k) ut[k * ld + j] = up[j * r + k];
  const acc_t* utp = ut.data();
  const L s(static_cast<acc_t>(scale));

  // Rows in groups of kRowTile, so that each block of U^T read from the cache serves
  // kRowTile rows; a short last group computes on zero rows and stores nothing for them.
  const int64_t groups = (n + kRowTile - 1) / kRowTile;
  at::parallel_for(0, groups, std::max<int64_t>(1, kRowGrain / kRowTile), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> rows(kRowTile * dp), c(kRowTile * r);
    for (int64_t grp = begin; grp < end; ++grp) {
      const int64_t i0 = grp * kRowTile, live = std::min(kRowTile, n - i0);
      std::fill(rows.begin(), rows.end(), acc_t(0));
      for (int64_t q = 0; q < live; ++q) {
        const scalar_t* xi = xp + (i0 + q) * xs;
        for (int64_t j = 0; j < d; j += kLanes)
          store_block(rows.data() + q * dp + j, d - j, load_block(xi + j, d - j));
      }
      const acc_t* x0 = rows.data();
      const acc_t* x1 = x0 + dp;
      const acc_t* x2 = x0 + 2 * dp;
      const acc_t* x3 = x0 + 3 * dp;
      for (int64_t k = 0; k < r; ++k) {  // c_k = sum_j x_j U_jk, four rows at once
        const acc_t* uk = utp + k * ld;
        L a0(acc_t(0)), a1(acc_t(0)), a2(acc_t(0)), a3(acc_t(0));
        for (int64_t j = 0; j < dp; j += kLanes) {
          const L uv = L::load(uk + j);
          a0 = a0 + L::load(x0 + j) * uv;
          a1 = a1 + L::load(x1 + j) * uv;
          a2 = a2 + L::load(x2 + j) * uv;
          a3 = a3 + L::load(x3 + j) * uv;
        }
        c[k] = reduce_lanes(a0);
        c[r + k] = reduce_lanes(a1);
        c[2 * r + k] = reduce_lanes(a2);
        c[3 * r + k] = reduce_lanes(a3);
      }
      if (cp)
        for (int64_t q = 0; q < live; ++q) std::copy(c.begin() + q * r, c.begin() + (q + 1) * r, cp + (i0 + q) * r);
      const acc_t* c0 = c.data();
      for (int64_t j = 0; j < d; j += kLanes) {  // t_j = sum_k c_k U_jk; y = x - s t
        L t0(acc_t(0)), t1(acc_t(0)), t2(acc_t(0)), t3(acc_t(0));
        for (int64_t k = 0; k < r; ++k) {
          const L uv = L::load(utp + k * ld + j);
          t0 = t0 + L(c0[k]) * uv;
          t1 = t1 + L(c0[r + k]) * uv;
          t2 = t2 + L(c0[2 * r + k]) * uv;
          t3 = t3 + L(c0[3 * r + k]) * uv;
        }
        const L* t[kRowTile] = {&t0, &t1, &t2, &t3};
        for (int64_t q = 0; q < live; ++q)
          store_block(yp + (i0 + q) * d + j, d - j, L::load(rows.data() + q * dp + j) - s * *t[q]);
      }
    }
  });
}

template <typename scalar_t>
void gram_impl(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& gram) {
  using acc_t = typename Io<scalar_t>::A;
  using L = Lanes<acc_t>;
  const int64_t n = x.size(0), d = x.size(1);
  const int64_t dp = padded_length(d);  // also a multiple of kGramStrip
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t xs = x.stride(0);
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  std::vector<acc_t> g(dp * dp, acc_t(0));  // G, rows and columns zero-padded to dp
  std::vector<acc_t> rows(kGramChunkRows * dp, acc_t(0));
  const int64_t strips = dp / kGramStrip;
  int64_t i = 0;
  while (i < n) {
    int64_t m = 0;  // kept rows in this chunk
    for (; i < n && m < kGramChunkRows; ++i) {
      if (mp && !mp[i]) continue;
      const scalar_t* xi = xp + i * xs;
      acc_t* dst = rows.data() + m * dp;
      for (int64_t j = 0; j < d; j += kLanes) store_block(dst + j, d - j, load_block(xi + j, d - j));
      ++m;
    }
    if (m == 0) break;
    at::parallel_for(0, strips, 1, [&](int64_t begin, int64_t end) {
      for (int64_t strip = begin; strip < end; ++strip) {
        const int64_t a0 = strip * kGramStrip;
        acc_t* g0 = g.data() + a0 * dp;
        for (int64_t b = a0 / kLanes * kLanes; b < dp; b += kLanes) {
          L t0 = L::load(g0 + b), t1 = L::load(g0 + dp + b);
          L t2 = L::load(g0 + 2 * dp + b), t3 = L::load(g0 + 3 * dp + b);
          for (int64_t q = 0; q < m; ++q) {
            const acc_t* xq = rows.data() + q * dp;
            const L xb = L::load(xq + b);
            t0 = t0 + L(xq[a0]) * xb;
            t1 = t1 + L(xq[a0 + 1]) * xb;
            t2 = t2 + L(xq[a0 + 2]) * xb;
            t3 = t3 + L(xq[a0 + 3]) * xb;
          }
          t0.store(g0 + b);
          t1.store(g0 + dp + b);
          t2.store(g0 + 2 * dp + b);
          t3.store(g0 + 3 * dp + b);
        }
      }
    });
  }
  acc_t* out = gram.data_ptr<acc_t>();
  for (int64_t a = 0; a < d; ++a)
    for (int64_t b = a; b < d; ++b) out[a * d + b] = out[b * d + a] = g[a * dp + b];
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
  const int64_t d = x.size(1);
  at::Tensor gram = at::empty({d, d}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_gram_cpu", [&] {
    gram_impl<scalar_t>(x, mask, gram);
  });
  return gram;
}

}  // namespace uk::cpu::CPU_CAPABILITY
