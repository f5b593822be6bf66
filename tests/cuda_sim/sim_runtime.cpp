// The runtime of the CPU execution harness (model in cuda_on_cpu.h): fibers for the CUDA
// threads of a block, the scheduler, __syncthreads(), the warp collectives, the emulated
// PTX instructions and the runtime API.
//
// A block of n threads uses fibers 0..n-1 (a 256 KiB stack each behind a guard page, reused
// across blocks). The scheduler runs on the launching thread's stack; a fiber returns to it
// whenever it waits (barrier, warp collective) or ends, and the scheduler resumes the next
// runnable fiber by policy. When none is runnable, either every thread waits at
// __syncthreads() (the barrier opens), or all have ended (the block is done), or the block is
// stuck: an error names the waiting threads. An error stops the launch; the fibers of the
// failed block are abandoned (their stacks are reset by the next block) and the error stays
// until the caller takes it, like a sticky CUDA error.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "cuda_on_cpu.h"

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

// The static __shared__ variables (section uk_sim_shared; the linker defines the bounds).
extern "C" char __start_uk_sim_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_uk_sim_shared[] __attribute__((weak, visibility("hidden")));

// Context switch (x86-64 System V): saves the callee-saved registers, MXCSR and the x87
// control word on the current stack, stores the stack pointer to *save, loads `load` and
// restores the same from there.
extern "C" void uk_sim_switch(void** save, void* load);
asm(R"(
  .text
  .globl uk_sim_switch
  .hidden uk_sim_switch
  .type uk_sim_switch, @function
uk_sim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size uk_sim_switch, .-uk_sim_switch
)");

