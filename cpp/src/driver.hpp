// The driver: plans the work of one call, owns scratch, runs the active kernel on the pool.
#pragma once

#include "sdpa/sdpa.hpp"

namespace sdpa {

// Selects the kernel variant used by run() (the Python layer picks it after CPU detection).
void set_kernel(const KernelTable* table);
const KernelTable* active_kernel();

// Overrides the row-tile and key-block sizes (0 restores the defaults). For benchmarks only:
// results stay correct for any positive sizes but are bitwise reproducible only for equal ones.
void set_tiles(int64_t row_tile, int64_t key_block);

// Splits the problem into work items; depends on the shape only, never on the thread count.
Plan make_plan(const Problem& p);

// Computes one attention call. Throws std::invalid_argument on an inconsistent Problem.
void run(const Problem& p);

}  // namespace sdpa
