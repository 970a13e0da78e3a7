// CPU feature detection (declared in the driver API).
#include "sdpa/sdpa.hpp"

namespace sdpa {

CpuFeatures cpu_features() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  // libgcc's detection checks both CPUID and XGETBV (OS support for the AVX/AVX-512 state).
  __builtin_cpu_init();
  f.sse42 = __builtin_cpu_supports("sse4.2");
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512dq = __builtin_cpu_supports("avx512dq");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512bf16 = __builtin_cpu_supports("avx512bf16");
  // F16C is not among __builtin_cpu_supports' names in every GCC: CPUID leaf 1, ECX bit 29.
  unsigned a = 1, b = 0, c = 0, d = 0;
  __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
  f.f16c = (c >> 29) & 1u;
  f.f16c = f.f16c && f.avx2;  // only used together with AVX, whose OS support avx2 implies
#endif
  return f;
}

}  // namespace sdpa
