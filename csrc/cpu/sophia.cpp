// CPU kernel of the fused masked Sophia-G step (math in sophia.h).
//
// The tensors are cut into chunks of kGrain elements, numbered across the whole list, and
// one at::parallel_for runs over all the chunks, so small and large tensors share the
// threads. Within a chunk the elements are walked row segment by row segment on at::vec
// fp32 vectors: a kRows segment is skipped or updated whole, a kCols segment is updated whole
// and blended with its old values by the column mask (precomputed once per call as fp32
// blend lanes). Per element: read p, g, m, h; write p, m.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_vec.h"
#include "sophia_cpu.h"

namespace uk::cpu::CPU_CAPABILITY {

namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task

// The Sophia-G element update (sophia.h) on vectors of fp32 lanes.
inline void sophia_vector(Vectorized<float>& p, const Vectorized<float>& g, Vectorized<float>& m,
                          const Vectorized<float>& h, const SophiaHyper& hp) {
  using V = Vectorized<float>;
  const V one(1.f);
  p = p * V(hp.decay);
  m = V(hp.beta1) * m + V(hp.one_minus_beta1) * g;
  const V ratio = at::vec::minimum(m.abs() / (V(hp.rho_bs) * h + V(hp.eps)), one);
  const V sign = ((m > V(0.f)) & one) - ((m < V(0.f)) & one);
  p = p - V(hp.lr) * sign * ratio;
}

// n consecutive elements on at::vec vectors (bf16/fp16 converted on load and store); with
// `keep` (fp32 lanes, all bits set where the element is selected, 0 elsewhere) the new p and
// m are blended with the old ones, so unselected elements keep their exact values.
template <typename P, typename S>
void update_run(P* __restrict__ p, const P* __restrict__ g, S* __restrict__ m,
                const S* __restrict__ h, const float* __restrict__ keep, int64_t n,
                const SophiaHyper& hp) {
  using V = Vectorized<float>;
  constexpr int64_t L = V::size();
  static_assert(Io<P>::kStep == Io<S>::kStep, "params and state move in steps of one size");
  for (int64_t j = 0; j < n; j += Io<P>::kStep) {
    const int64_t k = std::min<int64_t>(Io<P>::kStep, n - j);
    V p0, p1, g0, g1, m0, m1, h0, h1;
    load2(p + j, k, p0, p1);
    load2(g + j, k, g0, g1);
    load2(m + j, k, m0, m1);
    load2(h + j, k, h0, h1);
    V q0 = p0, q1 = p1, s0 = m0, s1 = m1;
    sophia_vector(q0, g0, s0, h0, hp);
    sophia_vector(q1, g1, s1, h1, hp);
    if (keep != nullptr) {
      const V k0 = V::loadu(keep + j, std::min<int64_t>(k, L));
      const V k1 = k > L ? V::loadu(keep + j + L, k - L) : V(0.f);
      q0 = V::blendv(p0, q0, k0);
      q1 = V::blendv(p1, q1, k1);
      s0 = V::blendv(m0, s0, k0);
      s1 = V::blendv(m1, s1, k1);
    }
    store2(p + j, k, q0, q1);
    store2(m + j, k, s0, s1);
  }
}

// Elements [begin, end) of one tensor.
template <typename P, typename S>
void update_range(const SophiaTensor& t, const float* keep, int64_t begin, int64_t end,
                  const SophiaHyper& hp) {
  auto* p = static_cast<P*>(t.param);
  const auto* g = static_cast<const P*>(t.grad);
  auto* m = static_cast<S*>(t.exp_avg);
  const auto* h = static_cast<const S*>(t.hessian);
  if (t.mode == MaskMode::kNone) {
    update_run<P, S>(p + begin, g + begin, m + begin, h + begin, nullptr, end - begin, hp);
    return;
  }
  int64_t row = begin / t.inner;
  int64_t col = begin - row * t.inner;
  for (int64_t i = begin; i < end; ++row, col = 0) {
    const int64_t stop = std::min(end, i + (t.inner - col));
    if (t.mode == MaskMode::kCols) {
      update_run<P, S>(p + i, g + i, m + i, h + i, keep + col, stop - i, hp);
    } else if (t.mask[row]) {
      update_run<P, S>(p + i, g + i, m + i, h + i, nullptr, stop - i, hp);
    }
    i = stop;
  }
}

template <typename P>
void update_param_typed(const SophiaTensor& t, const float* keep, int64_t begin, int64_t end,
                        const SophiaHyper& hp) {
  if (t.state_dtype == DType::F32) {
    update_range<P, float>(t, keep, begin, end, hp);
  } else {
    update_range<P, P>(t, keep, begin, end, hp);  // the ops layer allows only fp32 or the param dtype
  }
}

void update(const SophiaTensor& t, const float* keep, int64_t begin, int64_t end,
            const SophiaHyper& hp) {
  switch (t.param_dtype) {
    case DType::F32: update_range<float, float>(t, keep, begin, end, hp); break;
    case DType::BF16: update_param_typed<c10::BFloat16>(t, keep, begin, end, hp); break;
    case DType::F16: update_param_typed<c10::Half>(t, keep, begin, end, hp); break;
  }
}

// A kCols mask as fp32 blend lanes: all bits set where selected, 0 elsewhere.
std::vector<float> blend_lanes(const SophiaTensor& t) {
  std::vector<float> lanes(t.inner);
  uint32_t ones = ~uint32_t{0};
  float selected;
  std::memcpy(&selected, &ones, sizeof(float));
  for (int64_t j = 0; j < t.inner; ++j) lanes[j] = t.mask[j] ? selected : 0.f;
  return lanes;
}

}  // namespace

void masked_sophia_step(const SophiaTensor* tensors, int64_t count, const SophiaHyper& hyper) {
  std::vector<int64_t> first_chunk(count + 1, 0);  // chunks before tensor i
  for (int64_t i = 0; i < count; ++i)
    first_chunk[i + 1] = first_chunk[i] + (tensors[i].numel + kGrain - 1) / kGrain;
  std::vector<std::vector<float>> keep(count);  // blend lanes of the kCols masks
  for (int64_t i = 0; i < count; ++i)
    if (tensors[i].mode == MaskMode::kCols) keep[i] = blend_lanes(tensors[i]);
  at::parallel_for(0, first_chunk[count], 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      const int64_t i =
          std::upper_bound(first_chunk.begin(), first_chunk.end(), c) - first_chunk.begin() - 1;
      const SophiaTensor& t = tensors[i];
      const int64_t begin = (c - first_chunk[i]) * kGrain;
      update(t, keep[i].data(), begin, std::min(begin + kGrain, t.numel), hyper);
    }
  });
}

}  // namespace uk::cpu::CPU_CAPABILITY