namespace uk_sim {
namespace {

constexpr size_t kStackBytes = size_t{256} << 10;
constexpr int kMaxThreads = 1024;
constexpr size_t kMaxDynamicSmem = 232448;   // sm_90: 227 KiB opt-in per block
constexpr int kDefaultDynamicSmem = 48 << 10;
constexpr size_t kMaxParamBytes = 32764;     // CUDA 12.1+, sm_70+
constexpr uint64_t kUndefined = ~uint64_t{0};

struct Device {
  const char* name;
  int sms, major, minor, smem_optin;
};
// Device 0: few SMs (grids of a handful of blocks, long loops per block); device 1: an H100's
// launch shapes; device 2: a pre-Ampere part (no tensor-core path).
const Device kDevices[] = {{"sim-sm90-3sm", 3, 9, 0, 232448},
                           {"sim-h100", 132, 9, 0, 232448},
                           {"sim-sm75", 40, 7, 5, 65536}};
constexpr int kDeviceCount = sizeof(kDevices) / sizeof(kDevices[0]);

enum class State : uint8_t { kRunnable, kBarrier, kWarp, kDone };
enum class Op : uint8_t { kShfl, kSyncWarp, kBallot, kMatch, kLdMatrix, kLdMatrixTrans, kMma };

struct Collective {
  Op op;
  Shfl mode;
  unsigned mask;
  int b, width;
  uint64_t bits;
  const void* in;
  void* out;
};

struct MmaArgs {
  const uint32_t* a;
  uint32_t b0, b1;
  float* d;
  bool bf16;
};

struct Copy {
  void* dst;
  const void* src;
  int bytes;
};

struct Thread {
  void* sp = nullptr;
  char* stack = nullptr;  // lowest usable address
  State state = State::kDone;
  uint3 idx{};
  int tid = 0;
  Collective c{};
  uint64_t result = 0;
  std::vector<Copy> open_group;
  std::deque<std::vector<Copy>> groups;
};

// ---- state (one launch at a time, under g_mutex) ---------------------------------------------

std::mutex g_mutex;
std::vector<Thread> g_threads(kMaxThreads);
int g_n = 0;                    // threads of the current block
uint64_t g_runnable[kMaxThreads / 64];
int g_done = 0, g_at_barrier = 0;
uint32_t g_waiting[kMaxThreads / 32];  // per warp: lanes waiting at a warp collective
uint32_t g_absent[kMaxThreads / 32];   // per warp: lanes exited or beyond the block
Thread* g_current = nullptr;
void* g_sched_sp = nullptr;
bool g_abort = false;
void (*g_body)(void*) = nullptr;
void* g_ctx = nullptr;
const char* g_kernel = "";

int g_policy = 0;               // 0 lowest thread first, 1 highest first, 2 random
std::mt19937_64 g_rng;
int g_device = 0;
std::map<const void*, int> g_max_dynamic_smem;
std::map<std::string, long> g_launch_log;
std::string g_error;
cudaError_t g_last = cudaSuccess;

unsigned char* g_dynamic = nullptr;
size_t g_dynamic_size = 0;

bool copies_early() { return g_policy == 1; }

void fail(cudaError_t code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void fail(cudaError_t code, const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (g_error.empty()) {
    g_error = buf;
    if (g_current != nullptr) {
      const uint3 b = blockIdx, t = g_current->idx;
      char where[256];
      snprintf(where, sizeof where, " [block (%u,%u,%u) thread (%u,%u,%u) of %s]", b.x, b.y, b.z,
               t.x, t.y, t.z, g_kernel);
      g_error += where;
    }
  }
  if (g_last == cudaSuccess) g_last = code;
  g_abort = true;
}

// ---- fibers ---------------------------------------------------------------------------------

void set_runnable(int tid) {
  g_threads[tid].state = State::kRunnable;
  g_runnable[tid >> 6] |= uint64_t{1} << (tid & 63);
}

void clear_runnable(int tid) { g_runnable[tid >> 6] &= ~(uint64_t{1} << (tid & 63)); }

void yield() { uk_sim_switch(&g_current->sp, g_sched_sp); }

[[noreturn]] void abandon() {  // after fail(): the scheduler stops the block
  for (;;) yield();
}

void run_copy(const Copy& c) {
  if (c.bytes > 0) std::memcpy(c.dst, c.src, 16);
  else std::memset(c.dst, 0, 16);
}

void finish_pending_copies(Thread& t) {
  for (const auto& g : t.groups)
    for (const Copy& c : g) run_copy(c);
  for (const Copy& c : t.open_group) run_copy(c);
  t.groups.clear();
  t.open_group.clear();
}

void try_complete(int warp, unsigned mask);

void fiber_main() {
  g_body(g_ctx);
  Thread& t = *g_current;
  finish_pending_copies(t);
  t.state = State::kDone;
  ++g_done;
  // Collectives of this warp waiting for this lane complete without it.
  const int warp = t.tid >> 5;
  g_absent[warp] |= 1u << (t.tid & 31);
  for (int k = 0; k < 32 && g_waiting[warp] != 0; ++k) {
    const Thread& u = g_threads[warp * 32 + k];
    if ((g_waiting[warp] >> k & 1u) && (u.c.mask >> (t.tid & 31) & 1u)) try_complete(warp, u.c.mask);
  }
  for (;;) yield();  // never resumed
}

void prepare_fiber(Thread& t) {
  if (t.stack == nullptr) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "cuda_sim: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(p, page, PROT_NONE);  // guard page: an overflow faults instead of corrupting
    t.stack = static_cast<char*>(p) + page;
  }
  // The frame uk_sim_switch pops: x87 CW, MXCSR, r15..rbp, then the entry as return address.
  auto s = (reinterpret_cast<uintptr_t>(t.stack + kStackBytes) - 128) & ~uintptr_t{15};
  auto* w = reinterpret_cast<uint64_t*>(s);
  std::memset(w, 0, 80);
  uint32_t mxcsr;
  uint16_t fcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fcw));
  std::memcpy(w, &fcw, 2);
  std::memcpy(w + 1, &mxcsr, 4);
  w[8] = reinterpret_cast<uint64_t>(&fiber_main);
  w[9] = 0;
  t.sp = w;
}

