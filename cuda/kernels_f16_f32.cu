// Kernels for variables of type half_t with slots of type float (see sgd_kernels.cuh).
#include "sgd_kernels.cuh"

namespace fastsgd {
namespace gpu {
const ComboLaunchers& launchers_f16_f32() { return ComboKernels<half_t, float>::table(); }
}  // namespace gpu
}  // namespace fastsgd
