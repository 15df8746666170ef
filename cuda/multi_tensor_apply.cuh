// The multi-tensor walk: how many flat tensors are covered by few kernel launches. This file
// knows nothing about SGD (that is sgd_functor.cuh); it packs tensors into launches, tells a
// block which piece of which tensor it owns, moves lanes of elements between memory and
// registers, and reduces a block's partial sums in a fixed order.
//
// Layout of one launch (passed BY VALUE as a kernel argument, so a step needs no device
// table and no host-to-device copy; CUDA >= 12.1 on sm >= 70 accepts up to 32,764 bytes of
// kernel parameters, which a CUDA 13 build always has):
//
//   LaunchMeta.tensors[t]       up to kMaxTensors tensors, each with kSlots pointers, numel,
//                               an `aux` integer, `flags`, a 64-bit `word` and kTensorScalars
//                               doubles for the functor (per-tensor hyper-parameters: no
//                               device table needed)
//   LaunchMeta.chunk_start[t]   prefix sums of chunks: block b works on the chunk
//                               b - chunk_start[t] of the tensor t with
//                               chunk_start[t] <= b < chunk_start[t + 1]
//
// A chunk is kChunk consecutive elements of one tensor; the last chunk of a tensor may be
// shorter. One block per chunk, kBlockThreads threads, each thread handles kILP consecutive
// elements per iteration (one vector load per buffer when every pointer of the tensor is
// aligned to kILP elements, guarded scalar loads otherwise and in the tail).
//
// Chunk boundaries depend only on tensor sizes, so a per-chunk partial sum is the same
// whatever the grid, the device or the launch split: reductions built on it are deterministic.
//
// Everything marked FASTSGD_HD also compiles for the host, where tests/gpu runs the very
// same block functions thread by thread to check them against the CPU engine.
#pragma once

#include <cstdint>

#include "fastsgd/config.h"
#include "fastsgd/dtype.h"