int pick() {
  constexpr int kWords = kMaxThreads / 64;
  const int words = (g_n + 63) / 64;
  if (g_policy == 0) {
    for (int i = 0; i < words; ++i)
      if (g_runnable[i]) return i * 64 + __builtin_ctzll(g_runnable[i]);
  } else if (g_policy == 1) {
    for (int i = words - 1; i >= 0; --i)
      if (g_runnable[i]) return i * 64 + 63 - __builtin_clzll(g_runnable[i]);
  } else {
    int count = 0;
    for (int i = 0; i < words; ++i) count += __builtin_popcountll(g_runnable[i]);
    if (count == 0) return -1;
    int k = static_cast<int>(g_rng() % static_cast<uint64_t>(count));
    for (int i = 0; i < words && i < kWords; ++i) {
      const int c = __builtin_popcountll(g_runnable[i]);
      if (k >= c) {
        k -= c;
        continue;
      }
      uint64_t w = g_runnable[i];
      while (k-- > 0) w &= w - 1;
      return i * 64 + __builtin_ctzll(w);
    }
  }
  return -1;
}

bool open_barrier() {
  if (g_at_barrier == 0 || g_at_barrier + g_done != g_n) return false;
  if (g_done > 0) {
    g_current = nullptr;
    fail(cudaErrorLaunchFailure,
         "%d threads wait at __syncthreads() while %d threads of the block have exited "
         "(a barrier in divergent code is undefined) [block (%u,%u,%u) of %s]",
         g_at_barrier, g_done, blockIdx.x, blockIdx.y, blockIdx.z, g_kernel);
    return false;
  }
  for (int i = 0; i < g_n; ++i) set_runnable(i);
  g_at_barrier = 0;
  return true;
}

void report_stuck() {
  std::string who;
  int shown = 0;
  for (int i = 0; i < g_n && shown < 4; ++i) {
    const Thread& t = g_threads[i];
    if (t.state != State::kWarp) continue;
    char buf[128];
    snprintf(buf, sizeof buf, " thread %d waits at a warp collective (op %d, mask 0x%08x);", i,
             static_cast<int>(t.c.op), t.c.mask);
    who += buf;
    ++shown;
  }
  g_current = nullptr;
  fail(cudaErrorLaunchFailure,
       "deadlock: %d threads at __syncthreads(), %d exited, the others at warp collectives "
       "whose lanes never arrive:%s [block (%u,%u,%u) of %s]",
       g_at_barrier, g_done, who.c_str(), blockIdx.x, blockIdx.y, blockIdx.z, g_kernel);
}

char* static_shared_begin() { return __start_uk_sim_shared; }
char* static_shared_end() {
  return __start_uk_sim_shared != nullptr ? __stop_uk_sim_shared : nullptr;
}

void poison_shared() {
  std::memset(static_shared_begin(), 0xff,
              static_cast<size_t>(static_shared_end() - static_shared_begin()));
  std::memset(g_dynamic, 0xff, g_dynamic_size);
}

