// Hessian-diagonal EMA, in place (semantics in hessian_cuda.h):
//   hess_i <- beta * hess_i + (1 - beta) * a_i * b_i        (b = a when absent)
//
// Design (streaming, memory bound): a thread handles kUnroll groups of V consecutive
// elements, V = 16 bytes of the narrower of the two storage types (so fp32 hess with bf16 a
// moves 32 + 16 (+ 16) bytes per group), all loads issued before any arithmetic. Blocks of
// kThreads cover the vector body; the n % V tail (and every element, when a pointer is not
// 16-byte aligned) goes through the V = 1 instance of the same kernel.
// Bytes moved: n * (2 sizeof(hess) + sizeof(a) * (b ? 2 : 1)).
#include "hessian_cuda.h"
#include "cuda_launch.cuh"
#include "scores_common.cuh"

namespace uk::cuda {
namespace {

using namespace scores;

constexpr int kThreads = 256;
constexpr int kUnroll = 2;

struct EmaArgs {
  void* hess;
  const void* a;
  const void* b;  // nullptr: b = a
  int64_t begin, end;  // element range of this launch
  float beta, one_minus_beta;
};

template <typename H, typename A, int V>
__global__ void __launch_bounds__(kThreads) hessian_ema_kernel(const EmaArgs args) {
  H* hess = static_cast<H*>(args.hess);
  const A* a = static_cast<const A*>(args.a);
  const A* b = static_cast<const A*>(args.b);
  const int64_t first =
      args.begin + (int64_t{blockIdx.x} * kThreads * kUnroll + threadIdx.x) * V;
  Raw<H, V> h[kUnroll];
  Raw<A, V> x[kUnroll], y[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = first + int64_t{u} * kThreads * V;
    const bool ok = i < args.end;
    h[u] = load<H, V>(hess + i, ok);
    x[u] = load<A, V>(a + i, ok);
    if (b != nullptr) y[u] = load<A, V>(b + i, ok);
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = first + int64_t{u} * kThreads * V;
    if (i >= args.end) continue;
    float out[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float xa = element(x[u], k);
      const float xb = b != nullptr ? element(y[u], k) : xa;
      out[k] = fmaf(args.beta, element(h[u], k), args.one_minus_beta * (xa * xb));
    }
    store<H, V>(hess + i, out);
  }
}

template <typename H, typename A, int V>
void launch(EmaArgs args, cudaStream_t stream) {
  const int64_t per_block = int64_t{kThreads} * kUnroll * V;
  const int64_t blocks = ceil_div(args.end - args.begin, per_block);
  if (blocks > 0)
    UK_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream,
              hessian_ema_kernel<H, A, V>)(args);
}

template <typename H, typename A>
void hessian_ema_impl(EmaArgs args, cudaStream_t stream) {
  constexpr int V = vec_width<H, A>();
  const bool vec = aligned16(args.hess) && aligned16(args.a) &&
                   (args.b == nullptr || aligned16(args.b));
  const int64_t body = vec ? args.end / V * V : 0;
  EmaArgs head = args, tail = args;
  head.end = body;
  tail.begin = body;
  launch<H, A, V>(head, stream);
  launch<H, A, 1>(tail, stream);
}

template <typename A>
void dispatch_hess(DType hess_dt, EmaArgs args, cudaStream_t stream) {
  if (hess_dt == DType::F32) {
    hessian_ema_impl<float, A>(args, stream);
  } else {
    hessian_ema_impl<A, A>(args, stream);  // the ops layer admits fp32 or a's dtype only
  }
}

}  // namespace

void hessian_ema(DType hess_dt, void* hess, DType ab_dt, const void* a, const void* b, int64_t n,
                 float beta, float one_minus_beta, cudaStream_t stream) {
  const EmaArgs args{hess, a, b, 0, n, beta, one_minus_beta};
  switch (ab_dt) {
    case DType::F32: dispatch_hess<float>(hess_dt, args, stream); break;
    case DType::BF16: dispatch_hess<__nv_bfloat16>(hess_dt, args, stream); break;
    case DType::F16: dispatch_hess<__half>(hess_dt, args, stream); break;
  }
}

}  // namespace uk::cuda