namespace fastsgd {
namespace gpu {

constexpr int kBlockThreads = 512;
constexpr int kILP = 4;
constexpr int kChunk = 16384;  // 8 block-iterations of kBlockThreads * kILP elements
constexpr int kMaxTensors = 128;
constexpr int kSlots = 6;
constexpr int kTensorScalars = 6;
constexpr int32_t kMaxChunksPerLaunch = 1 << 30;

// `#pragma unroll` for nvcc; host compilers unroll the kILP loops on their own.
#if defined(__CUDACC__)
#define FASTSGD_UNROLL _Pragma("unroll")
#else
#define FASTSGD_UNROLL
#endif

static_assert(kChunk % (kBlockThreads * kILP) == 0, "a chunk is whole block-iterations");
static_assert((kBlockThreads & (kBlockThreads - 1)) == 0, "the reduction tree needs a power of two");

// Bit 0 of TensorMeta::flags is the walk's; functors own the others.
constexpr uint32_t kAligned = 1u;

struct TensorMeta {
  void* ptr[kSlots];  // functor-defined roles (see sgd_functor.cuh); null when unused
  int64_t numel;
  int32_t aux;        // functor-defined index (e.g. a row of a device table), -1 for none
  uint32_t flags;     // kAligned | functor bits
  uint64_t word;      // functor-defined (e.g. the key of a random stream)
  double scalars[kTensorScalars];  // functor-defined per-tensor values
};

struct LaunchMeta {
  int32_t count;         // tensors in this launch
  int32_t pad_;
  int64_t partial_base;  // index of this launch's first chunk in a step-wide per-chunk table
  int32_t chunk_start[kMaxTensors + 1];
  TensorMeta tensors[kMaxTensors];
};

// Two sums reduced side by side (e.g. a sum of squares and a non-finite probe); the element
// type of reduction tables shared by device and host code.
struct Pair {
  double a, b;
};

// The largest kernel adds a pointer and a StepScalars (< 256 bytes) to the LaunchMeta.
static_assert(sizeof(LaunchMeta) + 256 <= 32764, "kernel parameters are limited to 32,764 bytes");

// Functions are compiled by nvcc (device and host passes) and by the host compiler for the
// tests: like math.h, they live in the per-compiler inline namespace (see config.h).
inline namespace FASTSGD_ISA_NS {

// ---- device/host: which piece of which tensor a block owns ----------------------------------

struct ChunkRef {
  int tensor;     // index into LaunchMeta::tensors
  int64_t begin;  // first element of the chunk within the tensor
  int n;          // elements in the chunk (<= kChunk)
};

FASTSGD_HD ChunkRef locate_chunk(const LaunchMeta& meta, int64_t block) {
  // Largest t with chunk_start[t] <= block (binary search over the launch's prefix sums).
  int lo = 0, hi = meta.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (meta.chunk_start[mid] <= block) lo = mid; else hi = mid - 1;
  }
  ChunkRef c;
  c.tensor = lo;
  c.begin = (block - meta.chunk_start[lo]) * int64_t(kChunk);
  const int64_t left = meta.tensors[lo].numel - c.begin;
  c.n = int(left < kChunk ? left : kChunk);
  return c;
}

// ---- device/host: lanes between memory and registers --------------------------------------

template <class T>
struct alignas(sizeof(T) * kILP) Pack {
  T v[kILP];
};

// dst[j] = src[j] for j < lanes, converted to C; `vector` asks for one aligned load of kILP.
template <class C, class T>
FASTSGD_HD void load_lanes(C (&dst)[kILP], const T* src, bool vector, int lanes) {
  if (vector) {
    const Pack<T> p = *reinterpret_cast<const Pack<T>*>(src);
    FASTSGD_UNROLL
    for (int j = 0; j < kILP; ++j) dst[j] = load<C>(p.v[j]);
  } else {
    FASTSGD_UNROLL
    for (int j = 0; j < kILP; ++j) dst[j] = j < lanes ? load<C>(src[j]) : C(0);
  }
}

template <class C, class T>
FASTSGD_HD void store_lanes(T* dst, const C (&src)[kILP], bool vector, int lanes) {
  if (vector) {
    Pack<T> p;
    FASTSGD_UNROLL
    for (int j = 0; j < kILP; ++j) store(p.v[j], src[j]);
    *reinterpret_cast<Pack<T>*>(dst) = p;
  } else {
    FASTSGD_UNROLL
    for (int j = 0; j < kILP; ++j)
      if (j < lanes) store(dst[j], src[j]);
  }
}

// As load_lanes and store_lanes, without conversion: storage words the functor reads itself.
template <class T>
FASTSGD_HD void load_raw_lanes(T (&dst)[kILP], const T* src, bool vector, int lanes) {
  if (vector) {
    const Pack<T> p = *reinterpret_cast<const Pack<T>*>(src);
    FASTSGD_UNROLL
    for (int j = 0; j < kILP; ++j) dst[j] = p.v[j];
  } else {
    FASTSGD_UNROLL
    for (int j = 0; j < kILP; ++j) dst[j] = j < lanes ? src[j] : T{};
  }
}

template <class T>
FASTSGD_HD void store_raw_lanes(T* dst, const T (&src)[kILP], bool vector, int lanes) {
  if (vector) {
    Pack<T> p;
    FASTSGD_UNROLL
    for (int j = 0; j < kILP; ++j) p.v[j] = src[j];
    *reinterpret_cast<Pack<T>*>(dst) = p;
  } else {
    FASTSGD_UNROLL
    for (int j = 0; j < kILP; ++j)
      if (j < lanes) dst[j] = src[j];
  }
}

// ---- device/host: fixed-order block reduction ---------------------------------------------
//
// Reductions carry two independent sums side by side (Pair). Every thread puts its partial
// into buf[tid]; then, for width = kBlockThreads/2 .. 1, the threads below `width` add the
// value `width` above them (a barrier between levels). The host replays the levels in the
// same order (block_reduce_host), so both give identical bits.

FASTSGD_HD void reduce_level(Pair* buf, int tid, int width) {
  if (tid < width) {
    buf[tid].a += buf[tid + width].a;
    buf[tid].b += buf[tid + width].b;
  }
}

// This thread's share of x[0, n): x[tid] + x[tid + kBlockThreads] + ..., in index order.
FASTSGD_HD Pair strided_sum(const Pair* x, int64_t n, int tid) {
  Pair s{0.0, 0.0};
  for (int64_t i = tid; i < n; i += kBlockThreads) {
    s.a += x[i].a;
    s.b += x[i].b;
  }
  return s;
}

inline Pair block_reduce_host(Pair* buf) {
  for (int width = kBlockThreads / 2; width > 0; width >>= 1)
    for (int tid = 0; tid < width; ++tid) reduce_level(buf, tid, width);
  return buf[0];
}

#if defined(__CUDACC__)
// buf[0] = sum of buf[0, kBlockThreads); every thread of the block must call it.
__device__ __forceinline__ Pair block_reduce(Pair* buf, Pair mine) {
  const int tid = int(threadIdx.x);
  buf[tid] = mine;
  __syncthreads();
  FASTSGD_UNROLL
  for (int width = kBlockThreads / 2; width > 0; width >>= 1) {
    reduce_level(buf, tid, width);
    __syncthreads();
  }
  return buf[0];
}

// The one generic kernel: block b runs Functor::block on its chunk (apex's
// multi_tensor_apply_kernel, with the chunk table replaced by chunk_start).
template <class Functor, class... Args>
__global__ void __launch_bounds__(kBlockThreads)
    multi_tensor_kernel(const __grid_constant__ LaunchMeta meta, Args... args) {
  Functor::block(meta, int64_t(blockIdx.x), int(threadIdx.x), args...);
}

// Per-chunk partial sums: partials[meta.partial_base + b] = sum over threads of
// Functor::thread_sum(meta, b, tid, args...), reduced in the fixed tree order.
template <class Functor, class... Args>
__global__ void __launch_bounds__(kBlockThreads)
    multi_tensor_reduce_kernel(const __grid_constant__ LaunchMeta meta, Pair* __restrict__ partials,
                               Args... args) {
  __shared__ Pair buf[kBlockThreads];
  const Pair sum =
      block_reduce(buf, Functor::thread_sum(meta, int64_t(blockIdx.x), int(threadIdx.x), args...));
  if (threadIdx.x == 0) partials[meta.partial_base + blockIdx.x] = sum;
}
#endif  // __CUDACC__

}  // namespace FASTSGD_ISA_NS

// ---- host: packing tensors into launches ----------------------------------------------------
//
// Launch storage belongs to the caller and is reused step after step (no allocation here).

inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

inline void launch_reset(LaunchMeta& meta) {
  meta.count = 0;
  meta.pad_ = 0;
  meta.partial_base = 0;
  meta.chunk_start[0] = 0;
}

inline int32_t launch_chunks(const LaunchMeta& meta) { return meta.chunk_start[meta.count]; }

// Whether a tensor of `numel` elements still fits into the launch.
inline bool launch_fits(const LaunchMeta& meta, int64_t numel) {
  return meta.count < kMaxTensors && int64_t(launch_chunks(meta)) + chunks_of(numel) <= kMaxChunksPerLaunch;
}

// Appends a tensor (numel > 0). elem_size[s] is the element size of ptr[s]; kAligned is set
// when every non-null pointer is aligned to kILP of its elements.
inline void launch_add(LaunchMeta& meta, void* const (&ptr)[kSlots], const int (&elem_size)[kSlots],
                       int64_t numel, int32_t aux, uint32_t flags, uint64_t word,
                       const double (&scalars)[kTensorScalars]) {
  TensorMeta& t = meta.tensors[meta.count];
  t.word = word;
  for (int k = 0; k < kTensorScalars; ++k) t.scalars[k] = scalars[k];
  bool aligned = true;
  for (int s = 0; s < kSlots; ++s) {
    t.ptr[s] = ptr[s];
    if (ptr[s] && reinterpret_cast<uintptr_t>(ptr[s]) % uintptr_t(kILP * elem_size[s]) != 0) aligned = false;
  }
  t.numel = numel;
  t.aux = aux;
  t.flags = flags | (aligned ? kAligned : 0u);
  meta.chunk_start[meta.count + 1] = int32_t(meta.chunk_start[meta.count] + chunks_of(numel));
  ++meta.count;
}

}  // namespace gpu
}  // namespace fastsgd
