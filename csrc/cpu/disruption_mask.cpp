// CPU kernel of the disruption mask (MUDMAN), elementwise:
//   agree_i = (g_i > 0 and r_i > 0) or (g_i < 0 and r_i < 0)     (g_i * r_i > 0, exactly)
//   out_i   = agree_i ? scale * g_i : 0          kept = number of agreeing i
// The sign test is made on the signs, never on a rounded product (which could underflow to 0
// for tiny g and r); NaN agrees with nothing. scale * g_i is one multiply in the arithmetic
// type (fp32 for fp32 / bf16 / fp16, fp64 for fp64), rounded once to the storage type, so
// every instruction set gives the same bits. The count is an integer sum (exact, any order).
// at::vec over the body in blocks of kLanes (cpu_vec.h's Lanes, whatever the vector width), a
// scalar tail; being elementwise, it has no reduction order to fix.
#include <ATen/Parallel.h>

#include <functional>
#include <type_traits>

#include "cpu_vec.h"
#include "disruption_mask_cpu.h"

namespace uk::cpu::CPU_CAPABILITY {

namespace {

constexpr int64_t kGrain = 1 << 15;

template <typename A>
inline bool agree(A g, A r) {
  return (g > A(0) && r > A(0)) || (g < A(0) && r < A(0));
}

// Masks each lane of `g * s` by the sign agreement of g and r; adds the kept lanes to `kept`.
template <typename A>
inline Vectorized<A> masked(const Vectorized<A>& g, const Vectorized<A>& r, const Vectorized<A>& s,
                            int64_t& kept) {
  using V = Vectorized<A>;
  const V zero(A(0));
  const V same = ((g > zero) & (r > zero)) | ((g < zero) & (r < zero));  // all-ones lanes
  // zero_mask: a bit per lane that is all-zero (disagreeing lanes)
  kept += V::size() - __builtin_popcount(static_cast<unsigned>(same.zero_mask()));
  return V::blendv(zero, g * s, same);
}

template <typename T>
int64_t mask_impl(const at::Tensor& grad, const at::Tensor& retain, double scale,
                  const at::Tensor& out) {
  using A = typename Io<T>::A;
  using L = Lanes<A>;
  using V = Vectorized<A>;
  const T* gp = grad.data_ptr<T>();
  const T* rp = retain.data_ptr<T>();
  T* op = out.data_ptr<T>();  // may be gp (in place): each block loads before it stores
  const A s = static_cast<A>(scale);
  return at::parallel_reduce(0, grad.numel(), kGrain, int64_t{0},
      [&](int64_t begin, int64_t end, int64_t) {
        int64_t kept = 0;
        int64_t i = begin;
        const V vs(s);
        for (; i + kLanes <= end; i += kLanes) {
          const L g = Io<T>::load(gp + i), r = Io<T>::load(rp + i);
          L o;
          for (int k = 0; k < L::kVecs; ++k) o.v[k] = masked(g.v[k], r.v[k], vs, kept);
          Io<T>::store(op + i, o);
        }
        for (; i < end; ++i) {
          const A g = static_cast<A>(gp[i]);
          const bool ok = agree(g, static_cast<A>(rp[i]));
          kept += ok;
          op[i] = static_cast<T>(ok ? s * g : A(0));
        }
        return kept;
      },
      std::plus<int64_t>());
}

}  // namespace

int64_t disruption_mask(const at::Tensor& grad, const at::Tensor& retain, double scale,
                        const at::Tensor& out) {
  switch (grad.scalar_type()) {
    case at::kFloat: return mask_impl<float>(grad, retain, scale, out);
    case at::kDouble: return mask_impl<double>(grad, retain, scale, out);
    case at::kBFloat16: return mask_impl<c10::BFloat16>(grad, retain, scale, out);
    case at::kHalf: return mask_impl<c10::Half>(grad, retain, scale, out);
    default: TORCH_CHECK(false, "disruption_mask: unsupported dtype ", grad.scalar_type());
  }
}

}  // namespace uk::cpu::CPU_CAPABILITY
