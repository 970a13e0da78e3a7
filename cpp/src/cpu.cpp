// CPU feature detection (declared in the driver API).
#include "sdpa/sdpa.hpp"

#if defined(_MSC_VER)
#include <immintrin.h>
#include <intrin.h>
#endif

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
  f.avx512vnni = __builtin_cpu_supports("avx512vnni");
  // F16C is not among __builtin_cpu_supports' names in every GCC: CPUID leaf 1, ECX bit 29.
  unsigned a = 1, b = 0, c = 0, d = 0;
  __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
  f.f16c = (c >> 29) & 1u;
  f.f16c = f.f16c && f.avx2;  // only used together with AVX, whose OS support avx2 implies
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
  // MSVC: CPUID by hand, and XGETBV for the OS's support of the AVX and AVX-512 register state.
  int r[4];
  __cpuid(r, 0);
  const int max_leaf = r[0];
  __cpuid(r, 1);
  const unsigned ecx1 = static_cast<unsigned>(r[2]);
  const bool osxsave = (ecx1 >> 27) & 1u;
  const unsigned long long xcr0 = osxsave ? _xgetbv(0) : 0;
  const bool os_avx = (xcr0 & 0x6) == 0x6;       // XMM and YMM state
  const bool os_avx512 = (xcr0 & 0xE6) == 0xE6;  // and opmask, ZMM state
  unsigned ebx7 = 0, ecx7 = 0, eax7_1 = 0;
  if (max_leaf >= 7) {
    __cpuidex(r, 7, 0);
    ebx7 = static_cast<unsigned>(r[1]);
    ecx7 = static_cast<unsigned>(r[2]);
    __cpuidex(r, 7, 1);
    eax7_1 = static_cast<unsigned>(r[0]);
  }
  auto bit = [](unsigned word, int n) { return ((word >> n) & 1u) != 0; };
  f.sse42 = bit(ecx1, 20);
  f.fma = os_avx && bit(ecx1, 12);
  f.f16c = os_avx && bit(ecx1, 29);
  f.avx2 = os_avx && bit(ebx7, 5);
  f.avx512f = os_avx512 && bit(ebx7, 16);
  f.avx512dq = os_avx512 && bit(ebx7, 17);
  f.avx512bw = os_avx512 && bit(ebx7, 30);
  f.avx512vl = os_avx512 && bit(ebx7, 31);
  f.avx512bf16 = os_avx512 && bit(eax7_1, 5);
  f.avx512vnni = os_avx512 && bit(ecx7, 11);
#endif
  return f;
}

}  // namespace sdpa
