// CPU instruction-set dispatch of the compiled CPU kernels (as ATen's CPU capability).
//
// Every csrc/cpu/*.cpp is compiled once per instruction set CMake builds for, with that set's
// flags and CPU_CAPABILITY defined to its name (DEFAULT, AVX2, AVX512: the macros ATen's own
// kernels use, which also select at::vec's implementation), into the namespace
// uk::cpu::<CPU_CAPABILITY>. The headers declare each kernel in every such namespace with
// UK_CPU_KERNELS(...); the ops call UK_CPU_CALL(kernel)(args...), which picks the variant of
// active_isa(): the best set this CPU supports (__builtin_cpu_supports), or the one asked for
// by UNLEARN_KERNELS_CPU_CAPABILITY, else ATEN_CPU_CAPABILITY (default | avx2 | avx512; a set
// the CPU lacks falls back to the best it has). Never -march=native: the flags are fixed per
// variant, so one build runs on any x86-64 CPU. Every variant gives the same bits (the rules
// are in cpu_vec.h: 16 lanes whatever the vector width, no fused multiply-add, one
// implementation of every function), so the choice changes speed only.
#pragma once

namespace uk::cpu {

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The variant the kernels run (decided once per process).
Isa active_isa();
// "default", "avx2" or "avx512".
const char* isa_name(Isa isa);
// The best variant this build holds and this CPU supports (ignoring the environment).
Isa best_isa();

}  // namespace uk::cpu

#define UK_CPU_KERNELS(...)          \
  namespace uk::cpu {                \
  namespace DEFAULT { __VA_ARGS__ }  \
  namespace AVX2 { __VA_ARGS__ }     \
  namespace AVX512 { __VA_ARGS__ }   \
  }

#ifdef UK_CPU_HAVE_AVX512
#define UK_CPU_PICK_AVX512(fn) \
  ::uk::cpu::active_isa() == ::uk::cpu::Isa::kAvx512 ? &::uk::cpu::AVX512::fn:
#else
#define UK_CPU_PICK_AVX512(fn)
#endif
#ifdef UK_CPU_HAVE_AVX2
#define UK_CPU_PICK_AVX2(fn) ::uk::cpu::active_isa() == ::uk::cpu::Isa::kAvx2 ? &::uk::cpu::AVX2::fn:
#else
#define UK_CPU_PICK_AVX2(fn)
#endif
// The active variant of a kernel (a function pointer).
#define UK_CPU_CALL(fn) (UK_CPU_PICK_AVX512(fn) UK_CPU_PICK_AVX2(fn) & ::uk::cpu::DEFAULT::fn)
