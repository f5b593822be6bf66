// Which CPU kernel variant runs (see cpu_isa.h). Compiled once, with the baseline flags.
#include "cpu_isa.h"

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace uk::cpu {

namespace {

Isa detect() {
  Isa best = Isa::kDefault;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
#ifdef UK_CPU_HAVE_AVX2
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) best = Isa::kAvx2;
#ifdef UK_CPU_HAVE_AVX512
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = Isa::kAvx512;
#endif
#endif
#endif
  return best;
}

// The request in `value` ("default" | "avx2" | "avx512", any case), capped at `best`;
// `ok` false when the value is not one of them.
Isa requested(const char* value, Isa best, bool& ok) {
  std::string v(value);
  for (char& ch : v) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  ok = true;
  Isa want;
  if (v == "default") want = Isa::kDefault;
  else if (v == "avx2") want = Isa::kAvx2;
  else if (v == "avx512") want = Isa::kAvx512;
  else {
    ok = false;
    return best;
  }
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

Isa choose() {
  const Isa best = best_isa();
  bool ok = true;
  if (const char* own = std::getenv("UNLEARN_KERNELS_CPU_CAPABILITY"); own && *own) {
    const Isa isa = requested(own, best, ok);
    if (!ok)
      std::fprintf(stderr,
                   "unlearn_kernels: ignoring UNLEARN_KERNELS_CPU_CAPABILITY=%s (use default, "
                   "avx2 or avx512)\n", own);
    return isa;
  }
  if (const char* aten = std::getenv("ATEN_CPU_CAPABILITY"); aten && *aten)
    return requested(aten, best, ok);  // ATen's other values (sve, zvector, ...) are not ours
  return best;
}

}  // namespace

Isa best_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa active_isa() {
  static const Isa isa = choose();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

}  // namespace uk::cpu
