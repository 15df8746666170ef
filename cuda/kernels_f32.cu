// Kernels for variables of type float with slots of type float (see sgd_kernels.cuh).
#include "sgd_kernels.cuh"

namespace fastsgd {
namespace gpu {
const ComboLaunchers& launchers_f32() { return ComboKernels<float, float>::table(); }
}  // namespace gpu
}  // namespace fastsgd
