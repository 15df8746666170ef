// The CPU walk for any other architecture: portable C++ only.
#define FASTSGD_ISA_NS isa_generic
#define KERNEL_SET_FN kernels_generic
#define KERNEL_SET_NAME "generic"
#if !defined(__x86_64__) && !defined(_M_X64) && !defined(__aarch64__)
#include "cpu/walk.inc"
#endif