void run_block() {
  poison_shared();
  const dim3 bd = blockDim;
  std::memset(g_runnable, 0, sizeof g_runnable);
  for (int i = 0; i < g_n; ++i) {
    Thread& t = g_threads[i];
    t.tid = i;
    t.idx = {i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
    t.groups.clear();
    t.open_group.clear();
    prepare_fiber(t);
    set_runnable(i);
  }
  g_done = g_at_barrier = 0;
  for (int w = 0; w < (g_n + 31) / 32; ++w) {
    g_waiting[w] = 0;
    const int lanes = g_n - 32 * w;
    g_absent[w] = lanes >= 32 ? 0u : ~((1u << lanes) - 1u);
  }
  for (;;) {
    const int i = pick();
    if (i < 0) {
      if (g_done == g_n) break;
      if (open_barrier()) continue;
      if (!g_abort) report_stuck();
      break;
    }
    clear_runnable(i);
    g_current = &g_threads[i];
    threadIdx = g_current->idx;
    uk_sim_switch(&g_sched_sp, g_current->sp);
    if (g_abort) break;
  }
  g_current = nullptr;
}

bool in_shared(const void* p, size_t bytes) {
  const auto* c = static_cast<const char*>(p);
  const bool in_static = c >= static_shared_begin() && c + bytes <= static_shared_end() &&
                         static_shared_begin() != nullptr;
  const auto* dyn = reinterpret_cast<const char*>(g_dynamic);
  return in_static || (c >= dyn && c + bytes <= dyn + g_dynamic_size);
}

// ---- warp collectives -----------------------------------------------------------------------

uint16_t lo16(uint32_t w) { return static_cast<uint16_t>(w & 0xffffu); }
uint16_t hi16(uint32_t w) { return static_cast<uint16_t>(w >> 16); }

float decode(uint16_t h, bool bf16) {
  return bf16 ? bf16_bits_to_float(h) : half_bits_to_float(h);
}

void complete_mma(int base) {
  double A[16][16], B[16][8], C[16][8];
  const bool bf16 = static_cast<const MmaArgs*>(g_threads[base].c.in)->bf16;
  for (int l = 0; l < 32; ++l) {
    const auto& m = *static_cast<const MmaArgs*>(g_threads[base + l].c.in);
    const int g = l >> 2, t = l & 3;
    for (int r = 0; r < 4; ++r) {
      const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
      A[row][col] = decode(lo16(m.a[r]), bf16);
      A[row][col + 1] = decode(hi16(m.a[r]), bf16);
    }
    B[2 * t][g] = decode(lo16(m.b0), bf16);
    B[2 * t + 1][g] = decode(hi16(m.b0), bf16);
    B[2 * t + 8][g] = decode(lo16(m.b1), bf16);
    B[2 * t + 9][g] = decode(hi16(m.b1), bf16);
    C[g][2 * t] = m.d[0];
    C[g][2 * t + 1] = m.d[1];
    C[g + 8][2 * t] = m.d[2];
    C[g + 8][2 * t + 1] = m.d[3];
  }
  for (int l = 0; l < 32; ++l) {
    const auto& m = *static_cast<const MmaArgs*>(g_threads[base + l].c.in);
    const int g = l >> 2, t = l & 3;
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
      double acc = C[row][col];
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
      m.d[e] = static_cast<float>(acc);
    }
  }
}

bool complete_ldmatrix(int base, bool trans) {
  for (int l = 0; l < 32; ++l) {
    const void* p = g_threads[base + l].c.in;
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0 || !in_shared(p, 16)) {
      fail(cudaErrorLaunchFailure,
           "ldmatrix: lane %d's row address %p is not a 16-byte aligned shared-memory row", l, p);
      return false;
    }
  }
  for (int l = 0; l < 32; ++l) {
    auto* r = static_cast<uint32_t*>(g_threads[base + l].c.out);
    for (int i = 0; i < 4; ++i) {
      if (!trans) {
        const auto* row = static_cast<const unsigned char*>(g_threads[base + 8 * i + l / 4].c.in);
        std::memcpy(&r[i], row + 4 * (l % 4), 4);
      } else {
        const auto* r0 = static_cast<const uint16_t*>(g_threads[base + 8 * i + 2 * (l % 4)].c.in);
        const auto* r1 =
            static_cast<const uint16_t*>(g_threads[base + 8 * i + 2 * (l % 4) + 1].c.in);
        r[i] = uint32_t{r0[l / 4]} | uint32_t{r1[l / 4]} << 16;
      }
    }
  }
  return true;
}

// PTX shfl.sync: the source lane j of `lane`, or -1 when the value is the caller's own.
int shuffle_source(const Collective& c, int lane) {
  const unsigned clamp = c.mode == Shfl::kUp ? 0u : 0x1fu;
  const unsigned segmask = static_cast<unsigned>(32 - c.width) & 0x1fu;
  const int max_lane = static_cast<int>((lane & segmask) | (clamp & ~segmask));
  const int min_lane = static_cast<int>(lane & segmask);
  const int b = c.b & 0x1f;
  int j = lane;
  bool in_range = true;
  switch (c.mode) {
    case Shfl::kUp: j = lane - b; in_range = j >= max_lane; break;
    case Shfl::kDown: j = lane + b; in_range = j <= max_lane; break;
    case Shfl::kBfly: j = lane ^ b; in_range = j <= max_lane; break;
    case Shfl::kIdx: j = min_lane | (b & ~static_cast<int>(segmask)); in_range = j <= max_lane; break;
  }
  return in_range ? j : -1;
}

