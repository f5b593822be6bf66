// CPU kernel of the Hessian-diagonal EMA, in place:
//   hess_i <- beta * hess_i + (1 - beta) * a_i * b_i        (b = a when absent)
// One pass over the flat elements in parallel ranges; each element is independent, so the
// result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "cpu_vec.h"
#include "hessian_cpu.h"

namespace uk::cpu::CPU_CAPABILITY {

namespace {

constexpr int64_t kGrain = 1 << 15;

template <typename H, typename A>
void ema_impl(const at::Tensor& hess, const at::Tensor& a, const at::Tensor& b, double beta) {
  using acc_t = std::conditional_t<std::is_same_v<H, double> || std::is_same_v<A, double>,
                                   double, float>;
  H* hp = hess.data_ptr<H>();
  const A* ap = a.data_ptr<A>();
  const A* bp = b.defined() ? b.data_ptr<A>() : ap;
  const acc_t keep = static_cast<acc_t>(beta);
  const acc_t mix = static_cast<acc_t>(1.0 - beta);
  // fp32 arithmetic on at::vec vectors (bf16/fp16 converted on load and store); anything
  // with fp64 stays a scalar loop.
  constexpr bool kVector = std::is_same_v<acc_t, float>;
  at::parallel_for(0, hess.numel(), kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    if constexpr (kVector) {
      using V = Vectorized<float>;
      const V vkeep(keep), vmix(mix);
      for (; i < end; i += Io<H>::kStep) {
        const int64_t m = std::min<int64_t>(Io<H>::kStep, end - i);
        V h0, h1, x0, x1, y0, y1;
        load2(hp + i, m, h0, h1);
        load2(ap + i, m, x0, x1);
        load2(bp + i, m, y0, y1);
        store2(hp + i, m, vkeep * h0 + vmix * (x0 * y0), vkeep * h1 + vmix * (x1 * y1));
      }
    }
    for (; i < end; ++i) {
      const acc_t x = static_cast<acc_t>(ap[i]);
      const acc_t y = static_cast<acc_t>(bp[i]);
      hp[i] = static_cast<H>(keep * static_cast<acc_t>(hp[i]) + mix * (x * y));
    }
  });
}

}  // namespace

void hessian_ema(const at::Tensor& hess, const at::Tensor& a, const at::Tensor& b, double beta) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "hessian_ema_cpu", [&] {
    if (hess.scalar_type() == at::kFloat) {
      ema_impl<float, scalar_t>(hess, a, b, beta);
    } else {
      ema_impl<scalar_t, scalar_t>(hess, a, b, beta);
    }
  });
}

}  // namespace uk::cpu::CPU_CAPABILITY
