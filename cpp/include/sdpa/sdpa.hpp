// sdpa public C++ API: the driver. It selects a kernel variant, resolves a call's defaults, plans
// its work and runs it on the process-wide thread pool. Built with baseline instructions only;
// the kernels (cpp/include/sdpa/kernel.hpp) are compiled once per ISA.
#pragma once

#include <cstdint>

#include "sdpa/kernel.hpp"

namespace sdpa {

// ---- Kernel variants -------------------------------------------------------------------------

// Selects the kernel variant used by run() (the Python layer picks it after CPU detection).
// Throws std::invalid_argument for a table built against another kAbiVersion.
void set_kernel(const KernelTable* table);
const KernelTable* active_kernel();

// What the running CPU (and the OS, which must save the wider registers) supports, read with
// the CPUID instruction (so emulators such as qemu report the CPU they emulate).
struct CpuFeatures {
  bool sse42 = false, avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512dq = false, avx512vl = false, avx512bf16 = false;
  bool avx512vnni = false;
};
CpuFeatures cpu_features();

// ---- Threads ---------------------------------------------------------------------------------

// How many threads run() uses, the caller included (one long-lived pool, created on first use).
void set_num_threads(int n);
int get_num_threads();

// ---- Calls -----------------------------------------------------------------------------------

// The scale applied to q.k when the call gives none: 1 / sqrt(E), and 1 when E == 0.
double default_scale(int64_t E);

// Splits the problem into work items and chooses every tile and block size; depends on the shape
// only, never on the thread count.
Plan make_plan(const Problem& p);

// A caller's way to stop a long call: run() asks pending(ctx), on the calling thread only and
// about every kInterruptPoll, whether to stop (e.g. a signal arrived).
struct Interrupt {
  bool (*pending)(void* ctx) = nullptr;
  void* ctx = nullptr;
};

// Computes one attention call, first resolving its defaults in `p` (scale NaN: the default).
// Returns false if `interrupt` stopped it (the outputs then hold partial results). Throws
// std::invalid_argument on a Problem whose sizes are inconsistent; it trusts the values of its
// operands (lengths, starts, offsets, and that outputs do not alias inputs), which the Python
// layer checks. A call made from within an interrupt's poll (a signal handler) runs inline.
bool run(Problem& p, const Interrupt* interrupt = nullptr);

// The inner path the first row tile of `p` takes (for tests and diagnostics).
Path path_of(const Problem& p);

// Overrides the row-tile and key-block sizes (0 restores the defaults). For tests and benchmarks
// only: results stay correct for any positive sizes but are bitwise reproducible only for equal
// ones.
void set_tiles(int64_t row_tile, int64_t key_block);

}  // namespace sdpa