void try_complete(int warp, unsigned mask) {
  if (((g_waiting[warp] | g_absent[warp]) & mask) != mask) return;  // lanes still running
  const int base = warp * 32;
  unsigned members = 0;
  const Collective* first = nullptr;
  for (int k = 0; k < 32; ++k) {
    if (!(mask >> k & 1u) || base + k >= g_n) continue;
    const Thread& u = g_threads[base + k];
    if (u.state == State::kDone) continue;
    if (u.state != State::kWarp || u.c.mask != mask) return;  // not arrived yet
    if (first == nullptr) {
      first = &u.c;
    } else if (u.c.op != first->op || u.c.mode != first->mode) {
      fail(cudaErrorLaunchFailure,
           "lanes of warp %d wait at different warp collectives with the same mask 0x%08x",
           warp, mask);
      return;
    }
    members |= 1u << k;
  }
  if (first == nullptr) return;
  const Op op = first->op;
  if ((op == Op::kLdMatrix || op == Op::kLdMatrixTrans || op == Op::kMma) &&
      members != 0xffffffffu) {
    fail(cudaErrorLaunchFailure,
         "ldmatrix/mma.sync.aligned needs all 32 lanes of warp %d (mask 0x%08x, present 0x%08x)",
         warp, mask, members);
    return;
  }
  switch (op) {
    case Op::kShfl:
      for (int k = 0; k < 32; ++k) {
        if (!(members >> k & 1u)) continue;
        Thread& u = g_threads[base + k];
        const int w = u.c.width;
        if (w < 1 || w > 32 || (w & (w - 1)) != 0) {
          fail(cudaErrorLaunchFailure, "shuffle width %d is not a power of two <= 32", w);
          return;
        }
        const int j = shuffle_source(u.c, k);
        if (j < 0) u.result = u.c.bits;
        else if (members >> j & 1u) u.result = g_threads[base + j].c.bits;
        else u.result = kUndefined;  // a source lane outside the mask (or exited): undefined
      }
      break;
    case Op::kSyncWarp: break;
    case Op::kBallot: {
      unsigned bits = 0;
      for (int k = 0; k < 32; ++k)
        if ((members >> k & 1u) && g_threads[base + k].c.bits) bits |= 1u << k;
      for (int k = 0; k < 32; ++k)
        if (members >> k & 1u) g_threads[base + k].result = bits;
      break;
    }
    case Op::kMatch:
      for (int k = 0; k < 32; ++k) {
        if (!(members >> k & 1u)) continue;
        unsigned same = 0;
        for (int m = 0; m < 32; ++m)
          if ((members >> m & 1u) && g_threads[base + m].c.bits == g_threads[base + k].c.bits)
            same |= 1u << m;
        g_threads[base + k].result = same;
      }
      break;
    case Op::kLdMatrix:
    case Op::kLdMatrixTrans:
      if (!complete_ldmatrix(base, op == Op::kLdMatrixTrans)) return;
      break;
    case Op::kMma: complete_mma(base); break;
  }
  g_waiting[warp] &= ~members;
  for (int k = 0; k < 32; ++k)
    if (members >> k & 1u) set_runnable(base + k);
}

uint64_t collective(const Collective& c) {
  Thread& t = *g_current;
  const int lane = t.tid & 31;
  if (!(c.mask >> lane & 1u)) {
    fail(cudaErrorLaunchFailure,
         "a warp collective's mask 0x%08x does not contain the calling lane %d (undefined)",
         c.mask, lane);
    abandon();
  }
  t.c = c;
  t.state = State::kWarp;
  g_waiting[t.tid >> 5] |= 1u << lane;
  try_complete(t.tid >> 5, c.mask);
  if (g_abort) abandon();
  yield();
  return t.result;
}

Thread& current(const char* what) {
  if (g_current == nullptr) {
    std::fprintf(stderr, "cuda_sim: %s called outside a kernel\n", what);
    std::abort();
  }
  return *g_current;
}

}  // namespace

// ---- the intrinsics -------------------------------------------------------------------------

void syncthreads() {
  Thread& t = current("__syncthreads");
  t.state = State::kBarrier;
  ++g_at_barrier;
  yield();
}

