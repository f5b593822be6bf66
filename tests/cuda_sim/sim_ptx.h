// The PTX instructions of csrc/include/cuda_ptx.cuh, emulated for the CPU execution harness
// (same names and signatures, in uk::cuda::ptx).
//
//  - createpolicy: the policies are hints; any value does.
//  - cp.async.cg 16 bytes global -> shared: queued per thread and carried out when a
//    cp.async.wait_group lets its group complete (late, so a read before the wait sees the
//    old shared memory), or at once under the "early" schedules (so a copy into a stage that
//    other threads still read shows). Zero-fill when the source size is 0; both addresses
//    must be 16-byte aligned and the destination in shared memory.
//  - ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16 and mma.sync.aligned.m16n8k16.row.col
//    .f32.{bf16,f16}: warp collectives of all 32 lanes, each lane's registers holding the
//    fragments of PTX's layout (ISA, "Matrix fragments for mma.m16n8k16"). The mma products
//    are exact and the sums are formed in double, then rounded once to fp32 (the hardware's
//    accumulation order is unspecified; its result differs by fp32 roundings).
#pragma once

#include <cstdint>
#include <type_traits>

namespace uk_sim {

void cp_async(void* dst, const void* src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);
void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans);
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);

}  // namespace uk_sim

namespace uk::cuda::ptx {

inline uint64_t l2_policy_evict_last() { return 0; }
inline uint64_t l2_policy_evict_first() { return 1; }

inline void cp_async16(void* dst, const void* src, bool valid, uint64_t) {
  uk_sim::cp_async(dst, src, valid ? 16 : 0);
}
inline void cp_async_commit() { uk_sim::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  uk_sim::cp_async_wait(N);
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { uk_sim::ldmatrix_x4(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { uk_sim::ldmatrix_x4(r, p, true); }

template <typename T>
inline void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "bf16 or f16");
  uk_sim::mma_m16n8k16(d, a, b0, b1, std::is_same_v<T, __nv_bfloat16>);
}

}  // namespace uk::cuda::ptx
