// Kernels for variables of type bfloat16_t with slots of type bfloat16_t (see sgd_kernels.cuh).
#include "sgd_kernels.cuh"

namespace fastsgd {
namespace gpu {
const ComboLaunchers& launchers_bf16_bf16() { return ComboKernels<bfloat16_t, bfloat16_t>::table(); }
}  // namespace gpu
}  // namespace fastsgd
