// The driver: plans the work of one call, owns scratch, runs the active kernel on the pool.
#pragma once

#include "sdpa/sdpa.hpp"

namespace sdpa {

// Selects the kernel variant used by run() (the Python layer picks it after CPU detection).
void set_kernel(const KernelTable* table);
const KernelTable* active_kernel();

// Splits the problem into work items; depends on the shape only, never on the thread count.
Plan make_plan(const Problem& p);

// Computes one attention call. Throws std::invalid_argument on an inconsistent Problem.
void run(const Problem& p);

}  // namespace sdpa
