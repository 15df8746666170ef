// The CPU walk built for ISA level x86-64 (compile flags set in CMakeLists.txt).
#define FASTSGD_ISA_NS isa_x86_64
#define KERNEL_SET_FN kernels_x86_64
#define KERNEL_SET_NAME "x86-64"
#define FASTSGD_WALK_LEAN 1
#if defined(__x86_64__) || defined(_M_X64)
#include "cpu/walk.inc"
#endif