void syncwarp(unsigned mask) {
  current("__syncwarp");
  collective({Op::kSyncWarp, Shfl::kIdx, mask, 0, 32, 0, nullptr, nullptr});
}

uint64_t shuffle(Shfl mode, unsigned mask, uint64_t bits, int b, int width) {
  current("__shfl_*_sync");
  return collective({Op::kShfl, mode, mask, b, width, bits, nullptr, nullptr});
}

unsigned ballot(unsigned mask, bool pred) {
  current("__ballot_sync");
  return static_cast<unsigned>(
      collective({Op::kBallot, Shfl::kIdx, mask, 0, 32, pred ? 1u : 0u, nullptr, nullptr}));
}

unsigned match_any(unsigned mask, uint64_t bits) {
  current("__match_any_sync");
  return static_cast<unsigned>(
      collective({Op::kMatch, Shfl::kIdx, mask, 0, 32, bits, nullptr, nullptr}));
}

void trap(const char* what) {
  current(what);
  fail(cudaErrorLaunchFailure, "%s", what);
  abandon();
}

void* dynamic_shared_base() { return g_dynamic; }

void cp_async(void* dst, const void* src, int src_bytes) {
  Thread& t = current("cp.async");
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || !in_shared(dst, 16) ||
      (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0)) {
    fail(cudaErrorLaunchFailure,
         "cp.async: destination %p must be 16-byte aligned shared memory, source %p 16-byte "
         "aligned", dst, src);
    abandon();
  }
  const Copy c{dst, src, src_bytes};
  if (copies_early()) run_copy(c);
  else t.open_group.push_back(c);
}

void cp_async_commit() {
  Thread& t = current("cp.async.commit_group");
  t.groups.push_back(std::move(t.open_group));
  t.open_group.clear();
}

void cp_async_wait(int pending) {
  Thread& t = current("cp.async.wait_group");
  while (static_cast<int>(t.groups.size()) > pending) {
    for (const Copy& c : t.groups.front()) run_copy(c);
    t.groups.pop_front();
  }
}

void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  current("ldmatrix");
  collective({trans ? Op::kLdMatrixTrans : Op::kLdMatrix, Shfl::kIdx, 0xffffffffu, 0, 32, 0, row,
              r});
}

void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  current("mma.sync");
  MmaArgs args{a, b0, b1, d, bf16};
  collective({Op::kMma, Shfl::kIdx, 0xffffffffu, 0, 32, 0, &args, nullptr});
}

// ---- the launch -----------------------------------------------------------------------------

cudaError_t set_func_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > kDevices[g_device].smem_optin) return cudaErrorInvalidValue;
    g_max_dynamic_smem[kernel] = value;
  }
  return cudaSuccess;
}

void run_grid(const LaunchConfig& config, void (*thread_body)(void*), void* ctx) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_error.empty()) return;  // a sticky error from an earlier launch
  g_abort = false;
  g_kernel = config.name;
  ++g_launch_log[config.name];
  const dim3 g = config.grid, b = config.block;
  const uint64_t threads = uint64_t{b.x} * b.y * b.z;
  if (g.x < 1 || g.x > 0x7fffffffu || g.y < 1 || g.y > 65535 || g.z < 1 || g.z > 65535 ||
      b.x < 1 || b.y < 1 || b.z < 1 || b.x > 1024 || b.y > 1024 || b.z > 64 || threads > 1024) {
    fail(cudaErrorInvalidConfiguration,
         "invalid configuration: grid (%u,%u,%u), block (%u,%u,%u) [%s]", g.x, g.y, g.z, b.x,
         b.y, b.z, config.name);
    return;
  }
  const auto it = g_max_dynamic_smem.find(config.kernel);
  const int limit = it == g_max_dynamic_smem.end() ? kDefaultDynamicSmem : it->second;
  if (config.dynamic_smem > static_cast<size_t>(limit)) {
    fail(cudaErrorInvalidValue,
         "the launch asks for %zu bytes of dynamic shared memory, the kernel allows %d "
         "(cudaFuncSetAttribute) [%s]", config.dynamic_smem, limit, config.name);
    return;
  }
  if (config.param_bytes > kMaxParamBytes) {
    fail(cudaErrorInvalidValue, "kernel parameters of %zu bytes exceed %zu [%s]",
         config.param_bytes, kMaxParamBytes, config.name);
    return;
  }
  if (g_dynamic == nullptr)
    g_dynamic = static_cast<unsigned char*>(std::aligned_alloc(128, kMaxDynamicSmem));
  g_dynamic_size = config.dynamic_smem;
  g_body = thread_body;
  g_ctx = ctx;
  g_n = static_cast<int>(threads);
  gridDim = g;
  blockDim = b;
  const uint64_t blocks = uint64_t{g.x} * g.y * g.z;
  for (uint64_t k = 0; k < blocks && !g_abort; ++k) {
    const uint64_t linear = g_policy == 1 ? blocks - 1 - k : k;
    blockIdx = {static_cast<unsigned>(linear % g.x), static_cast<unsigned>(linear / g.x % g.y),
                static_cast<unsigned>(linear / (uint64_t{g.x} * g.y))};
    run_block();
  }
  g_abort = false;
}

}  // namespace uk_sim

