// CPU kernel of the fused masked Sophia-G step (math in sophia.h).
//
// The tensors are cut into chunks of kGrain elements, numbered across the whole list, and
// one at::parallel_for runs over all the chunks, so small and large tensors share the
// threads. Within a chunk the elements are walked row segment by row segment: a kRows
// segment is skipped or updated whole (a dense loop the compiler vectorises), a kCols
// segment reads the mask alongside the row. Per element: read p, g, m, h; write p, m.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "sophia_cpu.h"

namespace uk::cpu::CPU_CAPABILITY {

namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task

// n consecutive elements; with kMasked only those whose `selected` byte is set. (Computing
// every element and selecting the results measured 2x slower: the select stops GCC from
// vectorising, and the skipped elements cost nothing here.)
template <typename P, typename S, bool kMasked>
void update_run(P* __restrict__ p, const P* __restrict__ g, S* __restrict__ m,
                const S* __restrict__ h, const bool* __restrict__ selected, int64_t n,
                const SophiaHyper& hp) {
  for (int64_t j = 0; j < n; ++j) {
    if constexpr (kMasked) {
      if (!selected[j]) continue;
    }
    float pj = static_cast<float>(p[j]);
    float mj = static_cast<float>(m[j]);
    sophia_element(pj, static_cast<float>(g[j]), mj, static_cast<float>(h[j]), hp);
    p[j] = static_cast<P>(pj);
    m[j] = static_cast<S>(mj);
  }
}

// Elements [begin, end) of one tensor.
template <typename P, typename S>
void update_range(const SophiaTensor& t, int64_t begin, int64_t end, const SophiaHyper& hp) {
  auto* p = static_cast<P*>(t.param);
  const auto* g = static_cast<const P*>(t.grad);
  auto* m = static_cast<S*>(t.exp_avg);
  const auto* h = static_cast<const S*>(t.hessian);
  if (t.mode == MaskMode::kNone) {
    update_run<P, S, false>(p + begin, g + begin, m + begin, h + begin, nullptr, end - begin, hp);
    return;
  }
  int64_t row = begin / t.inner;
  int64_t col = begin - row * t.inner;
  for (int64_t i = begin; i < end; ++row, col = 0) {
    const int64_t stop = std::min(end, i + (t.inner - col));
    if (t.mode == MaskMode::kCols) {
      update_run<P, S, true>(p + i, g + i, m + i, h + i, t.mask + col, stop - i, hp);
    } else if (t.mask[row]) {
      update_run<P, S, false>(p + i, g + i, m + i, h + i, nullptr, stop - i, hp);
    }
    i = stop;
  }
}

template <typename P>
void update_param_typed(const SophiaTensor& t, int64_t begin, int64_t end, const SophiaHyper& hp) {
  if (t.state_dtype == DType::F32) {
    update_range<P, float>(t, begin, end, hp);
  } else {
    update_range<P, P>(t, begin, end, hp);  // the ops layer allows only fp32 or the param dtype
  }
}

void update(const SophiaTensor& t, int64_t begin, int64_t end, const SophiaHyper& hp) {
  switch (t.param_dtype) {
    case DType::F32: update_range<float, float>(t, begin, end, hp); break;
    case DType::BF16: update_param_typed<c10::BFloat16>(t, begin, end, hp); break;
    case DType::F16: update_param_typed<c10::Half>(t, begin, end, hp); break;
  }
}

}  // namespace

void masked_sophia_step(const SophiaTensor* tensors, int64_t count, const SophiaHyper& hyper) {
  std::vector<int64_t> first_chunk(count + 1, 0);  // chunks before tensor i
  for (int64_t i = 0; i < count; ++i)
    first_chunk[i + 1] = first_chunk[i] + (tensors[i].numel + kGrain - 1) / kGrain;
  at::parallel_for(0, first_chunk[count], 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      const int64_t i =
          std::upper_bound(first_chunk.begin(), first_chunk.end(), c) - first_chunk.begin() - 1;
      const SophiaTensor& t = tensors[i];
      const int64_t begin = (c - first_chunk[i]) * kGrain;
      update(t, begin, std::min(begin + kGrain, t.numel), hyper);
    }
  });
}

}  // namespace uk::cpu::CPU_CAPABILITY
