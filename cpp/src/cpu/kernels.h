// The CPU kernel table one ISA level provides. walk.inc is compiled once per level (each in
// its own namespace and with its own -march flags); dispatch.cpp picks one table at run time.
#pragma once

#include <cstdint>

#include "plan.h"

namespace fastsgd {
namespace cpu {

// Runs one pass over elements [begin, end) of a task.
using PassFn = void (*)(const detail::PassTask& task, const StepScalars& scalars, int64_t begin,
                        int64_t end);
// Sum of squares of the effective gradient over [begin, end), in a fixed summation order
// that does not depend on the ISA level, and whether any element was Inf or NaN.
struct BlockSum {
  double sum_squares = 0.0;
  bool nonfinite = false;
};
using SumSquaresFn = BlockSum (*)(const detail::PassTask& task, const StepScalars& scalars,
                                  int64_t begin, int64_t end);

struct KernelSet {
  const char* name;
  PassFn (*select_pass)(const detail::PassTask& task, const detail::PassFeatures& features);
  SumSquaresFn (*select_sum_squares)(const detail::PassTask& task, bool merge_window);
};

#if defined(__x86_64__) || defined(_M_X64)
const KernelSet& kernels_x86_64();
const KernelSet& kernels_x86_64_v3();
const KernelSet& kernels_x86_64_v4();
#elif defined(__aarch64__)
const KernelSet& kernels_neon();
#else
const KernelSet& kernels_generic();
#endif

}  // namespace cpu
}  // namespace fastsgd
