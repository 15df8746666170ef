// Kernels for variables of type double with slots of type double (see sgd_kernels.cuh).
#include "sgd_kernels.cuh"

namespace fastsgd {
namespace gpu {
const ComboLaunchers& launchers_f64() { return ComboKernels<double, double>::table(); }
}  // namespace gpu
}  // namespace fastsgd
