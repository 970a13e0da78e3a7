// What the running CPU (and the OS, which must save the wider registers) supports.
#pragma once

namespace sdpa {

struct CpuFeatures {
  bool sse42 = false, avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512dq = false, avx512vl = false, avx512bf16 = false;
};

// Read with the CPUID instruction (so emulators such as qemu report the CPU they emulate).
CpuFeatures cpu_features();

}  // namespace sdpa
