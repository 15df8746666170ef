// Compiler glue shared by every fastsgd translation unit: host/device markers and the
// per-ISA namespace that keeps code built with different -march flags from being merged
// by the linker (an AVX-512 copy of an inline function chosen for a baseline caller would
// crash older CPUs with SIGILL).
#pragma once

#if defined(__CUDACC__)
#define FASTSGD_HD __host__ __device__ __forceinline__
#else
#define FASTSGD_HD inline
#endif

// Each CPU walk translation unit defines FASTSGD_ISA_NS before including fastsgd headers;
// everything else (the engine, embedders, CUDA) gets the generic namespace.
#ifndef FASTSGD_ISA_NS
#if defined(__CUDACC__)
#define FASTSGD_ISA_NS cuda_device
#else
#define FASTSGD_ISA_NS generic
#endif
#endif

// FASTSGD_VERSION_MAJOR/MINOR/PATCH come from CMakeLists.txt's project(VERSION), through the
// header CMake generates and installs next to this one. A compile that only has the source tree
// on its include path (no CMake) sees 0.0.0 rather than a number that could go stale.
#if __has_include(<fastsgd/version.h>)
#include <fastsgd/version.h>
#else
#define FASTSGD_VERSION_MAJOR 0
#define FASTSGD_VERSION_MINOR 0
#define FASTSGD_VERSION_PATCH 0
#endif
