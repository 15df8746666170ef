// The CPU walk for aarch64, where NEON (ASIMD) is the baseline.
#define FASTSGD_ISA_NS isa_neon
#define KERNEL_SET_FN kernels_neon
#define KERNEL_SET_NAME "neon"
#if defined(__aarch64__)
#include "cpu/walk.inc"
#endif
