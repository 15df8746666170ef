// Kernels for variables of type bfloat16_t with slots of type float (see sgd_kernels.cuh).
#include "sgd_kernels.cuh"

namespace fastsgd {
namespace gpu {
const ComboLaunchers& launchers_bf16_f32() { return ComboKernels<bfloat16_t, float>::table(); }
}  // namespace gpu
}  // namespace fastsgd
