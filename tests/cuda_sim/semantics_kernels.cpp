// Small CUDA kernels that probe the harness's own semantics (tests/test_cuda_sim_semantics.py):
// shuffles, ballot and match, the block barrier, and launches CUDA refuses or that hang.
// Written as CUDA C++ and launched through UK_LAUNCH, one block each.
#include "cuda_on_cpu.h"  // first, as -include puts it for the kernels

#include "cuda_launch.cuh"

namespace {

// out[t] = the shuffle of in[t] (thread t, one warp or more), or -1 where lane t is outside
// `mask` and so does not call it.
__global__ void shuffle_probe(int mode, unsigned mask, int b, int width, const float* in,
                              float* out) {
  const int t = threadIdx.x, lane = t % 32;
  if (!(mask >> lane & 1u)) {
    out[t] = -1.f;
    return;
  }
  const float v = in[t];
  switch (mode) {
    case 0: out[t] = __shfl_sync(mask, v, b, width); break;
    case 1: out[t] = __shfl_up_sync(mask, v, b, width); break;
    case 2: out[t] = __shfl_down_sync(mask, v, b, width); break;
    default: out[t] = __shfl_xor_sync(mask, v, b, width); break;
  }
}

// out[2t] = __ballot_sync(mask, pred[t]), out[2t + 1] = __match_any_sync(mask, key[t]).
__global__ void vote_probe(unsigned mask, const int* pred, const long long* key, unsigned* out) {
  const int t = threadIdx.x;
  if (!(mask >> (t % 32) & 1u)) return;
  out[2 * t] = __ballot_sync(mask, pred[t]);
  out[2 * t + 1] = __match_any_sync(mask, key[t]);
}

// Reverses in[0..blockDim) through shared memory, with or without the barrier between the
// writes and the reads.
__global__ void reverse_probe(bool barrier, const float* in, float* out) {
  __shared__ float s[1024];
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = in[t];
  if (barrier) __syncthreads();
  out[t] = s[n - 1 - t];
}

// kind 0: half the block returns before a __syncthreads() the other half reaches;
// kind 1: lanes 0-15 wait at __syncwarp() for lanes 16-31, which wait at __syncthreads();
// kind 2: a lane calls a shuffle whose mask leaves it out;
// kind 3: __trap().
__global__ void hazard_probe(int kind, float* out) {
  const int t = threadIdx.x, lane = t % 32;
  if (kind == 0) {
    if (t >= 16) return;
    __syncthreads();
  } else if (kind == 1) {
    if (lane < 16) __syncwarp();
    else __syncthreads();
  } else if (kind == 2) {
    out[t] = __shfl_xor_sync(0x0000ffffu, 1.f, 1);
  } else {
    __trap();
  }
  out[t] = 1.f;
}

}  // namespace

extern "C" {

void uks_probe_shuffle(int threads, int mode, unsigned mask, int b, int width, const float* in,
                       float* out) {
  UK_LAUNCH(1, threads, 0, nullptr, shuffle_probe)(mode, mask, b, width, in, out);
}

void uks_probe_vote(unsigned mask, const int* pred, const long long* key, unsigned* out) {
  UK_LAUNCH(1, 32, 0, nullptr, vote_probe)(mask, pred, key, out);
}

void uks_probe_reverse(int threads, int barrier, const float* in, float* out) {
  UK_LAUNCH(1, threads, 0, nullptr, reverse_probe)(barrier != 0, in, out);
}

void uks_probe_hazard(int kind, float* out) {
  UK_LAUNCH(1, 64, 0, nullptr, hazard_probe)(kind, out);
}

void uks_probe_launch(unsigned gx, unsigned bx, unsigned by, size_t smem, float* out) {
  UK_LAUNCH(gx, dim3(bx, by), smem, nullptr, hazard_probe)(3, out);
}

}  // extern "C"