// ---- runtime API ----------------------------------------------------------------------------

using uk_sim::g_device;
using uk_sim::g_last;

cudaError_t cudaGetDevice(int* device) {
  *device = g_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= uk_sim::kDeviceCount) return cudaErrorInvalidDevice;
  g_device = device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= uk_sim::kDeviceCount) return cudaErrorInvalidDevice;
  const uk_sim::Device& d = uk_sim::kDevices[device];
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 << 10; break;
    case cudaDevAttrMultiProcessorCount: *value = d.sms; break;
    case cudaDevAttrComputeCapabilityMajor: *value = d.major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = d.minor; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_optin; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  if (bytes > 0) std::memset(p, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  return cudaMemsetAsync(p, value, bytes, nullptr);
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return g_last; }
cudaError_t cudaDeviceSynchronize() { return g_last; }
cudaError_t cudaPeekAtLastError() { return g_last; }

cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last;
  g_last = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    default: return "unspecified launch failure";
  }
}

// ---- controls for the tests (ctypes) --------------------------------------------------------

extern "C" {

// Policy 0: lowest thread (and block) first; 1: highest first, cp.async copies at issue;
// 2: random thread order from `seed`.
void uk_sim_set_schedule(int policy, unsigned long long seed) {
  std::lock_guard<std::mutex> lock(uk_sim::g_mutex);
  uk_sim::g_policy = policy;
  uk_sim::g_rng.seed(seed);
}

int uk_sim_set_device(int device) { return cudaSetDevice(device); }

const char* uk_sim_device_name(int device) { return uk_sim::kDevices[device].name; }

// The first error since the last call (empty: none), and clears it.
int uk_sim_take_error(char* buf, size_t size) {
  std::lock_guard<std::mutex> lock(uk_sim::g_mutex);
  std::snprintf(buf, size, "%s", uk_sim::g_error.c_str());
  const int code = uk_sim::g_error.empty() ? static_cast<int>(g_last) : 1;
  uk_sim::g_error.clear();
  g_last = cudaSuccess;
  return code;
}

// "count<TAB>kernel" lines of every launch since the library was loaded.
size_t uk_sim_launch_log(char* buf, size_t size) {
  std::lock_guard<std::mutex> lock(uk_sim::g_mutex);
  std::string out;
  for (const auto& [name, count] : uk_sim::g_launch_log)
    out += std::to_string(count) + "\t" + name + "\n";
  if (buf != nullptr && size > 0) std::snprintf(buf, size, "%s", out.c_str());
  return out.size() + 1;
}

void uk_sim_float_to_bf16(const float* in, uint16_t* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = uk_sim::float_to_bf16_bits(in[i]);
}
void uk_sim_float_to_half(const float* in, uint16_t* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = uk_sim::float_to_half_bits(in[i]);
}
void uk_sim_bf16_to_float(const uint16_t* in, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = uk_sim::bf16_bits_to_float(in[i]);
}
void uk_sim_half_to_float(const uint16_t* in, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = uk_sim::half_bits_to_float(in[i]);
}

}  // extern "C"
