// The kernels of one storage combination (W, S): every pass variant and both sum-of-squares
// variants. Included by exactly one kernels_<combo>.cu per combination.
#pragma once

#include <cuda_runtime.h>

#include "cuda_kernels.h"
#include "multi_tensor_apply.cuh"
#include "sgd_functor.cuh"

namespace fastsgd {
namespace gpu {
inline namespace FASTSGD_ISA_NS {

template <class W, class S>
struct ComboKernels {
  static void pass(const PassVariant& v, const LaunchMeta& meta, const StepScalars& s, const double* clip,
                   cudaStream_t stream) {
    const unsigned blocks = unsigned(launch_chunks(meta));
    visit_pass<W, S>(v, [&](auto tag) {
      using F = typename decltype(tag)::type;
      multi_tensor_kernel<F, StepScalars, const double*><<<blocks, kBlockThreads, 0, stream>>>(meta, s, clip);
    });
  }

  static void sum_squares(bool merge, const LaunchMeta& meta, const StepScalars& s, Pair* partials,
                          cudaStream_t stream) {
    const unsigned blocks = unsigned(launch_chunks(meta));
    visit_sum_squares<W, S>(merge, [&](auto tag) {
      using F = typename decltype(tag)::type;
      multi_tensor_reduce_kernel<F, StepScalars><<<blocks, kBlockThreads, 0, stream>>>(meta, partials, s);
    });
  }

  static const ComboLaunchers& table() {
    static const ComboLaunchers t{&pass, &sum_squares};
    return t;
  }
};

}  // namespace FASTSGD_ISA_NS
}  // namespace gpu
}  // namespace fastsgd
