// Kernels for variables of type half_t with slots of type half_t (see sgd_kernels.cuh).
#include "sgd_kernels.cuh"

namespace fastsgd {
namespace gpu {
const ComboLaunchers& launchers_f16_f16() { return ComboKernels<half_t, half_t>::table(); }
}  // namespace gpu
}  // namespace fastsgd
