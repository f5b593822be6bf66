// CPU kernel of the Hessian-diagonal EMA, in place:
//   hess_i <- beta * hess_i + (1 - beta) * a_i * b_i        (b = a when absent)
// One pass over the flat elements in parallel ranges; each element is independent, so the
// result does not depend on the thread count, and computed as the same IEEE operations on
// every instruction set (rules in cpu_vec.h): beta * hess + (1 - beta) * (a * b), each
// product rounded before the add (never fused), in blocks of kLanes lanes (fp32, or fp64 when
// anything is fp64; bf16/fp16 converted on load and store).
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
  at::parallel_for(0, hess.numel(), kGrain, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<acc_t, typename Io<H>::A> && std::is_same_v<acc_t, typename Io<A>::A>) {
      using L = Lanes<acc_t>;
      const L vkeep(keep), vmix(mix);
      for (int64_t i = begin; i < end; i += kLanes) {
        const int64_t m = end - i;
        store_block(hp + i, m, vkeep * load_block(hp + i, m) + vmix * (load_block(ap + i, m) * load_block(bp + i, m)));
      }
    } else {  // fp32 state of fp64 a (or the reverse): element by element
      for (int64_t i = begin; i < end; ++i) {
        const acc_t x = static_cast<acc_t>(ap[i]);
        const acc_t y = static_cast<acc_t>(bp[i]);
        hp[i] = static_cast<H>(keep * static_cast<acc_t>(hp[i]) + mix * (x * y));
      }
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
