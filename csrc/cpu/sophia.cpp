// CPU kernel of the fused masked Sophia-G step (math in sophia.h).
//
// The same bits on every instruction set (rules in cpu_vec.h): the update is element-wise
// IEEE arithmetic on fp32 lanes, each operation rounded on its own (never fused), the clamp a
// compare-and-select that keeps a NaN ratio's own bits (at::vec::minimum would not: it makes
// every NaN all-ones on AVX2/AVX-512 only).
//
// The tensors are cut into chunks of kGrain elements, numbered across the whole list, and
// one at::parallel_for runs over all the chunks, so small and large tensors share the
// threads. Within a chunk the elements are walked row segment by row segment in blocks of
// kLanes fp32 lanes: a kRows segment is skipped or updated whole, a kCols segment is updated whole
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

// The Sophia-G element update (sophia.h) on one vector of fp32 lanes.
inline void sophia_vector(Vectorized<float>& p, const Vectorized<float>& g, Vectorized<float>& m,
                          const Vectorized<float>& h, const SophiaHyper& hp) {
  using V = Vectorized<float>;
  const V one(1.f), zero(0.f);
  p = p * V(hp.decay);
  m = V(hp.beta1) * m + V(hp.one_minus_beta1) * g;
  const V raw = m.abs() / (V(hp.rho_bs) * h + V(hp.eps));
  const V ratio = V::blendv(raw, one, raw > one);  // min(raw, 1); NaN stays
  const V sign = ((m > zero) & one) - ((m < zero) & one);
  p = p - V(hp.lr) * sign * ratio;
}

// n consecutive elements in blocks of kLanes fp32 lanes (bf16/fp16 converted on load and
// store); with `keep` (fp32 lanes, all bits set where the element is selected, 0 elsewhere)
// the new p and m are blended with the old ones, so unselected elements keep their exact
// values.
template <typename P, typename S>
void update_run(P* __restrict__ p, const P* __restrict__ g, S* __restrict__ m,
                const S* __restrict__ h, const float* __restrict__ keep, int64_t n,
                const SophiaHyper& hp) {
  using L = Lanes<float>;
  for (int64_t j = 0; j < n; j += kLanes) {
    const int64_t k = n - j;
    const L p0 = load_block(p + j, k), g0 = load_block(g + j, k);
    const L m0 = load_block(m + j, k), h0 = load_block(h + j, k);
    L q = p0, s = m0;
    for (int v = 0; v < L::kVecs; ++v) sophia_vector(q.v[v], g0.v[v], s.v[v], h0.v[v], hp);
    if (keep != nullptr) {
      const L sel = load_block(keep + j, k);
      for (int v = 0; v < L::kVecs; ++v) {
        q.v[v] = Vectorized<float>::blendv(p0.v[v], q.v[v], sel.v[v]);
        s.v[v] = Vectorized<float>::blendv(m0.v[v], s.v[v], sel.v[v]);
      }
    }
    store_block(p + j, k, q);
    store_block(m + j, k, s);
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
